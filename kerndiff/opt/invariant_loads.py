"""Field elements an inner loop reads at a fixed index are read once, before it.

A pair loop's reverse reads `pos[i][0]` (and, for a Hessian-vector product, `pos_dual[i][0]`)
once per pair. The loop stores into other fields (private copies, adjoints), and Taichi's
generated code cannot tell those stores from `pos`, so it loads again on every trip. So a load
from a field that nothing in the kernel writes, at an index made of locals the loop does not
assign, becomes a local set just before the loop (`pos_i_0 = pos[i][0]`): 9% of W3's reverse
and of its HVP.

Primal kernels too (session 41). A pair loop over scalar fields (`(qx[i] - qx[j]) ** 2 + ...`)
stores nothing in its inner loop, yet Taichi's code loaded `qx[i]` on every trip there as well,
and LLVM then left the loop unvectorized: at N = 4096 in f32 the primal took 21.5 ms where its own
forward kernel, which read them once, took 5-7 ms (hoisted, the primal takes 3.6, its energy the
same to the bit, as Taichi's kernel's and the forward kernel's). Except where the inner loop adds
into a field (`E[None] += ...` per pair): there the hoisted reads let Taichi and LLVM sum
differently, and W3's half-pair spelling in f32 (8.4e6 terms into one f32) summed to 1614384
against Taichi's 1596263 (f64: 1615046), while its forward kernel, written differently, still
gave Taichi's sum. A primal's sums keep the primal's rounding (the forward kernel's primal
outputs are the primal's), so in primal kernels such loops keep their reads.

The load then runs where the loop body may not have (a trip count of zero, a branch such as
`if i != j:` around the read), so the index must be in the field's range wherever the hoisted
read runs: each index is a constant in range or the variable of an enclosing loop whose
constant bounds lie within the field's. Anything else stays where it is.
"""
from __future__ import annotations

import dataclasses

from ..ir import nodes as N
from ..ir.walk import (assigned_names, blocks_of, expr_children_of_stmt, iter_expr, iter_stmts, map_expr,
                       map_stmt_exprs, rebuild_stmt)


def hoist_invariant_loads(loop: N.For, written: set, names, keep_field_sums=False) -> N.For:
    """loop (a kernel's parallel loop) with the loads its inner loops repeat read before them.
    written: ids of the fields the kernel writes. keep_field_sums (primal kernels): an inner loop
    that adds into a field keeps its loads, and so its sum's rounding (see the module docstring)."""
    # a loop variable also assigned as a local somewhere does not keep its loop's range
    reassigned = {s.name for s in iter_stmts(loop.body) if isinstance(s, N.Assign)}
    outer = _constant_bounds(loop, {}, reassigned)
    return dataclasses.replace(loop, body=tuple(_block(loop.body, outer, written, names, reassigned, {},
                                                       keep_field_sums)))


def _constant_bounds(loop, env, reassigned):
    env = dict(env)
    for v, (lo, hi) in zip(loop.vars, loop.bounds):
        if isinstance(lo, N.Const) and isinstance(hi, N.Const) and v not in reassigned:
            env[v] = (lo.value, hi.value)
        else:
            env.pop(v, None)
    return env


def _block(stmts, env, written, names, reassigned, held, keep_field_sums):
    """held: load -> the local an earlier statement of this block, or of a block around it, read
    it into (still valid: the field is never written, its index variables never reassigned), so
    two inner loops in a row read `r[i]` once."""
    held = dict(held)
    out = []
    for s in stmts:
        if isinstance(s, N.For) and not s.parallel and keep_field_sums and \
                any(isinstance(t, N.Atomic) for t in iter_stmts(s.body)):
            out.append(s)
            continue
        if isinstance(s, N.For) and not s.parallel:
            for load in _invariant_loads(s, env, written):
                if load not in held:
                    held[load] = N.Var(load.dtype, names.fresh(_name(load)))
                    out.append(N.Assign(held[load].name, load, src=s.src, tag="hoist"))
            s = rebuild_stmt(s, [tuple(_block(s.body, _constant_bounds(s, env, reassigned), written, names,
                                              reassigned, held, keep_field_sums))])
        elif blocks_of(s):
            s = rebuild_stmt(s, [tuple(_block(b, env, written, names, reassigned, held, keep_field_sums))
                                 for b in blocks_of(s)])
        if held:
            s = map_stmt_exprs(s, lambda e: map_expr(e, lambda x: held.get(x, x)))
        out.append(s)
    return out


def _invariant_loads(loop, env, written):
    """The distinct loads in loop's body (nested blocks included, loop bounds and while
    conditions too) that every trip reads from the same element, in order of appearance."""
    changing = assigned_names(loop.body) | set(loop.vars)
    found = []
    for s in iter_stmts(loop.body):
        for e in expr_children_of_stmt(s):
            for x in iter_expr(e):
                if isinstance(x, N.Load) and x.index and x not in found and _fixed(x, changing, env, written):
                    found.append(x)
    return found


def _fixed(load, changing, env, written):
    if id(load.ref.field) in written:
        return False
    for e, (first, end) in zip(load.index, load.ref.bounds()):
        if isinstance(e, N.Const):
            if not first <= e.value < end:
                return False
        elif isinstance(e, N.Var) and e.name not in changing and e.name in env:
            lo, hi = env[e.name]
            if lo < first or hi > end:
                return False
        else:
            return False
    return True


def _name(load):
    """`pos_i_0` for pos[i][0], `x_m2` for x[-2]."""
    parts = [load.ref.name] + [e.name if isinstance(e, N.Var) else str(e.value).replace("-", "m")
                               for e in load.index]
    return "_".join(parts + [str(c) for c in load.ref.component])
