"""Host-side tools given a derivative kernel use the levels its own transforms use (API.md §2).

kd.forward / kd.backward / kd.hvp with inputs and output, and so kd.check_grad, take any kernel,
`k.forward` and `k.reverse` included. The forward transform of `k.forward` reads and writes
level-2 duals and the reverse of `k.reverse` level-2 adjoints; the factories seeded and read
level 1 and returned zeros (session 40). kd.Tape and kd.FwdMode run level-1 derivatives of what
is launched in them, so a derivative kernel launched there whose derivative is of another level
is refused at the launch, before it runs. References: analytic derivatives of
f(x) = sum(sin(x) x²)."""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd

pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)

X0 = np.array([0.3, 0.7, 1.1, 1.6])


def d1(x):
    return np.cos(x) * x**2 + 2 * x * np.sin(x)


def d2(x):
    return -np.sin(x) * x**2 + 4 * x * np.cos(x) + 2 * np.sin(x)


def d3(x):
    return -np.cos(x) * x**2 - 6 * x * np.sin(x) + 6 * np.cos(x)


@pytest.fixture(scope="module")
def setup(runtime):
    x = ti.field(ti.f64, shape=len(X0))
    loss = ti.field(ti.f64, shape=())

    @kd.kernel
    def f():
        for i in x:
            loss[None] += ti.sin(x[i]) * x[i] ** 2

    x.from_numpy(X0)
    return f, x, loss


def test_forward_of_a_forward_kernel_seeds_level_two(setup):
    f, x, loss = setup
    direction = np.array([0.5, -1.0, 2.0, 0.25])
    jvp = kd.forward(f.forward, inputs=[x, kd.dual(x)], output=kd.dual(loss))
    # dual(loss) = sum f'(x) d as a function of (x, d): its derivative along (vx, vd)
    vx, vd = np.array([1.0, 2.0, -1.0, 0.5]), np.array([0.3, 0.0, 1.0, -2.0])
    got = jvp([X0, direction], tangents=[vx, vd])
    assert got == pytest.approx(np.sum(d2(X0) * direction * vx + d1(X0) * vd), rel=1e-12)
    per_input = jvp([X0, direction])  # without tangents: the derivative w.r.t. each element of each input
    np.testing.assert_allclose(per_input[0], d2(X0) * direction, rtol=1e-12)
    np.testing.assert_allclose(per_input[1], d1(X0), rtol=1e-12)


def test_backward_of_a_reverse_kernel_gives_hessian_products(setup):
    f, x, loss = setup
    kd.adjoint(loss)[None] = 1.0  # a constant of f.reverse: the seed of its gradient
    c = np.array([1.0, -0.5, 2.0, 0.75])
    vjp = kd.backward(f.reverse, inputs=[x], output=kd.adjoint(x))
    (got,) = vjp([X0], cotangent=c)
    np.testing.assert_allclose(got, d2(X0) * c, rtol=1e-12)
    (by_hvp,) = kd.hvp(f, inputs=[x], output=loss)([X0], tangents=[c])
    np.testing.assert_allclose(got, by_hvp, rtol=1e-12)


