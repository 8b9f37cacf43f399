"""Inner loops whose body runs under a comparison of the loop's index: the ranges it lets through.

A pair loop skips the pair of an element with itself:

    for j in range(n):
        if i != j:
            ...

LLVM vectorizes that loop with the test kept: a compare of the index vector with i and a select
per value the trips carry (six accumulators in W3's HVP, three in its reverse), which costs more
than the sums themselves. Written as the trips the test lets through, nothing is tested:

    # for j in range(n): if i != j:, the trips with j < i
    for j in range(i):
        ...
    # for j in range(n): if i != j:, the trips with j > i
    for j in range(i + 1, n):
        ...

W3 (f32, N = 4096, by hand, session 56): the HVP's two gathering loops 37.9 ms -> 21.8, the
reverse's 17.1 -> 12.7. The trips run in the order they did, so every sum rounds as it did: the
rewrite is exact, and taken in primal kernels too. `j < c`, `j <= c`, `j > c` and `j >= c` (either
side) cut the range once; `j != c` splits it in two. The bounds are clamped to the loop's range
(`ti.min(i, n)`) unless what is known of c's range (the loops around it) shows they need not be.

When: a serial loop over one index (of at least MIN_TRIPS trips where its bounds are constants),
whose body is assignments of locals followed by one `if` without an `else`, the condition such a
comparison with c an integer expression of locals the loop does not assign (and constants); no
`break` out of the loop, no `return`, the index not reassigned. The skipped trips did run those assignments, so what
they assign must be read neither after the loop nor by a later trip before it assigns them again.
"""
from __future__ import annotations

import dataclasses

from ..errors import SrcLoc
from ..ir import build as B
from ..ir import nodes as N
from ..ir.ops import RANDOM
from ..ir.walk import assigned_names, blocks_of, carried_names, expr_children_of_stmt, iter_expr, iter_stmts, \
    jumps_out, rebuild_stmt, vars_in
from .trip_counts import apply_op, interval

MIN_TRIPS = 64  # below this the test costs little, and the user's loop reads better as written

MIRRORED = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "ne": "ne"}
SIGNED = {"i8", "i16", "i32", "i64"}


def split_ranges(body, launch=frozenset()):
    """body with each inner loop that qualifies (module docstring) over the ranges its test lets
    through. launch: names whose values are known before the loops run (the kernel's scalar
    arguments: `for i in range(m)` runs i up to m - 1, so the clamp of `range(ti.max(i + 1, 0), m)`
    cannot bind and is dropped)."""
    return _block(tuple(body), {}, frozenset(), frozenset(launch))


def _block(stmts, ranges, live_after, launch):
    """ranges: {loop variable: (least, greatest)} of the loops around stmts, numbers or
    expressions of the launch names (opt.trip_counts.interval)."""
    read_after = [live_after] * (len(stmts) + 1)  # [k]: what the statements after the k-th read
    for k in range(len(stmts) - 1, 0, -1):
        read_after[k - 1] = read_after[k] | _read((stmts[k],))
    out = []
    for k, s in enumerate(stmts):
        later = read_after[k]
        if isinstance(s, N.For):
            inner = {v: r for v, r in ranges.items() if v not in assigned_names(s.body)}  # (none should be)
            if len(s.vars) == 1:
                inner.pop(s.vars[0], None)
                known = interval(s.bounds[0][0], ranges, launch), interval(s.bounds[0][1], ranges, launch)
                if None not in known:
                    inner[s.vars[0]] = (known[0][0], apply_op("sub", known[1][1], 1))
            body = _block(s.body, inner, later | carried_names(s.body), launch)  # (carried: read by the next trip)
            s = dataclasses.replace(s, body=body)
            out.extend(_split(s, ranges, later, launch) or (s,))
        elif blocks_of(s):
            inside = later | (carried_names(s.body) if isinstance(s, N.While) else frozenset())
            out.append(rebuild_stmt(s, [_block(b, ranges, inside, launch) for b in blocks_of(s)]))
        else:
            out.append(s)
    return tuple(out)


def _read(stmts):
    return frozenset(v.name for s in iter_stmts(stmts) for e in expr_children_of_stmt(s) for v in vars_in(e))


