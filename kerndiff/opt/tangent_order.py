"""Local values before their tangents, in the order a person writes a JVP (for readability).

The forward transform puts a statement's tangent before it (ad.forward), which an update in place
needs (`v_dual = v_dual * (ti.cos(v) + 1.7)` must read the old v) and which lets opt.copies fold
a loop's carried copies (`v_2 = f(v); v = v_2` back into `v = f(v)`, its tangent likewise). Once
those passes ran, where the two touch nothing the other writes, the value goes first:

    d_0_dual = pos_dual[a][0] - pos_dual[b][0]        d_0 = pos[a][0] - pos[b][0]
    d_0 = pos[a][0] - pos[b][0]                  ->   d_0_dual = pos_dual[a][0] - pos_dual[b][0]

Only neighbours compiled from the same source statement swap (a tangent, then its value), so
each line stays under its source comment and the order of everything else is kept. Only
assignments to locals and stores into fields (`h[p, j] = t4` before `h_dual[p, j] = ...`, since
session 24): adds into fields keep the tangent's first, as the transform wrote them. Measured
(session 23, one process, 31 interleaved rounds): W2's HVP, whose adds into the private copies
of pos_adj and pos_adj_dual are its cost, ran 4% slower with the value's adds first, in the same
runs where swapping only the locals cost nothing (and W3's HVP gained 2-3%).

Second derivatives: a run of such statements from one source statement in which none touches
what another writes (the four sums of `s += W[j, k] * h[p, k]` in k.forward.forward, the four
stores of `h[p, j] = ti.tanh(s)`) is put in the order value, first tangent, second tangent,
mixed tangent, each local's (each field component's) together:

    s_dual_dual2 = s_dual_dual2 + ...                 s = s + W2[j, k] * h1[p, k]
    s_dual = s_dual + ...                        ->   s_dual = s_dual + W2[j, k] * h1_dual[p, k]
    s = s + ...                                       s_dual2 = s_dual2 + W2[j, k] * h1_dual2[p, k]
    s_dual2 = s_dual2 + ...                           s_dual_dual2 = s_dual_dual2 + ...

(read from the names, which ad.names gives by level: a local's derivatives are its name with
`_dual` / `_dual2` appended, as fields' are).
"""
from __future__ import annotations

from ..ad.names import tangent_levels
from ..ir import nodes as N
from ..ir.walk import blocks_of, independent, rebuild_stmt

ORDERED = (N.Assign, N.Store)  # not adds into fields (see the module's docstring)


def values_first(stmts):
    """stmts with each run of more than two independent statements from one source statement
    that holds tangents in the order of _ranked; elsewhere each (tangent, its value) pair of
    neighbours swapped where the two are independent; a tangent moves past one statement at most."""
    stmts = [rebuild_stmt(s, [values_first(b) for b in blocks_of(s)]) if blocks_of(s) else s for s in stmts]
    out, moved, i = [], None, 0
    while i < len(stmts):
        end = _run_end(stmts, i)
        if end - i > 2:
            out.extend(_ranked(stmts[i:end]))
            moved, i = None, end
            continue
        s = stmts[i]
        if out and out[-1] is not moved and _pair(out[-1], s):
            moved = out[-1]
            out[-1:] = [s, moved]
        else:
            out.append(s)
        i += 1
    return tuple(out)


def _run_end(stmts, start):
    """The end of the run of assignments to locals and stores into fields from stmts[start]'s
    source statement that starts there, where it holds a tangent and no two of it touch what the
    other writes; else start + 1."""
    first = stmts[start]
    if not isinstance(first, ORDERED) or first.src is None:
        return start + 1
    end = start + 1
    while end < len(stmts) and isinstance(stmts[end], ORDERED) and stmts[end].src == first.src \
            and all(independent(stmts[k], stmts[end]) for k in range(start, end)):
        end += 1
    if not any(s.tag == "tangent" for s in stmts[start:end]):
        return start + 1
    return end


def _ranked(run):
    """run with each local's (field component's) statements together, in the order they first
    appear, and for each its value, then its tangents by level, then the mixed ones."""
    family, levels = zip(*(_derivative_of(s) for s in run))
    first = {}
    for k, f in enumerate(family):
        first.setdefault(f, k)
    order = sorted(range(len(run)), key=lambda k: (first[family[k]], len(levels[k]), levels[k], k))
    return [run[k] for k in order]


def _derivative_of(s):
    """(what s assigns the derivative of, the levels of the derivatives), from the name of the
    local or field s assigns (ad.names.tangent_levels): s_dual_dual2 -> ("s", (1, 2));
    h_dual[p, j] -> (("h", its component), (1,))."""
    if isinstance(s, N.Assign):
        return tangent_levels(s.name)
    base, levels = tangent_levels(s.ref.name)
    return (base, s.ref.component), levels


def _pair(tangent, value):
    return (isinstance(tangent, ORDERED) and isinstance(value, ORDERED) and tangent.tag == "tangent"
            and value.tag != "tangent" and tangent.src is not None and tangent.src == value.src
            and independent(tangent, value))
