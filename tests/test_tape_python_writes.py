"""Writes from Python inside kd.Tape, into fields the recorded kernels use.

A recorded kernel's reverse reads the values its launch read. Before session 40 a `from_numpy`,
`fill` or `x[i] = v` between two launches changed them under the earlier launch's reverse, and
the Tape returned a gradient of no program without a word. Now a whole-field write (fill,
from_numpy, copy_from) into a field an earlier launch touched is recorded as an overwrite (its
reverse puts the old values back and zeroes their adjoint), and so is an element write there
(refused until session 43: the old value is kept by the field's wrapped setter, before the
write), and writes into fields nothing has touched yet set inputs, as before. References:
analytic gradients with respect to the values the fields held when each was last set before a
kernel read it, and f64 finite differences of a whole program."""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd

pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)

X0 = np.array([0.1, 0.2, 0.3, 0.4])
NEW = np.array([1.0, 2.0, 3.0, 4.0])


@pytest.fixture(scope="module")
def program(runtime):
    x = ti.field(ti.f64, shape=4, needs_grad=True)
    y = ti.field(ti.f64, shape=4, needs_grad=True)
    z = ti.field(ti.f64, shape=4)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)

    @kd.kernel
    def first():
        for i in x:
            y[i] = ti.sin(x[i]) * x[i]

    @kd.kernel
    def second():
        for i in x:
            loss[None] += y[i] * x[i]

    return x, y, z, loss, first, second


def d_first(x):
    return np.cos(x) * x + np.sin(x)


@pytest.mark.parametrize("how", ["from_numpy", "fill", "copy_from"])
def test_a_whole_field_overwritten_between_launches(program, how):
    x, y, z, loss, first, second = program
    x.from_numpy(X0)
    z.from_numpy(NEW)
    new = np.full(4, 2.0) if how == "fill" else NEW
    with kd.Tape(loss):
        first()
        if how == "from_numpy":
            x.from_numpy(NEW)
        elif how == "fill":
            x.fill(2.0)
        else:
            x.copy_from(z)
        second()
    # loss = sum(y(x0) * new): the new values are constants, the gradient is the one through y
    assert loss[None] == pytest.approx(np.sum(np.sin(X0) * X0 * new), rel=1e-13)
    np.testing.assert_allclose(x.grad.to_numpy(), d_first(X0) * new, rtol=1e-13)
    np.testing.assert_array_equal(x.to_numpy(), new)  # the program's values afterwards


def test_a_vector_field_overwritten_between_launches(runtime):
    p = ti.Vector.field(2, ti.f64, shape=3, needs_grad=True)
    q = ti.field(ti.f64, shape=3, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    p0 = np.array([[0.1, 0.5], [0.2, 0.6], [0.3, 0.7]])

    @kd.kernel
    def norms():
        for i in p:
            q[i] = p[i].norm_sqr()

    @kd.kernel
    def total():
        for i in p:
            loss[None] += q[i] * p[i][0]

    p.from_numpy(p0)
    with kd.Tape(loss):
        norms()
        p.from_numpy(2 * p0)
        total()
    np.testing.assert_allclose(p.grad.to_numpy(), 2 * p0 * (2 * p0[:, :1]), rtol=1e-13)


def test_an_element_write_into_a_touched_field(program):
    """`x[0] = 5.0` between two launches: the first launch's reverse reads the old x[0], the
    second's the new one, a constant (its own term of the gradient is gone)."""
    x, y, z, loss, first, second = program
    x.from_numpy(X0)
    with kd.Tape(loss):
        first()
        x[0] = 5.0
        second()
    new = X0.copy()
    new[0] = 5.0
    # loss = sum(y(x0) * new), new[0] a constant
    direct = np.where(np.arange(4) == 0, 0.0, np.sin(X0) * X0)
    assert loss[None] == pytest.approx(np.sum(np.sin(X0) * X0 * new), rel=1e-13)
    np.testing.assert_allclose(x.grad.to_numpy(), d_first(X0) * new + direct, rtol=1e-13)
    np.testing.assert_array_equal(x.to_numpy(), new)  # the program's values afterwards


def test_element_writes_into_a_vector_field_and_a_reset_loss(runtime):
    """A component (`p[1][2] = 3.0`) and a whole element (`p[0] = [...]`) of a vector field, and
    the loss reset from Python between launches (`loss[None] = 0.0`: what was added before
    counts for nothing)."""
    p = ti.Vector.field(3, ti.f64, shape=2, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)

    @kd.kernel
    def k():
        for i in p:
            loss[None] += p[i].norm_sqr() * p[i][0]

    p0 = np.array([[0.5, 1.0, 1.5], [2.0, 2.5, 3.0]])
    p.from_numpy(p0)
    with kd.Tape(loss):
        k()
        loss[None] = 0.0
        k()
        p[1][2] = 3.5
        p[0] = [1.0, 0.0, 2.0]
        k()
    after = p0.copy()
    after[1, 2] = 3.5
    after[0] = [1.0, 0.0, 2.0]

    def grad(q):  # of sum |q_i|^2 q_i0
        g = 2 * q * q[:, :1]
        g[:, 0] += np.sum(q * q, axis=1)
        return g

    expected = grad(p0)  # the launch after the reset, on the old values
    expected += np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]) * grad(after)  # the last, new values constants
    assert loss[None] == pytest.approx(np.sum(np.sum(p0 ** 2, 1) * p0[:, 0]) + np.sum(np.sum(after ** 2, 1) * after[:, 0]),
                                       rel=1e-13)
    np.testing.assert_allclose(p.grad.to_numpy(), expected, rtol=1e-13)
    np.testing.assert_array_equal(p.to_numpy(), after)


