"""A pair loop's adds into the inner index gathered by a second loop (opt.transposed_gathers), on
the CPU (and on CUDA with KERNDIFF_TEST_ARCH=cuda; test_vulkan runs a pair energy on SPIR-V).

The pass is made for pair loops of thousands of trips; these tests lower its size threshold so that
small loops take it, and check the reverse kernels that do against the analytic gradients of a pair
energy and of a coupling sum, the same kernel without the pass and finite differences; and
that what the pass must not gather (adds whose values a trip carries to the next, fields the loop
writes and the adds read) stays as it was."""
import os
import tempfile

import numpy as np
import pytest
import taichi as ti
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kerndiff as kd
from harness import load_elementwise, runs_recorder, skip_unless_all_ran_before
from kerndiff.opt import split_ranges, transposed_gathers

pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)

N = 40
GATHERED = "gathered for each j"


@pytest.fixture
def any_size(monkeypatch):
    monkeypatch.setattr(transposed_gathers, "MIN_TRIPS", 0)


@pytest.fixture(scope="module")
def particles(runtime):
    pos = ti.Vector.field(3, ti.f64, N, needs_grad=True)
    mass = ti.field(ti.f64, N, needs_grad=True)
    E = ti.field(ti.f64, (), needs_grad=True)
    rng = np.random.default_rng(4)
    pos.from_numpy(rng.uniform(0.0, 3.0, (N, 3)))
    mass.from_numpy(rng.uniform(0.5, 1.5, N))

    def energy():
        for i in range(N):
            e = 0.0
            for j in range(N):
                if i != j:
                    r2 = (pos[i] - pos[j]).norm_sqr() + 0.01
                    e += mass[i] * mass[j] * (1.0 / ti.sqrt(r2) + 0.1 / r2)
            E[None] += 0.5 * e

    return pos, mass, E, energy


def gradients(particles, run):
    pos, mass, E, _ = particles
    pos.grad.fill(0)
    mass.grad.fill(0)
    E.grad[None] = 1.0
    run()
    return pos.grad.to_numpy(), mass.grad.to_numpy()


