"""kerndiff's own f32 math in derived CPU kernels (opt.cpu_math, codegen.cpu_math): sine and
cosine of one value from one call, tanh from one exp. The helpers' accuracy against the f64
functions, derivatives against analytic ones and Taichi's own grad, what keeps libm's bits
(primal outputs, conditions), on hand-built IR what may be paired, and elementwise loops run four
elements per pass (opt.element_groups) against the same kernels one element per pass."""
import contextlib

import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import cpu_only, load_elementwise
from kerndiff.ad.names import NameAllocator
from kerndiff.ir import build as B
from kerndiff.ir import nodes as N
from kerndiff.ir.nodes import FieldRef
from kerndiff.ir.walk import iter_expr, iter_stmts
from kerndiff.opt.cpu_math import use_cpu_math

pytestmark = cpu_only("the pairing is for Taichi's CPU backends")

N_ELEM = 512


@pytest.fixture(scope="module", autouse=True)
def f32_runtime():
    ti.init(arch=ti.cpu, default_fp=ti.f32, random_seed=0)
    yield
    ti.reset()


def _ulps(value, reference):
    """|value - reference| in units of the f32 spacing at the reference (in f64 arithmetic:
    Taichi's runtime leaves the CPU flushing subnormals, which np.spacing near 0 would give)."""
    _, exponent = np.frexp(np.abs(reference))
    spacing = np.ldexp(1.0, np.maximum(exponent, -125) - 24)
    return np.abs(value.astype(np.float64) - reference) / spacing


def test_helper_is_within_one_ulp_and_matches_libm_outside_its_range():
    from kerndiff.codegen.cpu_math import sincos

    @ti.kernel
    def both(a: ti.types.ndarray(), s: ti.types.ndarray(), c: ti.types.ndarray(),
             s_libm: ti.types.ndarray(), c_libm: ti.types.ndarray()):
        for i in range(a.shape[0]):
            s[i], c[i] = sincos(a[i])
            s_libm[i], c_libm[i] = ti.sin(a[i]), ti.cos(a[i])

    rng = np.random.default_rng(3)
    near_axes = np.arange(-76, 77)[:, None] * (np.pi / 2) + np.linspace(-1e-4, 1e-4, 41)[None, :]
    a = np.concatenate([rng.uniform(-120, 120, 400000), rng.uniform(-1, 1, 100000), near_axes.ravel(),
                        [64.40264892578125, 119.99999, 0.0, 1e-30, -1e-30, 5e-8]]).astype(np.float32)
    a = a[np.abs(a) < 120]
    wide = np.array([120.0, -120.0, 250.5, -1e4, 3e38, np.inf, -np.inf, np.nan], np.float32)
    a_all = np.concatenate([a, wide])
    outs = [np.zeros_like(a_all) for _ in range(4)]
    both(a_all, *outs)
    s, c, s_libm, c_libm = outs
    exact = a.astype(np.float64)
    assert _ulps(s[:len(a)], np.sin(exact)).max() <= 0.78
    assert _ulps(c[:len(a)], np.cos(exact)).max() <= 0.78
    # where they differ from libm's, by one ulp; rarely
    for mine, libm in ((s, s_libm), (c, c_libm)):
        differ = mine[:len(a)] != libm[:len(a)]
        assert differ.mean() < 0.05
        assert (_ulps(mine[:len(a)][differ], libm[:len(a)][differ].astype(np.float64)) <= 1.0).all()
    # from 120 on, and for infinities and NaN, libm's own results
    np.testing.assert_array_equal(s[len(a):], s_libm[len(a):])
    np.testing.assert_array_equal(c[len(a):], c_libm[len(a):])
    assert np.isnan(s[-3:]).all() and np.isnan(c[-3:]).all()