def test_hvp_of_a_forward_kernel(setup):
    f, x, loss = setup
    d = np.array([0.5, -1.0, 2.0, 0.25])
    vx, vd = np.array([1.0, 2.0, -1.0, 0.5]), np.array([0.3, 0.0, 1.0, -2.0])
    hx, hd = kd.hvp(f.forward, inputs=[x, kd.dual(x)], output=kd.dual(loss))([X0, d], tangents=[vx, vd])
    np.testing.assert_allclose(hx, d3(X0) * d * vx + d2(X0) * vd, rtol=1e-12)
    np.testing.assert_allclose(hd, d2(X0) * vx, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("path", ["forward", "reverse"])
def test_check_grad_of_derivative_kernels_passes_and_restores(setup, path):
    f, x, loss = setup
    kd.dual(x).from_numpy(np.array([0.5, -1.0, 2.0, 0.25]))
    kd.adjoint(loss)[None] = 1.0
    kernel = getattr(f, path)
    inputs, output = ([x, kd.dual(x)], kd.dual(loss)) if path == "forward" else ([x], kd.adjoint(x))
    held = [g.to_numpy().copy() for g in inputs + [output]]
    assert kd.check_grad(kernel, inputs, output, order=2) < 1e-7
    for g, before in zip(inputs + [output], held):
        np.testing.assert_array_equal(g.to_numpy(), before)


def test_tape_over_a_reverse_kernel_runs_at_level_two(setup):
    """A penalty on the gradient (`f(); f.reverse(); penalty()`), after an in-place update of x:
    every recorded kernel is reversed with level-2 adjoints, the update by its
    reverse_from_inputs; dP/dx lands in kd.adjoint(x, 2), x.grad keeps the program's gradient."""
    f, x, loss = setup
    x.from_numpy(X0)
    penalty = ti.field(ti.f64, shape=())
    gx = kd.adjoint(x)

    @kd.kernel
    def nudge():
        for i in x:
            x[i] += 0.1 * ti.sin(x[i])

    @kd.kernel
    def pen():
        for i in x:
            penalty[None] += gx[i] ** 2 + x[i] * gx[i]

    kd.adjoint(x, 2)  # what the Tape's level-2 pass differentiates with respect to
    kd.adjoint(x, 2).fill(7.0)  # cleared by the Tape
    with kd.Tape(penalty):
        nudge()
        f()
        kd.adjoint(loss)[None] = 1.0
        f.reverse()
        pen()
    y = X0 + 0.1 * np.sin(X0)
    g, h = d1(y), d2(y)
    assert penalty[None] == pytest.approx(np.sum(g**2 + y * g), rel=1e-12)
    np.testing.assert_allclose(kd.adjoint(x).to_numpy(), g, rtol=1e-12)
    np.testing.assert_allclose(x.to_numpy(), y, rtol=1e-15)
    np.testing.assert_allclose(kd.adjoint(x, 2).to_numpy(), (2 * g * h + g + y * h) * (1 + 0.1 * np.cos(X0)),
                               rtol=1e-12)
    x.from_numpy(X0)


def test_fwdmode_refuses_a_forward_kernel_launched_in_it(setup):
    f, x, loss = setup
    kd.dual(x).fill(1.0)
    with pytest.raises(kd.KernDiffError) as e:
        with kd.FwdMode(loss=kd.dual(loss), param=x, seed=np.ones(len(X0))):
            f.forward()  # the launch refused
    text = str(e.value)
    assert "f.forward()  # the launch refused" in text and "f.forward.forward uses level-2 duals" in text
    assert "kd.forward(f.forward" in text


def test_tape_and_fwdmode_take_kernels_whose_derivative_is_level_one(setup):
    """f.forward under a Tape (its reverse is level 1) and f.reverse under FwdMode (H·v) run."""
    f, x, loss = setup
    x.from_numpy(X0)
    d = np.array([0.5, -1.0, 2.0, 0.25])
    kd.dual(x).from_numpy(d)
    kd.adjoint(x), kd.adjoint(kd.dual(x))  # what the Tape differentiates with respect to
    with kd.Tape(kd.dual(loss)):
        f.forward()
    np.testing.assert_allclose(kd.adjoint(x).to_numpy(), d2(X0) * d, rtol=1e-12)
    np.testing.assert_allclose(kd.adjoint(kd.dual(x)).to_numpy(), d1(X0), rtol=1e-12)
    kd.adjoint(x).fill(0)
    kd.adjoint(loss)[None] = 1.0
    with kd.FwdMode(loss=kd.adjoint(x), param=x, seed=d):
        f.reverse()
    np.testing.assert_allclose(kd.dual(kd.adjoint(x)).to_numpy(), d2(X0) * d, rtol=1e-12)


def test_check_grad_warns_where_every_number_it_compared_is_zero(setup):
    """check_grad of f.reverse with f.reverse's own seed (the loss adjoint) left at zero compares
    zeros with zeros: it passes, and says that it showed nothing."""
    import warnings
    f, x, loss = setup
    x.from_numpy(X0)
    kd.adjoint(loss)[None] = 0.0
    with pytest.warns(UserWarning, match=r"check_grad\(f\.reverse\): every derivative it compared is zero"):
        assert kd.check_grad(f.reverse, [x], kd.adjoint(x)) == 0.0
    kd.adjoint(loss)[None] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kd.check_grad(f.reverse, [x], kd.adjoint(x)) < 1e-7


def test_tape_at_level_two_keeps_taichi_s_own_gradients(runtime):
    """The tutorial's penalty on a gradient, with needs_grad fields: the level-2 pass cleared
    Taichi's own (level-1) grads on its way (session 40's first version), leaving x.grad, the
    value the penalty read, and the answer at zero."""
    x = ti.field(ti.f64, shape=8, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    penalty = ti.field(ti.f64, shape=())
    xs = np.linspace(0, 1, 8)
    x.from_numpy(xs)

    @kd.kernel
    def energy():
        for i in x:
            loss[None] += ti.sin(x[i]) ** 2

    @kd.kernel
    def grad_norm():
        for i in x:
            penalty[None] += x.grad[i] ** 2

    kd.adjoint(x, 2)
    with kd.Tape(penalty):
        energy()
        loss.grad[None] = 1.0
        energy.reverse()
        grad_norm()
    np.testing.assert_allclose(kd.adjoint(x, 2).to_numpy(), 2 * np.sin(4 * xs), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(x.grad.to_numpy(), np.sin(2 * xs), rtol=1e-12, atol=1e-15)
    assert loss.grad[None] == 1.0
