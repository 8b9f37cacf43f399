"""DiffTaichi's diffmpm as its authors write it: 2-D MLS-MPM with a neo-Hookean-like stress through
`ti.polar_decompose`, the weights a Python list of vectors indexed by `ti.static` loops, grid
nodes addressed by a vector index (`grid_v_in[base + offset]`) and cleared with list stores
(`grid_v_in[i, j] = [0, 0]`). The same kernel functions decorated with `@kd.kernel` and with
`@ti.kernel`: kd.Tape's gradient of the loss with respect to the initial velocity against
Taichi's ti.ad.Tape and f64 central differences; also the list stores themselves.

The grid is one set of fields that every step overwrites. Under a plain ti.ad.Tape, g2p(s)'s
grad reads the last step's grid (Taichi's gradient here is then 1.2% off in x, and 5e-6 in y
where it is 0), so DiffTaichi's diffmpm recomputes each step's grid in its backward pass by hand
(`ti.ad.grad_replaced` / `ti.ad.grad_for`) and clears the grid's adjoints in clear_grid; the
Taichi reference does the same. kd.Tape needs nothing of the kind: it snapshots what later
kernels overwrite (API.md §5)."""
import re

import numpy as np
import pytest
import taichi as ti

import kerndiff as kd

pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)

DIM, PARTICLES, GRID, STEPS = 2, 12, 16, 5
DX = 1 / GRID
INV_DX = 1 / DX
DT, P_VOL, P_MASS, MU, LA, BOUND = 2e-3, 1.0, 1.0, 100.0, 100.0, 3


