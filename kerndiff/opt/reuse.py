"""A value a local already holds is read from it: after `t7 = t5_inv * t5_inv`, a later
`t5_inv * t5_inv * (t5_inv * t5_inv) * t5_inv` (a fifth power, as opt.algebra writes it by
squaring) reads `t7 * t7 * t5_inv`. Exact: the same operations on the same values, while neither
the local nor what its value reads (locals, and fields: a store or atomic into a field ends what
was held of it) has been written since. A last rewrite (finalize), where CSE has already run and
the rewrites after it write such repeats again; so do the two passes of a reversed loop body,
once opt.fuse_ifs has put their branches in one `if`: `t5 = x[i] - x[j]` from the recomputation
is read again by the adjoint's `t14 = (x[i] - x[j]) * 2.0`, which CSE (per block) saw apart."""
from __future__ import annotations

from ..ir import nodes as N
from ..ir.types import is_float
from ..ir.walk import blocks_of, loads_in, map_expr, map_stmt_exprs, rebuild_stmt, vars_in, writes_in, writes_of


def reuse_held_values(body):
    return tuple(_block(body, {}))


def _block(stmts, held):
    out = []
    for s in stmts:
        if held:
            # a while condition is evaluated again after every trip of the body
            now = _surviving(held, *writes_of(s)) if isinstance(s, N.While) else held
            s = map_stmt_exprs(s, lambda e: map_expr(e, lambda x: now.get(x, x)))
        blocks = blocks_of(s)
        if blocks:
            # a loop's body may run again after its own writes: what it writes anywhere ends
            # what was held before it, from its first statement on
            s = rebuild_stmt(s, [tuple(_block(b, _surviving(held, *writes_in(b)))) for b in blocks])
        written = ({s.name}, set()) if isinstance(s, N.Assign) else writes_of(s)
        held = _surviving(held, *written)
        if isinstance(s, N.Assign) and _holdable(s):
            held[s.value] = N.Var(s.value.dtype, s.name)
        out.append(s)
    return out


def _holdable(s):
    """A float computation (not a bare load) that does not read the local it is assigned to."""
    return isinstance(s.value, N.Call) and is_float(s.value.dtype) \
        and all(v.name != s.name for v in vars_in(s.value))


def _surviving(held, names, fields):
    if not names and not fields:
        return dict(held)
    return {e: v for e, v in held.items()
            if v.name not in names and not any(x.name in names for x in vars_in(e))
            and not any(id(x.ref.field) in fields for x in loads_in(e))}
