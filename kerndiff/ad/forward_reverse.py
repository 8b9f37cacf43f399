"""k.forward.reverse as k.reverse.forward with the adjoints' roles swapped.

For a kernel y = f(x) with Jacobian J, the two second-order kernels compute the same numbers:
  k.forward.reverse   reads ȳ = adj(y), ẏ̄ = adj(dual(y)) and ẋ = dual(x); adds
                      adj(x) += Jᵀ ȳ + H[ẏ̄] ẋ,   adj(dual(x)) += Jᵀ ẏ̄
  k.reverse.forward   reads adj(y), its dual, and ẋ = dual(x); adds
                      adj(x) += Jᵀ adj(y),   dual(adj(x)) += Jᵀ dual(adj(y)) + H[adj(y)] ẋ
(H[w] = Σ w_k ∇²y_k, symmetric), and both zero the same output adjoints where the kernel
overwrote its outputs. So k.forward.reverse is k.reverse.forward with every level-1 adjoint
adj(f) read as adj(dual(f)) and every dual of one, dual(adj(f)), read as adj(f).

kerndiff builds k.forward.reverse by transforming the forward kernel in reverse, as any other
path. That is refused for a kernel with an atomic max/min: its forward kernel counts the winning
contributions in a helper field and clears it before it returns (ad/minmax.py), so its reverse
would read a count that is gone. k.reverse.forward has no such problem (its reverse step counts
the winners itself), so for those kernels the path's IR is k.reverse.forward's with the fields
renamed (pipeline.kernel_ir). Its locals keep the names of the kernel it came from; the source
says so in its first line.
"""
from __future__ import annotations

import dataclasses

from ..ir import nodes as N
from ..ir.walk import map_expr, map_stmt_exprs, map_stmts
from ..runtime.registry import REGISTRY


def applies(kernel, step_index, ir, primal):
    """Whether path step `step_index` of kernel is a level-1 reverse right after the level-1
    forward of a user's kernel whose reverse is taken so (swapped_for; ir: that forward kernel's
    IR, primal: the kernel's own)."""
    from ..runtime.kernel import split_step

    if step_index != 1 or not split_step(kernel.path[1])[0].startswith("reverse") or kernel.level(1) != 1:
        return False
    return swapped_for(kernel.root.forward, ir, primal)


def swapped_for(forward, ir, primal):
    """Whether the reverse of `forward` (a user's kernel's level-1 forward kernel, of IR `ir`) is
    taken from the kernel's reverse.forward here: it has an atomic max/min, no returned values
    (their cotangent parameters differ between the two paths), and reads no derivative field as
    data (whose roles the renaming would swap)."""
    from ..codegen.load import collect_fields
    from .hazards import counts_minmax_winners

    if forward.path != ("forward",) or forward.level() != 1 or ir.returns or not counts_minmax_winners(ir):
        return False
    return not any(id(r.field) in REGISTRY.parents for r in collect_fields(primal))


def restorable_fields(forward, args, kwargs):
    """What kd.Tape restores before running such a forward kernel's reverse from its inputs: the
    kernel's own restorable fields and their duals, as k.reverse_from_inputs.forward reads them
    (the forward kernel's own analysis sees its winner count cleared and takes fields for
    restorable that the reverse reads as results)."""
    own = forward.root.restorable_fields(*args, **kwargs)
    duals = [REGISTRY.get(f, "dual", 1) for f in own]
    return own + [d for d in duals if d is not None]


def forward_reverse_ir(kernel, templates, step, primal):
    """The IR of kernel.forward.<step> (a reverse step at level 1) from k.<step>.forward's
    (primal: the kernel's own IR). A transform differentiates with respect to the fields that
    have a derivative field of its kind, so first each field active in the path asked for gets
    the field that stands for it in the other: adj(f) needs dual(adj(f)), adj(dual(f)) needs
    adj(f) (without, k.reverse.forward left out the tangent of `x_adj[r] -= z_adj[j]` where z's
    adjoint had no dual: the programs fuzzer's seed 0, a wrong H·v)."""
    from ..codegen.load import collect_fields
    from ..ir.types import is_float

    for r in collect_fields(primal):
        if not is_float(r.dtype):
            continue
        adjoint, dual = REGISTRY.get(r.field, "adjoint", 1), REGISTRY.get(r.field, "dual", 1)
        if adjoint is not None:
            REGISTRY.get_or_make(adjoint, "dual", 1)
        if dual is not None and REGISTRY.get(dual, "adjoint", 1) is not None:
            REGISTRY.get_or_make(r.field, "adjoint", 1)
    swapped = kernel.root._child(step)._child("forward").ir(templates)
    refs = {}

    def ref(r):
        got = refs.get(id(r))
        if got is None:
            got = refs[id(r)] = REGISTRY.ref(_role_swapped(r.field), r.component)
        return got

    def expr(e):
        return N.Load(e.dtype, ref(e.ref), e.index) if isinstance(e, N.Load) else e

    def stmt(s):
        s = map_stmt_exprs(s, lambda e: map_expr(e, expr))
        return dataclasses.replace(s, ref=ref(s.ref)) if isinstance(s, (N.Store, N.Atomic)) else s

    note = (f"{kernel.root.__name__}.forward.{step}, computed as {kernel.root.__name__}.{step}.forward with "
            "adj(x) read as adj(dual(x)) and dual(adj(x)) as adj(x) (an atomic max/min: ad/forward_reverse.py)")
    return dataclasses.replace(swapped, body=map_stmts(swapped.body, stmt), note=note)


def _role_swapped(field):
    """adj(f) -> adj(dual(f)); dual(adj(f)) -> adj(f); any other field unchanged (level 1)."""
    parent = REGISTRY.parents.get(id(field))
    if parent is None or parent[2] != 1:
        return field
    of, kind, _ = parent
    if kind == "adjoint":
        return REGISTRY.get_or_make(REGISTRY.get_or_make(of, "dual", 1), "adjoint", 1)
    grand = REGISTRY.parents.get(id(of))
    if kind == "dual" and grand is not None and grand[1] == "adjoint" and grand[2] == 1:
        return of
    return field