def _split(loop, ranges, live_after, launch):
    """The loops that replace loop, or None where it does not qualify."""
    if loop.parallel or len(loop.vars) != 1 or not loop.body or not isinstance(loop.body[-1], N.If):
        return None
    (lo, hi), j = loop.bounds[0], loop.vars[0]
    if isinstance(lo, N.Const) and isinstance(hi, N.Const) and hi.value - lo.value < MIN_TRIPS:
        return None  # (bounds known at launch alone, `range(m)`, may be large: the split costs once)
    *prefix, test = loop.body
    if test.orelse or not all(isinstance(s, N.Assign) for s in prefix):
        return None
    compared = _compared(test.cond, j)
    if compared is None:
        return None
    op, c = compared
    assigned = assigned_names(loop.body)
    if j in assigned or {v.name for v in vars_in(c)} & assigned:
        return None
    if jumps_out(loop.body, (N.Break,)) or any(isinstance(s, N.Return) for s in iter_stmts(loop.body)):
        return None
    skipped = {s.name for s in prefix}  # what the trips the test stops assign all the same
    if skipped & (live_after | carried_names(loop.body)):
        return None
    if any(isinstance(x, N.Call) and x.op in RANDOM for s in prefix for x in iter_expr(s.value)):
        return None  # (a draw's key may count trips)
    trip_body = tuple(prefix) + test.then
    where = (loop.src.file, loop.src.line) if loop.src else ("<kerndiff>", 0)
    said = " ".join(t for t in (_text(loop), _text(test)) if t)
    ranges_let_through = _bounds(op, c, lo, hi, ranges, launch)
    bound = _spelled(c)
    out = []
    for (start, end), side in zip(ranges_let_through, ("<", ">")):
        text = f"{said}, the trips with {j} {side} {bound}" if len(ranges_let_through) == 2 and bound else said
        out.append(dataclasses.replace(loop, bounds=((start, end),), body=trip_body,
                                       src=SrcLoc(*where, text=text) if said else loop.src))
    return out


def _text(s):
    return s.src.text.strip() if s.src is not None and s.src.text else ""


def _compared(cond, j):
    """(op, c) where cond compares the index j with c as `j op c`, else None."""
    if not (isinstance(cond, N.Call) and cond.op in MIRRORED and len(cond.args) == 2):
        return None
    a, b = cond.args
    if isinstance(a, N.Var) and a.name == j and j not in {v.name for v in vars_in(b)}:
        other, op = b, cond.op
    elif isinstance(b, N.Var) and b.name == j and j not in {v.name for v in vars_in(a)}:
        other, op = a, MIRRORED[cond.op]
    else:
        return None
    if other.dtype != (a if other is b else b).dtype or other.dtype not in SIGNED or \
            any(isinstance(x, N.Load) for x in iter_expr(other)):
        return None  # (an unsigned `i - 5` wraps where the bounds' arithmetic would not)
    return op, other


def _bounds(op, c, lo, hi, ranges, launch):
    """The (start, end) of each loop over [lo, hi) that the test `j op c` lets through."""
    one = B.const(1, c.dtype)

    def below(x):  # [lo, min(x, hi))
        return lo, _clamp("min", x, hi, ranges, launch)

    def above(x):  # [max(x, lo), hi)
        return _clamp("max", x, lo, ranges, launch), hi

    if op == "ne":
        return [below(c), above(B.add(c, one))]
    return [{"lt": below(c), "le": below(B.add(c, one)), "gt": above(B.add(c, one)), "ge": above(c)}[op]]


def _spelled(e):
    """c as the comment names it: a local, a constant, or one of them plus or minus a constant."""
    if isinstance(e, N.Var):
        return e.name
    if isinstance(e, N.Const):
        return str(e.value)
    if isinstance(e, N.Call) and e.op in ("add", "sub") and len(e.args) == 2:
        a, b = (_spelled(x) for x in e.args)
        if a and b:
            return f"{a} {'+' if e.op == 'add' else '-'} {b}"
    return None


def _clamp(op, x, y, ranges, launch):
    """ti.min or ti.max (op) of x and y, or the one of them it surely is."""
    a, b = interval(x, ranges, launch), interval(y, ranges, launch)
    if a is not None and b is not None:
        x_below, y_below = _at_most(a[1], b[0]), _at_most(b[1], a[0])
        if x_below or y_below:
            return x if x_below == (op == "min") else y
    return B.call(op, x, y)


def _at_most(p, q):
    """Whether p <= q surely: numbers, or one expression plus or minus constants (`m - 1` and `m`)."""
    if isinstance(p, (int, float)) and isinstance(q, (int, float)):
        return p <= q
    (base_p, k_p), (base_q, k_q) = _offset(p), _offset(q)
    return base_p is not None and base_p == base_q and k_p <= k_q


def _offset(e):
    """(x, k) with e == x + k for an integer constant k; (None, e) for a number."""
    if isinstance(e, (int, float)):
        return None, e
    if isinstance(e, N.Call) and e.op in ("add", "sub") and isinstance(e.args[1], N.Const) and \
            isinstance(e.args[1].value, int):
        return e.args[0], e.args[1].value if e.op == "add" else -e.args[1].value
    return e, 0
