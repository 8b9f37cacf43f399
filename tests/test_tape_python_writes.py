"""Writes from Python inside kd.Tape, into fields the recorded kernels use.

A recorded kernel's reverse reads the values its launch read. Before session 40 a `from_numpy`,
`fill` or `x[i] = v` between two launches changed them under the earlier launch's reverse, and
the Tape returned a gradient of no program without a word. Now a whole-field write (fill,
from_numpy, copy_from) into a field an earlier launch touched is recorded as an overwrite (its
reverse puts the old values back and zeroes their adjoint), an element write there is refused
with its line, and writes into fields nothing has touched yet set inputs, as before. References:
analytic gradients with respect to the values the fields held when each was last set before a
kernel read it."""
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


def test_an_element_write_into_a_touched_field_is_refused(program):
    x, y, z, loss, first, second = program
    x.from_numpy(X0)
    with pytest.raises(kd.KernDiffError) as e:
        with kd.Tape(loss):
            first()
            x[0] = 5.0  # the write refused
            second()
    text = str(e.value)
    assert "test_tape_python_writes.py" in text and "x[0] = 5.0  # the write refused" in text
    assert "'x' was written from Python inside kd.Tape" in text and "kernel argument" in text


def test_an_element_write_into_a_vector_component_is_refused(runtime):
    p = ti.Vector.field(3, ti.f64, shape=2, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)

    @kd.kernel
    def k():
        for i in p:
            loss[None] += p[i].norm()

    p.fill(1.0)
    with pytest.raises(kd.KernDiffError, match="written from Python inside kd.Tape"):
        with kd.Tape(loss):
            k()
            p[1][2] = 3.0


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
