"""Multi-kernel programs (API.md §4-5): host factories, kd.Tape and kd.FwdMode over time-stepped
simulations — with state indexed by time step, and with state updated in place by later kernels —
against f64 finite differences; and every factory error path."""
import contextlib
import re

import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import TEST_ARCH

N, T = 6, 8


pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)


# ---------------------------------------------------------------- factories
@pytest.fixture(scope="module")
def poly(runtime):
    x1, x2, x3, y = (ti.field(float, shape=()) for _ in range(4))

    @kd.kernel
    def f():
        y[None] += x1[None] ** 3 + 2 * x2[None] ** 2 - 3 * x3[None] + 1

    return f, [x1, x2, x3], y


def test_factory_seed_examples(poly):
    f, xs, y = poly
    dfdx = kd.backward(f, inputs=xs, output=y)
    assert dfdx([1.0, 2.0, 3.0]) == [3.0, 8.0, -3.0]
    assert dfdx([1.0, 2.0, 3.0]) == [3.0, 8.0, -3.0]  # fresh numbers on every call
    jvp = kd.forward(f, inputs=xs, output=y)
    assert jvp([1.0, 2.0, 3.0]) == [3.0, 8.0, -3.0]
    assert jvp([1.0, 2.0, 3.0], tangents=[1.0, 1.0, 0.0]) == 11.0
    hvp = kd.hvp(f, inputs=xs, output=y)
    assert hvp([1.0, 2.0, 3.0], tangents=[1.0, 0.0, 0.0]) == [6.0, 0.0, 0.0]
    assert hvp([2.0, 2.0, 3.0], tangents=[1.0, 1.0, 0.0]) == [12.0, 4.0, 0.0]
    assert kd.reverse(f, inputs=xs, output=y)([1.0, 2.0, 3.0]) == [3.0, 8.0, -3.0]
    assert kd.forward(f) is f.forward and kd.reverse(f) is f.reverse and kd.backward(f) is f.reverse


@pytest.fixture(scope="module")
def arrays(runtime):
    a = ti.field(ti.f64, shape=N)
    b = ti.field(ti.f64, shape=(2, 3))
    out = ti.field(ti.f64, shape=N)
    n = ti.field(ti.i32, shape=N)

    @kd.kernel
    def g():
        for i in a:
            out[i] = ti.sin(a[i]) * b[i % 2, i % 3] + a[i] ** 2

    return g, a, b, out, n


def test_factories_on_arrays_with_cotangent(arrays):
    g, a, b, out, _ = arrays
    rng = np.random.default_rng(0)
    av, bv, w = rng.standard_normal(N), rng.standard_normal((2, 3)), rng.standard_normal(N)
    ga, gb = kd.backward(g, inputs=[a, b], output=out)([av, bv], cotangent=w)
    idx = [(i % 2, i % 3) for i in range(N)]
    ea = w * (np.cos(av) * np.array([bv[p] for p in idx]) + 2 * av)
    eb = np.zeros((2, 3))
    for i, p in enumerate(idx):
        eb[p] += w[i] * np.sin(av[i])
    np.testing.assert_allclose(ga, ea, rtol=1e-12)
    np.testing.assert_allclose(gb, eb, rtol=1e-12)
    va, vb = rng.standard_normal(N), rng.standard_normal((2, 3))
    t = kd.forward(g, inputs=[a, b], output=out)([av, bv], tangents=[va, vb])
    np.testing.assert_allclose(np.dot(w, t), np.dot(ga, va) + np.sum(gb * vb), rtol=1e-12)
    assert kd.check_grad(g, [a, b], out, order=2) < 1e-5


def test_forward_factory_without_tangents_gives_jacobians(arrays):
    """kd.forward(k, inputs, output)(values) with array inputs: each input's Jacobian, the output's
    shape then the input's (jax.jacfwd's layout), one pass per input element; for a 0-d output
    it is kd.backward's gradient, for a vector field the components are axes too."""
    g, a, b, out, _ = arrays
    rng = np.random.default_rng(3)
    av, bv = rng.standard_normal(N), rng.standard_normal((2, 3))
    ja, jb = kd.forward(g, inputs=[a, b], output=out)([av, bv])
    assert ja.shape == (N, N) and jb.shape == (N, 2, 3)
    idx = [(i % 2, i % 3) for i in range(N)]
    np.testing.assert_allclose(ja, np.diag(np.cos(av) * np.array([bv[p] for p in idx]) + 2 * av), rtol=1e-12)
    eb = np.zeros((N, 2, 3))
    for i, p in enumerate(idx):
        eb[(i,) + p] = np.sin(av[i])
    np.testing.assert_allclose(jb, eb, rtol=1e-12)

    p = ti.Vector.field(2, ti.f64, shape=3)
    s = ti.field(ti.f64, shape=())
    e = ti.field(ti.f64, shape=())

    @kd.kernel
    def energy():
        for i in p:
            e[None] += s[None] * p[i].norm_sqr() * p[(i + 1) % 3][0]

    pv, sv = rng.standard_normal((3, 2)), 0.7
    jp, js = kd.forward(energy, inputs=[p, s], output=e)([pv, sv])
    gp, gs = kd.backward(energy, inputs=[p, s], output=e)([pv, sv])
    assert jp.shape == (3, 2) and isinstance(js, float)
    np.testing.assert_allclose(jp, gp, rtol=1e-12)
    assert js == pytest.approx(gs, rel=1e-12)
    assert js == pytest.approx(sum((pv[i] ** 2).sum() * pv[(i + 1) % 3, 0] for i in range(3)), rel=1e-12)


def test_factory_errors(arrays, poly):
    g, a, b, out, n = arrays
    f, xs, y = poly
    bwd = kd.backward(g, inputs=[a, b], output=out)
    with pytest.raises(kd.KernDiffError, match="2 input field.* but 1 value"):
        bwd([np.zeros(N)], cotangent=np.ones(N))
    with pytest.raises(kd.KernDiffError, match=r"value.* 1 has shape \(3,\), but its field has shape \(2, 3\)"):
        bwd([np.zeros(N), np.zeros(3)], cotangent=np.ones(N))
    with pytest.raises(kd.KernDiffError, match="a cotangent is needed"):
        bwd([np.zeros(N), np.zeros((2, 3))])
    with pytest.raises(kd.KernDiffError, match="cotangent has shape"):
        bwd([np.zeros(N), np.zeros((2, 3))], cotangent=np.ones(3))
    with pytest.raises(kd.KernDiffError, match="not a float field"):
        kd.backward(g, inputs=[n], output=out)
    with pytest.raises(kd.KernDiffError, match="must be Taichi fields"):
        kd.backward(f, inputs=[1.0], output=y)
    with pytest.raises(kd.KernDiffError, match="tangents"):
        kd.forward(f, inputs=xs, output=y)([1.0, 2.0, 3.0], tangents=[1.0])


# ---------------------------------------------------------------- simulations
@pytest.fixture(scope="module")
def sim(runtime):
    """A damped nonlinear oscillator chain, stepped by kernels; state indexed by time step."""
    x = ti.field(ti.f64, shape=(T + 1, N))
    v = ti.field(ti.f64, shape=(T + 1, N))
    k = ti.field(ti.f64, shape=N)
    loss = ti.field(ti.f64, shape=())

    @kd.kernel
    def step(t: ti.i32):
        for i in range(N):
            left = x[t, (i + N - 1) % N]
            right = x[t, (i + 1) % N]
            f = k[i] * (left + right - 2 * x[t, i]) - 0.1 * v[t, i] - ti.sin(x[t, i])
            v[t + 1, i] = v[t, i] + 0.1 * f
            x[t + 1, i] = x[t, i] + 0.1 * v[t + 1, i]

    @kd.kernel
    def measure():
        for i in range(N):
            loss[None] += (x[T, i] - 0.5) ** 2 + 0.1 * v[T, i] ** 2

    def run():
        for t in range(T):
            step(t)
        measure()

    return x, v, k, loss, run


def sim_value(sim, x0, kv):
    x, v, k, loss, run = sim
    xs = np.zeros((T + 1, N))
    xs[0] = x0
    x.from_numpy(xs)
    v.fill(0)
    k.from_numpy(kv)
    loss[None] = 0
    run()
    return loss[None]


def test_tape_and_fwdmode_through_time_indexed_simulation(sim):
    x, v, k, loss, run = sim
    rng = np.random.default_rng(1)
    x0, kv = rng.standard_normal(N), rng.uniform(0.5, 1.5, N)
    sim_value(sim, x0, kv)
    kd.adjoint(k)
    with kd.Tape(loss):
        run()
    gk = kd.adjoint(k).to_numpy()
    gx0 = kd.adjoint(x).to_numpy()[0]
    h = 1e-6
    dk = rng.standard_normal(N)
    fd = (sim_value(sim, x0, kv + h * dk) - sim_value(sim, x0, kv - h * dk)) / (2 * h)
    np.testing.assert_allclose(np.dot(gk, dk), fd, rtol=1e-6)
    dx = rng.standard_normal(N)
    fd = (sim_value(sim, x0 + h * dx, kv) - sim_value(sim, x0 - h * dx, kv)) / (2 * h)
    np.testing.assert_allclose(np.dot(gx0, dx), fd, rtol=1e-6)
    sim_value(sim, x0, kv)
    with kd.FwdMode(loss=loss, param=k, seed=list(dk)):
        run()
    fd = (sim_value(sim, x0, kv + h * dk) - sim_value(sim, x0, kv - h * dk)) / (2 * h)
    np.testing.assert_allclose(kd.dual(loss)[None], fd, rtol=1e-6)


@pytest.fixture(scope="module")
def inplace(runtime):
    """The same kind of simulation with state updated in place: `copy` overwrites what `step` read."""
    x = ti.field(ti.f64, shape=N)
    nxt = ti.field(ti.f64, shape=N)
    k = ti.field(ti.f64, shape=N)
    loss = ti.field(ti.f64, shape=())

    @kd.kernel
    def step():
        for i in range(N):
            nxt[i] = x[i] + 0.1 * (k[i] * (x[(i + 1) % N] - x[i]) - ti.sin(x[i]) ** 2)

    @kd.kernel
    def copy():
        for i in range(N):
            x[i] = nxt[i]

    @kd.kernel
    def measure():
        for i in range(N):
            loss[None] += (x[i] - 0.3) ** 2

    def run():
        for _ in range(T):
            step()
            copy()
        measure()

    return x, k, loss, run


def inplace_value(prog, x0, kv):
    x, k, loss, run = prog
    x.from_numpy(x0)
    k.from_numpy(kv)
    loss[None] = 0
    run()
    return loss[None]


