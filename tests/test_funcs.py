"""Device functions and their transforms (API.md §3) against analytic derivatives and f64 finite
differences: scalar and vector functions, orders 1-3, mixed partials of a tanh MLP (PINN-style),
forces from a potential's gradient inside a kernel."""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd


pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)


@kd.func
def cubic(x):
    return x**3 + 2 * x**2 - 3 * x + 1


def test_seed_example():
    dfdx = kd.forward(cubic)
    d2fdx2 = kd.forward(kd.forward(cubic))

    @kd.kernel
    def k() -> float:
        return dfdx(1.0)

    @kd.kernel
    def k2(x: ti.f64) -> ti.f64:
        return d2fdx2(x)

    assert k() == 4.0
    assert k2(1.0) == 10.0
    assert k2(-2.0) == 6 * -2.0 + 4


@kd.func
def wave(x, y):
    return ti.sin(x * y) * ti.exp(0.3 * x) + x**2 * y**3


def wave_np(x, y):
    return np.sin(x * y) * np.exp(0.3 * x) + x**2 * y**3


def fd2(f, x, y, i, j, h=1e-4):
    """Second partial ∂²f/∂i∂j by central differences (f64)."""
    e = [np.array([h, 0.0]), np.array([0.0, h])]
    p = np.array([x, y])
    return (f(*(p + e[i] + e[j])) - f(*(p + e[i] - e[j])) - f(*(p - e[i] + e[j])) + f(*(p - e[i] - e[j]))) / (4 * h * h)


def test_mixed_partials_and_orders_against_finite_differences():
    dx = kd.forward(wave, argnum=0)
    dy = kd.forward(wave, argnum=1)
    dxy = kd.forward(kd.forward(wave, argnum=0), argnum=1)
    dxx = kd.forward(kd.forward(wave, argnum=0), argnum=0)
    dxxy = kd.forward(kd.forward(kd.forward(wave, argnum=0), argnum=0), argnum=1)

    @kd.kernel
    def k(x: ti.f64, y: ti.f64) -> (ti.f64, ti.f64, ti.f64, ti.f64, ti.f64):
        return dx(x, y), dy(x, y), dxy(x, y), dxx(x, y), dxxy(x, y)

    x, y = 0.7, -0.4
    got = k(x, y)
    h = 1e-6
    np.testing.assert_allclose(got[0], (wave_np(x + h, y) - wave_np(x - h, y)) / (2 * h), rtol=1e-7)
    np.testing.assert_allclose(got[1], (wave_np(x, y + h) - wave_np(x, y - h)) / (2 * h), rtol=1e-7)
    np.testing.assert_allclose(got[2], fd2(wave_np, x, y, 0, 1), rtol=1e-5)
    np.testing.assert_allclose(got[3], fd2(wave_np, x, y, 0, 0), rtol=1e-5)
    # third order: differentiate the (checked) second derivative numerically in y
    ey = 1e-5
    third = (k(x, y + ey)[3] - k(x, y - ey)[3]) / (2 * ey)
    np.testing.assert_allclose(got[4], third, rtol=1e-6)


