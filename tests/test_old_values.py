"""The old value an atomic returns (`slot = ti.atomic_add(count[c], 1)`): binning, stream
compaction and claiming slots, which hand out values in the order the threads ran in. No
derivative kernel can replay that order, so the values may reach integer work only (indices and
values of integer fields), which the reverse drops and the forward kernel runs again: in kernels
that write no float (no derivative work at all) and, since session 53, in kernels that go on to
compute floats from the integer fields they fill (the fused form: bin a grid, then sum over it);
where an old value reaches a float it is refused (test_errors). The serial loops here fix the
order, so the values are checked exactly: that no pass merged two atomics, moved one out of its
loop or dropped one whose value goes unread."""
import os
import tempfile

import numpy as np
import pytest
import taichi as ti
from hypothesis import given, settings
from hypothesis import strategies as st

import kerndiff as kd
from harness import load_elementwise


@pytest.fixture(scope="module", autouse=True)
def _runtime(runtime):
    yield


def test_serial_claims_keep_every_atomic_in_place():
    n = ti.field(ti.i32, 6)
    pairs, inner, below = ti.field(ti.i32, 4), ti.field(ti.i32, (4, 2)), ti.field(ti.i32, 4)

    @ti.func
    def claim(counter: ti.template(), c):
        return ti.atomic_add(counter[c], 1)

    @kd.kernel
    def claims():
        ti.loop_config(serialize=True)
        for i in range(4):
            a = ti.atomic_add(n[0], 1)
            b = ti.atomic_add(n[0], 1)  # (the same expression as a's: two claims all the same)
            pairs[i] = b - a + 10 * a
            for k in range(2):
                inner[i, k] = claim(n, 1)  # (nothing in the inner loop changes but the count)
            ti.atomic_add(n[2], 1)
            _ = ti.atomic_max(n[3], i)  # (its value goes unread: the max still runs)
            if ti.atomic_sub(n[4], 1) > 97:
                below[i] = 1
            n[5] = ti.atomic_min(n[5], 10 - i) * 2 + n[5]  # (the old value, then the new)

    n.from_numpy(np.array([0, 0, 0, -1, 100, 50], np.int32))
    claims()
    np.testing.assert_array_equal(pairs.to_numpy(), [1, 21, 41, 61])
    np.testing.assert_array_equal(inner.to_numpy(), [[0, 1], [2, 3], [4, 5], [6, 7]])
    np.testing.assert_array_equal(below.to_numpy(), [1, 1, 1, 0])
    # n[5]: min(50, 10) -> old 50, then n[5] = 50 * 2 + 10; min(110, 9) -> 110 * 2 + 9; ...
    expected = 50
    for i in range(4):
        expected = expected * 2 + min(expected, 10 - i)
    np.testing.assert_array_equal(n.to_numpy(), [8, 8, 4, 3, 96, expected])
    assert "a = ti.atomic_add(n[0], 1)" in claims.source and "b = ti.atomic_add(n[0], 1)" in claims.source
    assert "= ti.atomic_sub(n[4], 1)" in claims.source
    assert "ti.atomic_max(n[3], i)" in claims.source