def test_tape_with_state_overwritten_by_later_kernels(inplace):
    x, k, loss, run = inplace
    rng = np.random.default_rng(2)
    x0, kv = rng.standard_normal(N), rng.uniform(0.5, 1.5, N)
    x.from_numpy(x0)
    k.from_numpy(kv)
    kd.adjoint(k)  # k is only read: like any input, it is active once it has an adjoint
    inplace_value(inplace, x0, kv)
    final = x.to_numpy()  # the forward results of a plain run
    x.from_numpy(x0)
    loss[None] = 0
    with kd.Tape(loss):
        run()
    gx, gk = kd.adjoint(x).to_numpy(), kd.adjoint(k).to_numpy()
    np.testing.assert_array_equal(x.to_numpy(), final)  # back after the reverse pass
    h = 1e-6
    for g, which in ((gx, 0), (gk, 1)):
        d = rng.standard_normal(N)
        args_p = [x0 + h * d, kv] if which == 0 else [x0, kv + h * d]
        args_m = [x0 - h * d, kv] if which == 0 else [x0, kv - h * d]
        fd = (inplace_value(inplace, *args_p) - inplace_value(inplace, *args_m)) / (2 * h)
        np.testing.assert_allclose(np.dot(g, d), fd, rtol=1e-6)


def test_check_grad_catches_a_wrong_rule(arrays, monkeypatch):
    """The checker can fail: swap sin's derivative for -cos and it must raise with a table."""
    from kerndiff.ad import rules
    from kerndiff.ir import build as B
    g, a, b, out, _ = arrays
    a.from_numpy(np.linspace(0.1, 1.0, N))
    b.from_numpy(np.ones((2, 3)))
    monkeypatch.setitem(rules.PARTIALS, "sin", (lambda x, out: B.neg(B.call("cos", x)),))

    @kd.kernel
    def h():
        for i in a:
            out[i] = ti.sin(a[i]) * b[i % 2, i % 3]

    with pytest.raises(AssertionError, match="derivatives disagree"):
        kd.check_grad(h, [a, b], out)


def test_tape_compares_writes_only_with_patterns_that_can_overlap():
    """The Tape groups the index patterns it saw by their first index; grouping must not lose an
    overlap (a None, 'any element', in either pattern overlaps everything in that dimension)."""
    from kerndiff.tape import _Touched
    f, g = object(), object()
    seen = _Touched()
    for t in range(100):
        seen.add(f, (t, None))
    seen.add(g, (None, 5))
    assert not seen.overlaps(f, (100, None))          # x[t + 1, i] after x[t, i]: fresh
    assert seen.overlaps(f, (99, 3))                  # the same step
    assert seen.overlaps(f, (None, 3))                # any step
    assert seen.overlaps(g, (7, 5)) and not seen.overlaps(g, (7, 4))
    assert not seen.overlaps(object(), (0, 0))        # a field no launch touched
    seen.add(f, ())
    assert seen.overlaps(f, ())                       # 0-d fields: one element


def test_tape_through_kernels_that_update_state_in_place(runtime):
    """Symplectic Euler written the way Taichi code usually is, `v[i] += ...; x[i] += dt * v[i]`
    in one kernel: each launch destroys the x and v its own reverse needs. The Tape snapshots them
    before the launch and restores them before that reverse; alone, the reverse is refused."""
    n, steps, dt = 6, 40, 0.05
    x = ti.field(ti.f64, shape=n)
    v = ti.field(ti.f64, shape=n)
    stiff = ti.field(ti.f64, shape=())
    loss = ti.field(ti.f64, shape=())

    @kd.kernel
    def step():
        for i in x:
            v[i] += dt * (-stiff[None] * ti.sin(x[i]) - 0.3 * v[i] * ti.abs(v[i]))
            x[i] += dt * v[i]

    @kd.kernel
    def measure():
        for i in x:
            loss[None] += x[i] ** 2 + 0.1 * v[i]

    def run(x0, s):
        x.from_numpy(x0)
        v.fill(0)
        stiff[None] = s
        loss[None] = 0
        for _ in range(steps):
            step()
        measure()
        return loss[None]

    rng = np.random.default_rng(5)
    x0, s = rng.uniform(-1, 1, n), 1.7
    run(x0, s)
    final = x.to_numpy()
    kd.adjoint(stiff)
    x.from_numpy(x0)
    v.fill(0)
    stiff[None] = s
    with kd.Tape(loss):
        for _ in range(steps):
            step()
        measure()
    np.testing.assert_array_equal(x.to_numpy(), final)  # the forward results are back
    gx, gs = kd.adjoint(x).to_numpy(), kd.adjoint(stiff)[None]
    h = 1e-6
    d = rng.standard_normal(n)
    fd_x = (run(x0 + h * d, s) - run(x0 - h * d, s)) / (2 * h)
    fd_s = (run(x0, s + h) - run(x0, s - h)) / (2 * h)
    np.testing.assert_allclose(np.dot(gx, d), fd_x, rtol=1e-6)
    np.testing.assert_allclose(gs, fd_s, rtol=1e-6)
    with pytest.raises(kd.KernDiffError, match="kd.Tape"):
        step.reverse()


def test_check_grad_leaves_every_field_as_it_found_it(runtime):
    """Inputs, the output, an intermediate field the kernel writes and an existing adjoint hold
    their values after kd.check_grad (which fills and clears them all while it runs)."""
    x = ti.field(ti.f64, shape=4, needs_grad=True)
    mid = ti.field(ti.f64, shape=4)
    out = ti.field(ti.f64, shape=())

    @kd.kernel
    def k():
        for i in x:
            mid[i] = ti.sin(x[i])
            out[None] += mid[i] * x[i]

    x.from_numpy(np.array([0.1, 0.5, 0.9, 1.3]))
    mid.fill(7.0)
    out[None] = 5.0
    x.grad.from_numpy(np.array([1.0, 2.0, 3.0, 4.0]))
    before = [f.to_numpy() for f in (x, mid, out, x.grad)]
    assert kd.check_grad(k, [x], out) < 1e-6
    for f, b in zip((x, mid, out, x.grad), before):
        np.testing.assert_array_equal(f.to_numpy(), b)


def test_factories_hold_fields_outside_the_inputs_constant(runtime):
    """A tangent sitting in the dual of a field the kernel only reads (set by the user, or left by
    a check over other inputs) must not join J·v or H·v: the derivative is w.r.t. the inputs. The
    factories read that dual as zero and give it back afterwards; duals a check makes are left
    zero-filled."""
    a = ti.field(ti.f64, shape=3)
    c = ti.field(ti.f64, shape=3)
    out = ti.field(ti.f64, shape=())

    @kd.kernel
    def k():
        for i in a:
            out[None] += a[i] ** 2 * c[i]

    av, cv = np.array([0.5, -1.0, 2.0]), np.array([1.5, 0.25, -0.75])
    a.from_numpy(av)  # (with a at zero the check compared zeros: check_grad warned so)
    c.from_numpy(cv)
    assert kd.check_grad(k, [c], out, order=2) < 1e-6  # makes kd.dual(c) and fills it while it runs
    np.testing.assert_array_equal(kd.dual(c).to_numpy(), 0.0)
    stale = np.array([3.0, -2.0, 1.0])
    kd.dual(c).from_numpy(stale)
    va = np.array([1.0, 2.0, -1.0])
    jv = kd.forward(k, inputs=[a], output=out)(av, tangents=va)
    np.testing.assert_allclose(jv, np.dot(2 * av * cv, va), rtol=1e-12)
    hv = kd.hvp(k, inputs=[a], output=out)(av, va)[0]
    np.testing.assert_allclose(hv, 2 * cv * va, rtol=1e-12)
    np.testing.assert_array_equal(kd.dual(c).to_numpy(), stale)
    # The direction the calls wrote into the inputs' duals is theirs: a later forward kernel reads
    # zeros there again (ti.ad.FwdMode clears its seed on exit likewise).
    np.testing.assert_array_equal(kd.dual(a).to_numpy(), 0.0)
    kd.dual(c).fill(0)
    out[None], kd.dual(out)[None] = 0.0, 0.0
    k.forward()
    assert kd.dual(out)[None] == 0.0
    kd.dual(a).from_numpy(va)
    kd.forward(k, inputs=[a], output=out)(av, tangents=-va)
    np.testing.assert_array_equal(kd.dual(a).to_numpy(), va)  # a user's own contents come back


def test_fwd_mode_clears_duals_on_entry_and_the_seed_on_exit_like_taichi(runtime):
    """Two kernels under kd.FwdMode, the first accumulating into an intermediate field, the second
    also reading a field that is not the param. Run twice, and after a stale tangent was put in
    that field's dual, the result is the same and agrees with Taichi's FwdMode (which clears all
    duals on entry); after the block the seed is gone from the param's dual, as in Taichi."""
    x = ti.field(ti.f64, shape=3, needs_dual=True)
    c = ti.field(ti.f64, shape=3, needs_dual=True)
    y = ti.field(ti.f64, shape=3, needs_dual=True)
    loss = ti.field(ti.f64, shape=(), needs_dual=True)
    x.from_numpy(np.array([0.3, -0.6, 1.1]))
    c.from_numpy(np.array([2.0, 0.5, -1.0]))

    def spread():
        for i in x:
            y[i] += ti.sin(x[i]) * c[i]

    def measure():
        for i in y:
            loss[None] += y[i] ** 2 * c[i]

    seed = [1.0, -2.0, 0.5]
    duals = []
    for context, kernels in ((ti.ad.FwdMode, (ti.kernel(spread), ti.kernel(measure))),
                             (kd.FwdMode, (kd.kernel(spread), kd.kernel(measure))),
                             (kd.FwdMode, (kd.kernel(spread), kd.kernel(measure)))):
        y.fill(0)
        c.dual.fill(7.0)  # stale: c is not the param
        with context(loss=loss, param=x, seed=seed):
            for k in kernels:
                k()
        duals.append(loss.dual[None])
        np.testing.assert_array_equal(x.dual.to_numpy(), 0.0)
    xv, cv = x.to_numpy(), c.to_numpy()
    expected = np.dot(2 * np.sin(xv) * cv * cv * np.cos(xv) * cv, seed)
    np.testing.assert_allclose(duals, expected, rtol=1e-12)


