"""ti.random and ti.randn inside kd.kernels. Each draw is bound to a local once, so every use reads
the same number. The numbers are keyed (kerndiff/codegen/draws.py): a hash of the launch's seed,
the draw's place in the kernel and its loop indices, so a reverse kernel draws again what the
primal launch drew (the seed of the family's latest primal or forward launch; kd.Tape keeps each
launch's), and kd.check_grad's runs all draw alike. The references: the analytic derivatives at
the numbers drawn (read back from the fields the kernels write), and central differences."""
import os

import numpy as np
import pytest
import taichi as ti
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kerndiff as kd
import test_fuzz as fuzz


def numpy_keyed_random(seed, site, indexes, bits=False):
    """codegen/draws.py's f32 numbers, in numpy (uint32 arithmetic wraps as on the device): the
    reference for the numbers every arch draws; bits=True: the 64 random bits of an i64 draw."""
    def mixed(h):
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x7FEB352D)
        h = h ^ (h >> np.uint32(15))
        h = h * np.uint32(0x846CA68B)
        return h ^ (h >> np.uint32(16))

    def combined(h, part):
        return mixed(h ^ (np.asarray(part).astype(np.uint32) + np.uint32(0x9E3779B9) + (h << np.uint32(6))
                          + (h >> np.uint32(2))))

    with np.errstate(over="ignore"):
        h = combined(mixed(np.uint32(seed)), np.uint32(site))
        for index in indexes:
            h = combined(h, index)
        if bits:
            low = mixed(h ^ np.uint32(0x68E31DA4))
            return ((h.astype(np.uint64) << np.uint64(32)) | low.astype(np.uint64)).view(np.int64)
    return (h >> np.uint32(8)).astype(np.float64) / 2 ** 24


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
    assert "keyed_random(" not in draw_noise.reverse.source + kick.reverse.source  # (it needs none)
    assert "draw_seed" not in draw_noise.reverse.source + kick.reverse.source  # (nor the seed parameter)
    assert "= keyed_random(ti.f64, draw_seed, " in draw_noise.source and "keyed_random(" in kick.source


def test_forward_kernels_derive_at_their_own_draws(variant_runs):
    """y = x² r with r = ti.random(): k.forward writes y and its tangent from one draw per
    element (y' = 2 x r x' = 2 y x' / x), k.forward.forward the second derivative (2 r, so
    2 y / x²) from one draw too (its equal-directions variant, which takes the seed too)."""
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
    assert scaled.forward.source.count("= keyed_random(ti.f64, ") == 1
    assert variant_runs == [scaled.forward.forward] and "draw_seed" in scaled.forward.forward.equal_directions_source


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


def test_numbers_are_the_keyed_hash():
    """A launch with a given seed draws codegen/draws.py's hash of (seed, the draw's number, the
    loop indices), as numpy computes it: the same numbers on every arch (test_vulkan) and in
    every kernel of the family given that seed."""
    u = ti.field(ti.f32, (6, 40))

    @kd.kernel
    def fill():
        for i, j in u:
            u[i, j] = ti.random(ti.f32)

    i, j = np.meshgrid(np.arange(6), np.arange(40), indexing="ij")
    for seed in (0, 12345, 2 ** 32 - 1):
        fill.launch_seeded(seed, (), {})
        np.testing.assert_array_equal(u.to_numpy(), numpy_keyed_random(seed, 1, [i, j]).astype(np.float32))
    assert fill.draw_seed == 2 ** 32 - 1
    words = ti.field(ti.i64, (6, 40))

    @kd.kernel
    def fill_words():
        for i, j in words:
            words[i, j] = ti.random(ti.i64)

    fill_words.launch_seeded(99, (), {})  # 64-bit integers take all their bits, as Taichi's do
    drawn = words.to_numpy()
    np.testing.assert_array_equal(drawn, numpy_keyed_random(99, 1, [i, j], bits=True))
    assert (drawn < 0).any() and (np.abs(drawn) > 2 ** 40).mean() > 0.9
    fill.launch_seeded(2 ** 32 - 1, (), {})
    fill()
    assert fill.draw_seed != 2 ** 32 - 1 and not np.array_equal(u.to_numpy(), numpy_keyed_random(2 ** 32 - 1, 1, [i, j]))


