"""Inner loops run over the trips their index test lets through (opt.split_ranges), on the CPU
(and on CUDA with KERNDIFF_TEST_ARCH=cuda; test_vulkan runs split loops on SPIR-V).

A pair energy's primal, gradient and H·v against their analytic values; drawn loops (each
comparison, either side, offsets that put the test's bound inside, at the edge of and outside the
range, a local assigned before the test) against numpy and against the same kernels without the
rewrite; and the loops the rewrite must leave as written (a local of the skipped trip read after the
loop or by the next trip, a break, an else, a bound the loop changes) against numpy."""
import os
import tempfile

import numpy as np
import pytest
import taichi as ti
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kerndiff as kd
from harness import load_elementwise, pair_energy
from kerndiff.opt import split_ranges

pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)

N = 70  # above split_ranges.MIN_TRIPS: the pair loops below are split without lowering it
SPLIT = "the trips with"


def has_test(source, test):
    """Whether the generated source tests `test` in an if (not only names it in a comment)."""
    return any(line.strip() == f"if {test}:" for line in source.splitlines())


def test_min_trips_is_what_this_module_assumes():
    assert N >= split_ranges.MIN_TRIPS


@pytest.fixture(scope="module")
def particles(runtime):
    pos = ti.Vector.field(3, ti.f64, N, needs_grad=True)
    E = ti.field(ti.f64, (), needs_grad=True)
    pos.from_numpy(np.random.default_rng(4).uniform(0.0, 3.0, (N, 3)))

    return pos, E, kd.kernel(pair_energy(pos, E, N))


def test_pair_energy_over_the_trips_either_side(particles):
    """E = ½ Σ_i Σ_{j≠i} e(r2), e = r2^-½ + 0.1 r2^-1: the primal, ∇E = Σ_j 2 e'(r2) d_ij and
    H·v = Σ_j 2 e'(r2) (v_i - v_j) + 4 e''(r2) (d_ij · (v_i - v_j)) d_ij, analytic in f64, from
    kernels that test nothing per pair (the primal's loop, the reverse's and the HVP's two each)."""
    pos, E, energy = particles
    for source in (energy.source, energy.reverse.source):
        assert not has_test(source, "i != j") and "for j in range(i):" in source, source
        assert f"for j in range(i + 1, {N}):" in source, source
    p = pos.to_numpy()
    d = p[:, None, :] - p[None, :, :]
    r2 = (d ** 2).sum(-1) + 0.01
    off = ~np.eye(N, dtype=bool)
    de = np.where(off, -0.5 * r2 ** -1.5 - 0.1 * r2 ** -2, 0.0)
    dde = np.where(off, 0.75 * r2 ** -2.5 + 0.2 * r2 ** -3, 0.0)
    E[None] = 0.0
    energy()
    assert E[None] == pytest.approx(0.5 * np.where(off, r2 ** -0.5 + 0.1 / r2, 0.0).sum(), rel=1e-12)
    pos.grad.fill(0)
    E.grad[None] = 1.0
    energy.reverse()
    np.testing.assert_allclose(pos.grad.to_numpy(), (2 * de[:, :, None] * d).sum(1), rtol=1e-10, atol=1e-10)
    v = np.random.default_rng(5).standard_normal((N, 3))
    hvp = kd.hvp(energy, [pos], E)([p], tangents=[v])[0]
    dv = v[:, None, :] - v[None, :, :]
    expected = (2 * de[:, :, None] * dv).sum(1) + ((4 * dde * (d * dv).sum(-1))[:, :, None] * d).sum(1)
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(hvp, expected, rtol=1e-9, atol=1e-9)
    assert SPLIT in energy.reverse.forward.source


_OPS = ["!=", "<", "<=", ">", ">="]
_FIELDS = {}
_DIR = tempfile.mkdtemp(prefix="kerndiff_split_")


def _fields(n):
    if not _FIELDS:
        rng = np.random.default_rng(0)
        _FIELDS.update({name: ti.field(ti.f64, n, needs_grad=True) for name in ("x", "w", "y")})
        _FIELDS.update(loss=ti.field(ti.f64, (), needs_grad=True))
        _FIELDS["x"].from_numpy(rng.uniform(-1.0, 1.0, n))
        _FIELDS["w"].from_numpy(rng.uniform(0.5, 1.5, n))
    return _FIELDS


