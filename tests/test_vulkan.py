"""The GPU code path without a GPU: the f32 corpus on Taichi's Vulkan (SPIR-V) backend, run on
Mesa's software driver (lavapipe), against the f64 CPU derivatives (which test_corpus checks
against finite differences).

Needs the Debian packages mesa-vulkan-drivers and libvulkan1 (.ci/run installs them). Without
them the tests are skipped with that reason; under CI=true a missing driver is a failure.
"""
import os
import glob

import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
import test_fuzz_programs as fuzz_programs
from harness import derivatives, equal_directions_against_generated, make_derivative_fields
from test_corpus import CORPUS_NAMES, assert_same_derivatives, build_corpus, cpu_derivatives, start_backend

SKIP_ON_VULKAN = {"template_args"}  # scalar f32 args work; kept off to bound the suite's compile time
NAMES = [n for n in CORPUS_NAMES if n not in SKIP_ON_VULKAN]


def vulkan_driver_present():
    return bool(glob.glob("/usr/share/vulkan/icd.d/*.json"))


# Programs drawn by test_fuzz_programs (as its generator draws them now), each as k.forward and
# k.reverse.forward on both backends: multi-loop kernels with while loops, atomic max/min,
# scatters and sums. Such programs, compared so in session 32, found the locals declared once for
# every thread of a kernel's loops (codegen/scopes.py); the corpus's walks_and_their_maximum keeps
# that case whatever the generator draws.
PROGRAMS = [0, 1, 2, 3, 5, 6, 8, 34]


def program_derivatives(fields, dt_name):
    """{seed: harness.derivatives of drawn program seed, or its KernDiffError's reason}."""
    out = {}
    for seed in PROGRAMS:
        fn, args, _ = fuzz_programs.drawn_kernel(fields, seed, dt_name)
        fuzz_programs.starting_values(fields)
        try:
            out[seed] = derivatives(kd.kernel(fn), args)
        except kd.KernDiffError as e:
            out[seed] = e.reason
    return out


@pytest.fixture(scope="module")
def references():
    refs = cpu_derivatives(NAMES)
    ti.init(arch=ti.cpu, default_fp=ti.f64)
    programs = program_derivatives(fuzz_programs.make_fields(ti.f64), "f64")
    ti.reset()
    return {"corpus": refs, "programs": programs}


@pytest.fixture(scope="module")
def vulkan_corpus(references):
    if not vulkan_driver_present():
        if os.environ.get("CI") == "true":
            pytest.fail("no Vulkan driver: CI must install mesa-vulkan-drivers and libvulkan1")
        pytest.skip("no Vulkan driver (apt-get install mesa-vulkan-drivers libvulkan1)")
    if not start_backend(ti.vulkan, ti.f32):  # a driver's manifest, but no working loader or device
        assert os.environ.get("CI") != "true", "Taichi fell back from Vulkan"
        pytest.skip("Taichi found no working Vulkan device (it fell back to the CPU)")
    yield build_corpus(ti.f32)
    ti.reset()


@pytest.mark.parametrize("name", NAMES)
def test_f32_corpus_on_vulkan_matches_cpu(vulkan_corpus, references, name):
    assert_same_derivatives(derivatives(*vulkan_corpus[name]), references["corpus"][name], 2e-3)


def test_drawn_programs_on_vulkan_match_cpu(vulkan_corpus, references):
    got = program_derivatives(fuzz_programs.make_fields(ti.f32), "f32")
    for seed, ref in references["programs"].items():
        if isinstance(ref, str):
            assert got[seed] == ref, f"program {seed}"
        else:
            assert_same_derivatives(got[seed], ref, 2e-3)
    assert sum(not isinstance(r, str) for r in references["programs"].values()) >= len(PROGRAMS) // 2


def test_f64_transcendental_on_vulkan_is_a_clear_error(vulkan_corpus):
    x = ti.field(ti.f64, shape=4)
    y = ti.field(ti.f64, shape=4)

    @kd.kernel
    def k():
        for i in x:
            y[i] = ti.exp(x[i])

    with pytest.raises(kd.KernDiffError, match="not available on Taichi's SPIR-V backends") as info:
        k()
    assert "y[i] = ti.exp(x[i])" in str(info.value)


