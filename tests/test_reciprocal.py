"""Repeated divisions by one value in derivative code share its reciprocal (opt.reciprocal).

The numbers are checked against Taichi's own AD and finite differences (through the harness), and
the values that must stay bit-exact are checked bit for bit: a primal output of a forward kernel,
and a recomputed branch condition, which must go the way the primal went.
"""
import re

import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import check, pair_energy

pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)

N = 24


@pytest.fixture(scope="module")
def pairs(runtime):
    return make_pairs()


def scalar_pair_energy(qx, qy, qz, E):
    """W3's pair potential over three scalar fields, undecorated (for kd.kernel and ti.kernel)."""
    def energy():
        for i in range(N):
            e = 0.0
            for j in range(N):
                if i != j:
                    r2 = (qx[i] - qx[j]) ** 2 + (qy[i] - qy[j]) ** 2 + (qz[i] - qz[j]) ** 2 + 0.01
                    e += 1.0 / ti.sqrt(r2) + 0.1 / r2
            E[None] += 0.5 * e
    return energy


def positions(seed):
    """N random points in a 3 x 3 x 3 box, and a scalar energy field: a pair potential's fields."""
    pos = ti.Vector.field(3, ti.f64, shape=N, needs_grad=True)
    E = ti.field(ti.f64, shape=(), needs_grad=True)
    pos.from_numpy(np.random.default_rng(seed).uniform(0, 3, (N, 3)))
    return pos, E


def make_pairs():
    pos, E = positions(5)
    energy = pair_energy(pos, E, N)
    return pos, E, ti.kernel(energy), kd.kernel(energy)


def _assigning(src, name):
    """The line of src that assigns the local `name`, or a multiple of it, which opt.scales names
    for its scale (`twice_r2_adj`, `minus_half_r2_adj_dual`)."""
    scaled = r"(minus_)?((twice|half|four_times|quarter|eight_times|eighth|scaled)_)?"
    return next(line for line in src.splitlines() if re.match(rf"\s*{scaled}{name} = ", line))


def test_pair_potential_divides_once_per_denominator(pairs):
    pos, E, tk, kk = pairs
    src = kk.reverse.source
    assert "_inv = 1.0 / " in src
    adjoint_line = _assigning(src, "r2_adj")
    assert " / " not in adjoint_line  # was 0.5 / t4 * (1.0 / t4 / t4 * ...) - 0.1 / r2 / r2 * ...
    assert sum(line.count(" / ") for line in src.splitlines() if not line.strip().startswith("#")) == 1
    assert "_inv" not in kk.source  # the primal is the user's arithmetic
    E[None] = 0
    tk()
    pos.grad.fill(0)
    E.grad[None] = 1.0
    tk.grad()
    expected = pos.grad.to_numpy()
    pos.grad.fill(0)
    E.grad[None] = 1.0
    kk.reverse()
    np.testing.assert_allclose(pos.grad.to_numpy(), expected, rtol=1e-12, atol=1e-12)


def test_pair_potential_hvp_against_finite_differences(pairs):
    pos, E, tk, kk = pairs
    kd.dual(pos)
    code = [line for line in kk.reverse.forward.source.splitlines() if not line.strip().startswith("#")]
    # nine divisions before the rewrite; 1 / r2 is the square of 1 / sqrt(r2), which it has
    assert sum(line.count(" / ") for line in code) == 1
    # pos[i] and its tangent are read once per i, before the loop over j (opt.invariant_loads)
    text = "\n".join(code)
    assert text.count("pos[i][0]") == 1 and text.count("pos_dual[i][0]") == 1, text
    check(kk.reverse, "forward", eps=1e-6, rtol=1e-5, atol=1e-7)