def test_tape_through_a_wave_equation_with_boundary_ternaries(runtime):
    """DiffTaichi's wave: a leapfrog step reading two earlier time slices through
    `p[t, i, j] if 0 <= i < n and 0 <= j < n else 0` (out-of-range reads whose value is discarded;
    their adjoints are added only inside), with the adjoint fields placed by hand as that example
    does. Loss and gradient against Taichi's Tape, and against f64 finite differences."""
    n, steps = 6, 8
    p, initial, target, loss = ti.field(ti.f64), ti.field(ti.f64), ti.field(ti.f64), ti.field(ti.f64)
    ti.root.dense(ti.i, steps).dense(ti.jk, n).place(p)
    ti.root.dense(ti.i, steps).dense(ti.jk, n).place(p.grad)
    ti.root.dense(ti.ij, n).place(initial, target)
    ti.root.dense(ti.ij, n).place(initial.grad)
    ti.root.place(loss)
    ti.root.place(loss.grad)

    @ti.func
    def at(t, i, j):
        return p[t, i, j] if 0 <= i < n and 0 <= j < n else 0

    def start():
        for i, j in ti.ndrange(n, n):
            p[0, i, j] = initial[i, j]
            p[1, i, j] = initial[i, j]

    def leapfrog(t: ti.i32):
        for i in range(n):
            for j in range(n):
                lap = at(t - 1, i - 1, j) + at(t - 1, i + 1, j) + at(t - 1, i, j - 1) + at(t - 1, i, j + 1) \
                    - 4 * at(t - 1, i, j)
                p[t, i, j] = 2 * p[t - 1, i, j] + 0.2 * lap - p[t - 2, i, j]

    def misfit():
        for i, j in ti.ndrange(n, n):
            loss[None] += (target[i, j] - p[steps - 1, i, j]) ** 2

    rng = np.random.default_rng(16)
    target.from_numpy(rng.standard_normal((n, n)))
    i0 = rng.standard_normal((n, n))
    made = {}

    def run(make, tape, values):
        initial.from_numpy(values)
        begin, step, end = made.setdefault(make, tuple(make(f) for f in (start, leapfrog, misfit)))
        with tape(loss):
            begin()
            for t in range(2, steps):
                step(t)
            end()
        return loss[None], initial.grad.to_numpy()

    expected, expected_grad = run(ti.kernel, ti.ad.Tape, i0)
    value, grad = run(kd.kernel, kd.Tape, i0)
    assert value == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-12)
    d, h = rng.standard_normal((n, n)), 1e-6
    fd = (run(kd.kernel, kd.Tape, i0 + h * d)[0] - run(kd.kernel, kd.Tape, i0 - h * d)[0]) / (2 * h)
    assert np.sum(grad * d) == pytest.approx(fd, rel=1e-6)
    src = made[kd.kernel][1].reverse.source
    assert src.count("if 0 <= ") == 5 and "+= ti.select" not in src, src


def test_tape_through_billiard_collisions(runtime):
    """DiffTaichi's billiards: impulses from pairwise collisions (nested data-dependent ifs,
    `ti.Vector.normalized(d, 1e-6)` called through the class), accumulated into the next step and
    integrated. The Tape's gradient of the last ball's final position with respect to the cue
    ball's initial velocity against f64 finite differences (the cue ball hits the second ball)."""
    steps, n, r, dt = 30, 4, 0.1, 0.01
    x = ti.Vector.field(2, ti.f64, shape=(steps, n))
    v = ti.Vector.field(2, ti.f64, shape=(steps, n))
    imp = ti.Vector.field(2, ti.f64, shape=(steps, n))
    cue = ti.Vector.field(2, ti.f64, shape=(), needs_grad=True)
    loss = ti.field(ti.f64, shape=())

    @kd.kernel
    def collide(t: ti.i32):
        for i in range(n):
            for j in range(n):
                if i != j:
                    d = x[t, i] - x[t, j]
                    rel = v[t, i] - v[t, j]
                    if d.norm() < 2 * r:
                        direction = ti.Vector.normalized(d, 1e-6)
                        proj = direction.dot(rel)
                        if proj < 0:
                            imp[t + 1, i] += -proj * direction

    @kd.kernel
    def advance(t: ti.i32):
        for i in range(n):
            v[t, i] = v[t - 1, i] + imp[t, i]
            x[t, i] = x[t - 1, i] + dt * v[t, i]

    @kd.kernel
    def place():
        for i in range(n):
            x[0, i] = ti.Vector([0.25 * i, 0.02 * i])
            v[0, i] = cue[None] if i == 0 else ti.Vector([0.0, 0.0])

    @kd.kernel
    def measure():
        loss[None] = x[steps - 1, n - 1].norm_sqr() + x[steps - 1, 1].y

    def run(c):
        cue[None] = c
        imp.fill(0)
        with kd.Tape(loss):
            place()
            for t in range(1, steps):
                collide(t - 1)
                advance(t)
            measure()
        return loss[None], cue.grad.to_numpy()

    c0 = np.array([20.0, 0.3])
    _, grad = run(c0)
    assert np.abs(imp.to_numpy()).max() > 0  # the balls did collide
    h = 1e-6
    for d in range(2):
        e = np.zeros(2)
        e[d] = h
        fd = (run(c0 + e)[0] - run(c0 - e)[0]) / (2 * h)
        assert grad[d] == pytest.approx(fd, rel=1e-6)