def test_reverse_draws_what_the_primal_drew():
    """y = mu + sigma z with z = ti.randn() (the reparameterization trick) and loss = Σ y²: the
    reverse kernel's gradients are 2 y and 2 y z at the z the primal drew (read back as
    (y - mu) / sigma), so is H·v after k.forward (which draws anew, as a launch does), and a new
    primal launch draws other numbers. Taichi's own AD refuses any kernel with ti.random."""
    n = 32
    mu, sigma = ti.field(ti.f64, n, needs_grad=True), ti.field(ti.f64, n, needs_grad=True)
    y, loss = ti.field(ti.f64, n, needs_grad=True), ti.field(ti.f64, (), needs_grad=True)
    kd.dual(mu), kd.dual(sigma), kd.dual(mu.grad), kd.dual(sigma.grad)

    @kd.kernel
    def sample():
        for i in mu:
            z = ti.randn()
            y[i] = mu[i] + sigma[i] * z
            loss[None] += y[i] ** 2

    mv, sv = np.linspace(-1.0, 1.0, n), np.linspace(0.5, 2.0, n)
    mu.from_numpy(mv)
    sigma.from_numpy(sv)
    sample()
    yv = y.to_numpy()
    z = (yv - mv) / sv
    assert abs(z.mean()) < 0.6 and 0.5 < z.std() < 1.6
    kd.adjoint(loss)[None] = 1.0
    sample.reverse()
    np.testing.assert_allclose(kd.adjoint(mu).to_numpy(), 2 * yv, rtol=1e-12)
    np.testing.assert_allclose(kd.adjoint(sigma).to_numpy(), 2 * yv * z, rtol=1e-12, atol=1e-14)

    # H·v: the Hessian of Σ (mu + sigma z)² is 2 [[1, z], [z, z²]] per element
    vm, vs = np.cos(np.arange(n)), np.sin(np.arange(n))
    kd.dual(mu).from_numpy(vm)
    kd.dual(sigma).from_numpy(vs)
    y.fill(0)
    loss[None] = 0.0
    sample.forward()
    z2 = (y.to_numpy() - mv) / sv
    assert np.all(z2 != z)  # (a new launch, new numbers)
    for d in (mu.grad, sigma.grad, kd.dual(mu.grad), kd.dual(sigma.grad)):
        d.fill(0)
    sample.reverse.forward()
    np.testing.assert_allclose(kd.dual(mu.grad).to_numpy(), 2 * (vm + z2 * vs), rtol=1e-12)
    np.testing.assert_allclose(kd.dual(sigma.grad).to_numpy(), 2 * z2 * (vm + z2 * vs), rtol=1e-12, atol=1e-14)
    assert kd.check_grad(sample, [mu, sigma], loss, order=2) < 1e-6
    assert "keyed_random(ti.f64, draw_seed, 1, ti.Vector([i]))" in sample.reverse.source


def test_seed_draws_gives_common_random_numbers():
    """`with kd.seed_draws(seed):` launches draw from a sequence fixed by the seed: kd.backward of
    a noisy kernel (y = Σ x² (1 + 0.5 n_i)) called in two blocks with one seed differentiates one
    sample, so at 2x the gradient 2 x (1 + 0.5 n_i) doubles exactly; another seed draws other
    numbers; the program's own sequence goes on after a block as if it had drawn nothing; a seed
    that is not a non-negative integer is refused."""
    import copy
    from kerndiff.runtime import draws

    x = ti.field(ti.f64, 4)
    y = ti.field(ti.f64, ())

    @kd.kernel
    def noisy():
        for i in x:
            y[None] += x[i] ** 2 * (1.0 + 0.5 * ti.randn())

    gradient = kd.backward(noisy, inputs=[x], output=y)
    with kd.seed_draws(7):
        at_one = gradient(np.ones(4))[0]
    with kd.seed_draws(7):
        at_two = gradient(2 * np.ones(4))[0]
    with kd.seed_draws(8):
        other = gradient(np.ones(4))[0]
    np.testing.assert_allclose(at_two, 2 * at_one, rtol=1e-15)
    assert len(set(at_one)) == 4 and not np.allclose(other, at_one)
    noisy()
    after = copy.deepcopy(draws._generator())  # the program's sequence, from here
    with kd.seed_draws(3):
        noisy()
        noisy()
    noisy()
    assert noisy.draw_seed == int(after.integers(0, 2 ** 32))
    for seed in (-1, 1.5, "7", True):
        with pytest.raises(kd.KernDiffError, match="non-negative integer seed"):
            with kd.seed_draws(seed):
                pass


