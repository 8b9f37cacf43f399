"""Derivatives of atomic max/min reductions (`ti.atomic_max(y[i], v)`, `ti.atomic_min`).

The result M = max(y0, v_1, ..., v_n) depends on the winners only: the contributions equal to M
share its derivative evenly (ties split evenly, like ti.max). Parallel iterations cannot know the
winners while they run, so both modes add passes after the loop, over the same iteration space
with the primal values recomputed:
  count     C[e] = number of contributions v with v == M[e]        (a helper field like y)
  forward:  y_dual[e] = 0 where C[e] > 0, then each winner adds v_dual / C[e]
  reverse:  each winner gets y_adj[e] / C[e]; y_adj[e] = 0 where C[e] > 0
  cleanup   C[e] = 0
Where no contribution reached M (C[e] = 0) the initial value won and keeps its derivative. A tie
between the initial value and a contribution is resolved in favour of the contribution (a valid
subgradient; documented in the README).
"""
from __future__ import annotations

import dataclasses

from ..errors import KernDiffError
from ..ir import build as B
from ..ir import nodes as N
from ..ir.walk import iter_stmts
from ..runtime.registry import REGISTRY


def minmax_atomics(stmts, active):
    """The atomic max/min statements on active fields in stmts (nested blocks included)."""
    return [s for s in iter_stmts(stmts) if isinstance(s, N.Atomic) and s.op in ("max", "min") and active(s.ref)]


def count_field(ref):
    f = REGISTRY.scratch(("minmax", id(ref.field), ref.component), ref.dtype, ref.shape, ref.offset)
    return REGISTRY.ref(f, (), f"{ref.name}_winners")


def winner(s):
    return B.call("eq", s.value, B.load(s.ref, s.index))


def stripped(stmts, keep_minmax, on_minmax):
    """The loop body with its effects removed (primal values only), atomic max/min statements
    replaced by on_minmax(stmt) (a list of statements)."""
    out = []
    for s in stmts:
        if isinstance(s, N.Atomic) and s.op in ("max", "min") and keep_minmax(s):
            out.extend(on_minmax(s))
        elif isinstance(s, (N.Store, N.Atomic, N.Return)):
            continue
        elif isinstance(s, N.If):
            out.append(dataclasses.replace(s, then=tuple(stripped(s.then, keep_minmax, on_minmax)),
                                           orelse=tuple(stripped(s.orelse, keep_minmax, on_minmax))))
        elif isinstance(s, (N.For, N.While)):
            out.append(dataclasses.replace(s, body=tuple(stripped(s.body, keep_minmax, on_minmax))))
        else:
            out.append(s)
    return out


def count_pass(loop, targets):
    ids = {id(t) for t in targets}

    def count(s):
        c = count_field(s.ref)
        return [N.If(winner(s), (N.Atomic("add", c, s.index, B.const(1, c.dtype), src=s.src, tag="recompute"),),
                     src=s.src, tag="recompute")]
    body = stripped(loop.body, lambda s: id(s) in ids, count)
    return dataclasses.replace(loop, body=tuple(body), tag="recompute")


def element_pass(ref, body_fn, names, src):
    """Statements for each element of ref's field: body_fn(index exprs) -> statements, once for a
    0-d field, else in a parallel loop over its elements."""
    if not ref.shape:
        return list(body_fn(()))
    vars_ = tuple(names.fresh(f"e{k}") for k in range(len(ref.shape)))
    index = tuple(B.var(v, "i32") for v in vars_)
    bounds = tuple((B.const(a, "i32"), B.const(b, "i32")) for a, b in ref.bounds())
    return [N.For(vars_, bounds, tuple(body_fn(index)), parallel=True, src=src, tag="adjoint")]


def cleanup(refs, names, src):
    out = []
    for ref in refs:
        c = count_field(ref)
        out.extend(element_pass(ref, lambda idx, c=c: [N.Store(c, idx, B.const(0, c.dtype), src=src)], names, src))
    return out


