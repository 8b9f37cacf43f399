"""ti.polar_decompose of 3x3 matrices (frontend/polar.py): Taichi's rotation, refined by two Newton
steps whose derivatives are the rotation's. Values against Taichi's own and numpy's SVD; tangents
against the closed form dR = R ω̂, ((tr S) I - S) ω = axial(Rᵀ dA - dAᵀ R), at the identity and at
repeated singular values (where an SVD's own derivatives are undefined) and for det A < 0; the
reverse kernel by the dot-product test; second and third derivatives against finite differences
(two steps would give exact ones to the eighth order; past that the count of derivatives taken
refuses). (test_corpus runs a fixed-corotated energy on every transform path, and
test_vulkan on Taichi's SPIR-V backend.)"""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import check, make_derivative_fields, make_outer_duals, random_inner_directions

pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)

N = 6


def polar(A):
    """(R, S) as Taichi defines them: R a rotation (det 1), S symmetric, A = R S (for det A < 0
    the smallest singular value takes the sign)."""
    U, s, Vt = np.linalg.svd(A)
    if np.linalg.det(U @ Vt) < 0:
        U[:, -1] *= -1
        s[-1] *= -1
    return U @ Vt, Vt.T @ np.diag(s) @ Vt


def hat(w):
    return np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])


def polar_tangent(A, dA):
    """(dR, dS) in closed form."""
    R, S = polar(A)
    M = R.T @ dA
    w = np.linalg.solve(np.trace(S) * np.eye(3) - S, [M[2, 1] - M[1, 2], M[0, 2] - M[2, 0], M[1, 0] - M[0, 1]])
    return R @ hat(w), R.T @ dA - hat(w) @ S


def matrices(rng):
    """The identity, repeated singular values, det < 0, and random ones near the identity."""
    A = np.eye(3) + 0.3 * rng.standard_normal((N, 3, 3))
    A[0] = np.eye(3)
    A[1] = np.diag([1.0, 1.0, 2.0])
    A[2] = np.diag([1.0, 1.0, -1.0]) @ A[2]
    return A


@pytest.fixture(scope="module")
def setup(runtime):
    rng = np.random.default_rng(5)
    F = ti.Matrix.field(3, 3, ti.f64, shape=N)
    Wr, Ws = ti.Matrix.field(3, 3, ti.f64, shape=N), ti.Matrix.field(3, 3, ti.f64, shape=N)
    R, S = ti.Matrix.field(3, 3, ti.f64, shape=N), ti.Matrix.field(3, 3, ti.f64, shape=N)
    loss = ti.field(ti.f64, shape=())
    A = matrices(rng)
    F.from_numpy(A)
    Wr.from_numpy(rng.standard_normal((N, 3, 3)))
    Ws.from_numpy(rng.standard_normal((N, 3, 3)))

    def body():
        for i in F:
            r, s = ti.polar_decompose(F[i])
            R[i] = r
            S[i] = s
            loss[None] += (r * Wr[i]).sum() + ti.sin((s * Ws[i]).sum())

    return dict(F=F, Wr=Wr, Ws=Ws, R=R, S=S, loss=loss, A=A, k=kd.kernel(body), taichi=ti.kernel(body))


def test_values_are_taichis_rotation_polished(setup):
    s = setup
    s["taichi"]()
    taichi_R, taichi_S = s["R"].to_numpy(), s["S"].to_numpy()
    s["k"]()
    R, S = s["R"].to_numpy(), s["S"].to_numpy()
    for i, A in enumerate(s["A"]):
        np.testing.assert_allclose(R[i], taichi_R[i], atol=1e-9)
        np.testing.assert_allclose(S[i], taichi_S[i], atol=1e-9)
        ref_R, ref_S = polar(A)
        np.testing.assert_allclose(R[i], ref_R, atol=1e-13)
        np.testing.assert_allclose(S[i], ref_S, atol=1e-13)
        np.testing.assert_allclose(R[i] @ S[i], A, atol=1e-13)
        np.testing.assert_array_equal(S[i], S[i].T)
        assert np.linalg.det(R[i]) == pytest.approx(1.0, abs=1e-13)