def test_forward_kernel_leaves_primal_outputs_alone(runtime):
    """q / bi and 1 / bi divide by bi more than once; out is a primal field, so what it receives
    keeps the primal's divisions (a forward kernel's outputs are the primal kernel's), while the
    tangent shares the reciprocal."""
    rng = np.random.default_rng(6)
    n = 200
    a = ti.field(ti.f64, shape=n)
    b = ti.field(ti.f64, shape=n)
    out = ti.field(ti.f64, shape=n)
    a.from_numpy(rng.uniform(-3, 3, n))
    b.from_numpy(rng.uniform(0.3, 3, n))

    @kd.kernel
    def ratio():
        for i in range(n):
            bi = b[i]
            q = a[i] / bi
            out[i] = q + 0.7 / bi + q * a[i] / bi

    kd.dual(a)
    kd.dual(b)
    src = ratio.forward.source
    lines = [line.strip() for line in src.splitlines() if not line.strip().startswith("#")]
    tangents = [line for line in lines if line.startswith(("q_dual = ", "out_dual[i] = "))]
    assert len(tangents) == 2 and not any(" / " in line for line in tangents)  # they share 1.0 / bi
    assert sum(1 for line in lines if line.endswith(" = 1.0 / bi")) == 1
    # a[i] / bi (for q), 0.7 / bi and q * a[i] / bi (for out) stay divisions, in temporaries
    divisions = [line for line in lines if line.endswith(" / bi") and not line.endswith("1.0 / bi")]
    assert len(divisions) == 3
    primal_out = next(line for line in lines if line.startswith("out[i] = "))
    assert " * " not in primal_out  # out[i] = q + t3 + t4: the primal's sum of its quotients
    from kerndiff.opt.reciprocal import exact_names
    ir = ratio.forward._compiled({})["ir"]
    assert {"q", "bi"} <= exact_names(ir.body, lambda field: field is not out)
    check(ratio, "forward", rtol=1e-6)


