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
from ..ir.walk import iter_stmts, without_effects
from ..runtime.registry import REGISTRY


def minmax_atomics(stmts, active):
    """The atomic max/min statements on active fields in stmts (nested blocks included)."""
    return [s for s in iter_stmts(stmts) if isinstance(s, N.Atomic) and s.op in ("max", "min") and active(s.ref)]


def count_field(ref):
    f = REGISTRY.scratch(("minmax", id(ref.field), ref.component), ref.dtype, ref.shape, ref.offset)
    return REGISTRY.ref(f, (), f"{ref.name}_winners")


# How far (relative) a recomputed contribution may lie from the result and still count as reaching
# it: 8 units in the last place. The passes recompute each contribution after the loop, and Taichi
# compiles with fast math by default, which lets LLVM reassociate the same expression differently
# in each loop (`w ** 3 * ti.abs(y)` beside the tangent's `w ** 2 * 3.0`): a recomputed winner can
# miss the result by an ulp or two, and an exact comparison then found no winner and returned a
# zero derivative (found by a fuzzer of multi-loop programs, session 31). Contributions within the
# tolerance of the result share its derivative as ties do.
# The units are those of the contribution's magnitude (`magnitude`), not of the result alone: where
# the contribution is a difference of larger terms, `a / (1.5 + x * x) - (t * 0.5 + b)` near -0.04
# with terms near 1, an ulp of a term is many ulps of the result (the programs fuzzer's seed
# 124956839: no winner found, a zero tangent where a contribution had won).
REACH = {"f64": 2.0 ** -49, "f32": 2.0 ** -20, "f16": 2.0 ** -7}


def magnitude(e, dtype):
    """A first-order bound, up to a few units of rounding, on how far rounding can move the value of
    the float expression e (Higham's running error bound): |e| for a leaf or another op, the sum of
    the terms' magnitudes for a sum or difference, products and quotients of magnitudes for
    products and quotients."""
    if isinstance(e, N.Call) and e.dtype == dtype:
        if e.op in ("add", "sub"):
            return B.add(magnitude(e.args[0], dtype), magnitude(e.args[1], dtype))
        if e.op == "neg":
            return magnitude(e.args[0], dtype)
        if e.op == "mul":
            return B.mul(magnitude(e.args[0], dtype), magnitude(e.args[1], dtype))
        if e.op == "div":
            return B.div(magnitude(e.args[0], dtype), B.call("abs", B.cast(e.args[1], dtype)))
    return B.call("abs", B.cast(e, dtype))


def winner(s):
    """Whether the contribution of s, recomputed, reaches the result left in its field: equal to
    it, or within REACH of it in units of the larger of the result and the contribution's
    magnitude."""
    result = B.load(s.ref, s.index)
    dtype = s.ref.dtype
    tol = B.const(REACH.get(dtype, 2.0 ** -20), dtype)
    scale = B.call("max", B.call("abs", result), magnitude(B.cast(s.value, dtype), dtype))
    near = B.call("le", B.call("abs", B.sub(s.value, result)), B.mul(tol, scale))
    return B.call("or", B.call("eq", s.value, result), near)


def stripped(stmts, keep_minmax, on_minmax):
    """The loop body with its effects removed (primal values only), the atomic max/min statements
    keep_minmax picks replaced by on_minmax(stmt) (a list of statements)."""
    return without_effects(stmts, lambda s: isinstance(s, N.Atomic) and s.op in ("max", "min") and keep_minmax(s),
                           on_minmax)


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
    _check_recomputable(loop, targets)


def _check_recomputable(loop, targets):
    """The passes after the loop recompute the contributions (and the locals and branches they
    depend on) from the fields, so every value the loop read there must still be in its field: a
    read the loop overwrites later (`ti.atomic_min(m[None], v[i][1])` then `v[i] = ...`), or
    writes and reads again within an inner loop, would be recomputed from the wrong value (the
    forward kernel found no winner and left a zero tangent until session 31). Writes before the
    reads are fine (`y[i] = f(x[i])` then `ti.atomic_max(m[None], y[i])`)."""
    from .hazards import field_events
    ids = {id(t) for t in targets}
    events = field_events(loop.body)

    def dropped(s):  # by `stripped`, with the loads in it: nothing recomputes them
        return isinstance(s, (N.Store, N.Atomic)) and id(s) not in ids
    writes = [(pos, f, s, loops) for pos, kind, f, s, _, _, loops in events if kind != "read" and dropped(s)]
    kept_loads = [(pos, f, s, loops) for pos, kind, f, s, _, _, loops in events if kind == "read" and not dropped(s)]
    for wpos, field, w, wloops in writes:
        for lpos, f, stmt, lloops in kept_loads:
            if f is field and (lpos < wpos or any(a is b for a in wloops for b in lloops)):
                name = REGISTRY.name_of(field)
                raise KernDiffError(
                    f"the derivative of ti.atomic_{targets[0].op} recomputes what this loop read after the loop, "
                    f"and the loop writes '{name}' after reading it "
                    f"({'at line ' + str(stmt.src.line) + ': ' + repr(stmt.src.text.strip()) if stmt.src else 'here'})",
                    w.src, f"compute the values the reduction needs before writing '{name}' (into locals or "
                           f"another field), or take ti.atomic_{targets[0].op} in a loop of its own")


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