def test_parallel_binning_and_compaction():
    """Particles into cells in parallel (the slot in the cell from the count's old value) and the
    positive entries of an array compacted into a list (`picked[ti.atomic_add(count[None], 1)] =
    i`): the slots in a cell are 0..count-1, each particle in its own cell once; the list holds
    the positive entries' indices, each once. The derivative kernels run and do nothing: the
    forward kernel is the primal, the reverse touches no adjoint."""
    P, C = 40, 5
    pos, cell, slot = ti.field(ti.f64, P), ti.field(ti.i32, P), ti.field(ti.i32, P)
    count, members = ti.field(ti.i32, C), ti.field(ti.i32, (C, P))
    picked, npicked = ti.field(ti.i32, P), ti.field(ti.i32, ())

    @kd.kernel
    def bin_particles(width: ti.f64):
        for i in pos:
            c = ti.cast(pos[i] / width, ti.i32)
            cell[i] = c
            slot[i] = ti.atomic_add(count[c], 1)
            members[c, slot[i]] = i
        for i in pos:
            if pos[i] > 0.5:
                picked[ti.atomic_add(npicked[None], 1)] = i

    rng = np.random.default_rng(3)
    p = rng.uniform(0.0, 1.0, P)
    pos.from_numpy(p)
    bin_particles(1.0 / C)
    cells = (p * C).astype(int)
    np.testing.assert_array_equal(cell.to_numpy(), cells)
    np.testing.assert_array_equal(count.to_numpy(), np.bincount(cells, minlength=C))
    for c in range(C):
        ids = np.flatnonzero(cells == c)
        assert sorted(slot.to_numpy()[ids]) == list(range(len(ids)))
        assert sorted(members.to_numpy()[c, :len(ids)]) == list(ids)
    assert npicked[None] == np.count_nonzero(p > 0.5)
    assert sorted(picked.to_numpy()[:npicked[None]]) == list(np.flatnonzero(p > 0.5))

    kd.adjoint(pos).fill(0.25)
    count.fill(0)
    npicked[None] = 0
    bin_particles.forward(1.0 / C)  # the primal again
    np.testing.assert_array_equal(count.to_numpy(), np.bincount(cells, minlength=C))
    bin_particles.reverse(1.0 / C)
    np.testing.assert_array_equal(count.to_numpy(), np.bincount(cells, minlength=C))
    np.testing.assert_array_equal(kd.adjoint(pos).to_numpy(), np.full(P, 0.25))


def test_compaction_then_gather_under_tape():
    """A program compacts the positive entries (an integer kernel taking the count's old values)
    and a second kernel computes from the entries the list names: under kd.Tape, the gradient
    and the Hessian of Σ (x sin x)² over the positive x, against the analytic ones and central
    differences (the list's order changes from run to run; the loss does not depend on it)."""
    n = 16
    x, y = ti.field(ti.f64, n, needs_grad=True), ti.field(ti.f64, n, needs_grad=True)
    picked, count = ti.field(ti.i32, n), ti.field(ti.i32, ())
    loss = ti.field(ti.f64, (), needs_grad=True)

    @kd.kernel
    def compact():
        for i in x:
            if x[i] > 0.0:
                k = ti.atomic_add(count[None], 1)
                picked[k] = i

    @kd.kernel
    def gather():
        for k in y:
            if k < count[None]:
                j = picked[k]
                y[k] = ti.sin(x[j]) * x[j]

    @kd.kernel
    def total():
        for k in y:
            if k < count[None]:
                loss[None] += y[k] ** 2

    def program():
        count[None] = 0
        y.fill(0.0)
        compact()
        gather()
        total()

    xv = np.random.default_rng(5).uniform(-1.5, 1.5, n)
    x.from_numpy(xv)
    with kd.Tape(loss):
        program()
    g = np.sin(xv) * xv
    dg = np.sin(xv) + xv * np.cos(xv)
    d2g = 2 * np.cos(xv) - xv * np.sin(xv)
    expected = np.where(xv > 0, 2 * g * dg, 0.0)
    np.testing.assert_allclose(kd.adjoint(x).to_numpy(), expected, rtol=1e-12, atol=1e-14)
    v = np.random.default_rng(6).normal(size=n)
    (hv,) = kd.hvp(program, inputs=[x], output=loss)([xv], [v])
    np.testing.assert_allclose(hv, np.where(xv > 0, 2 * (dg * dg + g * d2g) * v, 0.0), rtol=1e-12, atol=1e-14)
    x.from_numpy(xv)
    assert kd.check_grad(program, [x], loss) < 1e-6
    assert "k = ti.atomic_add(count[None], 1)" in compact.source