def test_tangents_are_the_closed_form_and_reverse_is_their_transpose(setup):
    s = setup
    F, loss = s["F"], s["loss"]
    rng = np.random.default_rng(6)
    V = rng.standard_normal((N, 3, 3))
    Wr, Ws = s["Wr"].to_numpy(), s["Ws"].to_numpy()
    expected = 0.0
    for i, A in enumerate(s["A"]):
        _, S = polar(A)
        dR, dS = polar_tangent(A, V[i])
        expected += (dR * Wr[i]).sum() + np.cos((S * Ws[i]).sum()) * (dS * Ws[i]).sum()
    kd.dual(F).from_numpy(V)
    loss[None] = 0.0
    kd.dual(loss)[None] = 0.0
    s["k"].forward()
    assert kd.dual(loss)[None] == pytest.approx(expected, rel=1e-12)
    kd.adjoint(loss)[None] = 1.0
    kd.adjoint(F).fill(0)
    s["k"].reverse()
    assert np.sum(kd.adjoint(F).to_numpy() * V) == pytest.approx(expected, rel=1e-12)


def test_second_derivatives_against_finite_differences(setup):
    s = setup
    assert kd.check_grad(s["k"], inputs=[s["F"]], output=s["loss"], order=2) < 1e-6


def test_third_derivatives_against_finite_differences(runtime):
    """k.forward.forward.forward against finite differences of k.forward.forward: exact with two
    Newton steps (one step would be exact to the second order only, and fail this)."""
    F = ti.Matrix.field(3, 3, ti.f64, shape=2)
    out = ti.field(ti.f64, shape=())
    F.from_numpy(matrices(np.random.default_rng(7))[:2] + 0.1)

    @kd.kernel
    def k():
        for i in F:
            R, S = ti.polar_decompose(F[i])
            out[None] += R[0, 1] * S[2, 2] + R[2, 0]

    make_derivative_fields(k)
    make_outer_duals(k.forward)
    make_outer_duals(k.forward.forward)
    random_inner_directions(k)
    k()
    analytic, _ = check(k.forward.forward, "forward", rtol=1e-6, atol=1e-8)
    assert np.abs(np.concatenate([np.ravel(a) for a in analytic])).max() > 0.1


def test_derivatives_are_counted_and_refused_past_the_eighth(setup):
    """Each transform counts one more derivative in the op (k.reverse.forward: two); at the
    ninth, a KernDiffError names the statement. (Nine nested transforms of a real kernel would
    take minutes to build: the count is checked on the IR.)"""
    from kerndiff.ad.rules import count_derivative
    from kerndiff.errors import SrcLoc
    from kerndiff.ir import build as B
    from kerndiff.ir import nodes as IR
    from kerndiff.pipeline import kernel_ir
    from kerndiff.ir.walk import expr_children_of_stmt, iter_expr, iter_stmts

    ir = kernel_ir(setup["k"].reverse.forward, {})
    counts = {x.args[-1].value for s in iter_stmts(ir.body) for e in expr_children_of_stmt(s) for x in iter_expr(e)
              if isinstance(x, IR.Call) and x.op == "polar_rotation"}
    assert counts == {2}

    def rotation(taken):
        entries = tuple(B.var(f"a{k}", "f64") for k in range(9))
        call = IR.Call("f64", "polar_rotation", entries + (B.const(0, "i32"), B.const(taken, "i32")))
        return (IR.Assign("r", call, src=SrcLoc("user.py", 12, text="R, S = ti.polar_decompose(F[i])")),)

    assert count_derivative(rotation(7))[0].value.args[-1].value == 8
    with pytest.raises(kd.KernDiffError, match="derivative 9 of a 3x3 ti.polar_decompose") as info:
        count_derivative(rotation(8))
    assert 'user.py", line 12' in str(info.value) and "R, S = ti.polar_decompose(F[i])" in str(info.value)


def test_f32_matrices_in_an_f64_program_stay_f32(setup, runtime):
    """The refinement computes in the matrix's precision (its literals too), not the default
    float's; the values agree with the f64 ones to f32 accuracy."""
    s = setup
    F32 = ti.Matrix.field(3, 3, ti.f32, shape=N)
    R32 = ti.Matrix.field(3, 3, ti.f32, shape=N)
    out = ti.field(ti.f32, shape=())
    F32.from_numpy(s["A"].astype(np.float32))

    @kd.kernel
    def k():
        for i in F32:
            r, p = ti.polar_decompose(F32[i])
            R32[i] = r
            out[None] += r[0, 1] * p[1, 1]

    k()
    for i, A in enumerate(s["A"]):
        np.testing.assert_allclose(R32.to_numpy()[i], polar(A)[0], atol=2e-6)
    kd.adjoint(out)
    kd.dual(F32)
    k.forward()
    assert "f64" not in k.reverse.source and "f64" not in k.forward.source
    kd.check_grad(k, inputs=[F32], output=out)