def _reference(op, offset, flipped, lo, hi, prefix, n):
    """y and the loss of the drawn kernel, by numpy, trip by trip."""
    x, w = (_FIELDS[f].to_numpy() for f in ("x", "w"))
    y = np.zeros(n)
    for i in range(n):
        s = 0.0
        for j in range(lo, hi):
            c = i + offset
            a, b = (c, j) if flipped else (j, c)
            if eval(f"a {op} b"):
                t = x[j] * w[i] if prefix else x[j]
                s = s * 0.9 + np.sin(t + x[i])
        y[i] = s
    return y, float((y ** 2).sum())


@settings(max_examples=int(os.environ.get("KERNDIFF_FUZZ_N", 200)) if os.environ.get("KERNDIFF_FUZZ") == "long"
          else 12, deadline=None, derandomize=os.environ.get("CI") == "true")
@given(op=st.sampled_from(_OPS), offset=st.sampled_from([0, 1, -2, 5, -9, 30]), flipped=st.booleans(),
       bounds=st.sampled_from([(0, 9), (2, 7), (3, 9)]), prefix=st.booleans())
@example(op="!=", offset=0, flipped=False, bounds=(0, 9), prefix=True)  # the pair loop's test
@example(op=">=", offset=30, flipped=True, bounds=(2, 7), prefix=False)  # a bound past the range
def test_drawn_tests_of_the_index(op, offset, flipped, bounds, prefix):
    """`for j in range(lo, hi): [t = x[j] * w[i]] if j OP i + c: s = s * 0.9 + ti.sin(t + x[i])`
    (the order of the trips matters to s) with the size threshold lowered: y and the loss against
    numpy, the loop split (no test left), and y, the gradient and H·v against the same kernel left
    as written (sums round alike: the trips run in their order)."""
    n = 9
    fields = _fields(n)
    lo, hi = bounds
    c = f"i + {offset}" if offset > 0 else f"i - {-offset}" if offset < 0 else "i"
    test = f"{c} {op} j" if flipped else f"j {op} {c}"
    body = "\n".join(["s = 0.0", f"for j in range({lo}, {hi}):"] + (["    t = x[j] * w[i]"] if prefix else [])
                     + [f"    if {test}:", f"        s = s * 0.9 + ti.sin({'t' if prefix else 'x[j]'} + x[i])",
                        "y[i] = s", "loss[None] += y[i] ** 2"])
    fn, src = load_elementwise(body, fields, _DIR, head=f"def kernel():\n    for i in range({n}):")
    results = []
    for min_trips in (0, 1 << 30):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(split_ranges, "MIN_TRIPS", min_trips)
            k = kd.kernel(fn)
            assert has_test(k.source, test) == (min_trips > 0), k.source
        fields["loss"][None] = 0.0
        k()
        y, loss = _reference(op, offset, flipped, lo, hi, prefix, n)
        np.testing.assert_allclose(fields["y"].to_numpy(), y, rtol=1e-13, atol=1e-13, err_msg=src)
        assert fields["loss"][None] == pytest.approx(loss, rel=1e-13, abs=1e-13)
        grad = kd.backward(k, [fields["x"], fields["w"]], fields["loss"])
        hvp = kd.hvp(k, [fields["x"], fields["w"]], fields["loss"])
        values = [fields["x"].to_numpy(), fields["w"].to_numpy()]
        directions = [np.linspace(-1.0, 1.0, n), np.linspace(0.5, -0.5, n)]
        results.append((fields["y"].to_numpy(), *grad(values), *hvp(values, tangents=directions)))
    for split, written in zip(*results):
        np.testing.assert_allclose(split, written, rtol=1e-12, atol=1e-12, err_msg=src)