def test_grad_jvp_vjp_and_their_compositions():
    g = kd.grad(wave)
    gx = kd.grad(wave, argnum=0)
    hxy = kd.forward(kd.grad(wave, argnum=1), argnum=0)   # ∂/∂x (∂f/∂y)
    hyy = kd.grad(kd.grad(wave, argnum=1), argnum=1)       # ∂²f/∂y²
    jvp = kd.jvp(wave)
    vjp = kd.vjp(wave)

    @kd.kernel
    def k(x: ti.f64, y: ti.f64) -> (ti.f64, ti.f64, ti.f64, ti.f64, ti.f64, ti.f64, ti.f64, ti.f64, ti.f64):
        a, b = g(x, y)
        out, tan = jvp(x, y, 1.0, 2.0)
        cx, cy = vjp(x, y, 3.0)
        return a, b, gx(x, y), hxy(x, y), hyy(x, y), out, tan, cx, cy

    x, y = 0.3, 0.9
    a, b, gxv, hxyv, hyyv, out, tan, cx, cy = k(x, y)
    dfx = np.cos(x * y) * y * np.exp(0.3 * x) + 0.3 * np.sin(x * y) * np.exp(0.3 * x) + 2 * x * y**3
    dfy = np.cos(x * y) * x * np.exp(0.3 * x) + 3 * x**2 * y**2
    np.testing.assert_allclose([a, b, gxv], [dfx, dfy, dfx], rtol=1e-12)
    np.testing.assert_allclose(hxyv, fd2(wave_np, x, y, 0, 1), rtol=1e-5)
    np.testing.assert_allclose(hyyv, fd2(wave_np, x, y, 1, 1), rtol=1e-5)
    np.testing.assert_allclose(out, wave_np(x, y), rtol=1e-12)
    np.testing.assert_allclose(tan, dfx + 2 * dfy, rtol=1e-12)
    np.testing.assert_allclose([cx, cy], [3 * dfx, 3 * dfy], rtol=1e-12)


@kd.func
def polar_parts(x, y):
    """Two values, a scalar and a vector, as `return a, b` gives them."""
    return x * y ** 2, ti.Vector([ti.sin(x), x * ti.exp(y)])


def test_transforms_of_functions_returning_several_values():
    """kd.forward and kd.jvp of a function returning a tuple (a scalar and a vector; kd.grad
    without argnum) give one tangent per value, and kd.vjp takes one cotangent per value, as JAX's
    jvp/vjp take output trees (refused before: "differentiates a function returning one scalar").
    So the Hessian is `kd.forward(kd.grad(f), argnum=j)` column by column, and H·v is
    `kd.vjp(kd.grad(f))(x, y, (v0, v1))` (symmetric H). Analytic values and f64 differences."""
    hx = kd.forward(kd.grad(wave), argnum=0)   # (∂²f/∂x², ∂²f/∂y∂x)
    jvp = kd.jvp(polar_parts)
    vjp = kd.vjp(polar_parts)
    hv = kd.vjp(kd.grad(wave))

    @kd.kernel
    def k(x: ti.f64, y: ti.f64) -> (ti.f64, ti.f64, ti.f64, ti.f64, ti.f64, ti.f64, ti.f64, ti.f64, ti.f64):
        hxx, hyx = hx(x, y)
        (a, b), (ta, tb) = jvp(x, y, 1.0, 2.0)
        cx, cy = vjp(x, y, (3.0, ti.Vector([5.0, 7.0])))
        hv0, hv1 = hv(x, y, (1.0, -2.0))
        return hxx, hyx, a + b[1], ta, tb[0] + 10 * tb[1], cx, cy, hv0, hv1

    x, y = 0.3, 0.9
    hxx, hyx, ab, ta, tb, cx, cy, hv0, hv1 = k(x, y)
    np.testing.assert_allclose([hxx, hyx], [fd2(wave_np, x, y, 0, 0), fd2(wave_np, x, y, 1, 0)], rtol=1e-5)
    np.testing.assert_allclose(ab, x * y ** 2 + x * np.exp(y), rtol=1e-12)
    np.testing.assert_allclose(ta, y ** 2 + 2 * (2 * x * y), rtol=1e-12)
    np.testing.assert_allclose(tb, np.cos(x) + 10 * (np.exp(y) + 2 * x * np.exp(y)), rtol=1e-12)
    np.testing.assert_allclose([cx, cy], [3 * y ** 2 + 5 * np.cos(x) + 7 * np.exp(y),
                                          3 * 2 * x * y + 7 * x * np.exp(y)], rtol=1e-12)
    hess = [[fd2(wave_np, x, y, i, j) for j in range(2)] for i in range(2)]
    np.testing.assert_allclose([hv0, hv1], np.array(hess) @ [1.0, -2.0], rtol=1e-5)


