"""The rule table, one spec row per primitive: domain-aware inputs, orders 1 and 2, f64 against
finite differences and f32 against the (checked) f64 derivatives; plus table completeness."""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import check, get, make_derivative_fields, make_outer_duals, put
from kerndiff.ad import rules
from kerndiff.ir.ops import OPS

N = 5


@pytest.fixture(scope="module", autouse=True)
def runtime():
    ti.init(arch=ti.cpu, default_fp=ti.f64, random_seed=0)
    FIELDS.clear()
    yield
    ti.reset()


@ti.func
def op_add(a, b):
    return a + b


@ti.func
def op_sub(a, b):
    return a - b


@ti.func
def op_mul(a, b):
    return a * b


@ti.func
def op_div(a, b):
    return a / b


@ti.func
def op_neg(a, b):
    return -a


@ti.func
def op_pow(a, b):
    return a ** b


@ti.func
def op_pow_int(a, b):
    return a ** 3


@ti.func
def op_mod(a, b):
    return a % b


@ti.func
def op_min(a, b):
    return ti.min(a, b)


@ti.func
def op_max(a, b):
    return ti.max(a, b)


@ti.func
def op_abs(a, b):
    return ti.abs(a)


@ti.func
def op_sin(a, b):
    return ti.sin(a)


@ti.func
def op_cos(a, b):
    return ti.cos(a)


@ti.func
def op_tan(a, b):
    return ti.tan(a)


@ti.func
def op_asin(a, b):
    return ti.asin(a)


@ti.func
def op_acos(a, b):
    return ti.acos(a)


@ti.func
def op_atan(a, b):
    return ti.atan2(a, 1.0)


@ti.func
def op_atan2(a, b):
    return ti.atan2(a, b)


@ti.func
def op_exp(a, b):
    return ti.exp(a)


@ti.func
def op_log(a, b):
    return ti.log(a)


@ti.func
def op_sqrt(a, b):
    return ti.sqrt(a)


@ti.func
def op_rsqrt(a, b):
    return ti.rsqrt(a)


@ti.func
def op_tanh(a, b):
    return ti.tanh(a)


@ti.func
def op_select(a, b):
    return ti.select(a > 0.0, a * b, b ** 2)


