"""ti.random and ti.randn inside kd.kernels. Each draw is bound to a local once, so every use reads
the same number; a forward kernel draws its own numbers and derives at them; a reverse kernel
that needs none of them (noise drawn into a field, a kick added in place) runs, one that needs
one is refused (test_errors). The draws of a run are not known beforehand, so the derivatives
are checked against the analytic ones at the values the fields hold afterwards."""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd


@pytest.fixture(scope="module", autouse=True)
def _runtime(runtime):
    yield


def test_noise_and_kicks_under_tape():
    """A program draws noise into a field (uniform and normal), kicks velocities in place with
    normal numbers drawn where they are added, and measures: the gradient by kd.Tape against
    the analytic one at the drawn values (read back from the fields)."""
    n = 64
    x = ti.field(ti.f64, n, needs_grad=True)
    noise = ti.field(ti.f64, n, needs_grad=True)
    v = ti.field(ti.f64, n, needs_grad=True)
    loss = ti.field(ti.f64, (), needs_grad=True)

    @kd.kernel
    def draw_noise():
        for i in noise:
            noise[i] = 0.5 * ti.random() + ti.randn()

    @kd.kernel
    def kick():
        for i in v:
            v[i] = ti.sin(x[i]) + noise[i] * x[i]
        for i in v:
            v[i] += 0.3 * ti.randn(ti.f64) * (1.0 + i % 2)

    @kd.kernel
    def measure():
        for i in v:
            loss[None] += v[i] ** 2

    xv = np.linspace(-1.0, 1.0, n)
    x.from_numpy(xv)
    with kd.Tape(loss):
        draw_noise()
        kick()
        measure()
    drawn, vv = noise.to_numpy(), v.to_numpy()
    expected = 2 * vv * (np.cos(xv) + drawn)
    np.testing.assert_allclose(kd.adjoint(x).to_numpy(), expected, rtol=1e-12, atol=1e-14)
    kicks = vv - (np.sin(xv) + drawn * xv)
    assert np.all(kicks != 0.0) and len(set(kicks)) == n  # (each element its own draw)
    assert "= ti.random(ti.f64)" not in draw_noise.reverse.source + kick.reverse.source
    assert "= ti.random(ti.f64)" in draw_noise.source and "= ti.random(ti.f64)" in kick.source


def test_forward_kernels_derive_at_their_own_draws():
    """y = x² r with r = ti.random(): k.forward writes y and its tangent from one draw per
    element (y' = 2 x r x' = 2 y x' / x), k.forward.forward the second derivative (2 r, so
    2 y / x²) from one draw too."""
    n = 16
    x, y = ti.field(ti.f64, n), ti.field(ti.f64, n)
    kd.dual(x), kd.dual(x, 2), kd.dual(kd.dual(x), 2)

    @kd.kernel
    def scaled():
        for i in x:
            r = ti.random()
            y[i] = x[i] ** 2 * r

    xv = np.linspace(0.5, 2.0, n)
    x.from_numpy(xv)
    kd.dual(x).fill(1.0)
    scaled.forward()
    yv, dy = y.to_numpy(), kd.dual(y).to_numpy()
    assert np.all(yv > 0)
    np.testing.assert_allclose(dy, 2 * yv / xv, rtol=1e-14)
    kd.dual(x, 2).fill(1.0)
    scaled.forward.forward()
    yv, d2y = y.to_numpy(), kd.dual(kd.dual(y), 2).to_numpy()
    np.testing.assert_allclose(d2y, 2 * yv / xv ** 2, rtol=1e-14)
    assert scaled.forward.source.count("= ti.random(ti.f64)") == 1


def test_draws_are_apart():
    """Two draws in one expression, two alike in a row and one in an inner loop are all drawn
    (no pass takes two for one value); ti.randn's numbers have mean 0 and variance 1, in f32
    too, and ti.random(ti.i32) draws integers."""
    n = 4096
    a, b, c = ti.field(ti.f64, n), ti.field(ti.f64, n), ti.field(ti.f64, (n, 3))
    z32, k = ti.field(ti.f32, n), ti.field(ti.i32, n)

    @kd.kernel
    def draws():
        for i in a:
            a[i] = ti.random() - ti.random()
            first = ti.random()
            second = ti.random()
            b[i] = second - first
            for j in range(3):
                c[i, j] = ti.randn()
            z32[i] = ti.randn(ti.f32)
            k[i] = ti.random(ti.i32) % 1000

    draws()
    for values in (a.to_numpy(), b.to_numpy()):
        assert np.count_nonzero(values == 0.0) == 0
        assert abs(values.mean()) < 0.05 and abs(values.var() - 1 / 6) < 0.02  # (the difference of two uniforms)
    normal = c.to_numpy()
    assert np.all(normal[:, 0] != normal[:, 1]) and np.all(normal[:, 1] != normal[:, 2])
    for values in (normal.ravel(), z32.to_numpy()):
        assert abs(values.mean()) < 0.06 and abs(values.std() - 1.0) < 0.05
    assert len(set(k.to_numpy())) > 900


def test_check_grad_says_when_differences_drew_anew():
    """kd.check_grad's central differences run the kernel (or program) again, which draws other
    numbers: where that makes the check fail, its message says which kernels draw."""
    x = ti.field(ti.f64, 8, needs_grad=True)
    noisy = ti.field(ti.f64, 8, needs_grad=True)
    total = ti.field(ti.f64, (), needs_grad=True)

    @kd.kernel
    def plus_noise():
        for i in x:
            noisy[i] = x[i] ** 2 + ti.random()

    @kd.kernel
    def sum_up():
        for i in x:
            total[None] += noisy[i]

    def program():
        plus_noise()
        sum_up()

    x.from_numpy(np.linspace(0.0, 1.0, 8))
    with pytest.raises(AssertionError, match=r"note: plus_noise draw\(s\) random numbers"):
        kd.check_grad(program, [x], total)
    with pytest.raises(AssertionError, match=r"note: plus_noise draw\(s\) random numbers"):
        kd.check_grad(plus_noise, [x], noisy)
    assert not sum_up.draws() and plus_noise.draws()