def test_claims_into_ndarrays():
    """The count and the list as ti.ndarray parameters."""
    n = 24
    values, picked, count = ti.ndarray(ti.f64, n), ti.ndarray(ti.i32, n), ti.ndarray(ti.i32, 1)

    @kd.kernel
    def compact(values: ti.types.ndarray(), picked: ti.types.ndarray(), count: ti.types.ndarray()):
        for i in values:
            if values[i] < 0.25:
                picked[ti.atomic_add(count[0], 1)] = i

    v = np.random.default_rng(8).uniform(0.0, 1.0, n)
    values.from_numpy(v)
    compact(values, picked, count)
    got = count.to_numpy()[0]
    assert got == np.count_nonzero(v < 0.25)
    assert sorted(picked.to_numpy()[:got]) == list(np.flatnonzero(v < 0.25))


def test_particles_with_a_neighbour_grid_built_in_parallel():
    """A smoothed-particle program as Taichi users write it: each step bins the particles into a
    grid in parallel (a cell's slots from its count's old values), sums densities and pair forces
    over the 3x3 neighbouring cells' lists, and moves the particles. Under kd.Tape over four
    steps, the gradient with respect to the initial positions and velocities against central
    differences, and the H·v of the program (kd.hvp) against differences of gradients."""
    N, G, steps, dt = 48, 6, 4, 0.01
    h = 1.0 / G
    x, v = ti.Vector.field(2, ti.f64, N, needs_grad=True), ti.Vector.field(2, ti.f64, N, needs_grad=True)
    x0, v0 = ti.Vector.field(2, ti.f64, N, needs_grad=True), ti.Vector.field(2, ti.f64, N, needs_grad=True)
    rho = ti.field(ti.f64, N, needs_grad=True)
    count, members = ti.field(ti.i32, (G, G)), ti.field(ti.i32, (G, G, N))
    loss = ti.field(ti.f64, (), needs_grad=True)

    @ti.func
    def weight(r2):
        q = ti.max(1.0 - r2 / (h * h), 0.0)
        return q * q * q

    @ti.func
    def cell_of(p):
        return ti.max(ti.min(ti.cast(ti.floor(p / h), ti.i32), G - 1), 0)

    @kd.kernel
    def start():
        for i in x:
            x[i] = x0[i]
            v[i] = v0[i]

    @kd.kernel
    def build_grid():
        for c in ti.grouped(count):
            count[c] = 0
        for i in x:
            cell = cell_of(x[i])
            slot = ti.atomic_add(count[cell], 1)
            members[cell, slot] = i

    @kd.kernel
    def density():
        for i in x:
            cell = cell_of(x[i])
            d = 0.0
            for off in ti.static(ti.grouped(ti.ndrange((-1, 2), (-1, 2)))):
                nc = cell + off
                if 0 <= nc[0] < G and 0 <= nc[1] < G:
                    for k in range(count[nc]):
                        d += weight((x[i] - x[members[nc, k]]).norm_sqr())
            rho[i] = d

    @kd.kernel
    def accelerate():
        for i in x:
            cell = cell_of(x[i])
            f = ti.Vector([0.0, -1.0])
            for off in ti.static(ti.grouped(ti.ndrange((-1, 2), (-1, 2)))):
                nc = cell + off
                if 0 <= nc[0] < G and 0 <= nc[1] < G:
                    for k in range(count[nc]):
                        j = members[nc, k]
                        if j != i:
                            r = x[i] - x[j]
                            f += 0.5 * (rho[i] + rho[j]) * weight(r.norm_sqr()) * r
            v[i] += dt * f

    @kd.kernel
    def move():
        for i in x:
            x[i] += dt * v[i]

    @kd.kernel
    def measure():
        for i in x:
            loss[None] += x[i].norm_sqr() + 0.1 * rho[i]

    def run():
        start()
        for _ in range(steps):
            build_grid()
            density()
            accelerate()
            move()
        build_grid()
        density()
        measure()

    rng = np.random.default_rng(1)
    x0.from_numpy(rng.uniform(0.2, 0.8, (N, 2)))
    v0.from_numpy(rng.normal(0.0, 0.3, (N, 2)))
    assert kd.check_grad(run, [v0, x0], loss) < 1e-6

    base, direction = v0.to_numpy(), rng.normal(size=(N, 2))
    (hv,) = kd.hvp(run, inputs=[v0], output=loss)([base], [direction])

    def gradient_at(values):
        v0.from_numpy(values)
        with kd.Tape(loss):
            run()
        return kd.adjoint(v0).to_numpy().copy()
    eps = 1e-5
    by_differences = (gradient_at(base + eps * direction) - gradient_at(base - eps * direction)) / (2 * eps)
    assert np.abs(by_differences).max() > 0.1
    np.testing.assert_allclose(hv, by_differences, atol=1e-7)