def test_gpu_backends_keep_taichis_sin_cos_and_tanh(vulkan_corpus):
    """kerndiff's own f32 math (opt.cpu_math) is for the CPU: here the derived kernels call
    Taichi's functions, which the device has fast versions of."""
    k, args = vulkan_corpus["elementwise"]
    make_derivative_fields(k, args)
    src = k.reverse.forward.source
    assert "sincos(" not in src and "tanh_via_exp(" not in src
    assert "ti.sin(" in src and "ti.tanh(" in src


@pytest.mark.parametrize("name", ["mass_spring", "dense_layer"])
def test_equal_directions_variant_on_vulkan(vulkan_corpus, name, variant_runs):
    """k.forward.forward seeded alike at both levels: the variant (and its bit-for-bit seed
    test, over a Vector field in mass_spring) on SPIR-V gives the kernel as generated's numbers."""
    got, generated = equal_directions_against_generated(*vulkan_corpus[name])
    assert len(variant_runs) == 1
    for a, b in zip(got, generated):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.max(np.abs(b)))))


def test_store_check_on_vulkan(vulkan_corpus):
    """The run-time check behind stores at indices read from data (ad/claims.py) on SPIR-V: its
    kernel returns a value, and its claims and atomic max run on the device. A permutation's
    reverse runs (analytic values); a repeated index is refused before the reverse ran."""
    n = 64
    x, z, perm = ti.field(ti.f32, shape=n), ti.field(ti.f32, shape=n), ti.field(ti.i32, shape=n)

    @kd.kernel
    def scatter():
        for i in range(n):
            z[perm[i]] = ti.sin(x[i]) * x[i]

    xs, order = np.linspace(0.1, 1.0, n).astype(np.float32), np.random.default_rng(0).permutation(n)
    x.from_numpy(xs)
    perm.from_numpy(order.astype(np.int32))
    seed = np.linspace(1.0, 2.0, n).astype(np.float32)
    scatter()
    kd.adjoint(z).from_numpy(seed)
    kd.adjoint(x).fill(0)
    scatter.reverse()
    np.testing.assert_allclose(kd.adjoint(x).to_numpy(), (np.cos(xs) * xs + np.sin(xs)) * seed[order], rtol=1e-5)
    order[17] = order[40]
    perm.from_numpy(order.astype(np.int32))
    scatter()
    kd.adjoint(z).from_numpy(seed)
    with pytest.raises(kd.KernDiffError, match=r"iterations i = 17 and i = 40 of this parallel loop both reach"):
        scatter.reverse()
    np.testing.assert_array_equal(kd.adjoint(z).to_numpy(), seed)


def test_program_hvp_on_vulkan(vulkan_corpus):
    """H·v of a two-kernel program on SPIR-V (kd.Tape over the forward kernels; the atomic max's
    k.forward.reverse is its k.reverse.forward with the adjoints' roles swapped), against the
    analytic H·v: loss = g(x_w)² + x₂² x₃² / 2, g = x sin x, w the maximum's winner."""
    x, y = ti.field(ti.f32, shape=6), ti.field(ti.f32, shape=6)
    m, loss = ti.field(ti.f32, shape=()), ti.field(ti.f32, shape=())

    @kd.kernel
    def peak():
        for i in x:
            ti.atomic_max(m[None], ti.sin(x[i]) * x[i])
            y[i] = x[i] * x[i]

    @kd.kernel
    def total():
        loss[None] += m[None] * m[None] + 0.5 * y[2] * y[3]

    def program():
        m[None] = -10.0
        peak()
        total()

    xv = np.array([0.3, 1.9, 0.5, -0.7, 1.1, 0.2])
    v = np.array([0.4, -1.2, 0.8, 0.5, 1.5, -0.3])
    (hv,) = kd.hvp(program, inputs=[x], output=loss)([xv], [v])
    w = int(np.argmax(np.sin(xv) * xv))
    g, g1, g2 = (np.sin(xv[w]) * xv[w], np.sin(xv[w]) + xv[w] * np.cos(xv[w]),
                 2 * np.cos(xv[w]) - xv[w] * np.sin(xv[w]))
    expected = np.zeros(6)
    expected[w] = 2 * (g1 * g1 + g * g2) * v[w]
    expected[2] += xv[3] ** 2 * v[2] + 2 * xv[2] * xv[3] * v[3]
    expected[3] += xv[2] ** 2 * v[3] + 2 * xv[2] * xv[3] * v[2]
    np.testing.assert_allclose(hv, expected, rtol=1e-4, atol=1e-5)


