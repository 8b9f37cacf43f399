"""A value a local already holds is read from it: after `t7 = t5_inv * t5_inv`, a later
`t5_inv * t5_inv * (t5_inv * t5_inv) * t5_inv` (a fifth power, as opt.algebra writes it by
squaring) reads `t7 * t7 * t5_inv`. Exact: the same operations on the same values, while neither
the local nor what its value reads has been assigned since. A last rewrite (finalize), where CSE
has already run and the rewrites after it write such repeats again. Not in a while condition
that the loop's body changes what it reads: the condition is evaluated after every trip.

A local that gets such a value only after a statement of its block already computed it moves up
to just before that statement, where nothing in between reads or assigns it or assigns what its
value reads (copies forwarded late leave `t1_dual2 = (1.0 - t2 * t2) * s_dual2` before
`t3 = 1.0 - t2 * t2`, which CSE saw as `1.0 - t1 * t1`): the statement then reads it too.
Only from the statements' own expressions, not from inside their blocks (an if's branch would
then compute it whether taken or not)."""
from __future__ import annotations

from ..ir import nodes as N
from ..ir.types import is_float
from ..ir.walk import (assigned_names, blocks_of, expr_children_of_stmt, iter_expr, loads_in, map_expr,
                       map_stmt_exprs, mentioned_names, rebuild_stmt, vars_in)


def reuse_held_values(body):
    return tuple(_block(body, {}))


def _block(stmts, held):
    out = []
    for s in _held_earlier(list(stmts)):
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


def _held_earlier(stmts):
    """stmts with each holdable assignment moved up to just before the first statement that
    computes its value in its own expressions, where nothing in between stands in the way."""
    holds = [isinstance(s, N.Assign) and _holdable(s) for s in stmts]
    wanted = {s.value for s, held in zip(stmts[1:], holds[1:]) if held}
    if not wanted:
        return stmts
    first = _first_computed(stmts, wanted)
    for j in range(1, len(stmts)):
        s = stmts[j]
        if not holds[j] or first.get(s.value, j) >= j:
            continue
        i = first[s.value]
        if isinstance(stmts[i], N.Assign) and stmts[i].value == s.value:
            continue  # a local holds it already: s reads that one (and keeps its name, `t4_inv`)
        between = stmts[i:j]
        reads = {v.name for v in vars_in(s.value)} | {s.name}
        if not (assigned_names(between) & reads) and not any(s.name in mentioned_names(x) for x in between):
            stmts[i:j + 1] = [s] + between
            holds[i:j + 1] = [True] + holds[i:j]
            first = {v: k + 1 if i <= k < j else k for v, k in first.items()}
            first[s.value] = i
    return stmts


def _first_computed(stmts, wanted):
    """value in wanted -> the index of the first statement that computes it in its own
    expressions (a while loop's condition, evaluated again after every trip, does not count).
    Only calls of an operation and arity some wanted value has are looked up (hashing an
    expression walks all of it)."""
    shapes = {(v.op, len(v.args)) for v in wanted}
    first = {}
    for k, t in enumerate(stmts):
        if not isinstance(t, N.While):
            for e in expr_children_of_stmt(t):
                for x in iter_expr(e):
                    if type(x) is N.Call and (x.op, len(x.args)) in shapes and x in wanted:
                        first.setdefault(x, k)
    return first


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