def test_a_mass_pinned_from_python_every_step(runtime):
    """A chain of masses stepped in place, its first mass pinned from Python after every step
    (`x[0] = [0, 0]`, `v[0][1] = 0`): the stiffness's gradient under the Tape against f64 finite
    differences of the same program, and kd.check_grad of the program."""
    n, steps = 5, 6
    x = ti.Vector.field(2, ti.f64, shape=n)
    v = ti.Vector.field(2, ti.f64, shape=n)
    k = ti.field(ti.f64, shape=())
    loss = ti.field(ti.f64, shape=())
    x0 = np.stack([np.linspace(0, 1, n), np.zeros(n)], 1)

    @kd.kernel
    def step():
        for i in range(n):
            f = ti.Vector([0.0, -1.0])
            if i > 0:
                d = x[i - 1] - x[i]
                f += k[None] * (d.norm() - 0.25) * d.normalized()
            if i < n - 1:
                d = x[i + 1] - x[i]
                f += k[None] * (d.norm() - 0.25) * d.normalized()
            v[i] = v[i] * 0.98 + 0.05 * f

    @kd.kernel
    def move():
        for i in range(n):
            x[i] += 0.05 * v[i]

    @kd.kernel
    def measure():
        for i in range(n):
            loss[None] += x[i][1] ** 2 + x[i][0]

    def program():
        x.from_numpy(x0)
        v.fill(0)
        for _ in range(steps):
            step()
            move()
            x[0] = [0.0, 0.0]
            v[0][1] = 0.0
        measure()

    def value(stiffness):
        k[None] = stiffness
        loss[None] = 0.0
        program()
        return loss[None]

    k[None] = 30.0
    kd.adjoint(k)  # k is differentiated with respect to (it has an adjoint field)
    with kd.Tape(loss):
        program()
    h = 1e-5
    fd = (value(30.0 + h) - value(30.0 - h)) / (2 * h)
    assert kd.adjoint(k)[None] == pytest.approx(fd, rel=1e-5, abs=1e-12)
    k[None] = 30.0
    assert kd.check_grad(program, [k], loss) < 1e-6


def test_writes_before_any_launch_touched_the_field_set_inputs(program):
    x, y, z, loss, first, second = program
    with kd.Tape(loss):
        x.from_numpy(X0)
        x[3] = 0.7
        first()
        second()
    values = np.array([0.1, 0.2, 0.3, 0.7])
    # loss = sum(sin(x) x^2)
    np.testing.assert_allclose(x.grad.to_numpy(), 2 * x_times(values), rtol=1e-13)


def x_times(x):
    return np.sin(x) * x + 0.5 * np.cos(x) * x**2


def test_fwdmode_takes_values_written_from_python_as_constants(program):
    """Under kd.FwdMode the values a Python write puts into a field a launch touched are constants:
    their tangent is zero (the dual held the seed, or the tangent of the values they replace)."""
    x, y, z, loss, first, second = program
    seed = np.array([1.0, -0.5, 2.0, 0.25])
    x.from_numpy(X0)
    with kd.FwdMode(loss=loss, param=x, seed=seed):
        first()
        x.from_numpy(NEW)
        second()
    assert kd.dual(loss)[None] == pytest.approx(np.sum(d_first(X0) * seed * NEW), rel=1e-13)
    x.from_numpy(X0)
    with kd.FwdMode(loss=loss, param=x, seed=seed):
        first()
        x[0] = 5.0
        second()
    final, x_tangent = np.array([5.0, 0.2, 0.3, 0.4]), seed * np.array([0.0, 1.0, 1.0, 1.0])
    expected = np.sum(d_first(X0) * seed * final + np.sin(X0) * X0 * x_tangent)
    assert kd.dual(loss)[None] == pytest.approx(expected, rel=1e-13)
    with kd.FwdMode(loss=loss, param=x, seed=seed):  # before any launch: an input, seeded
        x.from_numpy(X0)
        first()
        second()
    assert kd.dual(loss)[None] == pytest.approx(np.sum(2 * x_times(X0) * seed), rel=1e-13)
