"""A kernel whose field belongs to an earlier ti.init: a KernDiffError, not a crash. In a module of
its own, since the test starts runtimes of its own: module-scoped fixtures' fields (test_errors'
`f`) would be gone after it, and a later test reading them aborted the process."""
import pytest
import taichi as ti

import kerndiff as kd


def test_field_from_an_earlier_ti_init():
    ti.init(arch=ti.cpu, default_fp=ti.f64)
    old = ti.field(ti.f64, shape=3)

    @kd.kernel
    def k():
        for i in old:
            old[i] = 1.0

    k()
    ti.init(arch=ti.cpu, default_fp=ti.f64)  # a new runtime: `old` is gone
    with pytest.raises(kd.KernDiffError) as info:
        k()
    msg = str(info.value)
    for part in (__file__, "for i in old:", "^", "Reason:", "field of an earlier ti.init", "Remedy:"):
        assert part in msg, msg
    ti.reset()