def test_tanh_is_within_one_ulp_and_saturates():
    from kerndiff.codegen.cpu_math import tanh_via_exp

    @ti.kernel
    def both(a: ti.types.ndarray(), mine: ti.types.ndarray(), libm: ti.types.ndarray()):
        for i in range(a.shape[0]):
            mine[i], libm[i] = tanh_via_exp(a[i]), ti.tanh(a[i])

    rng = np.random.default_rng(4)
    edge = np.float32(0.55)
    a = np.concatenate([rng.uniform(-6, 6, 300000), rng.uniform(-0.6, 0.6, 200000), 10.0 ** rng.uniform(-30, 1, 50000),
                        [edge, np.nextafter(edge, np.float32(0)), -edge, 0.0, 19.9, 44.5, -90.0]]).astype(np.float32)
    mine, libm = np.zeros_like(a), np.zeros_like(a)
    both(a, mine, libm)
    exact = np.tanh(a.astype(np.float64))
    assert _ulps(mine, exact).max() <= 0.82
    assert _ulps(libm, exact).max() > 1.0  # Taichi's own is further off, which is why this test allows a difference
    special = np.array([np.inf, -np.inf, np.nan], np.float32)
    m2, l2 = np.zeros_like(special), np.zeros_like(special)
    both(special, m2, l2)
    assert m2[0] == 1.0 and m2[1] == -1.0 and np.isnan(m2[2])