def check_placement(loop, targets):
    """Refuse what the winner counts cannot express: a reduction outside a parallel loop, and
    ti.atomic_max and ti.atomic_min into the same element in one loop (the result then depends on
    the order the iterations run in, and no contribution need equal it)."""
    from .hazards import disjoint
    if not loop.parallel:
        raise KernDiffError("differentiating ti.atomic_max/min outside a parallel (outermost) loop is not "
                            "supported", targets[0].src, "use ti.max on a local, or put the reduction in a loop")
    for a in targets:
        for b in targets:
            if a.op == "max" and b.op == "min" and a.ref.field is b.ref.field and not disjoint(a.index, b.index, ()):
                raise KernDiffError(
                    f"this loop takes ti.atomic_max and ti.atomic_min into the same elements of "
                    f"'{a.ref.name}': the result depends on the order of the parallel iterations",
                    b.src, "reduce into two fields (one for the max, one for the min), or put them in separate loops")


def forward_atomic_minmax(fwd, s, dual_ref):
    """Inside the main loop the primal atomic runs; its tangent comes from the passes after it."""
    if getattr(fwd, "minmax_mode", None) == "tangent":
        t = fwd.jvp(s.value)
        if t is None:
            return []
        c = count_field(s.ref)
        return [N.If(winner(s), (N.Atomic("add", dual_ref, s.index, B.div(t, B.load(c, s.index)),
                                          src=s.src, tag="tangent"),), src=s.src, tag="tangent")]
    if getattr(fwd, "minmax_mode", None) == "primal":
        return [s]
    raise serial_minmax_error(s)


def serial_minmax_error(s):
    """ti.atomic_max / atomic_min outside a parallel loop (at a kernel's top level, or in a
    serialized outermost loop carrying locals, which runs as a serial loop): the winner counts
    its derivatives split ties by need the parallel loop's passes."""
    fn = "ti.max" if s.op == "max" else "ti.min"
    return KernDiffError(f"differentiating ti.atomic_{s.op} outside a parallel loop is not supported (here the "
                         "code runs serially)", s.src,
                         f"keep the running value in a local (m = {fn}(m, v)) and store it after the loop, or "
                         "put the reduction inside a parallel outermost loop")


def forward_loop(fwd, loop, targets):
    """Forward mode of a parallel loop with atomic max/min: main loop, count, reset, tangents, cleanup."""
    check_placement(loop, targets)
    refs = list({id(t.ref): t.ref for t in targets}.values())
    fwd.minmax_mode = "primal"
    main = dataclasses.replace(loop, body=fwd.block(loop.body))
    ids = {id(t) for t in targets}
    fwd.minmax_mode = "tangent"
    tangent_body = fwd.block(stripped(loop.body, lambda s: id(s) in ids, lambda s: [s]))
    fwd.minmax_mode = None
    out = [main, count_pass(loop, targets)]
    for ref in refs:
        c, d = count_field(ref), fwd.dual_of_field(ref)
        out.extend(element_pass(ref, lambda idx, c=c, d=d: [N.If(B.call("gt", B.load(c, idx), B.const(0, c.dtype)),
                                                                 (N.Store(d, idx, B.const(0, d.dtype)),))],
                                fwd.names, loop.src))
    out.append(dataclasses.replace(loop, body=tangent_body, tag="tangent"))
    return out + cleanup(refs, fwd.names, loop.src)


def reverse_atomic_minmax(rev, s, adj_ref):
    """Each winner gets y_adj / C (the count pass ran before the loop's reverse)."""
    c = count_field(s.ref)
    g = B.select(winner(s), B.div(B.load(adj_ref, s.index), B.load(c, s.index)), B.const(0, adj_ref.dtype))
    acc = {}
    rev.vjp(s.value, g, acc)
    return rev.accumulate(acc, s.src)


def reverse_loop(rev, loop, targets, reversed_loop):
    check_placement(loop, targets)
    refs = list({id(t.ref): t.ref for t in targets}.values())
    out = [count_pass(loop, targets)] + reversed_loop
    for ref in refs:
        c, a = count_field(ref), rev.adj_of_field(ref)
        out.extend(element_pass(ref, lambda idx, c=c, a=a: [N.If(B.call("gt", B.load(c, idx), B.const(0, c.dtype)),
                                                                 (N.Store(a, idx, B.const(0, a.dtype)),))],
                                rev.names, loop.src))
    return out + cleanup(refs, rev.names, loop.src)