def test_recomputed_branch_on_a_quotient_stays_exact(runtime):
    """The reverse recomputes q = x/y to decide the branch: it must divide exactly as the primal
    did, or a q within an ulp of the threshold would take the other branch's derivative."""
    n = 64
    x = ti.field(ti.f64, shape=n, needs_grad=True)
    y = ti.field(ti.f64, shape=n, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    rng = np.random.default_rng(7)
    x.from_numpy(rng.uniform(0.5, 2, n))
    y.from_numpy(rng.uniform(0.5, 2, n))

    def f():
        for i in range(n):
            q = x[i] / y[i]
            if q > 1.0:
                loss[None] += q * q / y[i]
            else:
                loss[None] += ti.sin(q) / y[i]

    kk, tk = kd.kernel(f), ti.kernel(f)
    src = kk.reverse.source
    assert "q = x[i] / y[i]" in src
    cond = next(line for line in src.splitlines() if line.strip().startswith("if "))
    assert "_inv" not in cond
    from kerndiff.opt.reciprocal import exact_names
    ir = kk.reverse._compiled({})["ir"]
    assert "q" in exact_names(ir.body, lambda field: False)
    loss[None] = 0
    tk()
    x.grad.fill(0)
    y.grad.fill(0)
    loss.grad[None] = 1.0
    tk.grad()
    expected = x.grad.to_numpy(), y.grad.to_numpy()
    x.grad.fill(0)
    y.grad.fill(0)
    loss.grad[None] = 1.0
    kk.reverse()
    np.testing.assert_allclose(x.grad.to_numpy(), expected[0], rtol=1e-12)
    np.testing.assert_allclose(y.grad.to_numpy(), expected[1], rtol=1e-12)



def test_pair_potential_hvp_tangent_is_collected(runtime):
    pos, E, tk, kk = make_pairs()  # fresh: no tangent on E's adjoint (which would keep a sum whole)
    kd.dual(pos)
    src = kk.reverse.forward.source
    line = _assigning(src, "r2_adj_dual")
    # 0.75 * g * r**-5 * r2_dual + ..., with the factors 2 of the square's tangent and adjoint
    # merged into its constants (opt.scales): 4 * 0.75
    assert "3.0" in line and line.count(" * ") < 12, line
    code = [x.split("#")[0] for x in src.splitlines()]
    assert not any("2.0" in x for x in code), src  # no product by 2 left anywhere
    # r**-5 by squaring, from the square a local already holds (t * t * r_inv), not r_inv five times
    assert not re.search(r"(\b\w+) \* \1 \* \1 \* \1\b", line), line
    # and a power shared by terms comes out whole, not as a chain x * (x * (x * ...))
    assert not re.search(r"(\b\w+) \* \(\1 \* \(", line), line


def _operators(src, after="for j"):
    """Arithmetic operators in the generated code from `after` on (the first inner loop), comments
    left out."""
    code = "\n".join(line.split("#")[0] for line in src[src.index(after):].splitlines())
    return len(re.findall(r"(?<![\[,(=]) [-+*/] |\*\*", code))


def test_pair_potential_over_component_fields_computes_what_the_vector_one_does(runtime):
    """`(qx[i] - qx[j]) ** 2 + ...` over three scalar fields: the reverse recomputes each
    difference and its adjoint needs it again, in two branches that opt.fuse_ifs makes one; CSE
    then computes it once, and the factors 2 of the squares move into r2's adjoint as they do for
    `(pos[i] - pos[j]).norm_sqr()` (29 and 62 operators here before, 23 and 51 as with a vector)."""
    rng = np.random.default_rng(6)
    qs = [ti.field(ti.f64, shape=N, needs_grad=True) for _ in range(3)]
    E = ti.field(ti.f64, shape=(), needs_grad=True)
    for q in qs:
        q.from_numpy(rng.uniform(0, 3, N))
    qx, qy, qz = qs
    energy = kd.kernel(scalar_pair_energy(qx, qy, qz, E))

    pos, _, _, vector = make_pairs()
    for q in qs:
        kd.dual(q)
    kd.dual(pos)
    assert _operators(energy.reverse.source) == _operators(vector.reverse.source)
    assert _operators(energy.reverse.forward.source) == _operators(vector.reverse.forward.source)
    energy()
    check(energy.reverse, "forward", eps=1e-6, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("square", ["product", "power"])
def test_a_squared_denominator_is_the_square_of_the_reciprocal(runtime, square):
    """`1.0 / r + 0.1 / (r * r)` (r from `.norm()`): the reverse divided by r and by r * r, two
    divisions per pair; 1 / (r * r) is now the square of 1 / r, which the block needs anyway.
    The same for `r ** 2`."""
    pos, E = positions(7)

    power = square == "power"

    @kd.kernel
    def energy():
        for i in range(N):
            e = 0.0
            for j in range(N):
                if i != j:
                    r = (pos[i] - pos[j]).norm(0.1)
                    if ti.static(power):
                        e += 1.0 / r + 0.1 / r ** 2
                    else:
                        e += 1.0 / r + 0.1 / (r * r)
            E[None] += 0.5 * e

    kd.dual(pos)
    for k in (energy.reverse, energy.reverse.forward):
        code = [line.split("#")[0] for line in k.source.splitlines()]
        assert sum(line.count(" / ") for line in code) == 1, k.source
    # r's adjoint tangent starts at its one contribution in the branch (the zero before the branch
    # is folded once opt.scales has written that contribution in its final form)
    assert "r_adj_dual = 0.0" not in energy.reverse.forward.source
    energy()
    check(energy, "reverse", rtol=1e-6, atol=1e-8)
    check(energy.reverse, "forward", eps=1e-6, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("by_distance", [False, True], ids=["squared distance", "distance"])
def test_lennard_jones_hvp_tangent_meets_its_like_terms(runtime, by_distance):
    """`s6 = (1.0 / r2) ** 3; e += 4.0 * (s6 * s6 - s6)`: the product rule's tangent of r2's
    adjoint, t8 * (t6 * t4_dual - t9 * t10 * r2_dual) + t9 * (s6_adj * (...) + t7 * s6_adj_dual),
    has a sum of products whose terms meet the terms outside it once the product is distributed
    (opt.algebra): 14 operators before, 6 then. Since opt.algebra collects a second time once
    every accumulator is assigned once, it reads through the tangents of s6 and of its adjoint
    (one reader each, a sum of products) into that statement, `(s6_adj * 48.0 + e_1_adj * s6 *
    288.0) * r2_dual * s⁵`, and they die: the loops' code 58 -> 53 operators.
    Over the distance, `s6 = (1.0 / r) ** 6` with r a norm: the tangent of r's adjoint multiplies
    s⁵, s⁶ and s² = (1/r)², which meet as powers of one reciprocal (opt.algebra read x ** 5 and
    x ** 6 as atoms apart from x before: 70 -> 63), and the force factor's tangent collects to
    `(s6_adj * 48.0 + e_1_adj * s⁶ * 288.0) * s¹⁰ * t15`, r's adjoint's tangent dying (63 -> 57;
    W3's Lennard-Jones spelling in bench/variants.py: HVP 105 -> 98 -> 80 ms, as collected by
    hand)."""
    pos, E = positions(9 if by_distance else 8)

    @kd.kernel
    def energy():
        for i in range(N):
            e = 0.0
            for j in range(N):
                if i != j:
                    if ti.static(by_distance):
                        r = (pos[i] - pos[j]).norm()
                        s6 = (1.0 / r) ** 6
                    else:
                        r2 = (pos[i] - pos[j]).norm_sqr() + 0.5
                        s6 = (1.0 / r2) ** 3
                    e += 4.0 * (s6 * s6 - s6)
            E[None] += 0.5 * e

    kd.dual(pos)
    source = energy.reverse.forward.source
    assert _operators(source) <= (57 if by_distance else 53), source
    assert "s6_adj_dual" not in source and "s6_dual" not in source, source
    energy()
    check(energy, "reverse", rtol=1e-6, atol=1e-8)
    check(energy.reverse, "forward", eps=1e-6, rtol=1e-5, atol=1e-7)


def test_gravity_hvp_moves_each_components_factor_into_the_shared_scale(runtime):
    """`e += 1.0 / (pos[i] - pos[j]).norm(0.01)`: the adjoint of each component came as
    `t6 = t1 * t5; t1_adj = -t6 - t6` and its tangent `t1_adj_dual = t6_dual * -2.0`. Moving the
    -2 into t6 (and t6_dual) saves nothing by itself; moving it on into t5 (and t5_dual), which
    the three components share, saves a product per component and value (opt.scales: such moves
    are made together, and kept where the moves they open pay). The reverse's pair loop: 24 ->
    20 operators, the HVP's 52 -> 45."""
    pos, E = positions(9)

    @kd.kernel
    def energy():
        for i in range(N):
            e = 0.0
            for j in range(N):
                if i != j:
                    e += 1.0 / (pos[i] - pos[j]).norm(0.01)
            E[None] += 0.5 * e

    kd.dual(pos)
    for k in (energy.reverse, energy.reverse.forward):
        code = "\n".join(line.split("#")[0] for line in k.source.splitlines())
        assert "2.0" not in code and not re.search(r"-(\w+) - \1\b", code), k.source
    assert _operators(energy.reverse.source) <= 20, energy.reverse.source
    assert _operators(energy.reverse.forward.source) <= 45, energy.reverse.forward.source
    energy()
    check(energy, "reverse", rtol=1e-6, atol=1e-8)
    check(energy.reverse, "forward", eps=1e-6, rtol=1e-5, atol=1e-7)


def test_primal_pair_loop_reads_its_own_element_once(runtime):
    """opt.invariant_loads in the primal too: `qx[i]` in the loop over j is read once per i, before
    it, which on the CPU lets LLVM vectorize a pair loop over scalar fields (21.5 -> 3.6 ms at
    N = 4096 in f32: the primal had been 3.5x slower than its own forward kernel, which read them
    once already). Only where the reads sit changes: the energy is the one Taichi's kernel sums."""
    rng = np.random.default_rng(11)
    qx, qy, qz = (ti.field(ti.f64, shape=N) for _ in range(3))
    for f in (qx, qy, qz):
        f.from_numpy(rng.uniform(0, 3, N))
    E = ti.field(ti.f64, shape=())
    energy = scalar_pair_energy(qx, qy, qz, E)
    kk, tk = kd.kernel(energy), ti.kernel(energy)
    code = "\n".join(line for line in kk.source.splitlines() if not line.strip().startswith("#"))
    assert code.count("qx[i]") == 1 and code.count("qz[i]") == 1, code
    assert code.index("qx[i]") < code.index("for j in")
    values = []
    for k in (kk, tk):
        E[None] = 0
        k()
        values.append(E[None])
    q = np.stack([f.to_numpy() for f in (qx, qy, qz)], axis=1)
    r2 = ((q[:, None, :] - q[None, :, :]) ** 2).sum(-1) + 0.01
    np.fill_diagonal(r2, np.inf)
    assert values[0] == pytest.approx(0.5 * np.sum(1.0 / np.sqrt(r2) + 0.1 / r2), rel=1e-12)
    assert abs(values[0] - values[1]) <= 1e-12 * abs(values[1])  # the same sums, up to Taichi's atomics' order

    def half_pairs():
        for i in range(N):
            for j in range(i + 1, N):
                E[None] += 1.0 / ti.sqrt((qx[i] - qx[j]) ** 2 + (qy[i] - qy[j]) ** 2 + 0.01)

    # an inner loop that adds into a field keeps its reads in a primal: hoisted, Taichi and LLVM
    # summed W3's half-pair spelling differently (f32, N = 4096: 1614384 against 1596263)
    kk = kd.kernel(half_pairs)
    code = "\n".join(line for line in kk.source.splitlines() if not line.strip().startswith("#"))
    assert code.index("qx[i]") > code.index("for j in"), code
    kd.dual(qx)
    assert "qx_i = qx[i]" in kk.forward.source  # derived kernels still read it once
    values = []
    for k in (kk, ti.kernel(half_pairs), kk.forward):
        E[None] = 0
        k()
        values.append(E[None])
    assert values[0] == values[1] == values[2]
