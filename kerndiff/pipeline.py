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
        scalars = {n: d for n, d in params if d != "template"}
        got = optimize(lower_kernel(kernel.fn, dict(templates), scalars, rdt))
        CACHE[key] = (got, templates)
        return got
    return got[0]


def transform(ir, step, level):
    from .ad.forward import forward_kernel
    from .ad.reverse import reverse_kernel
    from .ir.walk import without_prints
    from .opt import optimize
    from .opt.guards import guard_zero_adds

    ir = dataclasses.replace(ir, body=without_prints(ir.body))
    if step == "forward":
        return optimize(forward_kernel(ir, level))
    # "reverse_from_inputs": kd.Tape's variant for kernels that update fields in place
    rev = reverse_kernel(ir, level, inputs_restored=step == "reverse_from_inputs")
    return optimize(dataclasses.replace(rev, body=guard_zero_adds(rev.body)))


def kernel_ir(kernel, templates):
    from .ad.hazards import refuse_reading_results
    primal = ir = base_ir(kernel, templates)
    for i, step in enumerate(kernel.path):
        if i > 0 and step != "forward":
            refuse_reading_results(ir, primal, ".".join((kernel.__name__,) + kernel.path[: i + 1]))
        ir = transform(ir, step, kernel.level(i))
    name = "_".join((kernel.__name__,) + kernel.path)
    return dataclasses.replace(ir, name=name)