def test_a_cotangent_per_returned_value_is_asked_for():
    vjp = kd.vjp(polar_parts)

    @kd.kernel
    def k(x: ti.f64) -> ti.f64:
        cx, cy = vjp(x, x, 1.0)
        return cx

    with pytest.raises(kd.KernDiffError, match="one per value") as e:
        k(0.5)
    assert "vjp(x, x, 1.0)" in str(e.value)


@kd.func
def lennard_jones(r):
    d2 = r.norm_sqr()
    inv6 = 1.0 / d2**3
    return 4.0 * (inv6 * inv6 - inv6)


def test_forces_from_potential_gradient_inside_kernel():
    n = 5
    pos = ti.Vector.field(2, ti.f64, shape=n)
    force = ti.Vector.field(2, ti.f64, shape=n)
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 3, (n, 2))
    pos.from_numpy(p)
    dU = kd.grad(lennard_jones)

    @kd.kernel
    def forces():
        for i in pos:
            f = ti.Vector([0.0, 0.0])
            for j in range(n):
                if i != j:
                    f -= dU(pos[i] - pos[j])[0]
            force[i] = f

    forces()

    def U(r):
        d2 = np.dot(r, r)
        return 4 * (d2**-6 - d2**-3)

    expected = np.zeros((n, 2))
    h = 1e-6
    for i in range(n):
        for j in range(n):
            if i != j:
                r = p[i] - p[j]
                g = [(U(r + h * e) - U(r - h * e)) / (2 * h) for e in np.eye(2)]
                expected[i] -= g
    np.testing.assert_allclose(force.to_numpy(), expected, rtol=1e-6, atol=1e-8)


@kd.func
def mlp(x, y):
    """A small tanh MLP u(x, y) with fixed weights: 2 -> 3 -> 1."""
    W1 = ti.Matrix([[0.5, -0.3], [0.8, 0.2], [-0.6, 0.9]])
    b1 = ti.Vector([0.1, -0.2, 0.05])
    w2 = ti.Vector([0.7, -1.1, 0.4])
    h = W1 @ ti.Vector([x, y]) + b1
    a = ti.Vector([ti.tanh(h[0]), ti.tanh(h[1]), ti.tanh(h[2])])
    return w2.dot(a) + 0.3


def mlp_np(x, y):
    W1 = np.array([[0.5, -0.3], [0.8, 0.2], [-0.6, 0.9]])
    b1 = np.array([0.1, -0.2, 0.05])
    w2 = np.array([0.7, -1.1, 0.4])
    return w2 @ np.tanh(W1 @ np.array([x, y]) + b1) + 0.3


def test_pinn_laplacian_and_mixed_partials_of_tanh_mlp():
    uxx = kd.forward(kd.forward(mlp, argnum=0), argnum=0)
    uyy = kd.forward(kd.forward(mlp, argnum=1), argnum=1)
    uxy = kd.forward(kd.forward(mlp, argnum=0), argnum=1)

    @kd.kernel
    def k(x: ti.f64, y: ti.f64) -> (ti.f64, ti.f64):
        return uxx(x, y) + uyy(x, y), uxy(x, y)

    x, y = 0.4, -0.7
    lap, mixed = k(x, y)
    np.testing.assert_allclose(lap, fd2(mlp_np, x, y, 0, 0) + fd2(mlp_np, x, y, 1, 1), rtol=1e-5)
    np.testing.assert_allclose(mixed, fd2(mlp_np, x, y, 0, 1), rtol=1e-5)


def test_nested_transform_evaluates_shared_subexpressions_once():
    d2 = kd.forward(kd.forward(kd.func(lambda_free_sin_exp)))

    @kd.kernel
    def k(x: ti.f64) -> ti.f64:
        return d2(x)

    x = 0.37
    expected = (2 * np.cos(x) - np.sin(x)) * np.exp(x) + np.sin(x) * np.exp(x)
    np.testing.assert_allclose(k(x), expected, rtol=1e-12)
    src = k.source
    code = "\n".join(line for line in src.splitlines() if not line.strip().startswith("#"))
    for call in ("ti.sin(", "ti.cos(", "ti.exp("):
        assert code.count(call) <= 1, src