@pytest.fixture(scope="module")
def diffmpm(runtime):
    """(fields, {"kerndiff": kernels, "taichi": kernels}, reset): the simulation's fields and its
    kernels made both ways from one set of functions."""
    fields = dict(
        x=ti.Vector.field(DIM, float, shape=(STEPS, PARTICLES), needs_grad=True),
        v=ti.Vector.field(DIM, float, shape=(STEPS, PARTICLES), needs_grad=True),
        C=ti.Matrix.field(DIM, DIM, float, shape=(STEPS, PARTICLES), needs_grad=True),
        F=ti.Matrix.field(DIM, DIM, float, shape=(STEPS, PARTICLES), needs_grad=True),
        grid_v_in=ti.Vector.field(DIM, float, shape=(GRID, GRID), needs_grad=True),
        grid_m_in=ti.field(float, shape=(GRID, GRID), needs_grad=True),
        grid_v_out=ti.Vector.field(DIM, float, shape=(GRID, GRID), needs_grad=True),
        init_v=ti.Vector.field(DIM, float, shape=(), needs_grad=True),
        loss=ti.field(float, shape=(), needs_grad=True))
    x, v, C, F = fields["x"], fields["v"], fields["C"], fields["F"]
    grid_v_in, grid_m_in, grid_v_out = fields["grid_v_in"], fields["grid_m_in"], fields["grid_v_out"]
    init_v, loss = fields["init_v"], fields["loss"]

    def set_v():
        for i in range(PARTICLES):
            v[0, i] = init_v[None]

    def clear_grid():
        for i, j in grid_m_in:
            grid_v_in[i, j] = [0, 0]
            grid_m_in[i, j] = 0
            grid_v_out[i, j] = [0, 0]

    def p2g(f: ti.i32):
        for p in range(PARTICLES):
            base = ti.cast(x[f, p] * INV_DX - 0.5, ti.i32)
            fx = x[f, p] * INV_DX - ti.cast(base, ti.f64)
            w = [0.5 * (1.5 - fx) ** 2, 0.75 - (fx - 1) ** 2, 0.5 * (fx - 0.5) ** 2]
            new_F = (ti.Matrix.diag(dim=2, val=1) + DT * C[f, p]) @ F[f, p]
            F[f + 1, p] = new_F
            J = new_F.determinant()
            r, s = ti.polar_decompose(new_F)
            cauchy = 2 * MU * (new_F - r) @ new_F.transpose() + ti.Matrix.diag(2, LA * (J - 1) * J)
            stress = -(DT * P_VOL * 4 * INV_DX * INV_DX) * cauchy
            affine = stress + P_MASS * C[f, p]
            for i in ti.static(range(3)):
                for j in ti.static(range(3)):
                    offset = ti.Vector([i, j])
                    dpos = (ti.cast(ti.Vector([i, j]), ti.f64) - fx) * DX
                    weight = w[i][0] * w[j][1]
                    grid_v_in[base + offset] += weight * (P_MASS * v[f, p] + affine @ dpos)
                    grid_m_in[base + offset] += weight * P_MASS

    def grid_op():
        for i, j in grid_m_in:
            inv_m = 1 / (grid_m_in[i, j] + 1e-10)
            v_out = inv_m * grid_v_in[i, j]
            v_out[1] -= DT * 9.8
            if i < BOUND and v_out[0] < 0:
                v_out[0] = 0
            if i > GRID - BOUND and v_out[0] > 0:
                v_out[0] = 0
            if j < BOUND and v_out[1] < 0:
                v_out[1] = 0
            if j > GRID - BOUND and v_out[1] > 0:
                v_out[1] = 0
            grid_v_out[i, j] = v_out

    def g2p(f: ti.i32):
        for p in range(PARTICLES):
            base = ti.cast(x[f, p] * INV_DX - 0.5, ti.i32)
            fx = x[f, p] * INV_DX - ti.cast(base, ti.f64)
            w = [0.5 * (1.5 - fx) ** 2, 0.75 - (fx - 1.0) ** 2, 0.5 * (fx - 0.5) ** 2]
            new_v = ti.Vector([0.0, 0.0])
            new_C = ti.Matrix([[0.0, 0.0], [0.0, 0.0]])
            for i in ti.static(range(3)):
                for j in ti.static(range(3)):
                    dpos = ti.cast(ti.Vector([i, j]), ti.f64) - fx
                    g_v = grid_v_out[base[0] + i, base[1] + j]
                    weight = w[i][0] * w[j][1]
                    new_v += weight * g_v
                    new_C += 4 * weight * g_v.outer_product(dpos) * INV_DX
            v[f + 1, p] = new_v
            x[f + 1, p] = x[f, p] + DT * v[f + 1, p]
            C[f + 1, p] = new_C

    def compute_loss():
        for i in range(PARTICLES):
            loss[None] += (x[STEPS - 1, i][0] - 0.7) ** 2 / PARTICLES

    def clear_grid_and_its_adjoints():
        """DiffTaichi's clear_grid: each step's backward starts on zero grid adjoints."""
        for i, j in grid_m_in:
            grid_v_in[i, j] = [0, 0]
            grid_m_in[i, j] = 0
            grid_v_out[i, j] = [0, 0]
            grid_v_in.grad[i, j] = [0, 0]
            grid_m_in.grad[i, j] = 0
            grid_v_out.grad[i, j] = [0, 0]

    fns = [set_v, clear_grid, p2g, grid_op, g2p, compute_loss]
    kernels = {"kerndiff": [kd.kernel(fn) for fn in fns],
               "taichi": [ti.kernel(clear_grid_and_its_adjoints if fn is clear_grid else fn) for fn in fns]}
    kernels["kerndiff, clearing adjoints"] = [kd.kernel(clear_grid_and_its_adjoints) if fn is clear_grid else k
                                              for fn, k in zip(fns, kernels["kerndiff"])]
    x0 = np.zeros((STEPS, PARTICLES, 2))
    x0[0] = 0.3 + 0.2 * np.random.default_rng(0).random((PARTICLES, 2))

    def reset(velocity):
        x.from_numpy(x0)
        F.from_numpy(np.broadcast_to(np.eye(2), (STEPS, PARTICLES, 2, 2)).copy())
        C.fill(0)
        v.fill(0)
        loss[None] = 0
        init_v[None] = list(velocity)

    return fields, kernels, reset


def simulate(kernels):
    set_v, clear_grid, p2g, grid_op, g2p, compute_loss = kernels
    set_v()
    for s in range(STEPS - 1):
        clear_grid()
        p2g(s)
        grid_op()
        g2p(s)
    compute_loss()


def simulate_as_difftaichi(kernels):
    """The simulation with each step's backward recomputing that step's grid first, as
    DiffTaichi's diffmpm writes it for ti.ad.Tape."""
    set_v, clear_grid, p2g, grid_op, g2p, compute_loss = kernels

    @ti.ad.grad_replaced
    def advance(s):
        clear_grid()
        p2g(s)
        grid_op()
        g2p(s)

    @ti.ad.grad_for(advance)
    def advance_grad(s):
        clear_grid()
        p2g(s)
        grid_op()
        g2p.grad(s)
        grid_op.grad()
        p2g.grad(s)

    set_v()
    for s in range(STEPS - 1):
        advance(s)
    compute_loss()