def test_exp4_is_within_half_an_ulp_and_libm_outside_its_range():
    from kerndiff.codegen.cpu_math import exp4

    @ti.kernel
    def both(a: ti.types.ndarray(), mine: ti.types.ndarray(), libm: ti.types.ndarray()):
        for g in range(a.shape[0] // 4):
            i = g * 4
            mine[i], mine[i + 1], mine[i + 2], mine[i + 3] = exp4(a[i], a[i + 1], a[i + 2], a[i + 3])
            for k in ti.static(range(4)):
                libm[i + k] = ti.exp(a[i + k])

    rng = np.random.default_rng(5)
    a = np.concatenate([rng.uniform(-87, 87, 400000), rng.uniform(-1, 1, 100000), 10.0 ** rng.uniform(-30, 1, 20000),
                        [0.0, -0.0, 1e-30, -1e-30, 86.99999, -86.99999, 0.5 * np.log(2), -0.5 * np.log(2)]]
                       ).astype(np.float32)
    mine, libm = np.zeros_like(a), np.zeros_like(a)
    both(a, mine, libm)
    assert _ulps(mine, np.exp(a.astype(np.float64))).max() <= 0.501
    differ = mine != libm
    assert differ.mean() < 0.005
    assert (_ulps(mine[differ], libm[differ].astype(np.float64)) <= 1.0).all()
    # a group with one value outside |x| < 87 takes libm's exponentials for all four
    wide = np.array([0.3, 87.0, -1.5, 2.0, -87.0, 0.1, 0.2, 0.3, 88.5, 1, 2, 3, -100.0, 1, 2, 3,
                     np.inf, 1, 2, 3, -np.inf, 1, 2, 3, np.nan, 1, 2, 3], np.float32)
    m2, l2 = np.zeros_like(wide), np.zeros_like(wide)
    both(wide, m2, l2)
    np.testing.assert_array_equal(m2, l2)


def test_reverse_of_a_tanh_layer_uses_it_and_matches_analytic_and_taichi():
    rng = np.random.default_rng(2)
    x = ti.field(ti.f32, shape=N_ELEM, needs_grad=True)
    w = ti.field(ti.f32, shape=(), needs_grad=True)
    loss = ti.field(ti.f32, shape=(), needs_grad=True)
    x.from_numpy(rng.uniform(-3, 3, N_ELEM).astype(np.float32))
    w[None] = 0.7

    def layer():
        for i in x:
            loss[None] += ti.tanh(w[None] * x[i]) ** 2

    k, tk = kd.kernel(layer), ti.kernel(layer)
    loss.grad[None] = 1.0
    k.reverse()
    assert "tanh_via_exp(" in k.reverse.source
    xv = x.to_numpy().astype(np.float64)
    t = np.tanh(0.7 * xv)
    dt = 2 * t * (1 - t * t)
    ours = x.grad.to_numpy(), w.grad[None]
    np.testing.assert_allclose(ours[0], dt * 0.7, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours[1], np.sum(dt * xv), rtol=1e-5)
    x.grad.fill(0)
    w.grad[None] = 0
    tk.grad()
    np.testing.assert_allclose(ours[0], x.grad.to_numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours[1], w.grad[None], rtol=1e-5)
    # the forward kernel returns the primal value too: that tanh stays Taichi's
    loss[None] = 0
    k()
    primal = loss[None]
    loss[None] = 0
    k.forward()
    assert loss[None] == primal and "ti.tanh(" in k.forward.source


def _elementwise():
    rng = np.random.default_rng(0)
    x = ti.field(ti.f32, shape=N_ELEM, needs_grad=True)
    y = ti.field(ti.f32, shape=N_ELEM, needs_grad=True)
    loss = ti.field(ti.f32, shape=(), needs_grad=True)
    x.from_numpy(rng.uniform(-3, 3, N_ELEM).astype(np.float32))
    y.from_numpy(rng.uniform(-1, 1, N_ELEM).astype(np.float32))

    def energy():
        for i in x:
            loss[None] += ti.sin(x[i]) * ti.exp(y[i])
    return x, y, loss, energy


def test_reverse_takes_both_from_one_call_and_matches_analytic_and_taichi():
    x, y, loss, energy = _elementwise()
    k, tk = kd.kernel(energy), ti.kernel(energy)
    loss.grad[None] = 1.0
    k.reverse()
    src = k.reverse.source
    code = [line for line in src.splitlines() if not line.lstrip().startswith("#")]
    # four elements per pass (opt.element_groups), their sines and cosines from one call
    assert "        sin_x, cos_x, sin_x_1, cos_x_1, sin_x_2, cos_x_2, sin_x_3, cos_x_3 = " \
           "sincos4(x[i], x[i_1], x[i_2], x[i_3])" in code
    assert not any("ti.sin" in line or "ti.cos" in line for line in code)
    # and their exponentials from another
    assert "        t1, t1_1, t1_2, t1_3 = exp4(y[i], y[i_1], y[i_2], y[i_3])" in code
    assert not any("ti.exp" in line for line in code)
    xv, yv = x.to_numpy().astype(np.float64), y.to_numpy().astype(np.float64)
    ours = x.grad.to_numpy(), y.grad.to_numpy()
    np.testing.assert_allclose(ours[0], np.cos(xv) * np.exp(yv), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(ours[1], np.sin(xv) * np.exp(yv), rtol=2e-6, atol=1e-6)
    x.grad.fill(0)
    y.grad.fill(0)
    tk.grad()
    np.testing.assert_allclose(ours[0], x.grad.to_numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours[1], y.grad.to_numpy(), rtol=1e-6, atol=1e-7)


def test_four_elements_per_pass_with_a_tail_and_libm_beyond_the_range(monkeypatch):
    """515 elements: 128 passes of four and a loop over the last three; a group with one element
    outside sincos's range takes libm's sines and cosines for all four. Against the analytic
    derivative, and against the same kernel without groups (one sincos and one ti.exp per
    element) wherever a whole group is in range: bit for bit but where exp4's exponential is one
    ulp off libm's (one argument in about 1,500)."""
    import kerndiff.opt.element_groups as groups
    n = 515
    rng = np.random.default_rng(7)
    xv = rng.uniform(-3, 3, n).astype(np.float32)
    xv[[5, 300, 514]] = [130.5, -1e4, 250.0]  # groups 1 and 75, and the tail
    yv = rng.uniform(-1, 1, n).astype(np.float32)
    x, y = ti.field(ti.f32, shape=n, needs_grad=True), ti.field(ti.f32, shape=n, needs_grad=True)
    loss = ti.field(ti.f32, shape=(), needs_grad=True)
    x.from_numpy(xv)
    y.from_numpy(yv)

    def energy():
        for i in x:
            loss[None] += ti.sin(x[i]) * ti.exp(y[i])

    def gradients(k):
        x.grad.fill(0)
        y.grad.fill(0)
        loss.grad[None] = 1.0
        k.reverse()
        return x.grad.to_numpy(), y.grad.to_numpy()

    grouped = kd.kernel(energy)
    got = gradients(grouped)
    src = grouped.reverse.source
    assert "for i_group in range(128):" in src and "for i in range(512, 515):" in src
    assert "= sincos4(x[i], x[i_1], x[i_2], x[i_3])" in src and "sin_x, cos_x = sincos(x[i])" in src
    x64, y64 = xv.astype(np.float64), yv.astype(np.float64)
    np.testing.assert_allclose(got[0], np.cos(x64) * np.exp(y64), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(got[1], np.sin(x64) * np.exp(y64), rtol=2e-6, atol=2e-6)
    monkeypatch.setattr(groups, "group_elements", lambda ir, names, is_derivative: ir)
    monkeypatch.setenv("KERNDIFF_OFFLINE_CACHE", "0")  # (a cached entry would not see the patch)
    single = kd.kernel(energy)
    expected = gradients(single)
    assert "sincos4" not in single.reverse.source
    in_range = np.repeat(np.abs(xv[:512]).reshape(-1, 4).max(axis=1) < 120, 4)
    in_range = np.concatenate([in_range, np.ones(3, bool)])
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a[in_range], b[in_range], rtol=2.5e-7, atol=0)
        assert (a[in_range] == b[in_range]).mean() > 0.98


def test_loops_with_branches_keep_one_element_per_pass():
    x, y, loss, _ = _elementwise()

    @kd.kernel
    def branchy():
        for i in x:
            if y[i] > 0.0:
                loss[None] += ti.sin(x[i]) * y[i]

    loss.grad[None] = 1.0
    x.grad.fill(0)
    branchy.reverse()
    src = branchy.reverse.source
    assert "sincos4" not in src and "sincos(x[i])" in src
    xv, yv = x.to_numpy().astype(np.float64), y.to_numpy().astype(np.float64)
    np.testing.assert_allclose(x.grad.to_numpy(), np.where(yv > 0, np.cos(xv) * yv, 0.0), rtol=2e-6, atol=1e-6)


def test_forward_keeps_libm_for_the_primal_value_it_returns():
    x, y, loss, energy = _elementwise()
    k = kd.kernel(energy)
    kd.dual(x).fill(1.0)
    loss[None] = 0
    k()
    primal = loss[None]
    loss[None] = 0
    k.forward()
    assert loss[None] == primal  # bit for bit: the forward kernel's sin and exp are libm's, as the primal's
    assert "ti.sin(x[i])" in k.forward.source and "ti.exp(y[i])" in k.forward.source


def test_exponentials_four_at_a_time_only_where_they_feed_derivatives_alone():
    """out[i] = exp(x[i]) * sin(x[i]): the reverse takes the four exponentials from exp4; the
    forward returns out, whose exponential (shared with the tangent) stays libm's, bit for bit
    the primal's."""
    rng = np.random.default_rng(8)
    x = ti.field(ti.f32, shape=N_ELEM, needs_grad=True)
    out = ti.field(ti.f32, shape=N_ELEM, needs_grad=True)
    xv = rng.uniform(-4, 4, N_ELEM).astype(np.float32)
    x.from_numpy(xv)

    @kd.kernel
    def k():
        for i in x:
            out[i] = ti.exp(x[i]) * ti.sin(x[i])

    w = rng.standard_normal(N_ELEM).astype(np.float32)
    out.grad.from_numpy(w)
    k.reverse()
    assert "= exp4(x[i], x[i_1], x[i_2], x[i_3])" in k.reverse.source
    x64 = xv.astype(np.float64)
    np.testing.assert_allclose(x.grad.to_numpy(), w * np.exp(x64) * (np.sin(x64) + np.cos(x64)), rtol=3e-6, atol=1e-6)
    k()
    primal = out.to_numpy()
    kd.dual(x).fill(1.0)
    k.forward()
    assert "exp4" not in k.forward.source
    np.testing.assert_array_equal(out.to_numpy(), primal)
    np.testing.assert_allclose(kd.dual(out).to_numpy(), np.exp(x64) * (np.sin(x64) + np.cos(x64)), rtol=3e-6, atol=1e-6)


def test_hessian_vector_product_of_a_sine_sum():
    x = ti.field(ti.f32, shape=N_ELEM, needs_grad=True)
    E = ti.field(ti.f32, shape=(), needs_grad=True)
    rng = np.random.default_rng(1)
    xv = rng.uniform(-10, 10, N_ELEM).astype(np.float32)
    v = rng.standard_normal(N_ELEM).astype(np.float32)
    x.from_numpy(xv)

    @kd.kernel
    def energy():
        for i in x:
            E[None] += 2.0 * ti.sin(x[i])

    kd.dual(x).from_numpy(v)
    E.grad[None] = 1.0
    energy.reverse.forward()
    src = energy.reverse.forward.source
    assert "= sincos4(x[i], x[i_1], x[i_2], x[i_3])" in src
    x64 = xv.astype(np.float64)
    np.testing.assert_allclose(x.grad.to_numpy(), 2 * np.cos(x64), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(kd.dual(x.grad).to_numpy(), -2 * np.sin(x64) * v, rtol=2e-6, atol=1e-5)


def test_a_sine_that_a_branch_reads_keeps_libm():
    x = ti.field(ti.f32, shape=N_ELEM, needs_grad=True)
    y = ti.field(ti.f32, shape=N_ELEM, needs_grad=True)
    x.from_numpy(np.linspace(-3, 3, N_ELEM).astype(np.float32))

    @kd.kernel
    def clipped():
        for i in x:
            s = ti.sin(x[i])
            if s > 0.25:
                y[i] = s * s
            else:
                y[i] = 0.0625

    y.grad.fill(1.0)
    clipped.reverse()
    src = clipped.reverse.source
    assert "sincos" not in src  # s decides the branch: its bits are libm's, and cos alone needs no pair
    x64 = x.to_numpy().astype(np.float64)
    expect = np.where(np.sin(x64) > 0.25, 2 * np.sin(x64) * np.cos(x64), 0.0)
    np.testing.assert_allclose(x.grad.to_numpy(), expect, rtol=2e-6, atol=1e-6)


# ------------------------------------------------------------------ hand-built IR

def _ref(name, dtype="f32"):
    return FieldRef(object(), (), name, dtype, (8,))


def _pairs(body, derivative=lambda f: True):
    ir = N.KernelIR("k", (), tuple(body))
    out = use_cpu_math(ir, NameAllocator({"i", "g"}), derivative).body
    return out, [s for s in iter_stmts(out) if isinstance(s, N.Assign) and s.value.op == "sincos_sin"]


def _index():
    return (B.var("i", "i32"),)


def test_pairs_only_while_the_argument_is_unchanged():
    x, out, other = _ref("x"), _ref("out_adj"), _ref("other_adj")
    arg = B.load(x, _index())
    g = B.var("g", "f32")
    body = [N.Store(out, _index(), B.mul(B.call("sin", arg), g)),
            N.Store(other, _index(), B.mul(B.call("cos", arg), g))]
    out_body, pairs = _pairs(body)
    assert len(pairs) == 1 and out_body[1].value == N.Call("f32", "sincos_cos", (arg,))
    assert not any(isinstance(e, N.Call) and e.op in ("sin", "cos")
                   for s in out_body for e in iter_expr(s.value))
    # a store into x between them: cos reads the new x[i], so no pair
    between = [body[0], N.Store(x, _index(), g), body[1]]
    assert _pairs(between)[1] == []
    # nor when the store goes to a field that is not a derivative (it must keep libm's bits)
    assert _pairs(body, derivative=lambda f: False)[1] == []


def test_f64_and_guarded_branches_do_not_start_a_pair():
    x64, out = _ref("x", "f64"), _ref("out_adj", "f64")
    arg = B.load(x64, _index())
    body = [N.Store(out, _index(), B.add(B.call("sin", arg), B.call("cos", arg)))]
    assert _pairs(body)[1] == []
    x, out32 = _ref("x"), _ref("out_adj")
    shifted = B.load(x, (B.sub(B.var("i", "i32"), B.const(1, "i32")),))
    guarded = B.call("select", B.call("gt", B.var("i", "i32"), B.const(0, "i32")),
                     B.call("sin", shifted), B.const(0.0, "f32"))
    body = [N.Store(out32, _index(), B.add(guarded, B.call("cos", shifted)))]
    assert _pairs(body)[1] == []  # sin(x[i - 1]) is evaluated only where i > 0


def test_a_local_holding_the_sine_becomes_the_pairs_own():
    x, out = _ref("x"), _ref("out_adj")
    arg = B.load(x, _index())
    body = [N.Assign("t2", B.call("sin", arg)),
            N.Store(out, _index(), B.add(B.var("t2", "f32"), B.call("cos", arg)))]
    out_body, pairs = _pairs(body)
    assert [s.name for s in out_body[:2]] == ["t2", "cos_x"] and len(out_body) == 3
    assert out_body[2].value == B.add(B.var("t2", "f32"), B.var("cos_x", "f32"))


# ------------------------------------------------------------------ the corpus in f32 (runs last: it re-inits)

SINE_CORPUS = ["elementwise", "branches", "recurrence", "two_loops", "template_args", "return_value"]


def test_f32_corpus_kernels_with_sines_match_the_f64_derivatives():
    """The corpus kernels that take sines and cosines, in f32 on the CPU (so paired where their
    values feed derivatives), against their f64 derivatives (which test_corpus checks against
    finite differences): forward, reverse.forward and the primal outputs."""
    from harness import derivatives
    from test_corpus import assert_same_derivatives, build_corpus, cpu_derivatives

    references = cpu_derivatives(SINE_CORPUS)
    ti.init(arch=ti.cpu, default_fp=ti.f32, random_seed=0)
    corpus = build_corpus(ti.f32)
    paired = 0
    for name in SINE_CORPUS:
        k, args = corpus[name]
        assert_same_derivatives(derivatives(k, args), references[name], 2e-3)
        paired += "= sincos(" in k.reverse.forward.source
    assert paired >= 3  # the pairing did run on most of them


GROUP_LEAVES = ["x[i]", "y[i]", "x[idx[i]]", "0.7"]
GROUP_OPS = ["ti.sin({0})", "ti.cos({0})", "ti.exp(0.5 * ti.sin({0}))", "({0}) * ({1})", "({0}) + ({1})",
             "({0}) / (1.5 + ({1}) * ({1}))", "ti.sqrt(0.5 + ({0}) * ({0}))"]


def _group_expr(depth, extra=()):
    from hypothesis import strategies as st
    leaves = st.sampled_from(GROUP_LEAVES + list(extra))
    if depth == 0:
        return leaves
    sub = _group_expr(depth - 1, extra)
    return st.one_of(leaves, st.tuples(st.sampled_from(GROUP_OPS), sub, sub).map(lambda t: t[0].format(t[1], t[2])))


@contextlib.contextmanager
def _one_element_per_pass():
    """Kernels made inside run one element per pass (opt.element_groups off): the reference."""
    import kerndiff.opt.element_groups as groups
    original = groups.group_elements
    groups.group_elements = lambda ir, names, is_derivative: ir
    try:
        yield
    finally:
        groups.group_elements = original


def _group_bodies():
    from hypothesis import strategies as st

    @st.composite
    def bodies(draw):
        a = draw(_group_expr(2))
        b = draw(_group_expr(2, ["a"]))
        out = draw(_group_expr(2, ["a", "b"]))
        total = draw(_group_expr(1, ["a", "b"]))
        c = draw(_group_expr(1, ["b"]))
        # a * a: the reverse needs the sine and the cosine of one value, so there is a pair to group;
        # c, an exponential the reverse reads as a value and as its own derivative, comes from exp4
        return "\n".join([f"a = ti.sin(x[i] + {a})", f"b = {b}", f"c = ti.exp(0.5 * y[i] + 0.25 * ({c}))",
                          f"out[i] = a * a * ({out}) + c * c", f"loss[None] += {total}"])
    return bodies()


@pytest.fixture(scope="module")
def group_fields():
    n = 11  # two groups of four and a tail of three
    rng = np.random.default_rng(8)
    f = {"x": ti.field(ti.f32, shape=n, needs_grad=True), "y": ti.field(ti.f32, shape=n, needs_grad=True),
         "idx": ti.field(ti.i32, shape=n), "out": ti.field(ti.f32, shape=n, needs_grad=True),
         "loss": ti.field(ti.f32, shape=(), needs_grad=True)}
    f["x"].from_numpy(rng.uniform(-2, 2, n).astype(np.float32))
    f["y"].from_numpy(rng.uniform(-2, 2, n).astype(np.float32))
    f["idx"].from_numpy(rng.permutation(n).astype(np.int32))
    return f


def test_random_elementwise_bodies_give_the_same_derivatives_four_per_pass(group_fields, tmp_path_factory):
    """Random straight-line bodies (gathers, a local read by the next, an exponential, a store and
    a sum): their reverse four elements per pass against the same kernel one element per pass and
    Taichi's grad."""
    from hypothesis import HealthCheck, given, settings

    tmp = tmp_path_factory.mktemp("grouped")
    f = group_fields
    w = np.random.default_rng(9).standard_normal(11).astype(np.float32)

    def gradients(run, rev):
        f["loss"][None] = 0
        run()
        for g in (f["x"].grad, f["y"].grad):
            g.fill(0)
        f["out"].grad.from_numpy(w)
        f["loss"].grad[None] = 1.0
        rev()
        return f["x"].grad.to_numpy(), f["y"].grad.to_numpy()

    @settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(body=_group_bodies())
    def check(body):
        fn, src = load_elementwise(body, f, tmp)
        grouped = kd.kernel(fn)
        got = gradients(grouped, grouped.reverse)
        assert "sincos4(" in grouped.reverse.source and "exp4(" in grouped.reverse.source, src
        with _one_element_per_pass():
            single = kd.kernel(fn)
            expected = gradients(single, single.reverse)
        tk = ti.kernel(fn)
        taichi = gradients(tk, tk.grad)
        for a, b, c in zip(got, expected, taichi):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=src)
            np.testing.assert_allclose(a, c, rtol=2e-5, atol=2e-5, err_msg=src)

    check()


def test_four_elements_per_pass_from_a_nonzero_start():
    """A field with an offset: its loop runs from -3, so the groups start there (i = i_group * 4 -
    3) and the tail covers the last two of 14."""
    x = ti.field(ti.f32, shape=14, offset=(-3,), needs_grad=True)
    loss = ti.field(ti.f32, shape=(), needs_grad=True)
    xv = np.random.default_rng(11).uniform(-2, 2, 14).astype(np.float32)
    x.from_numpy(xv)

    @kd.kernel
    def energy():
        for i in x:
            loss[None] += ti.sin(x[i]) ** 2 * (i + 4)

    loss.grad[None] = 1.0
    energy.reverse()
    src = energy.reverse.source
    assert "for i_group in range(3):" in src and "i = i_group * 4 - 3" in src and "for i in range(9, 11):" in src
    weights = np.arange(-3, 11) + 4.0
    x64 = xv.astype(np.float64)
    np.testing.assert_allclose(x.grad.to_numpy(), 2 * np.sin(x64) * np.cos(x64) * weights, rtol=2e-6, atol=1e-5)


def _lone_bodies():
    from hypothesis import strategies as st

    @st.composite
    def bodies(draw):
        fn = draw(st.sampled_from(["ti.sin", "ti.cos"]))
        a = draw(_group_expr(2))
        b = draw(_group_expr(2, ["a"]))
        out = draw(_group_expr(2, ["b"]))
        # out is linear in `a`, a sine or a cosine: its derivatives need the partner alone
        return "\n".join([f"a = {fn}(x[i] + {a})", f"b = {b}", f"out[i] = a * ({out}) + b"])
    return bodies()


@pytest.fixture(scope="module")
def lone_fields():
    n = 11  # two groups of four and a tail of three
    rng = np.random.default_rng(12)
    f = {name: ti.field(ti.f32, shape=n, needs_grad=True, needs_dual=True) for name in ("x", "y", "out")}
    f["idx"] = ti.field(ti.i32, shape=n)
    f["x"].from_numpy(rng.uniform(-2, 2, n).astype(np.float32))
    f["y"].from_numpy(rng.uniform(-2, 2, n).astype(np.float32))
    f["idx"].from_numpy(rng.permutation(n).astype(np.int32))
    return f


def test_a_sine_or_cosine_alone_is_paired_in_loops_run_four_per_pass(lone_fields, tmp_path_factory):
    """Random straight-line bodies whose derivatives need the cosine of a sine they take (or the
    sine of a cosine) and not the value's own function again: four elements per pass, the partner
    from sincos4 (opt.cpu_math.with_lone_pairs). Their forward takes `out`'s sine (or cosine) from
    libm, as the primal does, and its tangent agrees with the same kernel one element per pass
    and with Taichi's FwdMode; their reverse agrees with the same kernel one element per pass and
    with Taichi's grad."""
    from hypothesis import HealthCheck, given, settings

    tmp = tmp_path_factory.mktemp("lone")
    f = lone_fields
    rng = np.random.default_rng(13)
    v = rng.standard_normal(11).astype(np.float32)
    w = rng.standard_normal(11).astype(np.float32)
    grouped_kernels = []

    def forward(run):
        """out and its tangent along v in x (y's tangent zero)."""
        f["x"].dual.from_numpy(v)
        f["y"].dual.fill(0)
        f["out"].dual.fill(0)
        run()
        return f["out"].to_numpy(), f["out"].dual.to_numpy()

    def reverse(run, rev):
        run()
        for g in (f["x"].grad, f["y"].grad):
            g.fill(0)
        f["out"].grad.from_numpy(w)
        rev()
        return f["x"].grad.to_numpy(), f["y"].grad.to_numpy()

    @settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(body=_lone_bodies())
    def check(body):
        fn, src = load_elementwise(body, f, tmp)
        grouped = kd.kernel(fn)
        grouped()
        primal_out = f["out"].to_numpy()
        got_forward, got_reverse = forward(grouped.forward), reverse(grouped, grouped.reverse)
        grouped_kernels.append(("sincos4(" in grouped.forward.source) + ("sincos4(" in grouped.reverse.source))
        with _one_element_per_pass():
            single = kd.kernel(fn)
            expected_forward, expected_reverse = forward(single.forward), reverse(single, single.reverse)
        # out's sine (or cosine) is libm's, as the primal's (the arithmetic around it may round
        # differently in another kernel under Taichi's fast math: an ulp of its terms, which are
        # up to about 8, grouped or not)
        assert f"a = {body.split('(')[0].split('= ')[1]}(" in grouped.forward.source, grouped.forward.source
        np.testing.assert_allclose(got_forward[0], primal_out, rtol=1e-6, atol=2e-6, err_msg=src)
        tk = ti.kernel(fn)

        def taichi_forward():
            with ti.ad.FwdMode(loss=f["out"], param=f["x"], seed=[float(s) for s in v]):
                tk()
        taichi_tangent = forward(taichi_forward)[1]
        np.testing.assert_allclose(got_forward[1], expected_forward[1], rtol=1e-6, atol=1e-6, err_msg=src)
        np.testing.assert_allclose(got_forward[1], taichi_tangent, rtol=2e-5, atol=2e-5, err_msg=src)
        for a, b, c in zip(got_reverse, expected_reverse, reverse(tk, tk.grad)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=src)
            np.testing.assert_allclose(a, c, rtol=2e-5, atol=2e-5, err_msg=src)

    check()
    assert sum(k == 2 for k in grouped_kernels) >= 5, grouped_kernels  # forward and reverse both grouped


def test_a_sum_a_forward_kernel_returns_keeps_one_element_per_pass():
    """W1's forward: the tangent's cosine alone would be paired, but the loop also sums the primal
    value, and four elements per pass would make Taichi split that sum differently (its last bits)."""
    x, y, loss, energy = _elementwise()
    k = kd.kernel(energy)
    kd.dual(x)
    assert "ti.cos(x[i])" in k.forward.source and "sincos" not in k.forward.source
    assert "sincos4(" in k.reverse.source


def test_the_reverse_of_a_sine_alone_takes_cosines_four_per_pass():
    x = ti.field(ti.f32, shape=N_ELEM, needs_grad=True)
    y = ti.field(ti.f32, shape=N_ELEM, needs_grad=True)
    xv = np.random.default_rng(14).uniform(-10, 10, N_ELEM).astype(np.float32)
    x.from_numpy(xv)

    @kd.kernel
    def wave():
        for i in x:
            y[i] = 3.0 * ti.sin(x[i])

    y.grad.fill(1.0)
    wave()
    wave.reverse()
    src = wave.reverse.source
    assert "= sincos4(x[i], x[i_1], x[i_2], x[i_3])" in src and "ti.cos" not in src, src
    ulps = _ulps(x.grad.to_numpy() / np.float32(3.0), np.cos(xv.astype(np.float64)))
    assert ulps.max() <= 2.0, ulps.max()
    assert (y.grad.to_numpy() == 0).all()  # the overwritten output's adjoint, used up