def lambda_free_sin_exp(x):
    return ti.sin(x) * ti.exp(x)


@kd.func
def bump(a):
    return ti.rsqrt(0.5 + ((0.7) / (1.5 + a * a)) * ((0.7) / (1.5 + a * a)))


def bump_np(a):
    return 1 / np.sqrt(0.5 + (0.7 / (1.5 + a * a)) ** 2)


def test_deep_chains_of_transforms_stay_small():
    """Orders 3 and 4 of a compound expression through grad, forward, jvp and vjp (found by
    test_fuzz_funcs.py: the chain's derivative blocks went unnamed into the next transform, and
    the third derivative's expressions nested past Python's recursion limit). Each order against
    central differences of the order below, which test_funcs checks down to f itself."""
    chain = [bump]
    for transform in (kd.grad, kd.forward, kd.grad, kd.forward):
        chain.append(transform(chain[-1], argnum=0))
    jvp, vjp = kd.jvp(chain[3]), kd.vjp(chain[3])

    @kd.kernel
    def k(x: ti.f64) -> (ti.f64, ti.f64, ti.f64, ti.f64, ti.f64, ti.f64, ti.f64):
        value, tangent = jvp(x, 0.5)
        (cotangent,) = vjp(x, 2.0)
        return chain[1](x), chain[2](x), chain[3](x), chain[4](x), value, tangent, cotangent

    x, h = 0.4, 1e-5
    got = k(x)
    np.testing.assert_allclose(got[0], (bump_np(x + h) - bump_np(x - h)) / (2 * h), rtol=1e-8)
    for order in (2, 3, 4):
        fd = (k(x + h)[order - 2] - k(x - h)[order - 2]) / (2 * h)
        np.testing.assert_allclose(got[order - 1], fd, rtol=1e-6, err_msg=f"order {order}")
    np.testing.assert_allclose(got[4:], [got[2], 0.5 * got[3], 2.0 * got[3]], rtol=1e-12)
    assert len(k.source) < 40000, len(k.source)  # (29,606 characters in session 33)


def test_ti_func_inlined_and_differentiated_by_transforms():
    @ti.func
    def sq(a):
        return a * a

    dsq = kd.forward(sq)

    @kd.kernel
    def k(x: ti.f64) -> ti.f64:
        return dsq(x) + sq(x)

    assert k(3.0) == 6.0 + 9.0


def test_ti_math_library_functions_inline(runtime):
    """ti.math's own ti.funcs are inlined like the user's: ones that need ti.static on a folded
    constant (log2), template parameters (eye), ti.zero (refract) or ti.pow. Values against
    ti.kernel, derivatives against finite differences (forward and reverse)."""
    from harness import check

    x = ti.field(ti.f64, shape=4)
    out = ti.field(ti.f64, shape=())
    x.from_numpy(np.array([0.3, 0.55, 0.8, 1.1]))
    tm = ti.math

    def body():
        for i in x:
            a = x[i]
            d = tm.refract(tm.vec2(a, -1.0).normalized(), tm.vec2(0.0, 1.0), 0.9)
            out[None] += tm.log2(a) + ti.pow(a, 2.5) + (tm.eye(2) * a).sum() + d.dot(tm.vec2(1.0, 2.0))

    k, ref = kd.kernel(body), ti.kernel(body)
    values = []
    for run in (k, ref):
        out[None] = 0
        run()
        values.append(out[None])
    xs = x.to_numpy()
    assert abs(values[0] - values[1]) <= 1e-12 * abs(values[1])
    incident = np.stack([xs, -np.ones_like(xs)], 1) / np.hypot(xs, 1.0)[:, None]
    dxn = incident[:, 1]  # against the normal (0, 1)
    kk = 1 - 0.81 * (1 - dxn ** 2)
    refracted = 0.9 * incident - (0.9 * dxn + np.sqrt(kk))[:, None] * np.array([0.0, 1.0])
    expected = np.sum(np.log2(xs) + xs ** 2.5 + 2 * xs + refracted @ np.array([1.0, 2.0]))
    assert np.all(kk >= 0) and abs(values[0] - expected) <= 1e-12 * abs(expected)
    for mode in ("forward", "reverse"):
        check(k, mode, rtol=1e-6)