def test_diffmpm_gradient_against_taichi_tape_and_finite_differences(diffmpm):
    fields, kernels, reset = diffmpm
    init_v, loss = fields["init_v"], fields["loss"]
    velocity = np.array([0.5, 0.3])
    grads, losses = {}, {}
    for system, tape, run in (("kerndiff", kd.Tape, simulate), ("taichi", ti.ad.Tape, simulate_as_difftaichi)):
        reset(velocity)
        with tape(loss):
            run(kernels[system])
        grads[system], losses[system] = init_v.grad.to_numpy(), loss[None]

    def loss_at(vel):
        reset(vel)
        simulate(kernels["kerndiff"])
        return loss[None]

    eps = 1e-6
    fd = np.array([(loss_at(velocity + eps * e) - loss_at(velocity - eps * e)) / (2 * eps) for e in np.eye(2)])
    assert losses["kerndiff"] == pytest.approx(losses["taichi"], rel=1e-12) and losses["kerndiff"] > 1e-3
    assert abs(grads["kerndiff"][0]) > 1e-3  # the particles move, and the loss feels it
    np.testing.assert_allclose(grads["kerndiff"], fd, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(grads["kerndiff"], grads["taichi"], rtol=1e-9, atol=1e-12)


def test_list_stores_into_vector_and_matrix_elements(runtime):
    """`x[i] = [a, b]`, `m[i] = [[...], [...]]`, `m[i] = [row, row]`, `x[i] += [...]`, `x[i] -= [...]`
    and `v += [...]` on a local take the list as ti.Vector / ti.Matrix of it, with derivatives; a
    list of the wrong length, or ragged rows, is refused naming the line."""
    n = 4
    a = ti.field(ti.f64, shape=n, needs_grad=True)
    x = ti.Vector.field(2, ti.f64, shape=n, needs_grad=True)
    m = ti.Matrix.field(2, 2, ti.f64, shape=n, needs_grad=True)
    out = ti.field(ti.f64, shape=(), needs_grad=True)
    av = np.linspace(0.2, 1.1, n)
    a.from_numpy(av)

    @kd.kernel
    def lists():
        for i in a:
            x[i] = [ti.sin(a[i]), a[i] ** 2]
            x[i] += [1.0, a[i]]
            x[i] -= [0.5, 0.0]
            local = ti.Vector([0.0, 0.0])
            local += [0.5, 0.0]
            x[i] += local
            m[i] = [[a[i], 2.0], [0.0, ti.exp(a[i])]]
        for i in a:
            out[None] += x[i].dot(x[i]) + m[i].determinant()

    lists()
    np.testing.assert_allclose(x.to_numpy(), np.stack([np.sin(av) + 1, av ** 2 + av], axis=1), rtol=1e-14)
    np.testing.assert_allclose(m.to_numpy()[:, 1, 1], np.exp(av), rtol=1e-14)
    expected = ((np.sin(av) + 1) ** 2 + (av ** 2 + av) ** 2 + av * np.exp(av)).sum()
    assert out[None] == pytest.approx(expected, rel=1e-13)
    assert kd.check_grad(lists, [a], out, order=2) < 1e-6

    @kd.kernel
    def rows_of_vectors():
        for i in a:
            r = ti.Vector([a[i], 1.0])
            m[i] = [r, 2.0 * r]

    rows_of_vectors()
    np.testing.assert_allclose(m.to_numpy()[:, 1], np.stack([2 * av, np.full(n, 2.0)], axis=1), rtol=1e-14)

    @kd.kernel
    def too_long():
        for i in a:
            x[i] = [a[i], 1.0, 2.0]

    with pytest.raises(kd.KernDiffError, match=r"storing shape \(3,\) into a field of shape \(2,\)") as e:
        too_long()
    assert "x[i] = [a[i], 1.0, 2.0]" in str(e.value)

    @kd.kernel
    def ragged():
        for i in a:
            m[i] = [[a[i], 1.0], [2.0]]

    with pytest.raises(kd.KernDiffError, match=r"the rows of this matrix have lengths \[2, 1\]"):
        ragged()


def test_diffmpm_with_its_own_backward_under_kd_tape(diffmpm):
    """DiffTaichi's diffmpm exactly as written for ti.ad.Tape (each step a @ti.ad.grad_replaced
    function whose @ti.ad.grad_for gradient recomputes the step's grid and calls the kernels'
    .grad), with kerndiff's kernels, under kd.Tape: the Tape calls the gradient function in the
    step's place, as ti.ad.Tape does. (It once reversed the kernels the function launched instead,
    and where those were plain ti.kernels, as in a custom adjoint solve, the gradient was zero.)"""
    fields, kernels, reset = diffmpm
    init_v, loss = fields["init_v"], fields["loss"]
    velocity = np.array([0.5, 0.3])
    grads = {}
    for system, tape, run in (("kerndiff", kd.Tape, simulate), ("as written", kd.Tape, simulate_as_difftaichi),
                              ("taichi", ti.ad.Tape, simulate_as_difftaichi)):
        reset(velocity)
        with tape(loss):
            run(kernels["kerndiff, clearing adjoints" if system == "as written" else system])
        grads[system] = init_v.grad.to_numpy()
    assert abs(grads["kerndiff"][0]) > 1e-3
    np.testing.assert_allclose(grads["as written"], grads["kerndiff"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(grads["as written"], grads["taichi"], rtol=1e-9, atol=1e-12)


def test_custom_gradients_under_kd_tape(runtime):
    """@ti.ad.grad_replaced / @ti.ad.grad_for and @ti.ad.no_grad inside kd.Tape, as inside
    ti.ad.Tape: the gradient function runs in the function's place (here a plain ti.kernel and
    its hand-written adjoint, which kd.Tape cannot see into), a no_grad function adds nothing;
    one nested in another, or one without a gradient function, is refused, and so is either
    kind inside kd.FwdMode, whose kernels would run without tangents."""
    x = ti.field(ti.f64, shape=4, needs_grad=True)
    y = ti.field(ti.f64, shape=4, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    xv = np.array([1.0, 2.0, -3.0, 0.5])
    x.from_numpy(xv)

    @ti.kernel
    def scale_plain(a: ti.f64):
        for i in x:
            y[i] = a * x[i]

    @ti.kernel
    def scale_plain_adjoint(a: ti.f64):
        for i in x:
            x.grad[i] += a * y.grad[i]

    @ti.ad.grad_replaced
    def scale(a):
        scale_plain(a)

    @ti.ad.grad_for(scale)
    def scale_grad(a):
        scale_plain_adjoint(a)

    @kd.kernel
    def squares():
        for i in y:
            loss[None] += ti.sin(y[i]) + x[i] ** 2

    @ti.ad.no_grad
    def squares_again():
        squares()

    results = {}
    for name, tape in (("taichi", ti.ad.Tape), ("kerndiff", kd.Tape)):
        with tape(loss):
            scale(3.0)
            squares() if tape is kd.Tape else ti.kernel(squares.fn)()
            squares_again() if tape is kd.Tape else None
        results[name] = (loss[None], x.grad.to_numpy())
    np.testing.assert_allclose(results["kerndiff"][1], 3.0 * np.cos(3.0 * xv) + 2 * xv, rtol=1e-12)
    np.testing.assert_allclose(results["kerndiff"][1], results["taichi"][1], rtol=1e-12)
    assert results["kerndiff"][0] == pytest.approx(2 * results["taichi"][0], rel=1e-12)  # squares ran twice

    @ti.ad.grad_replaced
    def nested():
        scale(2.0)

    @ti.ad.grad_for(nested)
    def nested_grad():
        pass

    @ti.ad.grad_replaced
    def without_gradient():
        squares()

    for fn, message in ((nested, "'scale' has a custom gradient (ti.ad.grad_replaced or no_grad) and was called "
                                 "inside another one, 'nested'"),
                        (without_gradient, "'without_gradient' is decorated with @ti.ad.grad_replaced but has no "
                                           "gradient function")):
        with pytest.raises(kd.KernDiffError, match=re.escape(message)) as info:
            with kd.Tape(loss):
                fn()
        assert "test_difftaichi.py" in str(info.value) and "Remedy:" in str(info.value)
    with pytest.raises(kd.KernDiffError, match=re.escape("'scale' has a custom reverse gradient")):
        with kd.FwdMode(loss=loss, param=x, seed=[1.0] * 4):
            scale(2.0)
