"""Local values before their tangents, in the order a person writes a JVP (for readability).

The forward transform puts a statement's tangent before it (ad.forward), which an update in place
needs (`v_dual = v_dual * (ti.cos(v) + 1.7)` must read the old v) and which lets opt.copies fold
a loop's carried copies (`v_2 = f(v); v = v_2` back into `v = f(v)`, its tangent likewise). Once
those passes ran, where the two touch nothing the other writes, the value goes first:

    d_0_dual = pos_dual[a][0] - pos_dual[b][0]        d_0 = pos[a][0] - pos[b][0]
    d_0 = pos[a][0] - pos[b][0]                  ->   d_0_dual = pos_dual[a][0] - pos_dual[b][0]

Only neighbours compiled from the same source statement swap (a tangent, then its value), so
each line stays under its source comment and the order of everything else is kept. Only
assignments to locals: adds and stores into fields keep the tangent's first, as the transform
wrote them. Measured (session 23, one process, 31 interleaved rounds): W2's HVP, whose adds into
the private copies of pos_adj and pos_adj_dual are its cost, ran 4% slower with the value's adds
first, in the same runs where swapping only the locals cost nothing (and W3's HVP gained 2-3%).
"""
from __future__ import annotations

from ..ir import nodes as N
from ..ir.walk import blocks_of, independent, rebuild_stmt


def values_first(stmts):
    """stmts with each (tangent, its value) pair of neighbours swapped where they are independent;
    a tangent moves past one statement at most."""
    out, moved = [], None
    for s in stmts:
        blocks = blocks_of(s)
        if blocks:
            s = rebuild_stmt(s, [values_first(b) for b in blocks])
        if out and out[-1] is not moved and _pair(out[-1], s):
            moved = out[-1]
            out[-1:] = [s, moved]
        else:
            out.append(s)
    return tuple(out)


def _pair(tangent, value):
    return (isinstance(tangent, N.Assign) and isinstance(value, N.Assign) and tangent.tag == "tangent"
            and value.tag != "tangent" and tangent.src is not None and tangent.src == value.src
            and independent(tangent, value))
