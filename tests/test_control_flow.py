"""while / break / continue in every mode (Taichi 1.7.4's AD refuses them), checked against f64
finite differences on the paths forward, reverse, reverse.forward and forward.reverse."""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import check

PATHS = [("", "forward"), ("", "reverse"), ("reverse", "forward"), ("forward", "reverse")]


pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)


@pytest.fixture(scope="module")
def kernels(runtime):
    x = ti.field(ti.f64, shape=4)
    y = ti.field(ti.f64, shape=4)
    x.from_numpy(np.array([1.5, 0.7, 3.1, 2.2]))

    @kd.kernel
    def data_dependent_while():
        for i in x:
            v = x[i]
            n = 0
            while v < 10.0:  # trip count depends on the data: recorded, then replayed backward
                v = v * 1.7 + ti.sin(v)
                n += 1
            y[i] = v * n

    @kd.kernel
    def break_and_continue():
        for i in x:
            v = x[i]
            acc = 0.0
            for j in range(20):
                if j % 3 == 1:
                    continue
                acc += ti.sin(v * j)
                v = v * 1.1
                if v > 4.0:
                    break
            y[i] = acc + v

    @kd.kernel
    def continue_in_parallel_loop():
        for i in x:
            if x[i] < 1.0:
                continue
            y[i] = ti.exp(0.3 * x[i]) * x[i]

    return {k.__name__: k for k in (data_dependent_while, break_and_continue, continue_in_parallel_loop)}


@pytest.mark.parametrize("prefix,mode", PATHS, ids=["forward", "reverse", "reverse.forward", "forward.reverse"])
@pytest.mark.parametrize("name", ["data_dependent_while", "break_and_continue", "continue_in_parallel_loop"])
def test_control_flow_against_finite_differences(kernels, name, prefix, mode):
    k = kernels[name]
    k()
    K = getattr(k, prefix) if prefix else k
    check(K, mode, rtol=1e-6)