def test_ndarray_kernel_on_vulkan(vulkan_corpus):
    """A kernel over ti.ndarray parameters on SPIR-V (the generated kernels take the arrays and
    their derivative arrays as parameters): gradient by k.reverse and H·v by k.reverse.forward,
    against the analytic ones of loss = Σ c_i sin(x_i) x_i."""
    x, c = ti.ndarray(ti.f32, 6, needs_grad=True), ti.ndarray(ti.f32, 6)
    loss = ti.field(ti.f32, shape=(), needs_grad=True)

    @kd.kernel
    def weighted(x: ti.types.ndarray(), c: ti.types.ndarray()):
        for i in x:
            loss[None] += c[i] * ti.sin(x[i]) * x[i]

    xv = np.array([0.3, 1.9, 0.5, -0.7, 1.1, 0.2])
    cv = np.array([1.0, 0.5, 2.0, -1.0, 0.3, 1.5])
    v = np.array([0.4, -1.2, 0.8, 0.5, 1.5, -0.3])
    x.from_numpy(xv.astype(np.float32))
    c.from_numpy(cv.astype(np.float32))
    weighted(x, c)
    kd.dual(x).from_numpy(v.astype(np.float32))
    weighted.forward(x, c)
    x.grad.fill(0.0)
    kd.dual(x.grad).fill(0.0)
    loss.grad[None] = 1.0
    weighted.reverse.forward(x, c)
    np.testing.assert_allclose(x.grad.to_numpy(), cv * (np.sin(xv) + xv * np.cos(xv)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kd.dual(x.grad).to_numpy(), cv * (2 * np.cos(xv) - xv * np.sin(xv)) * v,
                               rtol=1e-5, atol=1e-6)


def test_ndarray_of_components_on_vulkan(vulkan_corpus):
    """A 2-D ndarray of points' components on SPIR-V, summed into a 0-D field: the reverse
    against the analytic gradient of loss = Σ |x_i|² sin(x_i0)."""
    x = ti.ndarray(ti.f32, (5, 2), needs_grad=True)
    loss = ti.field(ti.f32, shape=(), needs_grad=True)

    @kd.kernel
    def energy(x: ti.types.ndarray()):
        for i in range(x.shape[0]):
            loss[None] += (x[i, 0] ** 2 + x[i, 1] ** 2) * ti.sin(x[i, 0])

    xv = np.array([[0.3, 1.9], [0.5, -0.7], [1.1, 0.2], [-0.4, 0.6], [0.9, -1.3]])
    x.from_numpy(xv.astype(np.float32))
    energy(x)
    x.grad.fill(0.0)
    loss.grad[None] = 1.0
    energy.reverse(x)
    a, b = xv[:, 0], xv[:, 1]
    expected = np.stack([2 * a * np.sin(a) + (a * a + b * b) * np.cos(a), 2 * b * np.sin(a)], axis=1)
    np.testing.assert_allclose(x.grad.to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_scan_in_place_under_tape_on_vulkan(vulkan_corpus):
    """A running product kept in place on SPIR-V (`b[i, t] = b[i, t - 1] * b[i, t]`: the previous
    trip's element handed on in a local, ad.owned._forward_previous_trip) under kd.Tape, which
    restores b for the reverse: the values against numpy's cumulative product and the gradient of
    Σ (t + 1) b[i, t] against the analytic one."""
    n, T = 3, 6
    b = ti.field(ti.f32, (n, T), needs_grad=True)
    loss = ti.field(ti.f32, (), needs_grad=True)

    @kd.kernel
    def scan():
        for i in range(n):
            for t in range(1, T):
                b[i, t] = b[i, t - 1] * b[i, t]

    @kd.kernel
    def measure():
        for i, t in b:
            loss[None] += b[i, t] * (t + 1)

    b0 = np.random.default_rng(5).uniform(0.5, 1.5, (n, T))
    b.from_numpy(b0.astype(np.float32))
    with kd.Tape(loss):
        scan()
        measure()
    prods = np.cumprod(b0, axis=1)
    np.testing.assert_allclose(b.to_numpy(), prods, rtol=1e-5)
    expected = np.array([[sum((t + 1) * prods[i, t] for t in range(s, T)) / b0[i, s] for s in range(T)]
                         for i in range(n)])
    np.testing.assert_allclose(kd.adjoint(b).to_numpy(), expected, rtol=1e-5)


def test_compaction_by_old_values_on_vulkan(vulkan_corpus):
    """Stream compaction by the old values of an atomic add (a kernel writing integers only) and
    a kernel computing from the entries the list names, on SPIR-V under kd.Tape, and the two in
    one kernel (the fused form): the gradient of Σ (x sin x)² over the positive x, against the
    analytic one."""
    n = 12
    x, y = ti.field(ti.f32, n, needs_grad=True), ti.field(ti.f32, n, needs_grad=True)
    picked, count = ti.field(ti.i32, n), ti.field(ti.i32, ())
    loss = ti.field(ti.f32, (), needs_grad=True)

    @kd.kernel
    def compact():
        for i in x:
            if x[i] > 0.0:
                picked[ti.atomic_add(count[None], 1)] = i

    @kd.kernel
    def gather_and_sum():
        for k in y:
            if k < count[None]:
                j = picked[k]
                y[k] = ti.sin(x[j]) * x[j]
                loss[None] += y[k] ** 2

    xv = np.array([0.3, -1.9, 0.5, -0.7, 1.1, 0.2, -0.4, 0.9, 1.4, -0.1, 0.6, -1.2])
    x.from_numpy(xv.astype(np.float32))
    with kd.Tape(loss):
        compact()
        gather_and_sum()
    assert count[None] == 7 and sorted(picked.to_numpy()[:7]) == list(np.flatnonzero(xv > 0))
    g, dg = np.sin(xv) * xv, np.sin(xv) + xv * np.cos(xv)
    np.testing.assert_allclose(x.grad.to_numpy(), np.where(xv > 0, 2 * g * dg, 0.0), rtol=1e-5, atol=1e-6)

    @kd.kernel
    def fused():  # the same in one kernel: the old values reach the integer list only
        count[None] = 0
        for i in x:
            if x[i] > 0.0:
                picked[ti.atomic_add(count[None], 1)] = i
        for k in y:
            if k < count[None]:
                j = picked[k]
                y[k] = ti.sin(x[j]) * x[j]
                loss[None] += y[k] ** 2

    with kd.Tape(loss):
        fused()
    assert count[None] == 7 and sorted(picked.to_numpy()[:7]) == list(np.flatnonzero(xv > 0))
    np.testing.assert_allclose(x.grad.to_numpy(), np.where(xv > 0, 2 * g * dg, 0.0), rtol=1e-5, atol=1e-6)


def test_random_draws_on_vulkan(vulkan_corpus):
    """ti.random and ti.randn on SPIR-V: noise drawn into a field and kicks added in place, under
    kd.Tape; the gradient against the analytic one at the drawn values, read back."""
    n = 32
    x, noise = ti.field(ti.f32, n, needs_grad=True), ti.field(ti.f32, n, needs_grad=True)
    v, loss = ti.field(ti.f32, n, needs_grad=True), ti.field(ti.f32, (), needs_grad=True)

    @kd.kernel
    def draw_noise():
        for i in noise:
            noise[i] = 0.5 * ti.random() + ti.randn()

    @kd.kernel
    def kick_and_measure():
        for i in v:
            v[i] = ti.sin(x[i]) + noise[i] * x[i] + 0.3 * ti.randn()
        for i in v:
            loss[None] += v[i] ** 2

    xv = np.linspace(-1.0, 1.0, n)
    x.from_numpy(xv.astype(np.float32))
    with kd.Tape(loss):
        draw_noise()
        kick_and_measure()
    drawn, vv = noise.to_numpy().astype(np.float64), v.to_numpy().astype(np.float64)
    assert len(set(drawn)) == n and 0.15 < np.std(vv - np.sin(xv) - drawn * xv) < 0.5  # (the kicks: 0.3 randn)
    np.testing.assert_allclose(x.grad.to_numpy(), 2 * vv * (np.cos(xv) + drawn), rtol=1e-4, atol=1e-5)


def test_keyed_draws_on_vulkan(vulkan_corpus):
    """SPIR-V draws the numbers the CPU does for a seed (test_random's numpy reference of
    codegen/draws.py), and a reverse kernel that needs them draws them again: y = x (1 + 0.2 z),
    loss = Σ y², so x's adjoint is 2 y²/x at the primal's numbers."""
    from test_random import numpy_keyed_random
    n = 64
    x, y = ti.field(ti.f32, n, needs_grad=True), ti.field(ti.f32, n, needs_grad=True)
    u, loss = ti.field(ti.f32, n), ti.field(ti.f32, (), needs_grad=True)

    @kd.kernel
    def fill():
        for i in u:
            u[i] = ti.random(ti.f32)

    @kd.kernel
    def scaled():
        for i in x:
            y[i] = x[i] * (1.0 + 0.2 * ti.randn())
            loss[None] += y[i] ** 2

    fill.launch_seeded(4242, (), {})
    np.testing.assert_array_equal(u.to_numpy(), numpy_keyed_random(4242, 1, [np.arange(n)]).astype(np.float32))
    xv = np.linspace(0.5, 1.5, n).astype(np.float32)
    x.from_numpy(xv)
    scaled()
    kd.adjoint(loss)[None] = 1.0
    scaled.reverse()
    yv = y.to_numpy().astype(np.float64)
    assert np.std(yv / xv) > 0.1
    np.testing.assert_allclose(x.grad.to_numpy(), 2 * yv ** 2 / xv, rtol=1e-4)


def test_pair_loop_gathered_on_vulkan(vulkan_corpus, monkeypatch):
    """A pair energy's reverse as two gathering loops (opt.transposed_gathers), each over the
    trips either side of `i == j` (opt.split_ranges; both size thresholds lowered) on SPIR-V: the
    gradient against the analytic one in f64."""
    from kerndiff.opt import split_ranges, transposed_gathers
    monkeypatch.setattr(transposed_gathers, "MIN_TRIPS", 0)
    monkeypatch.setattr(split_ranges, "MIN_TRIPS", 0)
    n = 32
    pos = ti.Vector.field(2, ti.f32, n, needs_grad=True)
    E = ti.field(ti.f32, (), needs_grad=True)
    p = np.random.default_rng(7).uniform(0.0, 4.0, (n, 2))
    pos.from_numpy(p.astype(np.float32))

    @kd.kernel
    def energy():
        for i in range(n):
            for j in range(n):
                if i != j:
                    E[None] += 0.5 / ((pos[i] - pos[j]).norm_sqr() + 0.1)

    assert "gathered for each j" in energy.reverse.source and "for i in range(j + 1, 32):" in energy.reverse.source
    energy()
    E.grad[None] = 1.0
    energy.reverse()
    d = p[:, None, :] - p[None, :, :]
    r2 = (d ** 2).sum(-1) + 0.1
    np.fill_diagonal(r2, np.inf)
    np.testing.assert_allclose(pos.grad.to_numpy(), -2.0 * np.sum((d / r2[:, :, None] ** 2), axis=1),
                               rtol=2e-4, atol=1e-4)


def test_clamped_ranges_on_vulkan(vulkan_corpus, monkeypatch):
    """Tests of the index against bounds that may fall outside the loop's range (`j > i - 5`,
    `j != i + 3`: ti.max / ti.min clamps and empty ranges, opt.split_ranges with its size threshold
    lowered) on SPIR-V: values and gradient against numpy's."""
    from kerndiff.opt import split_ranges
    monkeypatch.setattr(split_ranges, "MIN_TRIPS", 0)
    n = 12
    x = ti.field(ti.f32, n, needs_grad=True)
    y = ti.field(ti.f32, n, needs_grad=True)
    loss = ti.field(ti.f32, (), needs_grad=True)
    xv = np.linspace(-1.0, 1.0, n)
    x.from_numpy(xv.astype(np.float32))

    @kd.kernel
    def clamped():
        for i in range(n):
            s = 0.0
            for j in range(n):
                if j > i - 5:
                    s = s * 0.5 + x[j] * x[i]
            for j in range(2, n):
                if j != i + 3:
                    s += ti.sin(x[j])
            y[i] = s
            loss[None] += s * s

    src = clamped.source
    assert "ti.max(i - 4, 0)" in src and "ti.min(i + 3, 12)" in src, src
    clamped()
    kd.adjoint(loss)[None] = 1.0
    clamped.reverse()
    ys, grads = np.zeros(n), np.zeros(n)
    for i in range(n):  # s and its gradient, trip by trip (forward mode in numpy)
        s, ds = 0.0, np.zeros(n)
        for j in range(n):
            if j > i - 5:
                s, ds = s * 0.5 + xv[j] * xv[i], ds * 0.5 + np.eye(n)[j] * xv[i] + np.eye(n)[i] * xv[j]
        for j in range(2, n):
            if j != i + 3:
                s, ds = s + np.sin(xv[j]), ds + np.eye(n)[j] * np.cos(xv[j])
        ys[i], grads = s, grads + 2 * s * ds
    np.testing.assert_allclose(y.to_numpy(), ys, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x.grad.to_numpy(), grads, rtol=1e-4, atol=1e-4)
