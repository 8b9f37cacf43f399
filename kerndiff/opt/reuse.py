"""A value a local already holds is read from it: after `t7 = t5_inv * t5_inv`, a later
`t5_inv * t5_inv * (t5_inv * t5_inv) * t5_inv` (a fifth power, as opt.algebra writes it by
squaring) reads `t7 * t7 * t5_inv`. Exact: the same operations on the same values, while neither
the local nor what its value reads has been assigned since. A last rewrite (finalize), where CSE
has already run and the rewrites after it write such repeats again. Not in a while condition
that the loop's body changes what it reads: the condition is evaluated after every trip."""
from __future__ import annotations

from ..ir import nodes as N
from ..ir.types import is_float
from ..ir.walk import assigned_names, blocks_of, loads_in, map_expr, map_stmt_exprs, rebuild_stmt, vars_in


def reuse_held_values(body):
    return tuple(_block(body, {}))


def _block(stmts, held):
    out = []
    for s in stmts:
        if held:
            # a while condition is evaluated again after every trip of the body
            now = _surviving(held, assigned_names((s,))) if isinstance(s, N.While) else held
            s = map_stmt_exprs(s, lambda e: map_expr(e, lambda x: now.get(x, x)))
        blocks = blocks_of(s)
        if blocks:
            s = rebuild_stmt(s, [tuple(_block(b, _surviving(held, assigned_names(b)))) for b in blocks])
        written = {s.name} if isinstance(s, N.Assign) else assigned_names((s,))
        held = _surviving(held, written)
        if isinstance(s, N.Assign) and _holdable(s):
            held[s.value] = N.Var(s.value.dtype, s.name)
        out.append(s)
    return out


def _holdable(s):
    """A float computation of locals and constants (a field may change under it) that does not
    read the local it is assigned to."""
    return isinstance(s.value, N.Call) and is_float(s.value.dtype) and not loads_in(s.value) \
        and all(v.name != s.name for v in vars_in(s.value))


def _surviving(held, written):
    if not written:
        return dict(held)
    return {e: v for e, v in held.items()
            if v.name not in written and not any(x.name in written for x in vars_in(e))}