SCALE = 1.5


@kd.func
def scaled(a, b=2.0, *, c=SCALE):
    return a ** b * c + ti.sin(a * b)


def test_keyword_arguments_and_defaults_follow_python():
    """Keywords, keyword-only parameters and defaults (any Python value, evaluated where the
    function was defined) bind as in Python, for a kd.func, a ti.func and their transforms:
    kerndiff once dropped a kd.func's keyword arguments (f(1.0, b=5.0) used b=2.0) and read
    defaults only when they were literals. Against the closed form and central differences."""
    dfda = kd.forward(scaled)
    dfdb = kd.forward(scaled, argnum=1)
    grad = kd.grad(scaled)

    @ti.func
    def twice(a, times=2):
        return scaled(a, c=0.5) * times

    @kd.kernel
    def k(a: ti.f64) -> ti.f64:
        ga, gb, gc = grad(a, 1.5, c=0.25)
        return (scaled(a, b=3.0) + twice(a) + twice(a, times=3) * 10 + dfda(a, c=2.0) * 100
                + dfdb(a, 2.5) * 1e3 + ga * 1e4 + gb * 1e5 + gc * 1e6)

    def f(a, b=2.0, c=SCALE):
        return a ** b * c + np.sin(a * b)

    def d(fn, x, h=1e-6):
        return (fn(x + h) - fn(x - h)) / (2 * h)

    a = 0.7
    expected = (f(a, 3.0) + f(a, c=0.5) * 2 + f(a, c=0.5) * 3 * 10 + d(lambda t: f(t, c=2.0), a) * 100
                + d(lambda t: f(a, t), 2.5) * 1e3 + d(lambda t: f(t, 1.5, 0.25), a) * 1e4
                + d(lambda t: f(a, t, 0.25), 1.5) * 1e5 + a ** 1.5 * 1e6)
    assert k(a) == pytest.approx(expected, rel=1e-8)


@kd.func
def squared_then_walked(a, b):
    t = a + b
    t = t * t
    acc = 0.5
    k = 0
    while k < 2 and t < 1.5:
        acc = 0.5 * acc + ti.tanh(t)
        k += 1
    return t + acc


@kd.func
def early_return_beside_a_loop(a, b):
    t = a * b
    if t > 0.4:
        return t * t
    acc = 0.5
    for k in range(2):
        acc = 0.5 * acc + ti.tanh(a - acc)
    return acc * t * t


@pytest.mark.parametrize("fn, outer", [(squared_then_walked, None), (early_return_beside_a_loop, kd.grad),
                                       (early_return_beside_a_loop, kd.forward)])
def test_gradients_through_loops_and_early_returns(fn, outer):
    """kd.grad of a function with a while loop (its forward sweep once counted no trips, so the
    gradient missed the loop), and a second derivative by a second kd.grad of a function that
    returns early beside a loop (the second reverse read the loop's result, which the first
    reverse's adjoint `if` reads after its recompute `if`, as the value from before the loop).
    Found by test_fuzz_funcs.py; both were silently wrong. Against central differences of the
    order below; the points take either side of the loop's and the early return's conditions."""
    inner = kd.grad(fn, argnum=1)
    top = inner if outer is None else outer(inner, argnum=1)
    below = fn if outer is None else inner

    @kd.kernel
    def k(a: ti.f64, b: ti.f64) -> (ti.f64, ti.f64):
        return top(a, b), below(a, b)

    h = 1e-6
    for a, b in [(0.1, 0.2), (0.3, -0.5), (-0.9, 0.4), (0.9, 0.9)]:
        fd = (k(a, b + h)[1] - k(a, b - h)[1]) / (2 * h)
        np.testing.assert_allclose(k(a, b)[0], fd, rtol=1e-6, atol=1e-9, err_msg=f"at {(a, b)}")


