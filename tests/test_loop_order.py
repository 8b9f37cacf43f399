"""opt.loop_order: a reversed inner loop whose iterations share nothing but sums runs forward in
derived kernels (`for j in range(n):`), one that carries anything else stays last-first. Every
kernel is checked against f64 finite differences on the paths forward, reverse, reverse.forward
and forward.reverse; the sources say which order each loop runs in."""
import re

import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from kerndiff.ir import build as B
from kerndiff.ir import nodes
from kerndiff.ir.nodes import FieldRef
from kerndiff.opt.liveness import remove_dead_stores
from kerndiff.opt.loop_order import run_forward
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

    M = 3
    W = ti.field(ti.f64, shape=(M, M))
    h = ti.field(ti.f64, shape=(N, M))
    w = ti.field(ti.f64, shape=N)
    W.from_numpy(np.array([[0.4, -0.7, 0.2], [0.9, 0.1, -0.5], [-0.3, 0.6, 0.8]]))
    for f in (W, h, w):
        kd.adjoint(f)
        kd.dual(f)
    for f in (x, y, W, h):  # the second direction of layers.forward.forward
        kd.dual(f, 2)

    @kd.kernel
    def layers():  # neuron j's reverse reads and zeroes h_adj[i, j], its own, and adds into W_adj
        for i in range(N):
            for j in range(M):
                s = 0.1 * j
                for k in range(M):
                    s += W[j, k] * x[(i + k) % N]
                h[i, j] = ti.tanh(s)
            for j in range(M):
                s = 0.0
                for k in range(M):
                    s += W[k, j] * h[i, k]
                y[i] += ti.tanh(s) * x[i]

    @kd.kernel
    def overwritten():  # w[i] overwritten in every iteration: only the last one's reaches y
        for i in range(N):
            for j in range(N):
                w[i] = ti.sin(x[i] * x[j])
            y[i] = w[i] * w[i]

    @kd.kernel
    def smooth():  # the same update three times: its reverse's iterations do not read k
        for i in range(N):
            acc = 0.5
            a = ti.sin(x[i])
            for k in range(3):
                acc = 0.5 * acc + ti.tanh(a)
            y[i] = acc * x[(i + 1) % N]

    return {k.__name__: k for k in (pair_sum, half_pairs, counted, product, last_value, sum_of_sums, layers,
                                    overwritten, smooth)}


ORDER = {"pair_sum": "forward", "half_pairs": "forward", "counted": "forward", "product": "reversed", "last_value": "reversed",
         "sum_of_sums": "reversed", "layers": "forward", "overwritten": "reversed",
         "smooth": "forward"}


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
    if name == "smooth":  # named as written: its iterations are alike, forward or backward
        assert len(re.findall(r"^ +for k in range\(3\):", k.reverse.source, re.M)) == 2, k.reverse.source
    if name == "layers":  # the neurons, and the sums inside them, run as written, in every path
        for src in (k.reverse.source, k.reverse.forward.source, k.forward.reverse.source):
            assert "_rev in range(" not in src and len(re.findall(r"for j(_\d+)? in range\(3\):", src)) == 2, src


def test_a_local_an_inner_loop_carries_over_keeps_the_outer_loop_reversed():
    """Hand-built IR (no kernel gets this past the other rules): c, read in the inner loop before
    it is assigned there, brings the last outer iteration's value into the next one."""
    i32, f64 = "i32", "f64"
    x, x_adj = (FieldRef(object(), (), name, f64, (4,)) for name in ("x", "x_adj"))
    j, c = B.var("j", i32), B.var("c", f64)
    inner = nodes.For(("k",), ((B.const(0, i32), B.const(2, i32)),), (
        nodes.Assign("u", B.mul(c, B.const(2.0, f64))),
        nodes.Assign("c", B.mul(B.load(x, (j,)), B.load(x, (B.var("k", i32),)))),
        nodes.Atomic("add", x_adj, (j,), B.var("u", f64))))
    index = nodes.Assign("j", B.sub(B.const(3, i32), B.var("j_rev", i32)))
    carried = nodes.For(("j_rev",), ((B.const(0, i32), B.const(4, i32)),), (index, inner))
    body = (nodes.Assign("c", B.const(0.0, f64)), carried)
    assert run_forward(body) == body
    fresh = nodes.For(("j_rev",), ((B.const(0, i32), B.const(4, i32)),),
                      (index, nodes.Assign("c", B.const(1.0, f64)), inner))
    (out,) = run_forward((fresh,))
    assert out.vars == ("j",) and out.bounds == ((B.const(0, i32), B.const(4, i32)),) and out.body == fresh.body[1:]


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


def test_a_reversed_loop_keeps_its_name_where_the_written_one_is_read():
    """Hand-built IR: `for k_rev in range(3)` whose body does not read k_rev is named `k` only
    where k is free: here the store after the loop reads the k assigned before it."""
    i32, f64 = "i32", "f64"
    y = FieldRef(object(), (), "y", f64, (4,))
    s = B.var("s", f64)
    loop = nodes.For(("k_rev",), ((B.const(0, i32), B.const(3, i32)),),
                     (nodes.Assign("s", B.mul(s, B.const(0.5, f64))),))
    after = nodes.Store(y, (B.var("k", i32),), s)
    body = (nodes.Assign("k", B.const(2, i32)), nodes.Assign("s", B.const(1.0, f64)), loop, after)
    assert run_forward(body) == body
    free = body[1:3] + (nodes.Store(y, (B.const(0, i32),), s),)  # k neither assigned before nor read after
    (renamed,) = [t for t in run_forward(free) if isinstance(t, nodes.For)]
    assert renamed.vars == ("k",) and renamed.body == loop.body


def test_the_reverse_of_a_networks_second_derivative_runs_its_neurons_as_written(kernels):
    """k.forward.forward.reverse of the tanh layers (a PINN's weight gradient through its
    Laplacian, W4's shape): against finite differences, every loop as written."""
    k = kernels["layers"]
    check_path(k.forward, "forward", "reverse")
    src = k.forward.forward.reverse.source
    assert "_rev in range(" not in src and len(re.findall(r"^ +for j(_\d+)? in range\(3\):", src, re.M)) == 2, src