@st.composite
def claiming_bodies(draw):
    """(the body of a serial loop over t taking atomics' old values, the same in Python): atomics
    of each kind into three counters, with values from t and earlier old values (CSE and
    propagation bait: the same atomic twice, an old value read later), stores into the counters,
    an atomic inside an if, and every old value recorded into out[t, k]."""
    kernel, python, bound = [], [], []
    for k in range(draw(st.integers(2, 7))):
        value = draw(st.sampled_from(["1", "t", "2 * t - 1", "3"] + [f"{b} + t" for b in bound] +
                                     [f"{b} - 1" for b in bound]))
        at = draw(st.integers(0, 2))
        kind = draw(st.sampled_from(["atomic", "atomic", "atomic", "store", "if"]))
        if kind == "atomic":
            op = draw(st.sampled_from(["add", "sub", "max", "min"]))
            kernel.append(f"o{k} = ti.atomic_{op}(n[{at}], {value})")
            python.append(f"o{k} = _{op}(n, {at}, {value})")
            bound.append(f"o{k}")
        elif kind == "store":
            kernel.append(f"n[{at}] = {value}")
            python.append(f"n[{at}] = {value}")
        else:
            kernel += [f"if {value} > 2:", f"    out[t, 7] = ti.atomic_add(n[{at}], t)"]
            python += [f"if {value} > 2:", f"    out[t, 7] = _add(n, {at}, t)"]
    for k, b in enumerate(bound):
        kernel.append(f"out[t, {k}] = {b}")
        python.append(f"out[t, {k}] = {b}")
    return "\n".join(kernel), "\n".join(python)


def _add(n, at, v):
    old, n[at] = n[at], n[at] + v
    return old


def _sub(n, at, v):
    old, n[at] = n[at], n[at] - v
    return old


def _max(n, at, v):
    old, n[at] = n[at], max(n[at], v)
    return old


def _min(n, at, v):
    old, n[at] = n[at], min(n[at], v)
    return old


_TMP = tempfile.mkdtemp(prefix="kerndiff_old_values_")
_CLAIMS = {}


@settings(max_examples=int(os.environ.get("KERNDIFF_FUZZ_N", 300)) if os.environ.get("KERNDIFF_FUZZ") == "long"
          else 30, deadline=None, derandomize=os.environ.get("CI") == "true")
@given(bodies=claiming_bodies())
def test_drawn_serial_claims_match_python(bodies):
    """Drawn serial loops of atomics taking old values, run by the primal and by k.forward (the
    same kernel), against the same statements in Python."""
    kernel_body, python_body = bodies
    if not _CLAIMS:
        _CLAIMS.update(n=ti.field(ti.i32, 3), out=ti.field(ti.i32, (4, 8)))
    n, out = _CLAIMS["n"], _CLAIMS["out"]
    fn, _ = load_elementwise(kernel_body, {"n": n, "out": out}, _TMP,
                             head="def kernel():\n    ti.loop_config(serialize=True)\n    for t in range(4):")
    k = kd.kernel(fn)
    start = [5, -2, 0]
    expected_n, expected_out = list(start), np.zeros((4, 8), np.int64)
    scope = {"_add": _add, "_sub": _sub, "_max": _max, "_min": _min, "n": expected_n, "out": expected_out}
    exec("for t in range(4):\n" + "\n".join("    " + line for line in python_body.splitlines()), scope)
    for run in (k, k.forward):
        n.from_numpy(np.array(start, np.int32))
        out.fill(0)
        run()
        assert n.to_numpy().tolist() == expected_n, (kernel_body, k.source)
        assert out.to_numpy().tolist() == expected_out.tolist(), (kernel_body, k.source)