@kd.func
def returns_its_argument_after_branches(a, b):
    t = ti.min(a, 0.7)
    if ti.acos(0.9 * ti.tanh(a)) > 0.1:
        t = 0.7 - ti.atan2(t, 1.0 + t * t)
    else:
        t = a
    if t > 0.4:
        return a
    return a


def test_second_derivatives_whose_adjoints_are_zeroed_in_a_branch():
    """kd.jvp, kd.vjp and kd.grad of kd.grad(f) where f's first reverse zeroes an adjoint in one
    branch and its second reads it in another `if` on the same condition: Taichi 1.7.4 failed to
    compile the kernel (an IR verification error) until opt.propagate folded the always-zero
    local (found by test_fuzz_funcs.py). f(a, b) = a: the derivatives of its gradient are 0."""
    g = kd.grad(returns_its_argument_after_branches, argnum=0)
    jvp, vjp, grad = kd.jvp(g), kd.vjp(g), kd.grad(g)
    pa, pb, value, tangent, a_part, b_part = (ti.field(ti.f64, shape=4) for _ in range(6))

    @kd.kernel
    def k():
        for i in pa:
            out, tan = jvp(pa[i], pb[i], 0.3, -0.7)
            ca, cb = vjp(pa[i], pb[i], 1.3)
            ga, gb = grad(pa[i], pb[i])
            value[i] = out
            tangent[i] = tan
            a_part[i] = ca + 10.0 * ga
            b_part[i] = cb + 10.0 * gb

    pa.from_numpy(np.array([0.2, 0.5, -0.6, 0.9]))
    pb.from_numpy(np.array([0.3, -0.2, 0.1, 0.8]))
    k()
    np.testing.assert_allclose(value.to_numpy(), 1.0, rtol=1e-12)
    for f in (tangent, a_part, b_part):
        np.testing.assert_allclose(f.to_numpy(), 0.0, atol=1e-12)


@kd.func
def piecewise(a, b):
    if a > 0.5:
        return a * a * b
    elif a > 0.0:
        if b > 0.0:
            return ti.sin(a * b)
        t = a - b
    else:
        t = a + b
    return t * t * t


def piecewise_np(a, b):
    if a > 0.5:
        return a * a * b
    if a > 0.0:
        return np.sin(a * b) if b > 0.0 else (a - b) ** 3
    return (a + b) ** 3


def test_code_after_an_elif_chain_runs_on_the_paths_that_fall_through():
    """`if: return / elif: return / return` (and a nested if that returns in one branch only):
    the statements after an if run on the paths that leave it without returning, as in Python.
    Taichi 1.7.4 refuses a return in a non-static if; kerndiff said "code after an if/else that
    returns in a branch". Values, first and second derivatives against Python and central
    differences on every path."""
    da, dab = kd.grad(piecewise, argnum=0), kd.forward(kd.grad(piecewise, argnum=0), argnum=1)

    @kd.kernel
    def k(a: ti.f64, b: ti.f64) -> (ti.f64, ti.f64, ti.f64):
        return piecewise(a, b), da(a, b), dab(a, b)

    h = 1e-5
    for a, b in [(0.8, 0.3), (0.3, 0.6), (0.3, -0.6), (-0.4, 0.2)]:
        value, d_a, d_ab = k(a, b)
        assert value == pytest.approx(piecewise_np(a, b), rel=1e-12)
        assert d_a == pytest.approx((piecewise_np(a + h, b) - piecewise_np(a - h, b)) / (2 * h), rel=1e-7)
        fd = (k(a, b + h)[1] - k(a, b - h)[1]) / (2 * h)
        assert d_ab == pytest.approx(fd, rel=1e-6, abs=1e-9), (a, b)