def test_tape_keeps_each_launch_seed():
    """A random walk x[t + 1, i] = x[t, i] + sigma ti.randn(), one launch per step, each drawing
    its own numbers: kd.Tape's (and ti.ad.Tape's) d loss / d sigma is Σ_i 2 x[T, i] Σ_t z[t, i]
    at the steps' numbers, and kd.check_grad of the program agrees with central differences
    (it fixes the launches' seeds, so each of its runs draws alike)."""
    n, steps = 16, 6
    x = ti.field(ti.f64, (steps + 1, n), needs_grad=True)
    sigma, loss = ti.field(ti.f64, (), needs_grad=True), ti.field(ti.f64, (), needs_grad=True)

    @kd.kernel
    def step(t: ti.i32):
        for i in range(n):
            x[t + 1, i] = x[t, i] + sigma[None] * ti.randn()

    @kd.kernel
    def measure():
        for i in range(n):
            loss[None] += x[steps, i] ** 2

    def walk():
        for t in range(steps):
            step(t)
        measure()

    sigma[None] = 0.7
    for tape in (lambda: kd.Tape(loss), lambda: ti.ad.Tape(loss)):
        with tape():
            walk()
        xv = x.to_numpy()
        z = np.diff(xv, axis=0) / 0.7
        assert len(set(np.round(z[:, 0], 12))) == steps  # (each launch its own numbers)
        np.testing.assert_allclose(kd.adjoint(sigma)[None], np.sum(2 * xv[steps] * z.sum(0)), rtol=1e-10)
    assert kd.check_grad(walk, [sigma], loss, order=2) < 1e-6


def test_kicks_added_in_place_under_tape():
    """v[i] += sigma z drawn in place, launched four times: each launch's reverse (kd.Tape's
    reverse_from_inputs variant, for kernels that update fields in place) needs its own draws
    for sigma's adjoint. The gradient against central differences (kd.check_grad of the
    program, orders 1 and 2) and against the analytic one, Σ_i 2 v_i Σ_t z_t,i, with the z read
    back from a copy of each launch's numbers."""
    n, steps = 16, 4
    v, sigma = ti.field(ti.f64, n, needs_grad=True), ti.field(ti.f64, (), needs_grad=True)
    drawn = ti.field(ti.f64, (steps, n))
    loss = ti.field(ti.f64, (), needs_grad=True)

    @kd.kernel
    def kick(t: ti.i32):
        for i in v:
            z = ti.randn()
            drawn[t, i] = z
            v[i] += sigma[None] * z * (1.0 + v[i] ** 2)

    @kd.kernel
    def measure():
        for i in v:
            loss[None] += v[i] ** 2

    def program():
        v.fill(0.5)
        for t in range(steps):
            kick(t)
        measure()

    sigma[None] = 0.2
    assert kd.check_grad(program, [sigma], loss, order=2) < 1e-6
    with kd.Tape(loss):
        program()
    z, vt = drawn.to_numpy(), np.full(n, 0.5)
    dv = np.zeros(n)  # d v / d sigma, forward through the steps
    for t in range(steps):
        vt, dv = vt + 0.2 * z[t] * (1 + vt ** 2), dv + z[t] * (1 + vt ** 2) + 0.2 * z[t] * 2 * vt * dv
    np.testing.assert_allclose(v.to_numpy(), vt, rtol=1e-12)
    np.testing.assert_allclose(kd.adjoint(sigma)[None], np.sum(2 * vt * dv), rtol=1e-10)


def test_draws_in_inner_loops_and_functions():
    """Draws inside a serial inner loop that carries a value (the reverse runs its trips
    backward, drawing each trip's number again) and inside a ti.func called twice (two draws):
    kd.check_grad's reverse, forward and H·v against central differences."""
    n = 8
    a, sigma = ti.field(ti.f64, n, needs_grad=True), ti.field(ti.f64, (), needs_grad=True)
    out = ti.field(ti.f64, n, needs_grad=True)

    @ti.func
    def jitter(v):
        return v + sigma[None] * ti.random()

    @kd.kernel
    def walk():
        for i in a:
            v = 1.0
            for t in range(5):
                v = ti.sin(v * a[i]) + sigma[None] ** 2 * ti.randn()
            out[i] = jitter(v) * jitter(a[i])

    a.from_numpy(np.linspace(0.2, 1.2, n))
    sigma[None] = 0.3
    assert kd.check_grad(walk, [a, sigma], out, order=2) < 1e-6
    source = walk.reverse.source  # (the inner loop's draws keyed by its trip, the functions' apart)
    assert "draw_seed, 1, ti.Vector([i, t" in source and "draw_seed, 3, ti.Vector([i]))" in source \
        and "draw_seed, 4, ti.Vector([i]))" in source