def test_fused_grid_and_pair_sums():
    """One kernel clears a grid's counts, bins points into it in parallel (slots from the counts'
    old values) and sums a smooth pair energy over each point's 3x3 neighbouring cells: the
    energy and its gradient against numpy's sums over all pairs, kd.check_grad's forward, reverse
    and H·v against central differences, and the reverse kernel holds no atomic of the binning
    (it reads the grid as the kernel left it)."""
    N, G = 40, 5
    h = 1.0 / G
    x = ti.Vector.field(2, ti.f64, N, needs_grad=True)
    count, members = ti.field(ti.i32, (G, G)), ti.field(ti.i32, (G, G, N))
    energy = ti.field(ti.f64, (), needs_grad=True)

    @kd.kernel
    def pair_energy():
        for c in ti.grouped(count):
            count[c] = 0
        for i in x:
            c = ti.max(ti.min(ti.cast(ti.floor(x[i] / h), ti.i32), G - 1), 0)
            members[c, ti.atomic_add(count[c], 1)] = i
        for i in x:
            c = ti.max(ti.min(ti.cast(ti.floor(x[i] / h), ti.i32), G - 1), 0)
            for off in ti.static(ti.grouped(ti.ndrange((-1, 2), (-1, 2)))):
                nc = c + off
                if 0 <= nc[0] < G and 0 <= nc[1] < G:
                    for k in range(count[nc]):
                        j = members[nc, k]
                        q = ti.max(1.0 - (x[i] - x[j]).norm_sqr() / (h * h), 0.0)
                        if j != i:
                            energy[None] += 0.5 * q ** 3

    p = np.random.default_rng(11).uniform(0.0, 1.0, (N, 2))
    x.from_numpy(p)
    pair_energy()
    d = p[:, None, :] - p[None, :, :]
    q = np.maximum(1.0 - (d ** 2).sum(-1) / h ** 2, 0.0)
    np.fill_diagonal(q, 0.0)
    assert np.count_nonzero(q) > 10
    np.testing.assert_allclose(energy[None], 0.5 * np.sum(q ** 3), rtol=1e-12)
    kd.adjoint(energy)[None] = 1.0
    pair_energy.reverse()
    # d/dx_i of Σ_pairs q³ (each pair twice, halved): -6 Σ_j q² (x_i - x_j) / h²
    grad = -6.0 * np.sum((q ** 2)[:, :, None] * d, axis=1) / h ** 2
    np.testing.assert_allclose(kd.adjoint(x).to_numpy(), grad, rtol=1e-10, atol=1e-12)
    assert "atomic_add(count" not in pair_energy.reverse.source and "count_old" not in pair_energy.reverse.source
    assert kd.check_grad(pair_energy, [x], energy, order=2) < 1e-6


def test_fused_compaction_under_tape():
    """A kernel compacts the indices of the positive entries (`picked[ti.atomic_add(n, 1)] = i`)
    and, in its next loop, gathers squares of those entries; a second launch measures: kd.Tape's
    gradient is 2x where x > 0, and kd.check_grad of the program agrees with differences."""
    n = 24
    x = ti.field(ti.f64, n, needs_grad=True)
    ys = ti.field(ti.f64, n, needs_grad=True)
    picked, count = ti.field(ti.i32, n), ti.field(ti.i32, ())
    total = ti.field(ti.f64, (), needs_grad=True)

    @kd.kernel
    def gather_positive():
        count[None] = 0
        for i in x:
            if x[i] > 0.0:
                picked[ti.atomic_add(count[None], 1)] = i
        for k in ys:
            ys[k] = 0.0
            if k < count[None]:
                ys[k] = x[picked[k]] ** 2

    @kd.kernel
    def measure():
        for k in ys:
            total[None] += ys[k]

    def program():
        gather_positive()
        measure()

    xv = np.linspace(-1.05, 1.3, n)  # (no entry at 0, where the gradient jumps)
    x.from_numpy(xv)
    with kd.Tape(total):
        program()
    assert count[None] == np.count_nonzero(xv > 0)
    np.testing.assert_allclose(total[None], np.sum(xv[xv > 0] ** 2), rtol=1e-12)
    np.testing.assert_allclose(kd.adjoint(x).to_numpy(), np.where(xv > 0, 2 * xv, 0.0), rtol=1e-12)
    assert kd.check_grad(program, [x], total, order=2) < 1e-6