def test_a_pair_energy_gathers_both_sides(particles, any_size, monkeypatch):
    """The reverse of a pair energy as two gathering loops: against the analytic gradient and the
    kernel without the pass; a second launch adds exactly once more. (Taichi's kernel.grad() of
    this kernel needs ad_stack_size >= N, or it segfaults: not a reference in this runtime.)"""
    pos, mass, E, energy = particles
    k = kd.kernel(energy)
    k()
    src = k.reverse.source
    assert f"# the adds into mass_adj[j], pos_adj[j] of each pair, {GATHERED}" in src, src
    assert "claim_slot" not in src and "_private" not in src  # no copies, no atomics: plain adds
    assert "pos_adj_0_sum = pos_adj_0_sum - t" in src and "pos_adj[j][0] = pos_adj[j][0] + pos_adj_0_sum" in src
    got = gradients(particles, k.reverse)
    p, m = pos.to_numpy(), mass.to_numpy()
    d = p[:, None, :] - p[None, :, :]
    r2 = (d ** 2).sum(-1) + 0.01
    off = ~np.eye(N, dtype=bool)
    mm = m[:, None] * m[None, :]
    dphi = np.where(off, -0.5 * r2 ** -1.5 - 0.1 * r2 ** -2, 0.0)  # d/d(r2) of 1/sqrt(r2) + 0.1/r2
    phi = np.where(off, r2 ** -0.5 + 0.1 / r2, 0.0)
    np.testing.assert_allclose(got[0], 2.0 * np.sum((mm * dphi)[:, :, None] * d, axis=1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[1], phi @ m, rtol=1e-12)
    twice = gradients(particles, lambda: (k.reverse(), k.reverse()))
    np.testing.assert_allclose(twice[0], 2.0 * got[0], rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(transposed_gathers, "MIN_TRIPS", 1 << 30)
    plain = kd.kernel(energy)
    plain()
    assert GATHERED not in plain.reverse.source
    np.testing.assert_allclose(gradients(particles, plain.reverse)[0], got[0], rtol=1e-12, atol=1e-12)


def test_triangles_of_pairs(particles, any_size):
    """The same energy over the triangle i < j (`range(i + 1, N)`) and over j < i (`range(i)`):
    the second loop runs j's trips over i < j (`range(j)`) and i > j (`range(j + 1, N)`); both
    gradients equal the square's (the energy is symmetric), which the test above checks."""
    pos, mass, E, energy = particles

    def upper():
        for i in range(N):
            for j in range(i + 1, N):
                E[None] += mass[i] * mass[j] / ti.sqrt((pos[i] - pos[j]).norm_sqr() + 0.01)

    def lower():
        for i in range(N):
            for j in range(i):
                E[None] += mass[i] * mass[j] / ti.sqrt((pos[i] - pos[j]).norm_sqr() + 0.01)

    def square():
        for i in range(N):
            for j in range(N):
                if i != j:
                    E[None] += 0.5 * mass[i] * mass[j] / ti.sqrt((pos[i] - pos[j]).norm_sqr() + 0.01)

    got = {}
    for fn, trips in ((upper, "for i in range(j):"), (lower, f"for i in range(j + 1, {N}):"), (square, None)):
        k = kd.kernel(fn)
        if trips:
            assert trips in k.reverse.source, k.reverse.source
        got[fn.__name__] = gradients(particles, k.reverse)
    for name in ("upper", "lower"):
        for a, b in zip(got[name], got["square"]):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_a_square_bounded_by_an_argument(particles):
    """`for i in range(m): for j in range(m)` with m a kernel argument: gathered whatever the
    trips (not known until launch; the size threshold untouched), the second loop running over
    the argument's range; `for j in range(lo, m)` (two counts: the second loop could be parallel
    over a few j) keeps one loop. Gradient and H·v against the same kernel without the pass, and
    the gradient against numpy's."""
    pos, mass, E, _ = particles

    def counted(m: ti.i32):
        for i in range(m):
            for j in range(m):
                if i != j:
                    r2 = (pos[i] - pos[j]).norm_sqr() + 0.01
                    E[None] += mass[i] * mass[j] / ti.sqrt(r2)

    def box(m: ti.i32, lo: ti.i32):
        for i in range(m):
            for j in range(lo, m):
                E[None] += mass[i] * mass[j] * pos[i][0] * pos[j][1]

    assert GATHERED not in kd.kernel(box).reverse.source
    m = 33
    results = []
    for gather in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            if not gather:
                patch.setattr(transposed_gathers, "gather_pair_adds", lambda ir, *args: ir)
            k = kd.kernel(counted)
            k(m)
            said = f"the adds into mass_adj[j], pos_adj[j] of each pair, {GATHERED}"
            assert (said in k.reverse.source and "for j in range(m):" in k.reverse.source) == gather, \
                k.reverse.source
            results.append(gradients(particles, lambda: k.reverse(m)))
            hvp = kd.hvp(lambda: k(m), [pos, mass], E)
            results[-1] += tuple(hvp([pos.to_numpy(), mass.to_numpy()],
                                     tangents=[np.ones((N, 3)), np.linspace(-1.0, 1.0, N)]))
    for a, b in zip(*results):
        assert np.abs(a).max() > 1e-3
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    p, w = pos.to_numpy()[:m], mass.to_numpy()[:m]
    d = p[:, None, :] - p[None, :, :]
    r2 = (d ** 2).sum(-1) + 0.01
    weight = np.where(~np.eye(m, dtype=bool), -0.5 * r2 ** -1.5, 0.0) * w[:, None] * w[None, :]
    expected = np.zeros((N, 3))
    expected[:m] = 4 * (weight[:, :, None] * d).sum(1)
    np.testing.assert_allclose(results[0][0], expected, rtol=1e-10, atol=1e-10)


def test_second_derivatives_of_a_gathered_pair_loop(particles, any_size, monkeypatch):
    """k.reverse.forward (H·v) gathers the adds into adjoints and their tangents alike;
    k.forward.reverse gathers what it can. Both against central differences (kd.check_grad
    order 2, and the harness's check of the reverse-over-forward kernel), and H·v against the
    same kernel without the pass."""
    pos, mass, E, energy = particles
    k = kd.kernel(energy)
    assert kd.check_grad(k, [pos, mass], E, order=2) < 1e-6
    assert GATHERED in k.reverse.forward.source and "pos_adj_dual[j]" in k.reverse.forward.source
    assert kd.check_grad(lambda: k(), [pos, mass], E, order=2) < 1e-6  # H·v through k.forward.reverse
    rng = np.random.default_rng(5)
    v = rng.standard_normal((N, 3)), rng.standard_normal(N)
    hvps = []
    for min_trips in (0, 10**9):
        monkeypatch.setattr(transposed_gathers, "MIN_TRIPS", min_trips)
        hvp = kd.hvp(kd.kernel(energy), [pos, mass], E)
        hvps.append(hvp([pos.to_numpy(), mass.to_numpy()], tangents=list(v)))
    assert GATHERED not in kd.kernel(energy).reverse.forward.source
    for a, b in zip(*hvps):
        assert np.abs(a).max() > 1e-3
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_a_replayed_product_stays_and_a_stored_value_is_read(runtime, any_size):
    """The reverse of a running product over j replays the product inside its pairs loop (a loop in
    the loop): it keeps one loop. The reverse of a sum that reads y[i], which the primal stored
    and the reverse only reads, is gathered. Both against finite differences (kd.check_grad
    order 2) and the second against its analytic gradient."""
    n = 24
    x = ti.field(ti.f64, n, needs_grad=True)
    y = ti.field(ti.f64, n, needs_grad=True)
    loss = ti.field(ti.f64, (), needs_grad=True)
    x.from_numpy(np.random.default_rng(2).uniform(0.2, 0.9, n))

    @kd.kernel
    def running_product():
        for i in range(n):
            p = 1.0
            for j in range(n):
                p = p * (1.0 + 0.1 * x[i] * x[j])
            loss[None] += p

    @kd.kernel
    def stored_then_read():
        for i in range(n):
            y[i] = ti.sin(x[i])
            s = 0.0
            for j in range(n):
                s += y[i] * x[j] ** 2
            loss[None] += s

    for k in (running_product, stored_then_read):
        y.fill(0)
        assert kd.check_grad(k, [x], loss, order=2) < 1e-6
    assert GATHERED not in running_product.reverse.source
    assert GATHERED in stored_then_read.reverse.source
    stored_then_read()
    x.grad.fill(0)
    loss.grad[None] = 1.0
    stored_then_read.reverse()
    xv = x.to_numpy()
    np.testing.assert_allclose(x.grad.to_numpy(), np.cos(xv) * np.sum(xv ** 2) + 2.0 * xv * np.sum(np.sin(xv)),
                               rtol=1e-12)


def test_a_shared_prologue_and_a_condition_on_both_indices(runtime, any_size):
    """Values the outer trip computes before its pairs (a weight from w[i] and a 0-d parameter) are
    computed per pair in the second loop; what depends on neither index is computed once before
    its trips. Against the analytic gradient and finite differences. The same sum through cosines
    keeps one loop: computed again, a transcendental function costs more than the scattered add
    it saves. (Taichi 1.7.4's own kernel.grad() of the cosine kernel gets w's and k's gradients
    wrong, k's by about 100: not a reference here.)"""
    n = 30
    x = ti.field(ti.f64, n, needs_grad=True)
    w = ti.field(ti.f64, n, needs_grad=True)
    k = ti.field(ti.f64, (), needs_grad=True)
    loss = ti.field(ti.f64, (), needs_grad=True)
    rng = np.random.default_rng(8)
    x.from_numpy(rng.uniform(-1.0, 1.0, n))
    w.from_numpy(rng.uniform(0.5, 1.5, n))
    k[None] = 0.7

    @kd.kernel
    def coupling():
        for i in range(n):
            wi = k[None] / (1.0 + w[i] ** 2)
            for j in range(n):
                if (i + j) % 3 != 0:
                    loss[None] += wi * (x[i] - 2.0 * x[j]) ** 2 * w[j]

    @kd.kernel
    def through_cosines():
        for i in range(n):
            wi = ti.exp(-w[i]) * k[None]
            for j in range(n):
                if (i + j) % 3 != 0:
                    loss[None] += wi * ti.cos(x[i] - 2.0 * x[j]) * w[j]

    src = coupling.reverse.source
    assert "x_adj[j] = x_adj[j] + x_adj_sum" in src and "w_adj[i] = w_adj[i] + " in src, src  # (plain adds)
    assert GATHERED not in through_cosines.reverse.source
    for f in (x, w, k):
        f.grad.fill(0)
    loss.grad[None] = 1.0
    coupling.reverse()
    X, W = x.to_numpy(), w.to_numpy()
    pairs = (np.arange(n)[:, None] + np.arange(n)[None, :]) % 3 != 0
    wi = 0.7 / (1.0 + W ** 2)
    gap = X[:, None] - 2.0 * X[None, :]
    terms = pairs * wi[:, None] * W[None, :]  # the factor of each pair's square
    expected_x = (2.0 * gap * terms).sum(1) + (-4.0 * gap * terms).sum(0)
    np.testing.assert_allclose(x.grad.to_numpy(), expected_x, rtol=1e-12, atol=1e-12)
    dwi = -2.0 * 0.7 * W / (1.0 + W ** 2) ** 2
    expected_w = dwi * (pairs * gap ** 2 * W[None, :]).sum(1) + (pairs * wi[:, None] * gap ** 2).sum(0)
    np.testing.assert_allclose(w.grad.to_numpy(), expected_w, rtol=1e-12, atol=1e-12)
    assert k.grad[None] == pytest.approx((gap ** 2 * terms).sum() / 0.7, rel=1e-12)
    for kernel in (coupling, through_cosines):
        assert kd.check_grad(kernel, [x, w, k], loss, order=2) < 1e-6


_PRE = ["a = ti.sin(x[i]) * k[None]", "a = w[i] ** 2 + 0.5", "a = 0.3"]
_CONDITIONS = ["i != j", "(i + j) % 3 != 0", "x[j] > x[i]", "w[j] > 0.8", "True"]
_LINES = ["loss[None] += a * w[j] / (1.0 + (x[i] - 2.0 * x[j]) ** 2)",
          "loss[None] += ti.sqrt(1.0 + (x[i] - x[j]) ** 2) * w[i] * w[j]",
          "loss[None] += a * ti.cos(x[i] - 2.0 * x[j]) * w[j]",
          "loss[None] += ti.exp(-(x[i] - x[j]) ** 2) * w[i] * w[j]",
          "y[i] += a * x[j] ** 2",
          "acc = acc * 0.9 + ti.sin(x[j] * a)",
          "acc = acc + w[j] * x[i]",
          "loss[None] += acc * x[j]",
          "z[j] += x[i] * w[j]"]
_POST = ["loss[None] += acc ** 2", "loss[None] += y[i] * x[i]"]
_OUTER = ["range(n)", "range(2, n - 1)"]
_INNER = ["range(n)", "range(i + 1, n)", "range(i)", "range(i, n)", "range(1, i + 1)"]  # boxes and triangles
_DRAWN = {}
_DRAWN_COUNTS = {"gathered": 0, "kept": 0}
_DRAWN_DIR = tempfile.mkdtemp(prefix="kerndiff_pairs_")


@settings(max_examples=int(os.environ.get("KERNDIFF_FUZZ_N", 200)) if os.environ.get("KERNDIFF_FUZZ") == "long"
          else 8, deadline=None, derandomize=os.environ.get("CI") == "true")
@given(pre=st.sampled_from(_PRE), condition=st.sampled_from(_CONDITIONS),
       lines=st.lists(st.sampled_from(range(len(_LINES))), min_size=1, max_size=3),
       post=st.lists(st.sampled_from(_POST), max_size=2), outer=st.sampled_from(_OUTER),
       inner=st.sampled_from(_INNER))
@example(pre=_PRE[1], condition="i != j", lines=[0, 8], post=[], outer=_OUTER[0], inner=_INNER[0])  # gathered
# kept: x_adj[j] reads the carried sum's adjoint
@example(pre=_PRE[1], condition="True", lines=[5], post=[_POST[0]], outer=_OUTER[0], inner=_INNER[0])
def test_drawn_pair_loops(runtime, pre, condition, lines, post, outer, inner):
    """Drawn pair loops (a value before the pairs, a condition on both indices, adds into the loss
    with and without transcendental functions, into y[i] and z[j], a sum carried over j, uses of
    it after the loop; over a box or a triangle
    of pairs, the outer range whole or not), with the pass on for any size: gathered or not,
    kd.check_grad of the kernel (orders 1 and 2) agrees with finite differences, or the kernel is
    refused (a y[i] read after the adds into it)."""
    n = 7
    if not _DRAWN:
        rng = np.random.default_rng(0)
        _DRAWN.update({name: ti.field(ti.f64, n, needs_grad=True) for name in ("x", "w", "y", "z")})
        _DRAWN.update(k=ti.field(ti.f64, (), needs_grad=True), loss=ti.field(ti.f64, (), needs_grad=True),
                      n=n)
        _DRAWN["x"].from_numpy(rng.uniform(-1.0, 1.0, n))
        _DRAWN["w"].from_numpy(rng.uniform(0.5, 1.5, n))
        _DRAWN["k"][None] = 0.6
    # (the last line keeps the loss dependent on x and w whatever was drawn: a check of all zeros
    # would show nothing)
    body = "\n".join([pre, "acc = 0.0", f"for j in {inner}:", f"    if {condition}:"]
                     + ["        " + _LINES[p] for p in lines] + post + ["loss[None] += 0.1 * x[i] * w[i]"])
    fn, src = load_elementwise(body, _DRAWN, _DRAWN_DIR, head=f"def kernel():\n    for i in {outer}:")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transposed_gathers, "MIN_TRIPS", 0)
        patch.setattr(split_ranges, "MIN_TRIPS", 0)  # (`i != j` in a box: both loops split)
        k = kd.kernel(fn)
        for f in ("y", "z"):
            _DRAWN[f].fill(0)
        try:
            assert kd.check_grad(k, [_DRAWN["x"], _DRAWN["w"], _DRAWN["k"]], _DRAWN["loss"], order=2) < 1e-6, src
        except kd.KernDiffError:  # (y[i] added into and then read: refused alone, as without the pass)
            _DRAWN_COUNTS["refused"] = _DRAWN_COUNTS.get("refused", 0) + 1
            return
        _DRAWN_COUNTS["gathered" if GATHERED in k.reverse.source else "kept"] += 1


RAN = set()
record_run = runs_recorder(RAN)


def test_drawn_pair_loops_were_gathered(request):
    """The drawn pair loops above took the pass, and kept one loop, each at least once."""
    skip_unless_all_ran_before(request, RAN)
    assert _DRAWN_COUNTS["gathered"] and _DRAWN_COUNTS["kept"], _DRAWN_COUNTS
