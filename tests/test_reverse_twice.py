"""k.reverse.reverse: reverse over reverse, at the second level of adjoints.

Seeded with v in the level-2 adjoint of x's adjoint, it leaves H·v in the level-2 adjoint of x,
which must equal what forward over reverse gives and finite differences of the gradient. Where
it cannot be right, it must refuse: a reverse kernel that reads the primal's own results (a field
written in one loop and read in the next, a kernel-scope sum) would be reversed with them held
fixed, and one that cleared an overwritten output's adjoint has lost the cotangent it read."""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd

pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)

N = 6
A, D = kd.adjoint, kd.dual


@pytest.fixture(scope="module")
def fields(runtime):
    x, y, out = (ti.field(ti.f64, shape=N) for _ in range(3))
    loss = ti.field(ti.f64, shape=())
    rng = np.random.default_rng(7)
    values = rng.uniform(0.2, 1.4, N), rng.uniform(-1.0, 1.0, N)
    return x, y, out, loss, values


def reset(fields):
    x, y, out, loss, (x0, y0) = fields
    x.from_numpy(x0)
    y.from_numpy(y0)
    out.fill(0)
    loss[None] = 0
    for f in (x, y, out, loss):
        for d in (A(f), D(f), D(A(f)), A(f, 2), A(A(f), 2)):
            d.fill(0)


def hvp_reverse_reverse(k, fields, v):
    x, _, _, loss, _ = fields
    reset(fields)
    k()
    A(loss)[None] = 1.0
    k.reverse()
    A(A(x), 2).from_numpy(v)
    k.reverse.reverse()
    return A(x, 2).to_numpy()


def hvp_reverse_forward(k, fields, v):
    x, _, _, loss, _ = fields
    reset(fields)
    D(x).from_numpy(v)
    k()
    k.forward()
    A(loss)[None] = 1.0
    k.reverse.forward()
    return D(A(x)).to_numpy()


def gradient(k, fields, xv):
    x, _, _, loss, _ = fields
    reset(fields)
    x.from_numpy(xv)
    k()
    A(loss)[None] = 1.0
    k.reverse()
    return A(x).to_numpy()


def assert_hvp_right(k, fields):
    v = np.random.default_rng(1).standard_normal(N)
    x0 = fields[4][0]
    eps = 1e-6
    fd = (gradient(k, fields, x0 + eps * v) - gradient(k, fields, x0 - eps * v)) / (2 * eps)
    rr = hvp_reverse_reverse(k, fields, v)
    np.testing.assert_allclose(rr, fd, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rr, hvp_reverse_forward(k, fields, v), rtol=1e-12, atol=1e-12)
    assert np.abs(rr).max() > 0.1


def test_an_accumulated_energy(fields):
    x, y, _, loss, _ = fields

    @kd.kernel
    def energy():
        for i in x:
            loss[None] += ti.sin(x[i]) * x[i] ** 3 * y[i] + (x[i] - x[(i + 1) % N]) ** 2

    assert_hvp_right(energy, fields)


def test_a_kernel_scope_value_that_every_iteration_uses(fields):
    # the reverse kernel sums c's adjoint over the parallel loop in a helper field and clears it
    # before the loop, not after reading it, so that reverse kernel can be reversed again
    x, y, _, loss, _ = fields

    @kd.kernel
    def scaled():
        c = ti.sin(x[0]) * 2.0
        for i in x:
            loss[None] += ti.exp(c * x[i]) * y[i]

    assert_hvp_right(scaled, fields)


def refusal(k, fields):
    reset(fields)
    with pytest.raises(kd.KernDiffError) as err:
        k.reverse.reverse()
    message = str(err.value)
    assert 'File "' in message and "k.reverse.forward" in message
    return message


def test_refused_where_the_reverse_kernel_reads_the_primal_results(fields):
    x, y, out, loss, _ = fields

    @kd.kernel
    def two_loops():
        for i in x:
            out[i] += x[i] ** 2
        for i in x:
            loss[None] += out[i] * y[i] + out[(i + 1) % N] * x[i]

    message = refusal(two_loops, fields)
    assert "reads 'out'" in message and "loss[None] += out[i] * y[i]" in message

    @kd.kernel
    def squared_sum():
        s = 0.0
        for i in range(N):
            s += x[i] * ti.sin(x[i])
        loss[None] += s * s

    assert "the sum s" in refusal(squared_sum, fields)
    # forward over reverse covers both
    v = np.ones(N)
    assert np.abs(hvp_reverse_forward(two_loops, fields, v)).max() > 0.1


def test_refused_where_the_reverse_kernel_cleared_an_overwritten_output(fields):
    x, _, out, _, _ = fields

    @kd.kernel
    def cube():
        for i in x:
            out[i] = x[i] ** 3

    message = refusal(cube, fields)
    assert "out[i] = x[i] ** 3" in message and "clears it" in message