# Uses of an old value `s` in a kernel that also computes floats, each labelled whether it reaches
# a float (then refused) or only integer work (then the derivatives are right). `v` is an integer
# local made from s, `a` a float local, `w` the float the loop writes.
_USES = [
    ("cell[t] = s % 4", False),
    ("v = s * 2 + 1\ncell[t] = v % 4", False),
    ("if s % 2 == 0:\n    cell[t] = 1", False),
    ("for q in range(s % 3):\n    cell[t] += q", False),
    ("k = 0\nwhile k < s % 3:\n    cell[t] += 1\n    k += 1", False),
    ("a = a * ti.cast(s % 3, ti.f64)", True),
    ("w[t] = a * (s % 2)", True),
    ("w[s % 4] += a", True),
    ("if s % 2 == 0:\n    a = a * 2.0", True),
    ("if s % 2 == 1:\n    w[t] += x[t]", True),
    ("for q in range(s % 3):\n    a = a * 0.5", True),
    ("v = s % 3\nfor q in range(3):\n    if q == v:\n        break\n    a = a + x[q]", True),
    ("a = a + x[s % 4]", True),
    ("cell[t] = s % 4\na = a + x[cell[t]]", False),  # (through a field: read as the kernel left it)
]


@st.composite
def fused_bodies(draw):
    integer_only = draw(st.booleans())  # (half the draws: the uses that must be taken)
    pool = [k for k, (_, floats) in enumerate(_USES) if not (integer_only and floats)]
    picks = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3))
    lines = ["a = x[t] ** 2", "s = ti.atomic_add(n[None], 1)"]
    for p in picks:
        lines += _USES[p][0].splitlines()
    lines.append("w[t] += a")
    return "\n".join(lines), any(_USES[p][1] for p in picks)


_FUSED = {}


@settings(max_examples=int(os.environ.get("KERNDIFF_FUZZ_N", 300)) if os.environ.get("KERNDIFF_FUZZ") == "long"
          else 12, deadline=None, derandomize=os.environ.get("CI") == "true")
@given(drawn=fused_bodies())
def test_drawn_uses_of_old_values(drawn):
    """Drawn uses of an old value in a serial loop that also computes floats: refused where one
    reaches a float through locals (ad/old_values.py); where none does, kd.check_grad's forward,
    reverse and H·v against central differences (the serial loop fixes the order, so the
    differences' runs hand out the same values), or a clear refusal: the reverse would read it
    back through a field the kernel overwrites after reading it (`cell[t] = s % 4` twice around
    a read of cell[t]: the reverse computes the value read again), which
    ad.hazards.refuse_old_values refuses, or the overwrite itself (`cell[t] += q` read before it),
    which every kernel gets: never a wrong derivative."""
    body, reaches_a_float = drawn
    if not _FUSED:
        _FUSED.update(n=ti.field(ti.i32, ()), cell=ti.field(ti.i32, 4), x=ti.field(ti.f64, 4, needs_grad=True),
                      w=ti.field(ti.f64, 4, needs_grad=True))
        _FUSED["x"].from_numpy(np.array([0.3, -0.7, 1.1, 0.4]))
    f = _FUSED
    fn, src = load_elementwise("n[None] = 0\nti.loop_config(serialize=True)\nfor t in range(4):\n"
                               + "\n".join("    " + line for line in body.splitlines()), f, _TMP,
                               head="def kernel():\n    if True:")
    k = kd.kernel(fn)
    if reaches_a_float:
        with pytest.raises(kd.KernDiffError, match="the old value ti.atomic_add returns"):
            k()
        return
    f["w"].fill(0)
    try:
        assert kd.check_grad(k, [f["x"]], f["w"], order=2) < 1e-6, src
    except kd.KernDiffError as e:
        assert "the reverse of kernel needs it (through a field" in str(e) or "overwrites 'cell' after reading" \
            in str(e), (src, str(e))