_KEPT = {
    "the skipped trip's local read after the loop": (
        ["last = 0.0", "for j in range(9):", "    last = x[j]", "    if j != i:", "        s = s + last * w[i]",
         "y[i] = s + last"],
        lambda x, w, i: sum(x[j] * w[i] for j in range(9) if j != i) + x[8]),
    "the skipped trip's local read by the next trip": (
        ["prev = 0.0", "for j in range(9):", "    t = prev", "    prev = x[j]", "    if j != i:",
         "        s = s + t * w[i]", "y[i] = s"],
        lambda x, w, i: sum((x[j - 1] if j else 0.0) * w[i] for j in range(9) if j != i)),
    "a break": (
        ["for j in range(9):", "    if j != i:", "        s = s + x[j] * w[i]", "        if s > 1.0:",
         "            break", "y[i] = s"],
        None),
    "an else": (
        ["for j in range(9):", "    if j < i:", "        s = s + x[j]", "    else:", "        s = s - w[j]",
         "y[i] = s"],
        lambda x, w, i: sum(x[j] if j < i else -w[j] for j in range(9))),
    "a bound the loop changes": (
        ["c = i", "for j in range(9):", "    if j != c:", "        s = s + x[j]", "        c = 3", "y[i] = s"],
        None),
}


@pytest.mark.parametrize("case", sorted(_KEPT))
def test_loops_kept_as_written(case, monkeypatch):
    """What the rewrite must not do (module docstring of opt.split_ranges): the test stays, and
    the values are numpy's (where a closed form is at hand) and the gradient finite differences'."""
    monkeypatch.setattr(split_ranges, "MIN_TRIPS", 0)
    n = 9
    fields = _fields(n)
    lines, expected = _KEPT[case]
    fn, src = load_elementwise("\n".join(["s = 0.0"] + lines + ["loss[None] += y[i] ** 2"]), fields, _DIR,
                               head=f"def kernel():\n    for i in range({n}):")
    k = kd.kernel(fn)
    assert SPLIT not in k.source and SPLIT not in k.reverse.source, k.source
    fields["loss"][None] = 0.0
    k()
    if expected is not None:
        x, w = fields["x"].to_numpy(), fields["w"].to_numpy()
        np.testing.assert_allclose(fields["y"].to_numpy(), [expected(x, w, i) for i in range(n)], rtol=1e-13)
    assert kd.check_grad(k, [fields["x"], fields["w"]], fields["loss"]) < 1e-6, src


def test_bounds_known_at_launch(particles):
    """`for j in range(m): if i != j:` with m a kernel argument (its trips unknown until launch:
    split whatever they are) and a triangle `for j in range(i + 1, m): if j != k:`: values and
    gradients against numpy's, the tests gone from the source."""
    pos, E, _ = particles

    @kd.kernel
    def counted(m: ti.i32, k: ti.i32):
        for i in range(m):
            e = 0.0
            for j in range(m):
                if i != j:
                    e += 1.0 / ((pos[i] - pos[j]).norm_sqr() + 0.5)
            for j in range(i + 1, m):
                if j != k:
                    e += 0.1 * pos[j][0] * pos[i][1]
            E[None] += e

    m, k = 50, 20
    for source in (counted.source, counted.reverse.source):
        assert not has_test(source, "i != j") and not has_test(source, "j != k"), source
    source = counted.source  # (the reverse's chunks of private copies leave i's range unknown: clamped)
    assert "for j in range(i):" in source and "for j in range(i + 1, m):" in source, source  # (i < m)
    assert "for j_1 in range(i + 1, ti.min(k, m)):" in source, source
    assert "for j_1 in range(ti.max(k + 1, i + 1), m):" in source, source
    p = pos.to_numpy()[:m]
    d = p[:, None, :] - p[None, :, :]
    r2 = (d ** 2).sum(-1) + 0.5
    off = ~np.eye(m, dtype=bool)
    upper = np.triu(np.ones((m, m), dtype=bool), 1) & (np.arange(m) != k)[None, :]
    E[None] = 0.0
    counted(m, k)
    expected = np.where(off, 1.0 / r2, 0.0).sum() + 0.1 * (upper * p[None, :, 0] * p[:, None, 1]).sum()
    assert E[None] == pytest.approx(expected, rel=1e-12)
    pos.grad.fill(0)
    E.grad[None] = 1.0
    counted.reverse(m, k)
    grad = np.zeros_like(pos.to_numpy())
    grad[:m] = (np.where(off, -2.0 / r2 ** 2, 0.0)[:, :, None] * d).sum(1) * 2
    grad[:m, 0] += 0.1 * (upper * p[:, None, 1]).sum(0)
    grad[:m, 1] += 0.1 * (upper * p[None, :, 0]).sum(1)
    np.testing.assert_allclose(pos.grad.to_numpy(), grad, rtol=1e-10, atol=1e-10)
