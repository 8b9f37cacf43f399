"""opt.loop_order: a reversed inner loop whose iterations share nothing but sums runs forward in
derived kernels (`for j in range(n):`), one that carries anything else stays last-first. Every
kernel is checked against f64 finite differences on the paths forward, reverse, reverse.forward
and forward.reverse; the sources say which order each loop runs in."""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from kerndiff.ir import build as B
from kerndiff.ir import nodes
from kerndiff.ir.nodes import FieldRef
from kerndiff.opt.liveness import remove_dead_stores
from harness import PATH_IDS, PATHS, check_path


pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)

N = 5


@pytest.fixture(scope="module")
def kernels(runtime):
    x = ti.field(ti.f64, shape=N)
    y = ti.field(ti.f64, shape=N)
    count = ti.field(ti.i32, shape=N)
    x.from_numpy(np.array([0.3, 1.1, -0.4, 0.8, 1.9]))
    count.from_numpy(np.array([2, 5, 0, 3, 1], dtype=np.int32))
    for f in (x, y):  # x and y active in both modes from the start
        kd.adjoint(f)
        kd.dual(f)

    @kd.kernel
    def pair_sum():  # each pair's term added into e: only sums cross iterations
        for i in range(N):
            e = 0.0
            for j in range(N):
                if i != j:
                    d = x[i] - x[j]
                    e += ti.exp(-d * d) * x[j]
            y[i] = e * e

    @kd.kernel
    def half_pairs():  # a loop from i + 1: its reverse ran n - (i + 1) trips from the top
        for i in range(N):
            for j in range(i + 1, N):
                y[i] += ti.cos(x[i] - x[j]) * x[j]

    @kd.kernel
    def counted():  # a bound read from a field, and the index read from it
        for i in range(N):
            s = 0.0
            for k in range(count[i]):
                s += ti.sin(x[i] * x[(i + k) % N])
            y[i] = s

    @kd.kernel
    def product():  # e carried as a product: its adjoint changes from one iteration to the next
        for i in range(N):
            e = 1.0
            for j in range(N):
                e = e * (1.0 + 0.1 * ti.sin(x[i] * x[j]))
            y[i] = e

    @kd.kernel
    def last_value():  # t overwritten in every iteration: only the last one's reaches y
        for i in range(N):
            t = 0.0
            for j in range(N):
                t = x[j] * x[i]
            y[i] = t * t

    @kd.kernel
    def sum_of_sums():  # s2 adds s1's running value: the order of the iterations matters
        for i in range(N):
            s1 = 0.0
            s2 = 0.0
            for j in range(N):
                s1 += x[j] * x[i]
                s2 += s1 * x[j]
            y[i] = s2

    return {k.__name__: k for k in (pair_sum, half_pairs, counted, product, last_value, sum_of_sums)}


ORDER = {"pair_sum": "forward", "half_pairs": "forward", "counted": "forward", "product": "reversed", "last_value": "reversed",
         "sum_of_sums": "reversed"}


@pytest.mark.parametrize("name", sorted(ORDER))
@pytest.mark.parametrize("prefix, mode", PATHS, ids=PATH_IDS)
def test_derivatives_match_finite_differences(kernels, name, prefix, mode):
    check_path(kernels[name], prefix, mode)


@pytest.mark.parametrize("name", sorted(ORDER))
def test_only_loops_carrying_sums_alone_run_forward(kernels, name):
    k = kernels[name]
    k()
    for src in (k.reverse.source, k.reverse.forward.source):
        reversed_ = "_rev in range(" in src
        assert reversed_ == (ORDER[name] == "reversed"), src
    if name == "pair_sum":
        assert "for j in range(5):" in k.reverse.source
    if name == "half_pairs":
        assert "for j in range(i + 1, 5):" in k.reverse.source
    if name == "counted":
        assert "for k in range(count[i]):" in k.reverse.source


def test_a_loop_variable_is_not_live_before_its_loop():
    """Liveness (opt.liveness): each iteration assigns the loop's variable, so a value it held
    before the loop is dead there (a reversed loop's `k = 63 - k_rev`, followed by a loop over the
    same k in the next iteration, left k live after the first loop and kept it reversed)."""
    i32 = "i32"
    y = FieldRef(object(), (), "y", i32, (4,))
    k = B.var("k", i32)
    loop = nodes.For(("k",), ((B.const(0, i32), B.const(3, i32)),), (nodes.Atomic("add", y, (k,), k),))
    body = (nodes.Assign("k", B.const(7, i32)), loop, nodes.Store(y, (B.const(3, i32),), k))
    kept = remove_dead_stores(nodes.KernelIR("f", (), body)).body
    assert kept == body  # k = 7 reaches the store after the loop (a loop may run no iteration)
    kept = remove_dead_stores(nodes.KernelIR("f", (), body[:2])).body
    assert kept == (loop,)