def test_draws_in_while_loops():
    """A while loop's trips have no index: a count of them keys its draws (frontend's
    Lowerer.stmt_While), so a reverse kernel draws those again too, a trip that breaks out
    included: kd.check_grad's reverse, forward and H·v against central differences, and the
    trips draw apart."""
    n = 8
    x, s = ti.field(ti.f64, n, needs_grad=True), ti.field(ti.f64, (), needs_grad=True)
    grown = ti.field(ti.f64, (n, 4))

    @kd.kernel
    def grow():
        for i in x:
            t = 0
            v = x[i]
            while t < 4:
                v = v * (1.0 + 0.5 * ti.random())
                grown[i, t] = v
                if v > 1.0:
                    break
                t += 1
            s[None] += v ** 2

    x.from_numpy(np.linspace(0.1, 0.8, n))
    assert kd.check_grad(grow, [x], s, order=2) < 1e-6
    grow()
    g = grown.to_numpy()
    ran = g[:, 1:] != 0  # (the trips after a break wrote nothing)
    factors = np.divide(g[:, 1:], g[:, :-1], out=np.zeros_like(g[:, 1:]), where=ran)
    assert np.all((factors[ran] > 1.0) & (factors[ran] < 1.5)) and len(set(factors[ran])) == np.count_nonzero(ran)
    assert "keyed_random(ti.f64, draw_seed, 1, ti.Vector([i, trips" in grow.reverse.source


@st.composite
def drawing_kernels(draw):
    """test_fuzz's expression trees with draws among the leaves, around a serial loop carrying a
    local (counted, with a conditional break, or a while loop) whose trips draw too. The draws
    are bound to locals first (test_fuzz's domain-safe templates repeat their argument: `(r) *
    (r)` is a square only of one number)."""
    def tree(depth, extra=()):
        return draw(fuzz.expr(depth, ["u", "z", *extra]))
    trips = draw(st.integers(0, 4))
    update = f"acc = 0.5 * acc + ti.tanh({tree(2, ['a', 'acc', 'kick'])})"
    loop = draw(st.sampled_from([
        [f"for k in range({trips}):", "    kick = ti.randn()", f"    {update}"],
        [f"for k in range({trips}):", "    kick = ti.randn()", f"    {update}",
         f"    if {tree(1, ['acc'])} > 0.5:", "        break"],
        ["k = 0", f"while k < {trips} and acc < 1.5:", "    kick = ti.random()", f"    {update}", "    k += 1"]]))
    # (a draw and x in a and out always: the check then shows something)
    return "\n".join(["u = ti.random()", "z = ti.randn()", f"a = {tree(2)} + x[i] * u", "acc = 0.5", *loop,
                      f"out[i] = {tree(2, ['a', 'acc'])} + a * acc"])


@pytest.fixture(scope="module")
def fuzz_fields():
    rng = np.random.default_rng(0)
    f = {"x": ti.field(ti.f64, 3, needs_grad=True), "y": ti.field(ti.f64, (2, 3), needs_grad=True),
         "idx": ti.field(ti.i32, 3), "out": ti.field(ti.f64, 3, needs_grad=True)}
    f["x"].from_numpy(rng.uniform(-1, 1, 3))
    f["y"].from_numpy(rng.uniform(-1, 1, (2, 3)))
    f["idx"].from_numpy(np.array([2, 0, 1], dtype=np.int32))
    return f


@settings(max_examples=int(os.environ.get("KERNDIFF_FUZZ_N", 200)) if fuzz.LONG else 8, deadline=None,
          derandomize=os.environ.get("CI") == "true", suppress_health_check=list(HealthCheck))
@given(body=drawing_kernels())
def test_drawn_kernels_that_draw(fuzz_fields, body):
    """Drawn kernels whose values and loops draw numbers: kd.check_grad's forward, reverse and
    H·v against central differences (it fixes the seeds, so every run draws alike)."""
    fn, src = fuzz.load(body, fuzz_fields)
    k = kd.kernel(fn)
    f = fuzz_fields
    try:
        kd.check_grad(k, [f["x"], f["y"]], f["out"], order=2)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{src}") from None