def test_tape_through_softened_gravity_on_snode_placed_fields(runtime):
    """DiffTaichi's layout: fields placed on ti.root.dense(...) together (x and v share a
    (steps, n) block), adjoints from ti.root.lazy_grad(), a time-indexed state, an inner serial loop
    summing softened pair forces with r.norm(1e-3). The loss agrees with Taichi's, the Tape's
    gradients with f64 finite differences (Taichi's own Tape gets the x gradient wrong here)."""
    steps, n = 4, 5
    x, v = ti.Vector.field(2, ti.f64), ti.Vector.field(2, ti.f64)
    m = ti.field(ti.f64)
    loss = ti.field(ti.f64, shape=())
    ti.root.dense(ti.i, steps).dense(ti.j, n).place(x, v)
    ti.root.dense(ti.i, n).place(m)
    ti.root.lazy_grad()
    rng = np.random.default_rng(5)
    x0 = np.zeros((steps, n, 2))
    x0[0] = rng.random((n, 2))
    v0 = np.zeros((steps, n, 2))
    v0[0] = rng.standard_normal((n, 2)) * 0.1
    m0 = 1.0 + rng.random(n)

    def advance(t: ti.i32):
        for j in range(n):
            f = ti.Vector([0.0, -9.8]) * m[j]
            for k in range(n):
                if k != j:
                    r = x[t - 1, k] - x[t - 1, j]
                    f += r * m[k] / r.norm(1e-3) ** 3
            v[t, j] = v[t - 1, j] + 0.01 * f / m[j]
            x[t, j] = x[t - 1, j] + 0.01 * v[t, j]

    def measure():
        for j in range(n):
            loss[None] += x[steps - 1, j].norm_sqr() * m[j]

    made = {}

    def run(make, xs=x0, ms=m0, tape=None):
        x.from_numpy(xs)
        v.from_numpy(v0)
        m.from_numpy(ms)
        step, final = made.setdefault(make, (make(advance), make(measure)))
        with tape(loss) if tape else contextlib.nullcontext():
            loss[None] = 0
            for t in range(1, steps):
                step(t)
            final()
        return loss[None]

    expected = run(ti.kernel)
    assert run(kd.kernel, tape=kd.Tape) == pytest.approx(expected, rel=1e-12)
    gx, gm = x.grad.to_numpy()[0], m.grad.to_numpy()
    h = 1e-6
    for j, d in [(0, 0), (2, 1), (4, 0)]:
        e = np.zeros_like(x0)
        e[0, j, d] = h
        fd = (run(kd.kernel, x0 + e) - run(kd.kernel, x0 - e)) / (2 * h)
        assert gx[j, d] == pytest.approx(fd, rel=1e-6, abs=1e-9)
    for j in range(n):
        e = np.zeros(n)
        e[j] = h
        fd = (run(kd.kernel, ms=m0 + e) - run(kd.kernel, ms=m0 - e)) / (2 * h)
        assert gm[j] == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_tape_through_smoke_advection_and_pressure_projection(runtime):
    """DiffTaichi's smoke example, small: semi-Lagrangian advection that gathers through indices
    computed from the velocity (one kernel advects the smoke *into the same field*, reading step
    t - 1 and writing step t), Gauss-Seidel pressure iterations whose time slice is a run-time
    `k + t * iters`, wrap-around neighbours from ti.funcs, an inner serial loop, fields placed
    together with lazy_grad. The Tape's gradient with respect to the initial velocity against f64
    finite differences. (DiffTaichi's own `imod` returns n for 0 and reads past the grid: fixed
    here, as out-of-range indices make values and derivatives alike undefined.)"""
    n, iters, steps = 6, 2, 3
    v, v_updated = ti.Vector.field(2, ti.f64), ti.Vector.field(2, ti.f64)
    div, p, smoke = ti.field(ti.f64), ti.field(ti.f64), ti.field(ti.f64)
    loss = ti.field(ti.f64, shape=())
    ti.root.dense(ti.i, steps * (iters + 1)).dense(ti.jk, n).place(p)
    ti.root.dense(ti.i, steps).dense(ti.jk, n).place(v, v_updated, smoke, div)
    ti.root.lazy_grad()
    rng = np.random.default_rng(8)
    v0 = rng.standard_normal((n, n, 2)) * 0.3

    @ti.func
    def wrap(k):
        return (k % n + n) % n

    @kd.kernel
    def advect(f: ti.template(), f_out: ti.template(), t_offset: ti.template(), t: ti.i32):
        for y in range(n):
            for x in range(n):
                cx = y - v[t + t_offset, y, x][0]
                cy = x - v[t + t_offset, y, x][1]
                left, top = ti.cast(ti.floor(cx), ti.i32), ti.cast(ti.floor(cy), ti.i32)
                rw, bw = cx - left, cy - top
                left, top = wrap(left), wrap(top)
                right, bot = wrap(left + 1), wrap(top + 1)
                f_out[t, y, x] = (1 - rw) * ((1 - bw) * f[t - 1, left, top] + bw * f[t - 1, left, bot]) + rw * (
                    (1 - bw) * f[t - 1, right, top] + bw * f[t - 1, right, bot])

    @kd.kernel
    def compute_div(t: ti.i32):
        for y in range(n):
            for x in range(n):
                div[t, y, x] = -0.5 / n * (v_updated[t, wrap(y + 1), x][0] - v_updated[t, wrap(y - 1), x][0]
                                           + v_updated[t, y, wrap(x + 1)][1] - v_updated[t, y, wrap(x - 1)][1])

    @kd.kernel
    def compute_p(t: ti.i32, k: ti.i32):
        for y in range(n):
            for x in range(n):
                a = k + t * iters
                p[a + 1, y, x] = (div[t, y, x] + p[a, wrap(y - 1), x] + p[a, wrap(y + 1), x]
                                  + p[a, y, wrap(x - 1)] + p[a, y, wrap(x + 1)]) / 4.0

    @kd.kernel
    def update_v(t: ti.i32):
        for y in range(n):
            for x in range(n):
                a = iters * t
                v[t, y, x] = v_updated[t, y, x] - 0.5 * n * ti.Vector([p[a, wrap(y + 1), x] - p[a, wrap(y - 1), x],
                                                                      p[a, y, wrap(x + 1)] - p[a, y, wrap(x - 1)]])

    @kd.kernel
    def compute_loss():
        for i, j in ti.ndrange(n, n):
            loss[None] += (smoke[steps - 1, i, j] - 0.3 * (i + j) / n) ** 2

    def run(velocity, tape=contextlib.nullcontext):
        for f in (v, v_updated, div, p, smoke):
            f.fill(0)
        v.from_numpy(np.concatenate([velocity[None], np.zeros((steps - 1, n, n, 2))]))
        smoke.from_numpy(np.concatenate([(np.add.outer(np.arange(n) // 2, np.arange(n) // 2) % 2)[None] * 1.0,
                                         np.zeros((steps - 1, n, n))]))
        with tape(loss):
            loss[None] = 0
            for t in range(1, steps):
                advect(v, v_updated, -1, t)
                compute_div(t)
                for k in range(iters):
                    compute_p(t, k)
                update_v(t)
                advect(smoke, smoke, 0, t)
            compute_loss()
        return loss[None]

    run(v0, kd.Tape)
    grad = v.grad.to_numpy()[0]
    h = 1e-6
    for _ in range(3):
        d = rng.standard_normal(v0.shape)
        fd = (run(v0 + h * d) - run(v0 - h * d)) / (2 * h)
        assert np.sum(grad * d) == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_tape_through_an_mpm_step(runtime):
    """A DiffTaichi-style MLS-MPM step: particle-to-grid scatter with quadratic B-spline weights (a
    Python list of vectors returned by a ti.func, ti.static(ti.ndrange(3, 3))), a fixed-corotated stress through
    ti.polar_decompose, grid momentum normalized in place, grid-to-particle gather. The Tape's
    gradient of a loss on the moved particles, with respect to their positions and affine
    velocities, against f64 finite differences."""
    n_p, n_g = 12, 8
    dx, dt, mu, la = 1 / n_g, 1e-3, 10.0, 10.0
    x = ti.Vector.field(2, ti.f64, shape=n_p, needs_grad=True)
    v = ti.Vector.field(2, ti.f64, shape=n_p, needs_grad=True)
    C = ti.Matrix.field(2, 2, ti.f64, shape=n_p, needs_grad=True)
    F = ti.Matrix.field(2, 2, ti.f64, shape=n_p, needs_grad=True)
    grid_v = ti.Vector.field(2, ti.f64, shape=(n_g, n_g), needs_grad=True)
    grid_m = ti.field(ti.f64, shape=(n_g, n_g), needs_grad=True)
    x_new = ti.Vector.field(2, ti.f64, shape=n_p, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)

    @ti.func
    def stencil(xp):  # the 3x3 grid nodes around a particle and their B-spline weights
        base = ti.cast(xp / dx - 0.5, ti.i32)
        fx = xp / dx - ti.cast(base, ti.f64)
        return base, fx, [0.5 * (1.5 - fx) ** 2, 0.75 - (fx - 1) ** 2, 0.5 * (fx - 0.5) ** 2]

    @kd.kernel
    def p2g():
        for p in range(n_p):
            base, fx, w = stencil(x[p])
            new_F = (ti.Matrix.identity(ti.f64, 2) + dt * C[p]) @ F[p]
            J = new_F.determinant()
            r, _ = ti.polar_decompose(new_F)
            stress = 2 * mu * (new_F - r) @ new_F.transpose() + ti.Matrix.identity(ti.f64, 2) * la * J * (J - 1)
            affine = -(dt * 4 / dx ** 2) * stress + C[p]
            for i, j in ti.static(ti.ndrange(3, 3)):
                offset = ti.Vector([i, j])
                dpos = (ti.cast(offset, ti.f64) - fx) * dx
                weight = w[i][0] * w[j][1]
                grid_v[base + offset] += weight * (v[p] + affine @ dpos)
                grid_m[base + offset] += weight

    @kd.kernel
    def normalize():
        for i, j in grid_m:
            grid_v[i, j] = grid_v[i, j] / (grid_m[i, j] + 1e-10)

    @kd.kernel
    def g2p():
        for p in range(n_p):
            base, _, w = stencil(x[p])
            new_v = ti.Vector([0.0, 0.0])
            for I in ti.static(ti.grouped(ti.ndrange(3, 3))):
                new_v += w[I[0]][0] * w[I[1]][1] * grid_v[base + I]
            x_new[p] = x[p] + dt * 50 * new_v

    @kd.kernel
    def measure():
        for p in range(n_p):
            loss[None] += (x_new[p] - ti.Vector([0.5, 0.5])).norm_sqr()

    rng = np.random.default_rng(4)
    x0 = 0.3 + 0.4 * rng.random((n_p, 2))
    c0 = 0.5 * rng.standard_normal((n_p, 2, 2))

    def run(xv, cv):
        x.from_numpy(xv)
        C.from_numpy(cv)
        v.from_numpy(np.ones((n_p, 2)))
        F.from_numpy(np.tile(np.eye(2), (n_p, 1, 1)) * 1.1)
        grid_v.fill(0)
        grid_m.fill(0)
        loss[None] = 0
        p2g()
        normalize()
        g2p()
        measure()
        return loss[None]

    with kd.Tape(loss):
        run(x0, c0)
    gx, gc = x.grad.to_numpy(), C.grad.to_numpy()
    assert np.abs(gc).max() > 1e-4  # the stress path carries gradient
    for dxv, dcv in ((rng.standard_normal(x0.shape), 0 * c0), (0 * x0, rng.standard_normal(c0.shape))):
        eps = 1e-6
        fd = (run(x0 + eps * dxv, c0 + eps * dcv) - run(x0 - eps * dxv, c0 - eps * dcv)) / (2 * eps)
        np.testing.assert_allclose(np.sum(gx * dxv) + np.sum(gc * dcv), fd, rtol=1e-6)


def test_time_indexed_advection_through_a_function(runtime):
    """Semi-Lagrangian advection as in DiffTaichi's smoke example: step t reads q[t - 1] through a
    ti.func (bilinear sampling with clamped indices) and writes q[t]. The function's argument
    `t - 1` is a local of the inlined body, and the access rule still sees that the rows differ.
    Checked against Taichi's own Tape and f64 finite differences."""
    n, steps = 8, 4
    v = ti.Vector.field(2, ti.f64, shape=(steps, n, n), needs_grad=True)
    q = ti.field(ti.f64, shape=(steps, n, n), needs_grad=True)
    target = ti.field(ti.f64, shape=(n, n))
    loss = ti.field(ti.f64, shape=(), needs_grad=True)

    @ti.func
    def sample(t, i, j):
        return q[t, ti.max(0, ti.min(n - 1, i)), ti.max(0, ti.min(n - 1, j))]

    @ti.func
    def bilerp(t, p):
        s = ti.max(0.0, ti.min(n - 1.001, p))
        I = ti.cast(ti.floor(s), ti.i32)
        f = s - I
        return (sample(t, I[0], I[1]) * (1 - f[0]) * (1 - f[1]) + sample(t, I[0] + 1, I[1]) * f[0] * (1 - f[1])
                + sample(t, I[0], I[1] + 1) * (1 - f[0]) * f[1] + sample(t, I[0] + 1, I[1] + 1) * f[0] * f[1])

    def advect(t: ti.i32):
        for i, j in ti.ndrange(n, n):
            q[t, i, j] = bilerp(t - 1, ti.Vector([i, j]) - 0.8 * v[t - 1, i, j])
            v[t, i, j] = v[t - 1, i, j] * 0.99

    def measure():
        for i, j in ti.ndrange(n, n):
            loss[None] += (q[steps - 1, i, j] - target[i, j]) ** 2

    rng = np.random.default_rng(6)
    q0, v0 = rng.random((n, n)), rng.standard_normal((n, n, 2)) * 1.3
    target.from_numpy(rng.random((n, n)))

    def setup(vv):
        qa, va = np.zeros((steps, n, n)), np.zeros((steps, n, n, 2))
        qa[0], va[0] = q0, vv
        q.from_numpy(qa)
        v.from_numpy(va)
        loss[None] = 0

    def run(kernels):
        for t in range(1, steps):
            kernels[0](t)
        kernels[1]()
        return loss[None]

    grads = {}
    for tape, deco in ((ti.ad.Tape, ti.kernel), (kd.Tape, kd.kernel)):
        kernels = (deco(advect), deco(measure))
        setup(v0)  # outside: Taichi's Tape would record from_numpy's own kernels
        with tape(loss):
            run(kernels)
        grads[deco] = v.grad.to_numpy()[0]
    np.testing.assert_allclose(grads[kd.kernel], grads[ti.kernel], rtol=1e-10, atol=1e-12)
    assert np.abs(grads[ti.kernel]).max() > 0.1
    d, eps = rng.standard_normal(v0.shape), 1e-6
    values = []
    for sign in (1, -1):
        setup(v0 + sign * eps * d)
        values.append(run(kernels))
    fd = (values[0] - values[1]) / (2 * eps)
    np.testing.assert_allclose(np.sum(grads[kd.kernel] * d), fd, rtol=1e-6)


def test_plain_taichi_kernel_inside_a_tape_is_refused(runtime):
    """kd.Tape and kd.FwdMode differentiate kerndiff kernels only; a plain ti.kernel launched inside
    would drop its part of the derivative (x.grad stayed 0 here), so it is refused by name. Taichi's
    own kernels behind fill/from_numpy are fine, and the guard is gone after the block."""
    x = ti.field(ti.f64, shape=3, needs_grad=True)
    y = ti.field(ti.f64, shape=3, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)

    @ti.kernel
    def square():
        for i in x:
            y[i] = x[i] ** 2

    @kd.kernel
    def total():
        for i in y:
            loss[None] += y[i]

    x.from_numpy(np.array([1.0, 2.0, 3.0]))
    for context in (lambda: kd.Tape(loss), lambda: kd.FwdMode(loss=loss, param=x, seed=[1.0, 0.0, 0.0])):
        with pytest.raises(kd.KernDiffError, match="the Taichi kernel 'square' ran inside kd.(Tape|FwdMode)"):
            with context():
                square()
                total()
    square()  # outside: runs as usual
    with kd.Tape(loss):
        y.fill(0.5)
        x.from_numpy(np.array([1.0, 2.0, 3.0]))
        total()
    np.testing.assert_array_equal(y.grad.to_numpy(), 1.0)
    assert loss[None] == 1.5


def test_kernels_as_methods_of_a_data_oriented_class(runtime):
    """@kd.kernel on methods of a @ti.data_oriented class, as Taichi programs are often organized:
    `self` is the instance, a compile-time argument; each instance gets its own kernels. A time
    step updating state in place under the Tape, and a factory on a bound kernel, against f64
    finite differences."""

    @ti.data_oriented
    class Oscillators:
        def __init__(self, n, stiffness):
            self.n, self.dt = n, 0.05
            self.x = ti.field(ti.f64, shape=n, needs_grad=True)
            self.v = ti.field(ti.f64, shape=n, needs_grad=True)
            self.k = ti.field(ti.f64, shape=(), needs_grad=True)
            self.loss = ti.field(ti.f64, shape=(), needs_grad=True)
            self.k[None] = stiffness

        @kd.kernel
        def step(self):
            for i in self.x:
                self.v[i] += -self.dt * self.k[None] * ti.sin(self.x[i])
                self.x[i] += self.dt * self.v[i]

        @kd.kernel
        def measure(self, weight: ti.f64):
            for i in self.x:
                self.loss[None] += weight * self.x[i] ** 2

        def run(self, x0, k, steps=20):
            self.x.from_numpy(x0)
            self.v.fill(0)
            self.k[None] = k
            self.loss[None] = 0
            for _ in range(steps):
                self.step()
            self.measure(0.5)
            return self.loss[None]

    a, b = Oscillators(4, 2.0), Oscillators(3, 1.0)
    assert a.step is a.step and a.step is not b.step
    x0 = np.linspace(0.2, 1.1, 4)
    with kd.Tape(a.loss):
        a.run(x0, 2.0)
    eps = 1e-6
    fd = (a.run(x0, 2.0 + eps) - a.run(x0, 2.0 - eps)) / (2 * eps)
    np.testing.assert_allclose(a.k.grad[None], fd, rtol=1e-6)
    b.run(np.linspace(0.1, 0.3, 3), 1.0)  # another instance, other fields: its own kernels
    assert b.loss[None] == pytest.approx(0.5 * np.sum(b.x.to_numpy() ** 2), rel=1e-12)
    a.x.from_numpy(x0)
    grad_x = kd.backward(a.measure, inputs=[a.x], output=a.loss, args=(0.5,))([x0])[0]
    np.testing.assert_allclose(grad_x, x0, rtol=1e-12)


def test_function_methods_called_through_self(runtime):
    """@ti.func and @kd.func methods of a @ti.data_oriented class called as `self.helper(i, j)`,
    the way Taichi classes are written: Python binds `self`, and the call passes it first (they
    were called without it: "missing a required argument"). A @ti.func method calling another
    through self, a @staticmethod one, one taking a field as a template argument; the values
    against the same class's ti.kernel, the derivatives against f64 finite differences and
    analytic gradients. A transform of such a bound method is refused at its line."""
    n = 5
    rng = np.random.default_rng(7)

    @ti.data_oriented
    class Chain:
        def __init__(self):
            self.pos = ti.Vector.field(2, ti.f64, shape=n)
            self.k = ti.field(ti.f64, shape=n)
            self.E = ti.field(ti.f64, shape=())
            self.pos.from_numpy(rng.uniform(0.1, 1.0, (n, 2)))
            self.k.from_numpy(rng.uniform(0.5, 2.0, n))

        @ti.func
        def dist(self, i, j):
            return (self.pos[i] - self.pos[j]).norm()

        @ti.func
        def spring(self, i, j):
            return 0.5 * self.k[i] * (self.dist(i, j) - 0.3) ** 2

        @staticmethod
        @ti.func
        def sq(a):
            return a * a

        @ti.func
        def weighted(self, f: ti.template(), i):
            return f[i] * self.k[i]

        @kd.func
        def decay(self, i):
            return ti.exp(-self.pos[i].norm_sqr())

        def energy(self):
            for i in range(n):
                self.E[None] += self.spring(i, (i + 1) % n) + self.sq(self.k[i]) + self.weighted(self.k, i)

        kd_energy = kd.kernel(energy)
        ti_energy = ti.kernel(energy)

        @kd.kernel
        def decays(self):
            for i in range(n):
                self.E[None] += self.decay(i) * self.k[i]

        @ti.func
        def cube(self, r=0.5):
            return r ** 3

        @kd.kernel
        def transformed(self):
            for i in range(n):
                self.E[None] += kd.grad(self.cube)(self.k[i])

    c = Chain()
    c.E[None] = 0.0
    c.kd_energy()
    ours = c.E[None]
    c.E[None] = 0.0
    c.ti_energy()
    assert ours == pytest.approx(c.E[None], rel=1e-14)
    assert kd.check_grad(c.kd_energy, [c.pos, c.k], c.E, order=2) < 1e-6
    posv, kv = c.pos.to_numpy(), c.k.to_numpy()
    grads = kd.backward(c.decays, inputs=[c.pos, c.k], output=c.E)([posv, kv])
    decay = np.exp(-np.sum(posv ** 2, axis=1))
    np.testing.assert_allclose(grads[1], decay, rtol=1e-12)
    np.testing.assert_allclose(grads[0], -2.0 * posv * (decay * kv)[:, None], rtol=1e-12)
    with pytest.raises(kd.KernDiffError, match="kd.grad of a method reached through an instance") as e:
        c.transformed()
    assert "kd.grad(self.cube)" in str(e.value)


def test_kernels_that_return_values_inside_tape_and_fwd_mode(runtime):
    """A kernel that returns a value inside kd.Tape: the value is not the loss, so its cotangent is
    0 (kerndiff once seeded it with 1, adding d(value)/dx to the gradient). Inside kd.FwdMode it
    returns its value, as under ti.ad.FwdMode (kerndiff once returned (value, tangent))."""
    n = 4
    x = ti.field(ti.f64, shape=n, needs_grad=True, needs_dual=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True, needs_dual=True)
    xv = np.linspace(0.1, 1.0, n)
    x.from_numpy(xv)

    def both() -> ti.f64:
        s = 0.0
        for i in x:
            s += x[i] ** 2
            loss[None] += ti.sin(x[i])
        return s

    k = kd.kernel(both)
    with kd.Tape(loss):
        value = k()
    assert value == pytest.approx(np.sum(xv ** 2), rel=1e-12)
    np.testing.assert_allclose(x.grad.to_numpy(), np.cos(xv), rtol=1e-12)
    got = []
    for kernel, mode in ((ti.kernel(both), ti.ad.FwdMode), (k, kd.FwdMode)):
        with mode(loss=loss, param=x, seed=[1.0] * n):
            got.append((kernel(), ))
        got[-1] += (loss.dual[None],)
    if TEST_ARCH == "cpu":  # on CUDA, Taichi 1.7.4 returns x[0] ** 2 under its FwdMode
        assert got[1] == pytest.approx(got[0], rel=1e-12)
    assert got[1] == pytest.approx((np.sum(xv ** 2), np.sum(np.cos(xv))), rel=1e-12)


def test_factories_over_a_kernel_that_also_returns_a_value(runtime):
    """kd.backward / kd.hvp / kd.check_grad with a field output, over a kernel that also returns a
    value: the value is not the output, so its cotangent is 0 (kerndiff once seeded it with 1)."""
    n = 4
    x = ti.field(ti.f64, shape=n)
    loss = ti.field(ti.f64, shape=())
    xv = np.linspace(0.1, 1.0, n)

    @kd.kernel
    def k() -> ti.f64:
        s = 0.0
        for i in x:
            s += x[i] ** 2
            loss[None] += ti.sin(x[i])
        return s

    np.testing.assert_allclose(kd.backward(k, inputs=[x], output=loss)([xv])[0], np.cos(xv), rtol=1e-12)
    np.testing.assert_allclose(kd.hvp(k, inputs=[x], output=loss)([xv], [np.ones(n)])[0], -np.sin(xv), rtol=1e-12)
    x.from_numpy(xv)
    kd.check_grad(k, [x], loss, order=2)


def test_factories_over_the_float_a_kernel_returns(runtime):
    """A kernel returning one float (a loss computed in a local) needs no output field: kd.backward,
    kd.forward, kd.hvp and kd.check_grad without `output` differentiate the returned value. Checked
    against the analytic gradient, Hessian and directional derivatives of f = a Σ exp(-x_i²) x_(i+1);
    without a returned float the output is still asked for."""
    n = 5
    x, a = ti.field(ti.f64, shape=n), ti.field(ti.f64, shape=())
    loss = ti.field(ti.f64, shape=())

    @kd.kernel
    def returned() -> ti.f64:
        s = 0.0
        for i in range(n):
            s += ti.exp(-x[i] ** 2) * x[(i + 1) % n] * a[None]
        return s

    @kd.kernel
    def into_a_field():
        for i in range(n):
            loss[None] += x[i] ** 2

    xv, av = np.linspace(-1.0, 0.8, n), 1.5
    e, after, before = np.exp(-xv ** 2), np.roll(xv, -1), np.roll(np.exp(-xv ** 2), 1)
    grad_x = av * (-2.0 * xv * e * after + before)
    grad_a = np.sum(e * after)
    gx, ga = kd.backward(returned, inputs=[x, a])([xv, av])
    np.testing.assert_allclose(gx, grad_x, rtol=1e-12)
    assert ga == pytest.approx(grad_a, rel=1e-12)
    doubled = kd.backward(returned, inputs=[x, a])([xv, av], cotangent=2.0)
    assert doubled[1] == pytest.approx(2.0 * grad_a, rel=1e-12)
    v, va = np.random.default_rng(3).standard_normal(n), 0.7
    jvp = kd.forward(returned, inputs=[x, a])
    assert jvp([xv, av], tangents=[v, va]) == pytest.approx(grad_x @ v + grad_a * va, rel=1e-12)
    np.testing.assert_allclose(jvp([xv, av])[0], grad_x, rtol=1e-12)  # the Jacobian: one pass per element
    # H·v: ∂²f/∂x_k² = a (4 x_k² - 2) e_k x_(k+1), ∂²f/∂x_k∂x_(k+1) = -2 a x_k e_k, ∂²f/∂a∂x = grad_x / a
    H = np.diag(av * (4.0 * xv ** 2 - 2.0) * e * after)
    for k in range(n):
        H[k, (k + 1) % n] += -2.0 * av * xv[k] * e[k]
        H[(k + 1) % n, k] += -2.0 * av * xv[k] * e[k]
    hx, ha = kd.hvp(returned, inputs=[x, a])([xv, av], tangents=[v, va])
    np.testing.assert_allclose(hx, H @ v + grad_x / av * va, rtol=1e-10)
    assert ha == pytest.approx(grad_x @ v / av, rel=1e-10)
    x.from_numpy(xv)
    a[None] = av
    assert kd.check_grad(returned, [x, a], order=2) < 1e-6
    for make in (kd.backward, kd.forward, kd.hvp):
        with pytest.raises(kd.KernDiffError, match="the returned value is the output"):
            make(into_a_field, inputs=[x])
    with pytest.raises(kd.KernDiffError, match="needs an output field"):
        kd.check_grad(into_a_field, [x])


def test_kernels_that_return_a_vector_or_a_matrix(runtime):
    """`-> ti.math.vec2` / `-> ti.types.matrix(2, 2, ...)`: the primal returns a ti.Vector /
    ti.Matrix as Taichi's kernel does; k.forward() returns (value, tangent); k.reverse takes a
    cotangent of the value's shape (a list, array or ti.Vector), k.forward.reverse one per group.
    Checked against the analytic Jacobian, Taichi's own kernel, kd.Tape and kd.FwdMode."""
    x = ti.field(ti.f64, shape=4, needs_grad=True, needs_dual=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True, needs_dual=True)
    xv = np.array([0.5, 1.5, -0.7, 2.0])
    x.from_numpy(xv)

    def pair() -> ti.math.vec2:
        loss[None] += x[2] ** 2
        return ti.Vector([x[0] * x[1], ti.sin(x[1]) + x[3] ** 2])

    def block() -> ti.types.matrix(2, 2, ti.f64):
        return ti.Matrix([[x[0], x[1] * x[2]], [x[3] ** 2, 1.0]])

    jac = np.array([[xv[1], xv[0], 0, 0], [0, np.cos(xv[1]), 0, 2 * xv[3]]])
    value = np.array([xv[0] * xv[1], np.sin(xv[1]) + xv[3] ** 2])
    k, m = kd.kernel(pair), kd.kernel(block)
    taichi_value = ti.kernel(pair)()
    got = k()
    assert isinstance(got, type(taichi_value)) and isinstance(m(), type(ti.kernel(block)()))
    np.testing.assert_allclose(got.to_numpy(), value, rtol=1e-14)
    np.testing.assert_allclose(taichi_value.to_numpy(), value, rtol=1e-14)
    np.testing.assert_allclose(m().to_numpy(), [[xv[0], xv[1] * xv[2]], [xv[3] ** 2, 1.0]], rtol=1e-14)

    v = np.array([0.3, -1.0, 0.0, 0.5])
    x.dual.from_numpy(v)
    val, tangent = k.forward()
    np.testing.assert_allclose(val.to_numpy(), value, rtol=1e-14)
    np.testing.assert_allclose(tangent.to_numpy(), jac @ v, rtol=1e-14)

    for c in ([1.0, -2.0], np.array([1.0, -2.0]), ti.Vector([1.0, -2.0])):
        x.grad.fill(0)
        k.reverse(cotangent=c)
        np.testing.assert_allclose(x.grad.to_numpy(), jac.T @ [1.0, -2.0], rtol=1e-14)
    for wrong in ([1.0, 2.0, 3.0], "a"):
        with pytest.raises(kd.KernDiffError, match=re.escape("a cotangent of the returned value's shape (2,)")):
            k.reverse(cotangent=wrong)
    x.grad.fill(0)
    m.reverse(cotangent=np.array([[1.0, 2.0], [3.0, 4.0]]))
    np.testing.assert_allclose(x.grad.to_numpy(), [1.0, 2 * xv[2], 2 * xv[1], 6 * xv[3]], rtol=1e-14)

    # the tangent's cotangent (0, 1) asks for d(jac[1] @ v)/dx: its only x-dependent entry is cos(x1) v1
    x.grad.fill(0)
    k.forward.reverse(cotangent=(ti.Vector([0.0, 0.0]), ti.Vector([0.0, 1.0])))
    np.testing.assert_allclose(x.grad.to_numpy(), [0, -np.sin(xv[1]) * v[1], 0, 2 * v[3]], rtol=1e-14)

    with kd.Tape(loss):  # the returned vector is not the loss: its cotangent is zero
        np.testing.assert_allclose(k().to_numpy(), value, rtol=1e-14)
    np.testing.assert_allclose(x.grad.to_numpy(), [0, 0, 2 * xv[2], 0], rtol=1e-14)
    with kd.FwdMode(loss=loss, param=x, seed=list(v)):
        np.testing.assert_allclose(k().to_numpy(), value, rtol=1e-14)


def test_kerndiff_kernels_inside_taichis_own_tape_and_fwd_mode(runtime):
    """`with ti.ad.Tape(loss): k()` / `with ti.ad.FwdMode(...)` over a @kd.kernel runs kerndiff's
    reverse / forward kernel, as kd.Tape and kd.FwdMode do: Taichi once differentiated the
    generated primal with its own AD, to which V (written and read in the kernel, no needs_grad)
    is a constant, giving x**2 where the derivative is 3 x**2. A kernel returning a value seeds it
    with 0; a derivative kernel there is refused (its derivatives are of the next level), and so is
    a kernel updating a field in place (its reverse needs the old values, and ti.ad.Tape keeps no
    copies); Taichi's grad_check reruns the kernel."""
    n = 4
    x = ti.field(ti.f64, shape=n, needs_grad=True, needs_dual=True)
    v = ti.field(ti.f64, shape=n)
    loss = ti.field(ti.f64, shape=(), needs_grad=True, needs_dual=True)
    xv = np.array([1.0, 2.0, -3.0, 0.5])
    x.from_numpy(xv)

    @kd.kernel
    def cubes() -> ti.f64:
        for i in x:
            v[i] = x[i] ** 2
        s = 0.0
        for i in x:
            loss[None] += v[i] * x[i]
            s += x[i]
        return s

    with ti.ad.Tape(loss):
        assert cubes() == pytest.approx(xv.sum(), rel=1e-14)
    np.testing.assert_allclose(x.grad.to_numpy(), 3 * xv ** 2, rtol=1e-14)
    with ti.ad.Tape(loss, grad_check=[x]):  # Taichi's checker reruns the calls it recorded
        cubes()
    np.testing.assert_allclose(x.grad.to_numpy(), 3 * xv ** 2, rtol=1e-14)
    seed = [0.5, -1.0, 0.0, 2.0]
    with ti.ad.FwdMode(loss=loss, param=x, seed=seed):
        assert cubes() == pytest.approx(xv.sum(), rel=1e-14)
    assert loss.dual[None] == pytest.approx(np.dot(3 * xv ** 2, seed), rel=1e-14)
    with pytest.raises(kd.KernDiffError, match="cubes.reverse is a derivative kernel, launched inside ti.ad.Tape"):
        with ti.ad.Tape(loss):
            cubes()
            cubes.reverse()


    @kd.kernel
    def grow():
        for i in x:
            x[i] += 0.1 * x[i] ** 2

    with pytest.raises(kd.KernDiffError, match="grow updates 'x' in place") as info:
        with ti.ad.Tape(loss):
            grow()
    assert "use kd.Tape" in str(info.value) and "test_programs.py" in str(info.value)


def test_a_matrix_summed_in_a_local_then_stored_with_its_inverse_mass(runtime):
    """A rigid body's mass and inertia as DFSPH_difftaichi computes them: a scalar and a 3x3
    matrix summed into kernel-scope locals in a parallel loop, then stored after it beside 1 /
    mass (Taichi's own AD refuses the kernel: a loop and statements outside it). kd.Tape's
    gradient of a loss read from those against f64 differences of the whole program."""
    n = 10
    x = ti.Vector.field(3, ti.f64, shape=n)
    m = ti.field(ti.f64, shape=n)
    inertia = ti.Matrix.field(3, 3, ti.f64, shape=())
    mass, inv_mass = ti.field(ti.f64, shape=()), ti.field(ti.f64, shape=())
    loss = ti.field(ti.f64, shape=())
    rng = np.random.default_rng(21)
    x.from_numpy(rng.standard_normal((n, 3)))
    m.from_numpy(rng.uniform(0.5, 1.5, n))

    @kd.kernel
    def mass_info():
        sum_m = 0.0
        sum_inertia = ti.Matrix([[0, 0, 0], [0, 0, 0], [0, 0, 0]], dt=ti.f64)
        for p in range(n):
            sum_m += m[p]
            r = x[p] - ti.Vector([0.1, 0.2, -0.1])
            sum_inertia += m[p] * (r.dot(r) * ti.Matrix.identity(ti.f64, 3) - r.outer_product(r))
        mass[None] = sum_m
        inertia[None] = sum_inertia
        inv_mass[None] = 1.0 / sum_m

    @kd.kernel
    def energy():
        loss[None] = (inertia[None] @ inertia[None]).trace() * inv_mass[None] + mass[None]

    def program():
        mass_info()
        energy()

    assert kd.check_grad(program, inputs=[m, x], output=loss) < 1e-7
    program()
    mv, r = m.to_numpy(), x.to_numpy() - [0.1, 0.2, -0.1]
    inertia_np = np.einsum("p,pij->ij", mv, np.einsum("p,ij->pij", (r * r).sum(1), np.eye(3))
                           - np.einsum("pi,pj->pij", r, r))
    assert loss[None] == pytest.approx(np.trace(inertia_np @ inertia_np) / mv.sum() + mv.sum(), rel=1e-12)


def test_a_kernel_returning_an_integer_has_a_reverse(runtime):
    """`-> ti.i32`: the reverse kernel's cotangent parameter is an integer (nothing reads it);
    launching it, alone or from a Tape, once failed on a float cotangent."""
    x = ti.field(ti.f64, shape=4, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    x.from_numpy(np.linspace(0.1, 1.0, 4))

    @kd.kernel
    def count() -> ti.i32:
        c = 0
        for i in x:
            if x[i] > 0.5:
                c += 1
            loss[None] += x[i] ** 2
        return c

    with kd.Tape(loss):
        assert count() == 2
    np.testing.assert_allclose(x.grad.to_numpy(), 2 * x.to_numpy(), rtol=1e-13)
    count.reverse()
    assert count.forward() == (2, 0)


def test_transforms_are_reused_until_a_derivative_field_appears(runtime, monkeypatch):
    """Each transform step is cached by the derivative fields it saw: k.reverse.forward reuses the
    reverse that k.reverse built, and a read-only field that gets an adjoint after k.reverse ran
    gets its gradient from the next call (a reverse reused blindly would leave it zero)."""
    import kerndiff.ad.reverse as reverse_module
    n = 4
    xv, wv, v = np.linspace(0.1, 1.0, n), np.linspace(2.0, 3.0, n), np.linspace(-1.0, 1.0, n)
    x, w = ti.field(ti.f64, shape=n), ti.field(ti.f64, shape=n)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    x.from_numpy(xv)
    w.from_numpy(wv)

    @kd.kernel
    def k():
        for i in x:
            loss[None] += w[i] * ti.sin(x[i])

    reverses = []
    real = reverse_module.reverse_kernel
    monkeypatch.setattr(reverse_module, "reverse_kernel", lambda *a, **kw: reverses.append(1) or real(*a, **kw))
    kd.adjoint(x).fill(0)
    loss.grad[None] = 1
    k.reverse()
    assert len(reverses) == 1
    np.testing.assert_allclose(kd.adjoint(x).to_numpy(), wv * np.cos(xv), rtol=1e-13)

    kd.dual(x).from_numpy(v)
    kd.adjoint(x).fill(0)
    kd.dual(kd.adjoint(x)).fill(0)
    k.reverse.forward()
    assert len(reverses) == 1  # the reverse of k.reverse, reused
    np.testing.assert_allclose(kd.dual(kd.adjoint(x)).to_numpy(), -wv * np.sin(xv) * v, rtol=1e-13)

    kd.adjoint(w).fill(0)  # w is active from now on
    kd.adjoint(x).fill(0)
    k.reverse()
    assert len(reverses) == 2
    np.testing.assert_allclose(kd.adjoint(w).to_numpy(), np.sin(xv), rtol=1e-13)
    np.testing.assert_allclose(kd.adjoint(x).to_numpy(), wv * np.cos(xv), rtol=1e-13)


def test_integer_bit_atomics_and_compile_time_calls_run_in_the_primal_only(runtime):
    """Flags set with |=, ti.atomic_and and ti.atomic_xor on integer fields run in the primal, as
    Taichi runs them, and in no derivative kernel (xor would flip the bits back); ti.static_assert
    and ti.block_local (a GPU cache hint) do their work at compile time. An inlined function's
    parameter named like a field (ti.math.fract's x) takes another name: the field keeps its
    own, and the parameter's binding sits under the caller's line."""
    x = ti.field(ti.f64, shape=N)
    y = ti.field(ti.f64, shape=N)
    flags = ti.field(ti.i32, shape=N)
    mask = ti.field(ti.i32, shape=())
    xs = np.linspace(0.1, 0.9, N)
    x.from_numpy(xs)

    @kd.kernel
    def k():
        ti.static_assert(N == 6, "six elements")
        ti.block_local(x)
        for i in x:
            flags[i] |= 4
            ti.atomic_xor(flags[i], i)
            ti.atomic_and(mask[None], 7 - i % 2)
            y[i] = ti.math.fract(x[i] * 3.0) * x[i]

    kd.adjoint(x)
    kd.dual(x)
    flags.fill(1)
    mask[None] = 15
    k()
    expected_flags = (1 | 4) ^ np.arange(N)
    assert flags.to_numpy().tolist() == expected_flags.tolist()
    assert mask[None] == 6
    frac = xs * 3.0 - np.floor(xs * 3.0)
    np.testing.assert_allclose(y.to_numpy(), frac * xs, rtol=1e-14)
    kd.adjoint(y).fill(1.0)
    kd.dual(x).fill(1.0)
    k.reverse()
    k.forward()
    k.reverse.forward()
    np.testing.assert_allclose(kd.adjoint(x).to_numpy(), 3.0 * xs + frac, rtol=1e-13)
    np.testing.assert_allclose(kd.dual(y).to_numpy(), 3.0 * xs + frac, rtol=1e-13)
    assert flags.to_numpy().tolist() == ((expected_flags | 4) ^ np.arange(N)).tolist()  # the forward's pass only
    assert mask[None] == 6
    code = [line.strip() for line in k.source.splitlines() if not line.strip().startswith("#")]
    assert "ti.atomic_or(flags[i], 4)" in code and "ti.atomic_xor(flags[i], i)" in code, k.source
    assert "x_1 = x[i] * 3.0" in k.source, k.source
    line = "# y[i] = ti.math.fract(x[i] * 3.0) * x[i]"
    assert k.source.index(line) < k.source.index("x_1 = x[i] * 3.0"), k.source
    for derived in (k.reverse, k.reverse.forward):
        assert "flags" not in derived.source and "mask" not in derived.source, derived.source


def test_adds_summed_in_a_local_go_in_before_a_later_store(runtime):
    """An element added into in an inner loop and not read is summed in a local and added once at
    the end of the iteration (opt.finalize); a store into it after the adds must still win:
    `y[i] = 5.0` after them left 5 + the sum until session 30. A store before them still
    starts the sum."""
    x = ti.field(ti.f64, shape=3)
    y = ti.field(ti.f64, shape=4)
    z = ti.field(ti.f64, shape=4)
    x.from_numpy(np.array([1.0, 2.0, 3.0]))

    @kd.kernel
    def k():
        for i in range(4):
            z[i] = 0.5 * i
            for j in range(3):
                y[i] += x[j] * i
                z[i] += x[j]
            y[i] = 5.0 + i

    kd.dual(x).from_numpy(np.array([1.0, 1.0, 0.5]))
    y.fill(1.0)
    k()
    k.forward()
    np.testing.assert_array_equal(y.to_numpy(), 5.0 + np.arange(4))
    np.testing.assert_array_equal(z.to_numpy(), 0.5 * np.arange(4) + 6.0)
    np.testing.assert_array_equal(kd.dual(y).to_numpy(), np.zeros(4))
    np.testing.assert_array_equal(kd.dual(z).to_numpy(), np.full(4, 2.5))
    assert "z_acc" in k.source and "y_acc" not in k.source, k.source


def test_an_add_reading_what_an_earlier_add_wrote_is_not_merged_with_it(runtime):
    """Adds into one element within a block become one add of their sum (opt.finalize), but not
    when the later add's value reads the element: `y[i] += x[i]; y[i] += y[i] * x[i]` was
    generated as one add of `x[i] + y[i] * x[i]`, reading y[i] from before the first add, until
    session 31 (the primal was wrong, and the forward kernel with it). Found by a fuzzer of random
    multi-loop programs; checked here against Taichi's own kernel, the analytic tangent, and the
    gradient under kd.Tape (which restores y for the kernel's reverse) against the analytic one."""
    x = ti.field(ti.f64, shape=4)
    y = ti.field(ti.f64, shape=4)
    loss = ti.field(ti.f64, shape=())

    def update():
        for i in range(4):
            y[i] += x[i]
            y[i] += y[i] * x[i]

    @kd.kernel
    def measure():
        for i in range(4):
            loss[None] += y[i]

    rng = np.random.default_rng(3)
    x0, y0, tx, ty = (rng.uniform(-1, 1, 4) for _ in range(4))
    x.from_numpy(x0)
    y.from_numpy(y0)
    ti.kernel(update)()
    expected = y.to_numpy()
    np.testing.assert_allclose(expected, (y0 + x0) * (1 + x0), rtol=1e-14)
    k = kd.kernel(update)
    y.from_numpy(y0)
    k()
    np.testing.assert_array_equal(y.to_numpy(), expected)
    y.from_numpy(y0)
    kd.dual(x).from_numpy(tx)
    kd.dual(y).from_numpy(ty)
    k.forward()
    np.testing.assert_array_equal(y.to_numpy(), expected)
    np.testing.assert_allclose(kd.dual(y).to_numpy(), (ty + tx) * (1 + x0) + (y0 + x0) * tx, rtol=1e-14)
    y.from_numpy(y0)
    kd.adjoint(x)  # (x is a constant to the reverse without one)
    with kd.Tape(loss):
        k()
        measure()
    np.testing.assert_array_equal(y.to_numpy(), expected)
    np.testing.assert_allclose(kd.adjoint(x).to_numpy(), 1 + y0 + 2 * x0, rtol=1e-14)
    np.testing.assert_allclose(kd.adjoint(y).to_numpy(), 1 + x0, rtol=1e-14)


def test_an_add_before_a_continue_stays_before_it(runtime):
    """`s[None] += x[i]` then a `continue` that constant folding leaves unconditional (`if 0.7 >
    0.4: continue`) then another add: merging the adds moved the first past the continue, and the
    primal summed nothing (until session 31; found by the program fuzzer). Checked against
    Taichi's kernel, and the gradient against the analytic one."""
    x = ti.field(ti.f64, shape=4)
    s = ti.field(ti.f64, shape=())
    x.from_numpy(np.array([0.5, -1.0, 2.0, 0.25]))

    def total():
        for i, r in ti.ndrange(4, 3):
            s[None] += x[i] * x[i]
            if 0.7 > 0.4:
                continue
            s[None] += x[i] * 2.0

    ti.kernel(total)()
    expected = s[None]
    assert expected == pytest.approx(3 * np.sum(x.to_numpy() ** 2), rel=1e-15)
    k = kd.kernel(total)
    s[None] = 0.0
    k()
    assert s[None] == expected
    kd.adjoint(x).fill(0)
    kd.adjoint(s)[None] = 1.0
    k.reverse()
    np.testing.assert_allclose(kd.adjoint(x).to_numpy(), 6 * x.to_numpy(), rtol=1e-15)
    kd.adjoint(x).fill(0)


def test_a_local_summed_by_two_loops_has_a_reverse(runtime):
    """`total = 0.0`, then two parallel loops `total += ...`, then `s[None] = total * total`: the
    loops summed into one 0-d field, stored before each loop and read back after it, so the second
    loop overwrote what the first's read-back had read and reverse mode refused the kernel (until
    session 32; found by the program fuzzer). Each loop now has its own field. Checked against
    Taichi's kernel, the analytic gradient, the tangent, and H·v by k.reverse.forward."""
    x = ti.field(ti.f64, shape=4)
    w = ti.field(ti.f64, shape=3)
    s = ti.field(ti.f64, shape=())
    x0, w0 = np.array([0.5, -1.0, 2.0, 0.25]), np.array([0.3, 0.7, -0.2])
    x.from_numpy(x0)
    w.from_numpy(w0)

    def square_of_sum():
        total = 0.0
        for i in range(4):
            total += x[i] * x[i]
        for j in w:
            total += ti.sin(w[j])
        s[None] = total * total

    ti.kernel(square_of_sum)()
    total = np.sum(x0 ** 2) + np.sum(np.sin(w0))
    assert s[None] == pytest.approx(total ** 2, rel=1e-14)
    k = kd.kernel(square_of_sum)
    s[None] = 0.0
    k()
    assert s[None] == pytest.approx(total ** 2, rel=1e-14)
    for f in (x, w):
        kd.adjoint(f).fill(0)
    kd.adjoint(s)[None] = 1.0
    k.reverse()
    np.testing.assert_allclose(kd.adjoint(x).to_numpy(), 2 * total * 2 * x0, rtol=1e-14)
    np.testing.assert_allclose(kd.adjoint(w).to_numpy(), 2 * total * np.cos(w0), rtol=1e-14)
    tx, tw = np.array([1.0, 0.5, -0.25, 2.0]), np.array([0.1, -0.4, 0.8])
    kd.dual(x).from_numpy(tx)
    kd.dual(w).from_numpy(tw)
    k.forward()
    dtotal = np.sum(2 * x0 * tx) + np.sum(np.cos(w0) * tw)
    assert kd.dual(s)[None] == pytest.approx(2 * total * dtotal, rel=1e-14)
    for f in (x, w):
        kd.adjoint(f).fill(0)
        kd.dual(kd.adjoint(f)).fill(0)
    kd.adjoint(s)[None] = 1.0
    k.reverse.forward()  # H·t: d/dt of (2 total * 2x, 2 total * cos w)
    np.testing.assert_allclose(kd.dual(kd.adjoint(x)).to_numpy(), 4 * dtotal * x0 + 4 * total * tx, rtol=1e-13)
    np.testing.assert_allclose(kd.dual(kd.adjoint(w)).to_numpy(),
                               2 * dtotal * np.cos(w0) - 2 * total * np.sin(w0) * tw, rtol=1e-13)


def test_a_vector_component_summed_in_an_ndrange_loop(runtime):
    """`for i, r in ti.ndrange(4, 3): s[None] += v[i][0]`: the reverse adds `s_adj` into
    `v_adj[i][0]`, and with the 0-d adjoint read once before the loop Taichi 1.7.4 aborted the
    process compiling it ("IR broken: stmt SNodeLookupStmt cannot have operand BinaryOpStmt");
    found by the program fuzzer in session 32. The load now stays in such loops (opt.finalize)."""
    v = ti.Vector.field(2, ti.f64, shape=4)
    s = ti.field(ti.f64, shape=())
    v.from_numpy(np.arange(8.0).reshape(4, 2))

    @kd.kernel
    def total():
        for i, r in ti.ndrange(4, 3):
            s[None] += v[i][0] + 2.0 * v[i][1]

    s[None] = 0.0
    total()
    assert s[None] == pytest.approx(3 * np.sum(v.to_numpy() @ [1.0, 2.0]), rel=1e-15)
    kd.adjoint(v).fill(0)
    kd.adjoint(s)[None] = 0.5
    total.reverse()
    np.testing.assert_allclose(kd.adjoint(v).to_numpy(), np.tile([1.5, 3.0], (4, 1)), rtol=1e-15)


@pytest.mark.parametrize("counting", ["serial", "atomic"])
def test_tape_through_steps_that_bin_particles(runtime, counting):
    """Each step puts the particles into cells (an integer cell from the position), gives each
    its slot in its cell by a serial count (`slot[i] = count[c]; count[c] += 1`) or in parallel
    by the old value an atomic returns (`slot[i] = ti.atomic_add(count[c], 1)`, in the order the
    threads ran in: a kernel that writes integers only has nothing to reverse, so neither that
    order nor overwriting what it read matters), files the positions in a cell-by-slot table,
    and moves each particle by the others of its cell. Under kd.Tape over three steps, the slots
    and counts of each step are restored for its reverse (cells change between steps). Against
    central differences, order 1 and 2."""
    P, C, steps = 7, 3, 3
    p0 = ti.field(ti.f64, P)
    p = ti.field(ti.f64, P)
    moved = ti.field(ti.f64, P)
    cell, slot, count = ti.field(ti.i32, P), ti.field(ti.i32, P), ti.field(ti.i32, C)
    table = ti.field(ti.f64, (C, P))
    loss = ti.field(ti.f64, shape=())
    kd.adjoint(p0), kd.adjoint(p), kd.adjoint(moved), kd.adjoint(table), kd.adjoint(loss)

    @kd.kernel
    def start():
        for i in p:
            p[i] = p0[i]

    @kd.kernel
    def bin_serially():
        for c in count:
            count[c] = 0
        for i in p:
            cell[i] = ti.cast(ti.floor(p[i] * C), ti.i32) % C
        ti.loop_config(serialize=True)
        for i in range(P):
            c = cell[i]
            slot[i] = count[c]
            count[c] += 1

    @kd.kernel
    def bin_in_parallel():
        for c in count:
            count[c] = 0
        for i in p:
            c = ti.cast(ti.floor(p[i] * C), ti.i32) % C
            cell[i] = c
            slot[i] = ti.atomic_add(count[c], 1)

    bin_particles = bin_serially if counting == "serial" else bin_in_parallel

    @kd.kernel
    def file_and_move():
        for i in p:
            table[cell[i], slot[i]] = p[i]
        for i in p:
            c = cell[i]
            push = 0.0
            for k in range(count[c]):
                push += ti.sin(3.0 * (table[c, k] - p[i]))
            moved[i] = p[i] + 0.15 + 0.002 * push  # (a drift: the cells change from step to step)

    @kd.kernel
    def update():
        for i in p:
            p[i] = moved[i]

    @kd.kernel
    def measure():
        for i in p:
            loss[None] += p[i] ** 2 * (1.0 + 0.1 * i)

    def run():
        start()
        for _ in range(steps):
            bin_particles()
            file_and_move()
            update()
        measure()

    # cells at thirds of the unit (mod 3); every position of every step at least 0.03 from a
    # boundary, so that the differences' small changes keep the cells
    p0.from_numpy(np.array([0.47, 0.13, 0.62, 0.6, 0.08, 0.78, 0.76]))
    cells = []
    start()
    for _ in range(steps):
        bin_particles()
        assert np.abs(p.to_numpy() * C - np.round(p.to_numpy() * C)).min() > 0.1
        cells.append(cell.to_numpy())
        file_and_move()
        update()
    assert not np.array_equal(cells[0], cells[1]) and not np.array_equal(cells[1], cells[2])
    assert list(count.to_numpy()) == [2, 2, 3] and sorted(slot.to_numpy()[cells[2] == 2]) == [0, 1, 2]
    assert kd.check_grad(run, [p0], loss) < 1e-6
    assert kd.check_grad(run, [p0], loss, order=2) < 1e-5
    assert "count" not in bin_particles.reverse.source  # (nothing to reverse)
    if counting == "atomic":
        assert "count_old = ti.atomic_add(count[c_1], 1)" in bin_particles.source  # (c_1: the loop's c)
        assert "slot[i] = count_old" in bin_particles.source
        assert bin_particles.forward.source.replace("_forward(", "(") == bin_particles.source


def test_a_component_read_in_an_inner_loop_after_a_whole_vector_add(runtime):
    """`v[i] += ti.Vector([..., v[i][1]]) * s`, then v[i][1] read inside an inner loop, or in the
    very next statement: kerndiff's kernel reads the value after the add, as numpy does (its
    generated code adds the components one by one). Taichi 1.7.4's own kernel reads the value from
    before the add there (found by test_fuzz_programs, seed 3617 of a long run in session 54, and
    seed 65596 in session 55): if a canary's assertion fails, Taichi was fixed, and
    test_fuzz_programs' generator may draw such reads again. The derivatives against central
    differences (kd.check_grad of it as a program, order 2: it updates v in place, which kd.Tape
    restores for the reverse)."""
    v = ti.Vector.field(2, ti.f64, shape=4, needs_grad=True)
    y = ti.field(ti.f64, shape=4, needs_grad=True)

    def body():
        for i in range(4):
            t = v[i][0] ** 2 + 0.5
            v[i] += ti.Vector([t - 0.45, v[i][1]]) * t
            for j in range(1):
                y[i] *= 0.6 + v[i][1] * 0.5

    v0 = np.array([[0.3, 0.9], [-0.4, 0.2], [0.7, -0.5], [0.1, 0.6]])
    y0 = np.array([1.1, -0.7, 0.4, 0.9])
    t = v0[:, 0] ** 2 + 0.5
    v1 = v0 + np.stack([t - 0.45, v0[:, 1]], axis=1) * t[:, None]
    expected = y0 * (0.6 + v1[:, 1] * 0.5)
    for make in (ti.kernel, kd.kernel):
        v.from_numpy(v0)
        y.from_numpy(y0)
        make(body)()
        np.testing.assert_allclose(v.to_numpy(), v1, rtol=1e-14)
        right = np.allclose(y.to_numpy(), expected, rtol=1e-14)
        assert right if make is kd.kernel else (not right or TEST_ARCH != "cpu"), make  # (the canary: CPU)
    k = kd.kernel(body)
    v.from_numpy(v0)
    y.from_numpy(y0)
    assert kd.check_grad(lambda: k(), [v], y, order=2) < 1e-6  # (a program: kd.Tape restores v)

    def right_after():  # (the statement after the add: seed 65596 of a long run in session 55)
        for i in range(4):
            v[i] += ti.Vector([0.3, ti.sin(v[i][1])]) * y[i]
            y[i] *= v[i][1]

    v2 = v0 + np.stack([np.full(4, 0.3), np.sin(v0[:, 1])], axis=1) * y0[:, None]
    for make in (ti.kernel, kd.kernel):
        v.from_numpy(v0)
        y.from_numpy(y0)
        make(right_after)()
        right = np.allclose(y.to_numpy(), y0 * v2[:, 1], rtol=1e-14)
        assert right if make is kd.kernel else (not right or TEST_ARCH != "cpu"), make  # (the canary: CPU)
    k = kd.kernel(right_after)
    v.from_numpy(v0)
    y.from_numpy(y0)
    assert kd.check_grad(lambda: k(), [v], y, order=2) < 1e-6
