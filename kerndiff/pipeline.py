"""The pipeline, in one direction: frontend -> (transform -> optimize)* -> IR for codegen."""
from __future__ import annotations

import dataclasses

from .runtime.cache import CACHE


def base_ir(kernel, templates):
    from .frontend.lower import lower_kernel
    from .opt import optimize

    params, rdt = kernel.signature()
    tkey = tuple((n, id(v)) for n, v in sorted(templates.items()))
    key = ("base", kernel.root.uid, tkey)
    got = CACHE.get(key)
    if got is None:
        scalars = {n: d for n, d in params if d != "template" and n not in templates}
        got = optimize(lower_kernel(kernel.fn, dict(templates), scalars, rdt))
        CACHE[key] = (got, templates)
        return got
    return got[0]


def transform(ir, step, level, last_reverse=False, over_reverse=False):
    """ir after one transform step. last_reverse: no reverse step follows this one (its long
    loops may then keep checkpoints in helper fields, on the CPU; see Reverse.checkpoint_rows).
    over_reverse: a reverse step came before this one (a forward step then leaves norms' tangents
    unguarded, ad.forward.Forward.guard_norms)."""
    from .ad.forward import forward_kernel
    from .ad.reverse import reverse_kernel
    from .ad.hazards import refuse_old_values
    from .ir.walk import old_value_atomics, without_prints, writes_floats
    from .opt import optimize
    from .opt.guards import guard_zero_adds

    from .runtime.kernel import split_step

    ir = dataclasses.replace(ir, body=without_prints(ir.body))
    step, _ = split_step(step)  # the level is given apart
    if old_value_atomics(ir.body) and not writes_floats(ir):
        # it writes no float: its forward kernel is the primal, its reverse has nothing to do,
        # and neither transform need follow its atomics' old values
        return ir if step == "forward" else reverse_kernel(
            dataclasses.replace(ir, body=()), level, inputs_restored=step == "reverse_from_inputs")
    if step == "forward":
        return optimize(forward_kernel(ir, level, guard_norms=not over_reverse))
    # "reverse_from_inputs": kd.Tape's variant for kernels that update fields in place
    rev = reverse_kernel(ir, level, inputs_restored=step == "reverse_from_inputs",
                         checkpoint_fields=last_reverse and _on_cpu())
    out = optimize(dataclasses.replace(rev, body=guard_zero_adds(rev.body)))
    refuse_old_values(out, ir, f"the reverse of {ir.name}")
    return out


def _on_cpu():
    import taichi as ti
    from taichi.lang import impl
    return impl.current_cfg().arch in (ti.x64, ti.arm64)


def _derivative_state(ir, step, level):
    """What a transform of `ir` reads of the registry: which of the fields it names have a
    derivative field of the step's kind and level (the transform reads no other global state,
    and allocates what is missing for the fields it writes, so the state after it is what a
    repeat would see)."""
    from .codegen.load import collect_fields
    from .ir.types import is_float
    from .runtime.registry import REGISTRY

    kind = "dual" if step == "forward" else "adjoint"
    out = []
    for r in collect_fields(ir):
        if is_float(r.dtype):
            d = REGISTRY.get(r.field, kind, level)
            out.append((id(r.field), None if d is None else id(d)))
    return tuple(out)


def kernel_ir(kernel, templates):
    """The IR after each step of kernel.path, in turn. Each step's result is cached by the step
    chain before it and the derivative fields it saw, so k.reverse.forward reuses the reverse
    that k.reverse built (fields appearing elsewhere, such as the duals of k.reverse's adjoint
    fields, do not invalidate it)."""
    from .ad import forward_reverse
    from .ad.hazards import refuse_reading_results
    from .errors import KernDiffError
    from .runtime.kernel import split_step
    primal = ir = base_ir(kernel, templates)
    key = ("base", kernel.root.uid, tuple((n, id(v)) for n, v in sorted(templates.items())))
    for i, step in enumerate(kernel.path):
        if i > 0 and step != "forward":
            refuse_reading_results(ir, primal, ".".join((kernel.__name__,) + kernel.path[: i + 1]))
        level = kernel.level(i)
        last_reverse = step != "forward" and all(later == "forward" for later in kernel.path[i + 1:])
        before = (key, step, level, last_reverse, _derivative_state(ir, step, level))
        got = CACHE.get(before)
        if got is not None:
            ir, key = got[0], before
            continue
        over_reverse = any(split_step(earlier)[0] != "forward" for earlier in kernel.path[:i])
        try:
            out = transform(ir, step, level, last_reverse, over_reverse)
        except KernDiffError:
            # k.forward.reverse refused (a max/min kernel's forward clears its winner count):
            # k.reverse.forward computes the same numbers, under its own checks (ad/forward_reverse.py)
            if not forward_reverse.applies(kernel, i, ir, primal):
                raise
            out = forward_reverse.forward_reverse_ir(kernel, templates, step, primal)
        key = (key, step, level, last_reverse, _derivative_state(ir, step, level))
        CACHE[key] = (out, ir)  # the input is kept alive: the key holds ids of its fields
        ir = out
    name = "_".join((kernel.__name__,) + kernel.path)
    return without_unused_seed(dataclasses.replace(ir, name=name))


def without_unused_seed(ir):
    """ir without its draw-seed parameter where no draw is left to read it (a reverse kernel
    whose draws fed only values its adjoints do not need: dead-code elimination dropped them), so
    that the generated kernel takes no parameter it ignores. The transforms keep the parameter
    on the IR they pass on; a launch passes a seed where the IR it compiled still has one."""
    from .ir.walk import used_names
    if not ir.seed or ir.seed in used_names(ir.body):
        return ir
    return dataclasses.replace(ir, params=tuple(p for p in ir.params if p.name != ir.seed), seed="")