@ti.func
def op_floor(a, b):
    return ti.floor(a) * b + ti.ceil(b) * a + ti.round(a * 2) + (a // 0.3)


@ti.func
def op_cast(a, b):
    return ti.cast(ti.cast(a, ti.f32), ti.f64) * 0 + ti.cast(a * b, ti.f64)


POS = (0.5, 2.0)
ANY = (-1.5, 1.5)
UNIT = (-0.8, 0.8)
SPECS = [  # name, function, domain of a, domain of b, rule(s) covered
    ("add", op_add, ANY, ANY, ["add"]),
    ("sub", op_sub, ANY, ANY, ["sub"]),
    ("mul", op_mul, ANY, ANY, ["mul"]),
    ("div", op_div, ANY, POS, ["div"]),
    ("neg", op_neg, ANY, ANY, ["neg"]),
    ("pow", op_pow, POS, ANY, ["pow"]),
    ("pow_int", op_pow_int, ANY, ANY, ["pow"]),
    ("mod", op_mod, POS, (0.3, 0.45), ["mod"]),
    ("min", op_min, ANY, ANY, ["min"]),
    ("max", op_max, ANY, ANY, ["max"]),
    ("abs", op_abs, ANY, ANY, ["abs"]),
    ("sin", op_sin, ANY, ANY, ["sin"]),
    ("cos", op_cos, ANY, ANY, ["cos"]),
    ("tan", op_tan, UNIT, ANY, ["tan"]),
    ("asin", op_asin, UNIT, ANY, ["asin"]),
    ("acos", op_acos, UNIT, ANY, ["acos"]),
    ("atan", op_atan, ANY, ANY, ["atan2"]),
    ("atan2", op_atan2, ANY, POS, ["atan2"]),
    ("exp", op_exp, ANY, ANY, ["exp"]),
    ("log", op_log, POS, ANY, ["log"]),
    ("sqrt", op_sqrt, POS, ANY, ["sqrt"]),
    ("rsqrt", op_rsqrt, POS, ANY, ["rsqrt"]),
    ("tanh", op_tanh, ANY, ANY, ["tanh"]),
    ("select", op_select, ANY, ANY, ["select"]),
    ("piecewise_constant", op_floor, (0.1, 0.9), (0.1, 0.9), ["floor", "ceil", "round", "floordiv"]),
    ("cast", op_cast, ANY, ANY, ["cast"]),
]


def avoid_kinks(a, b, name):
    """Keep inputs away from kinks (ties, zero, floor steps) where finite differences are meaningless."""
    if name in ("min", "max"):
        b = np.where(np.abs(a - b) < 0.1, b + 0.3, b)
    if name == "abs":
        a = np.where(np.abs(a) < 0.1, a + 0.3, a)
    if name == "select":
        a = np.where(np.abs(a) < 0.1, a + 0.3, a)
    if name == "mod":
        a = np.where(np.abs(np.mod(a, b) - b / 2) > 0.4 * b, a + b / 2, a)
    return a, b


FIELDS = {}


def make(fn, dtype):
    # One set of fields per dtype for the whole module: Taichi allows only 512 SNode trees.
    if dtype not in FIELDS:
        FIELDS[dtype] = tuple(ti.field(dtype, shape=N) for _ in range(3))
    x, y, out = FIELDS[dtype]

    @kd.kernel
    def k():
        for i in x:
            out[i] = fn(x[i], y[i])

    return k, x, y, out


def inputs(name, da, db, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(*da, N)
    b = rng.uniform(*db, N)
    return avoid_kinks(a, b, name)


@pytest.mark.parametrize("path", ["forward", "reverse", "reverse.forward", "forward.forward"])
@pytest.mark.parametrize("spec", SPECS, ids=[s[0] for s in SPECS])
def test_rule_f64_against_finite_differences(spec, path):
    name, fn, da, db, _ = spec
    k, x, y, out = make(fn, ti.f64)
    a, b = inputs(name, da, db)
    x.from_numpy(a)
    y.from_numpy(b)
    *prefix, last = path.split(".")
    K = k
    for p in prefix:
        K = getattr(K, p)
    if prefix:  # k's derivative fields (the first spec to run had none: its k.reverse was `pass`)
        make_derivative_fields(k)
        make_outer_duals(K)
    k()
    check(K, last, eps=1e-6, rtol=1e-5, atol=1e-7)


def derivatives(k, x, y, out, a, b, v):
    """(J·v by forward, Jᵀ·1 by reverse, H·v by reverse.forward) for inputs a, b and direction v."""
    x.from_numpy(a.astype(x.to_numpy().dtype))
    y.from_numpy(b.astype(y.to_numpy().dtype))
    for f in (kd.dual(x), kd.dual(y), kd.adjoint(x), kd.adjoint(y), kd.dual(kd.adjoint(x)),
              kd.dual(kd.adjoint(y)), kd.dual(out), kd.adjoint(out)):
        f.fill(0)
    put(kd.dual(x), v)
    k()
    k.forward()
    jv = get(kd.dual(out))
    kd.adjoint(out).fill(1)
    k.reverse.forward()
    return jv, get(kd.adjoint(x)), get(kd.dual(kd.adjoint(x)))


@pytest.mark.parametrize("spec", SPECS, ids=[s[0] for s in SPECS])
def test_rule_f32_matches_f64(spec):
    name, fn, da, db, _ = spec
    a, b = inputs(name, da, db)
    v = np.random.default_rng(3).standard_normal(N)
    ref = derivatives(*make(fn, ti.f64), a, b, v)
    got = derivatives(*make(fn, ti.f32), a, b, v)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=2e-3, atol=2e-3 * max(1.0, np.max(np.abs(r))))


def test_every_op_has_a_rule_or_is_declared_structural():
    covered = set(rules.PARTIALS) | rules.NO_DERIVATIVE | rules.STRUCTURAL
    assert covered == OPS, sorted(OPS ^ covered)
    tested = {r for s in SPECS for r in s[4]}
    assert set(rules.PARTIALS) | {"floor", "ceil", "round", "floordiv", "cast"} <= tested | {"atan"}, \
        sorted(set(rules.PARTIALS) - tested)


def test_minmax_ties_split_evenly():
    x, y, out = ti.field(ti.f64, shape=()), ti.field(ti.f64, shape=()), ti.field(ti.f64, shape=())

    @kd.kernel
    def k():
        out[None] = ti.max(x[None], y[None]) + 2 * ti.min(x[None], y[None])

    grad = kd.backward(k, inputs=[x, y], output=out)
    assert grad([1.0, 1.0]) == [1.5, 1.5]
    assert grad([2.0, 1.0]) == [1.0, 2.0]


def test_a_piecewise_zero_times_a_singular_partial_is_zero():
    """`ti.sqrt(ti.max(a, 0.0))` (a safe square root) and `ti.max(0.0, b) ** 1.5` (a Hertz contact
    energy) are constant where max chooses 0, but the chain rule multiplied max's zero partial by
    the root's infinite one (0.5 / sqrt(0)): NaN in the gradient of the root, and in the HVP of
    the contact energy (1.5 * 0 ** 0.5 differentiated once more), as in JAX and Taichi's AD.
    kerndiff multiplies those pairs with mul_or_zero (ad/piecewise_zeros.py). Gradient, JVP and
    HVP against the closed forms, the max inline and through a local (no ties at 0: there the
    one-sided derivatives differ)."""
    a, b, out = (ti.field(ti.f64, shape=4) for _ in range(3))

    @kd.kernel
    def clamped():
        for i in a:
            m = ti.max(0.0, b[i])
            out[i] = ti.sqrt(ti.max(a[i], 0.0)) + m ** 1.5

    av, bv = np.array([-0.5, 0.3, 2.0, -1e-3]), np.array([0.4, -0.2, -3.0, 1.7])
    pa, pb = np.maximum(av, 0), np.maximum(bv, 0)
    da = np.where(av > 0, 0.5 / np.sqrt(pa + (av <= 0)), 0.0)
    db = 1.5 * np.sqrt(pb)
    grads = kd.backward(clamped, inputs=[a, b], output=out)([av, bv], cotangent=np.ones(4))
    np.testing.assert_allclose(grads[0], da, rtol=1e-14)
    np.testing.assert_allclose(grads[1], db, rtol=1e-14)
    ta, tb = np.array([0.3, -0.7, 1.1, 0.5]), np.array([-0.4, 0.9, 0.6, 0.2])
    jv = kd.forward(clamped, inputs=[a, b], output=out)([av, bv], tangents=[ta, tb])
    np.testing.assert_allclose(jv, da * ta + db * tb, rtol=1e-14)
    hv = kd.hvp(clamped, inputs=[a, b], output=out)([av, bv], [ta, tb], cotangent=np.ones(4))
    daa = np.where(av > 0, -0.25 * (pa + (av <= 0)) ** -1.5, 0.0)
    dbb = np.where(bv > 0, 0.75 / np.sqrt(pb + (bv <= 0)), 0.0)
    np.testing.assert_allclose(hv[0], daa * ta, rtol=1e-14)
    np.testing.assert_allclose(hv[1], dbb * tb, rtol=1e-14)


def test_pow_is_differentiable_where_its_base_or_exponent_is_zero():
    """a**0 is 1 for every a, and 0**b is 0 for every b > 0: their partials are 0 there, where the
    textbook rules give 0·0**-1 and log(0)·0, both NaN (Taichi's grad returns those NaNs; JAX's
    rules return 0, and so do kerndiff's). Against the closed form in both modes; second order
    finite there."""
    a, b, k, out = (ti.field(ti.f64, shape=3) for _ in range(4))
    n = ti.field(ti.i32, shape=3)

    @kd.kernel
    def powers():
        for i in a:
            out[i] = a[i] ** b[i] + a[i] ** n[i] + k[i] * a[i] ** 2

    av, bv, nv = np.array([0.0, 0.5, 0.0]), np.array([2.0, 1.5, 3.0]), np.array([0, 1, 2], dtype=np.int32)
    n.from_numpy(nv)
    k.from_numpy(np.ones(3))
    grads = kd.backward(powers, inputs=[a, b], output=out)([av, bv], cotangent=np.ones(3))
    da = bv * np.where(av > 0, av, 1) ** (bv - 1) * (av > 0) + nv * np.where(nv > 0, av ** np.maximum(nv - 1, 0), 0) \
        + 2 * av
    db = np.where(av > 0, np.log(np.where(av > 0, av, 1)) * av ** bv, 0)
    np.testing.assert_allclose(grads[0], da, rtol=1e-13)
    np.testing.assert_allclose(grads[1], db, rtol=1e-13)
    ta, tb = np.array([0.3, -0.7, 1.1]), np.array([-0.4, 0.9, 0.6])
    jv = kd.forward(powers, inputs=[a, b], output=out)([av, bv], tangents=[ta, tb])
    np.testing.assert_allclose(jv, da * ta + db * tb, rtol=1e-13)
    hv = kd.hvp(powers, inputs=[a, b], output=out)([av, bv], [ta, tb], cotangent=np.ones(3))
    assert all(np.isfinite(h).all() for h in hv), hv  # (finite differences step to a < 0: NaN there)


def test_a_norm_that_nothing_moves_has_a_zero_tangent():
    """`(v[0] - v[1]).norm()` at v[0] = v[1] (two bodies at rest, DiffTaichi's rigid-body joint):
    its tangent (r · ṙ) / |r| was 0 / 0 even along a direction that does not move v, and the
    NaN reached every output of the forward kernel while the reverse's gradient was finite.
    Where every component's tangent is 0 the norm's is 0 now (exactly: the norm does not move);
    along a direction that moves r at r = 0 it stays NaN (no derivative there, and the reverse
    says NaN too). Checked against the closed form, the reverse, and finite differences."""
    v = ti.Vector.field(2, ti.f64, shape=2)
    s, out = ti.field(ti.f64, shape=()), ti.field(ti.f64, shape=())

    @kd.kernel
    def joint():
        for _ in range(1):
            r = v[0] - v[1]
            n = r.norm() + 0.1
            out[None] += n * s[None] ** 2 + ti.tanh(s[None]) * n

    at_rest = np.array([[0.3, -0.2], [0.3, -0.2]])
    jvp = kd.forward(joint, inputs=[v, s], output=out)
    expected = 2 * 0.7 * 0.1 + (1 - np.tanh(0.7) ** 2) * 0.1
    assert jvp([at_rest, 0.7], tangents=[np.zeros((2, 2)), 1.0]) == pytest.approx(expected, rel=1e-14)
    assert np.isnan(jvp([at_rest, 0.7], tangents=[np.array([[1.0, 0.0], [0.0, 0.0]]), 1.0]))
    (_, ds) = kd.backward(joint, inputs=[v, s], output=out)([at_rest, 0.7])
    assert ds == pytest.approx(expected, rel=1e-14)
    moved = np.array([[0.3, -0.2], [0.1, 0.4]])
    d = np.linalg.norm(moved[0] - moved[1])
    unit = (moved[0] - moved[1]) / d
    t = np.array([[0.5, -1.0], [0.25, 2.0]])
    got = jvp([moved, 0.7], tangents=[t, 0.0])
    assert got == pytest.approx((0.49 + np.tanh(0.7)) * unit @ (t[0] - t[1]), rel=1e-13)
    s[None] = 0.7
    v.from_numpy(moved)
    assert kd.check_grad(joint, [v, s], out) < 1e-6
