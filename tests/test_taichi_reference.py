"""kerndiff against Taichi's own AD (kernel.grad(), ti.ad.Tape, ti.ad.FwdMode) where Taichi supports
the kernel: the same Python function decorated both ways must give the same derivatives."""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd

N = 16


pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)


@pytest.fixture(scope="module")
def fields(runtime):
    rng = np.random.default_rng(0)
    x = ti.field(ti.f64, shape=N, needs_grad=True, needs_dual=True)
    pos = ti.Vector.field(2, ti.f64, shape=N, needs_grad=True, needs_dual=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True, needs_dual=True)
    x.from_numpy(rng.uniform(0.2, 1.0, N))
    pos.from_numpy(rng.standard_normal((N, 2)))
    return x, pos, loss


def both(fn):
    return ti.kernel(fn), kd.kernel(fn)


def test_elementwise_grad_and_fwd_mode_match_taichi(fields):
    x, pos, loss = fields

    def energy():
        for i in x:
            loss[None] += ti.sin(x[i]) ** 2 * ti.exp(x[i]) + ti.sqrt(x[i]) * ti.tanh(x[i])

    tk, kk = both(energy)
    with ti.ad.Tape(loss):
        tk()
    expected = x.grad.to_numpy()
    with kd.Tape(loss):
        kk()
    np.testing.assert_allclose(x.grad.to_numpy(), expected, rtol=1e-12)
    seed = [float(v) for v in np.linspace(-1, 1, N)]
    with ti.ad.FwdMode(loss=loss, param=x, seed=seed):
        tk()
    expected_dual = loss.dual[None]
    with kd.FwdMode(loss=loss, param=x, seed=seed):
        kk()
    xv = x.to_numpy()
    d = (2 * np.sin(xv) * np.cos(xv) * np.exp(xv) + np.sin(xv) ** 2 * np.exp(xv)
         + 0.5 / np.sqrt(xv) * np.tanh(xv) + np.sqrt(xv) * (1 - np.tanh(xv) ** 2))
    np.testing.assert_allclose(loss.dual[None], np.dot(d, seed), rtol=1e-12)
    np.testing.assert_allclose(loss.dual[None], expected_dual, rtol=1e-6)  # Taichi's own agrees to ~f32


def test_pairwise_vector_energy_matches_taichi_grad(fields):
    x, pos, loss = fields

    def pairs():
        for i in range(N):
            for j in range(i + 1, N):
                d = pos[i] - pos[j]
                loss[None] += 1.0 / (d.norm_sqr() + 0.5) + x[i] * x[j] * d.norm()

    tk, kk = both(pairs)
    loss[None] = 0
    tk()
    loss.grad[None] = 1
    x.grad.fill(0)
    pos.grad.fill(0)
    tk.grad()
    ex, ep = x.grad.to_numpy(), pos.grad.to_numpy()
    loss[None] = 0
    kk()
    x.grad.fill(0)
    pos.grad.fill(0)
    kk.grad()
    np.testing.assert_allclose(x.grad.to_numpy(), ex, rtol=1e-10)
    np.testing.assert_allclose(pos.grad.to_numpy(), ep, rtol=1e-10)


def test_long_recurrence_is_right_where_taichi_fails(fields):
    """A 1,000-step loop-carried `v = v * x[i]` (Taichi 1.7.4's AD stack overflows past 31 steps)."""
    x, pos, loss = fields
    r = ti.field(ti.f64, shape=3)
    out = ti.field(ti.f64, shape=())
    r.from_numpy(np.array([1.0005, 0.9995, 1.0002]))

    @kd.kernel
    def power():
        for i in r:
            v = 1.0
            for k in range(1000):
                v = v * r[i]
            out[None] += v

    g = kd.backward(power, inputs=[r], output=out)(r.to_numpy())[0]
    rv = np.array([1.0005, 0.9995, 1.0002])
    np.testing.assert_allclose(g, 1000 * rv ** 999, rtol=1e-10)
    t = kd.forward(power, inputs=[r], output=out)(rv, tangents=[np.ones(3)])
    np.testing.assert_allclose(t, np.sum(1000 * rv ** 999), rtol=1e-10)


def test_loop_invariant_local_before_dynamic_inner_loop(fields):
    """Taichi 1.7.4 gives such a local the adjoint of one iteration only; the true value is n times."""
    x, pos, loss = fields
    n = ti.field(ti.i32, shape=())
    out = ti.field(ti.f64, shape=())
    n[None] = 5

    @kd.kernel
    def k():
        for i in x:
            w = ti.sin(x[i])
            s = 0.0
            for j in range(n[None]):  # trip count known only at run time
                s += w * (j + 1)
            out[None] += s

    g = kd.backward(k, inputs=[x], output=out)(x.to_numpy())[0]
    np.testing.assert_allclose(g, 15 * np.cos(x.to_numpy()), rtol=1e-12)



def test_component_stores_into_vector_and_matrix_fields_match_taichi(runtime):
    """`v[i].y += ...`, `v[j].x += ...` (a scatter: atomic), `v[i][2] *= ...` and `m[i][0, 1] = ...`
    store one component of a field element; values and gradients as Taichi's kernel.grad()."""
    n = 8
    x = ti.field(ti.f64, shape=n, needs_grad=True)
    v = ti.Vector.field(3, ti.f64, shape=n, needs_grad=True)
    m = ti.Matrix.field(2, 2, ti.f64, shape=n, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    x.from_numpy(np.linspace(0.3, 1.1, n))

    def components():
        for i in x:
            v[i].y += x[i] * 3.0
            v[(i * 3 + 1) % n].x += x[i] ** 2  # several iterations add into one element
            m[i][0, 1] = ti.sin(x[i])
            m[i][1, 0] = x[i] * x[(i + 1) % n]

    def reduce():
        for i in x:
            loss[None] += v[i].dot(ti.Vector([1.0, 2.0, 3.0])) + (m[i] @ m[i]).sum() + v[i].x * v[i].y

    results = []
    for run in ((ti.kernel(components), ti.kernel(reduce), ti.ad.Tape),
                (kd.kernel(components), kd.kernel(reduce), kd.Tape)):
        comp, red, tape = run
        v.fill(0.5)
        m.fill(0.25)
        with tape(loss):
            comp()
            red()
        results.append((loss[None], x.grad.to_numpy(), v.to_numpy()))
    (l0, g0, v0), (l1, g1, v1) = results
    np.testing.assert_allclose(v1, v0, rtol=1e-14)
    assert l1 == pytest.approx(l0, rel=1e-13)
    np.testing.assert_allclose(g1, g0, rtol=1e-12)
    assert np.all(g1 != 0)