def test_one_decomposition_per_kernel(setup):
    """Each kernel computes Taichi's rotation once, its nine entries from one call, also where
    derivative code puts tangents between them (each entry alone would be a whole SVD)."""
    k = setup["k"]
    for K in (k, k.forward, k.reverse, k.reverse.forward):
        assert K.source.count("polar_rotation(") == 1 and "polar_rotation_entry(" not in K.source, K


def test_gradient_of_a_device_function(runtime):
    """kd.grad of a @kd.func that decomposes its argument (the device-function transforms count
    derivatives too), against central differences of the function itself."""
    F, G = (ti.Matrix.field(3, 3, ti.f64, shape=()) for _ in range(2))
    out = ti.field(ti.f64, shape=())

    @kd.func
    def psi(A):
        R, S = ti.polar_decompose(A)
        return (A - R).norm_sqr() + S[0, 1] * R[1, 2]

    gpsi = kd.grad(psi)

    @kd.kernel
    def gradient():
        g, = gpsi(F[None])
        G[None] = g

    @kd.kernel
    def value():
        out[None] = psi(F[None])

    A = np.eye(3) + 0.3 * np.random.default_rng(9).standard_normal((3, 3))
    F.from_numpy(A)
    gradient()
    got = G.to_numpy()
    h, fd = 1e-6, np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            E = np.zeros((3, 3))
            E[i, j] = h
            F.from_numpy(A + E)
            value()
            plus = out[None]
            F.from_numpy(A - E)
            value()
            fd[i, j] = (plus - out[None]) / (2 * h)
    np.testing.assert_allclose(got, fd, rtol=1e-7, atol=1e-9)
    assert np.abs(got).max() > 0.1


def test_integer_matrices_and_sizes_taichi_lacks(runtime):
    """An integer matrix is decomposed in default_fp, as Taichi does; a 4x4 one is refused,
    naming the sizes there are."""
    M = ti.Matrix.field(3, 3, ti.i32, shape=())
    R = ti.Matrix.field(3, 3, ti.f64, shape=())
    M4 = ti.Matrix.field(4, 4, ti.f64, shape=())

    @kd.kernel
    def integer():
        r, _ = ti.polar_decompose(M[None])
        R[None] = r

    @kd.kernel
    def four():
        r, _ = ti.polar_decompose(M4[None])
        R[None][0, 0] = r[0, 0]

    A = np.array([[1, 2, 0], [0, 1, 0], [0, 0, 3]])
    M.from_numpy(A.astype(np.int32))
    integer()
    np.testing.assert_allclose(R.to_numpy(), polar(A.astype(float))[0], atol=1e-13)
    with pytest.raises(kd.KernDiffError, match=r"of 2x2 and 3x3 matrices only \(this one is 4x4\)"):
        four()


def test_where_the_newton_system_is_singular_the_values_are_taichis(runtime):
    """((tr S) I - S) is singular where two singular values sum to zero (det A < 0 with the two
    smallest equal: a reflection) or where A has rank one or less. The derivative does not exist
    there; the values must still be Taichi's (they were NaN, 0 / 0 in the step), and the
    derivatives finite (the reverse's were NaN)."""
    F, R, S = (ti.Matrix.field(3, 3, ti.f64, shape=4) for _ in range(3))

    def body():
        for i in F:
            r, s = ti.polar_decompose(F[i])
            R[i] = r
            S[i] = s

    F.from_numpy(np.array([np.diag([1.0, 1.0, -1.0]), np.diag([2.0, 1.0, -1.0]), np.zeros((3, 3)),
                           np.diag([1.0, 0.0, 0.0])]))
    ti.kernel(body)()
    expected = R.to_numpy(), S.to_numpy()
    k = kd.kernel(body)
    k()
    for got, want in zip((R.to_numpy(), S.to_numpy()), expected):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, atol=1e-15)
    # the derivatives there are those of Taichi's rotation held constant (the step's guarded
    # division keeps its derivatives under its guard): finite, and forward and reverse agree
    for f in (F, R, S):
        kd.adjoint(f), kd.dual(f)
    rng = np.random.default_rng(10)
    V, W = rng.standard_normal((2, 4, 3, 3))
    kd.dual(F).from_numpy(V)
    k.forward()
    kd.adjoint(R).from_numpy(W)
    kd.adjoint(S).fill(0)
    kd.adjoint(F).fill(0)
    k.reverse()
    tangent, gradient = kd.dual(R).to_numpy(), kd.adjoint(F).to_numpy()
    assert np.isfinite(tangent).all() and np.isfinite(gradient).all()
    assert np.sum(W * tangent) == pytest.approx(np.sum(gradient * V), rel=1e-12)
