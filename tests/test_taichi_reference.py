"""kerndiff against Taichi's own AD (kernel.grad(), ti.ad.Tape, ti.ad.FwdMode) where Taichi supports
the kernel: the same Python function decorated both ways must give the same derivatives."""
import re

import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import cpu_only

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


def values_of_both(fn, out):
    """fn as Taichi's kernel and as kerndiff's, each run on a zeroed `out`: [Taichi's, kerndiff's]."""
    got = []
    for k in both(fn):
        out.fill(0)
        k()
        got.append(out.to_numpy())
    return got


def grads_of_both(fn, inputs, loss):
    """fn as Taichi's kernel and as kerndiff's, each run and then its grad seeded with loss's
    adjoint 1: [(loss value, input gradients...)] for Taichi, then kerndiff."""
    results = []
    for k in both(fn):
        for f in inputs:
            f.grad.fill(0)
        loss[None] = 0
        k()
        loss.grad[None] = 1
        k.grad()
        results.append((loss[None],) + tuple(f.grad.to_numpy() for f in inputs))
    return results


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


def test_taichi_matrix_decompositions_match_taichi_grad(runtime):
    """ti.polar_decompose, ti.svd, ti.sym_eig and ti.eig of 2x2 matrices: Taichi picks a ti.func by
    size at compile time, and kerndiff inlines the same one; Taichi's own grad is the reference,
    and the Hessian-vector product is checked against finite differences of the gradient."""
    from harness import check

    n = 5
    rng = np.random.default_rng(3)
    M = ti.Matrix.field(2, 2, ti.f64, shape=n, needs_grad=True)
    S = ti.Matrix.field(2, 2, ti.f64, shape=n, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    a = rng.standard_normal((n, 2, 2)) + 2 * np.eye(2)
    M.from_numpy(a)
    b = rng.standard_normal((n, 2, 2))
    S.from_numpy(b + b.transpose(0, 2, 1))

    def decompositions():
        for i in M:
            U, P = ti.polar_decompose(M[i])
            W, sig, V = ti.svd(M[i], ti.f64)
            lam, vecs = ti.sym_eig(S[i])
            ev, _ = ti.eig(M[i])
            loss[None] += ((U @ ti.Vector([0.3, 0.7])).dot(ti.Vector([1.0, 2.0])) + P.trace() * P[0, 1]
                           + sig[0, 0] * 2.0 + sig[1, 1] + lam[0] * 1.5 + lam[1] + vecs[0, 0] ** 2
                           + ev[0, 0] * ev[1, 0])

    expected, got = grads_of_both(decompositions, [M, S], loss)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-10)
    assert np.abs(expected[1]).max() > 0.1 and np.abs(expected[2]).max() > 0.1
    check(kd.kernel(decompositions).reverse.forward, "forward", eps=1e-5, rtol=1e-5)


def test_decomposition_of_a_size_taichi_cannot_give_source_for_is_refused(runtime):
    """A 3x3 SVD: Taichi computes it with a builtin statement (and its U and V have no
    derivatives where singular values repeat). A 3x3 polar decomposition is supported: test_polar3."""
    M3 = ti.Matrix.field(3, 3, ti.f64, shape=2, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)

    @kd.kernel
    def svd3():
        for i in M3:
            U, sig, V = ti.svd(M3[i])
            loss[None] += U[0, 0]

    with pytest.raises(kd.KernDiffError, match=r"2x2 matrices only \(this one is 3x3\).*builtin statement") as e:
        svd3.reverse()
    assert "use ti.polar_decompose" in e.value.remedy


def test_whole_struct_elements_and_nested_structs_match_taichi(runtime):
    """`Q[i] = p` stores every member, nested structs too; `Outer(s=Inner(...))` builds a nested
    struct; `p.s.a = ...` and `p.s = Inner(...)` assign into a local's nested struct; and a local
    copy of an element is a copy all the way down (a later store into Q[i].s.a leaves p.s.a as it
    was: it used to read the new value). Values and gradients as Taichi's, under each one's Tape.
    The generated source names member fields by their path (`src_s_v`), not by the last name."""
    n = 5

    @ti.dataclass
    class Inner:
        a: ti.f64
        v: ti.math.vec2

    @ti.dataclass
    class Outer:
        s: Inner
        w: ti.f64

    src = Outer.field(shape=n, needs_grad=True)
    dst = Outer.field(shape=n, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    rng = np.random.default_rng(11)
    a0, v0, w0 = rng.uniform(0.5, 1.5, n), rng.uniform(0.5, 1.5, (n, 2)), rng.uniform(0.5, 1.5, n)

    def score(i):
        return dst.s.a[i] * dst.w[i] + dst.s.v[i].dot(ti.Vector([1.0, 2.0])) * dst.s.a[i]

    def agree(fn):
        results = []
        for tape, k in zip((ti.ad.Tape, kd.Tape), both(fn)):
            src.s.a.from_numpy(a0)
            src.s.v.from_numpy(v0)
            src.w.from_numpy(w0)
            for f in (dst.s.a, dst.s.v, dst.w):
                f.fill(0)
            with tape(loss):
                k()
            results.append([loss[None], dst.s.a.to_numpy(), dst.s.v.to_numpy(), dst.w.to_numpy(),
                            src.s.a.grad.to_numpy(), src.s.v.grad.to_numpy(), src.w.grad.to_numpy()])
        for expected, got in zip(*results):
            np.testing.assert_allclose(got, expected, rtol=1e-12)
        assert all(np.abs(g).max() > 0 for g in results[1][4:])

    def shifted_copy():
        for i in range(n):
            dst[i] = src[(i + 1) % n]
            loss[None] += dst.s.a[i] * dst.w[i] + dst.s.v[i].dot(ti.Vector([1.0, 2.0])) * dst.s.a[i] \
                + ti.sin(src[i].w)

    def built():
        for i in range(n):
            dst[i] = Outer(s=Inner(a=src[i].w * 2, v=src[i].s.v * src[i].s.a), w=ti.sin(src[i].s.a))
            loss[None] += dst.s.a[i] * dst.w[i] + dst.s.v[i].dot(ti.Vector([1.0, 2.0])) * dst.s.a[i]

    def local_nested_members():
        for i in range(n):
            p = src[i]
            p.s.a = p.s.a ** 2 + p.w
            p.s.v *= p.w
            p.s.v.x = p.s.v.y * 3
            p.s = Inner(a=p.s.v.x, v=p.s.v * p.s.a)
            dst[i] = p
            dst[i].w = p.w * p.s.a
            loss[None] += dst.s.a[i] * dst.w[i] + dst.s.v[i].dot(ti.Vector([1.0, 2.0])) * dst.s.a[i]

    for fn in (shifted_copy, built, local_nested_members):
        agree(fn)
    # Generated code names a member field by its path: src.s.v and src.w are `src_s_v`, `src_w`.
    source = kd.kernel(built).reverse.source
    assert "src_s_v[" in source and "dst_s_a_adj" in source and " v[" not in source

    out = ti.field(ti.f64, shape=n)

    def copy_is_deep():
        for i in range(n):
            p = dst[i]
            dst[i].s.a = 7.0
            out[i] = p.s.a + p.w

    got = []
    for k in both(copy_is_deep):
        dst.s.a.from_numpy(a0)
        dst.w.from_numpy(w0)
        k()
        got.append(out.to_numpy())
    np.testing.assert_array_equal(got[1], got[0])
    np.testing.assert_array_equal(got[1], a0 + w0)


def test_struct_fields_match_taichi_grad(runtime):
    """ti.Struct.field and ti.dataclass: a struct-for, member loads and stores through P[i].member,
    a whole element read into a local, against Taichi's own grad; and that local is a copy, as in
    Taichi: a later store into the element does not change it."""
    n = 6
    vec2 = ti.math.vec2

    @ti.dataclass
    class Body:
        pos: vec2
        mass: ti.f64

        @ti.func
        def kinetic(self, v):
            return 0.5 * self.mass * v.norm_sqr()

        @ti.func
        def spin(self, s):  # Taichi passes self by reference: the caller's struct changes
            self.pos = ti.Vector([-self.pos.y, self.pos.x]) * s
            self.mass *= s
            return self.mass

    bodies = Body.field(shape=n, needs_grad=True)
    state = ti.Struct.field({"vel": vec2, "work": ti.f64}, shape=n, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    rng = np.random.default_rng(5)
    pos0, mass0, vel0 = rng.standard_normal((n, 2)), rng.uniform(1, 2, n), rng.standard_normal((n, 2))

    def step():
        for i in bodies:
            b = bodies[i]
            state[i].work = b.mass * b.pos.norm_sqr()
            state[i].vel += ti.sin(b.pos) * bodies.mass[i]
            loss[None] += state[i].vel.dot(b.pos) + state[i].work * 0.5

    def reset():
        bodies.pos.from_numpy(pos0)
        bodies.mass.from_numpy(mass0)
        state.vel.from_numpy(vel0)
        state.work.fill(0)
        loss[None] = 0

    def taichi_and_kerndiff_agree(fn):
        """fn decorated both ways, each run under its system's Tape: the same results and gradients."""
        results = []
        for tape, k in zip((ti.ad.Tape, kd.Tape), both(fn)):
            reset()
            with tape(loss):
                k()
            results.append((bodies.pos.grad.to_numpy(), bodies.mass.grad.to_numpy(), state.vel.grad.to_numpy(),
                            state.work.to_numpy(), loss[None]))
        for expected, got in zip(*results):
            np.testing.assert_allclose(got, expected, rtol=1e-12)
        return results[1]

    assert all(np.abs(g).min() > 0 for g in taichi_and_kerndiff_agree(step)[:3])

    def methods():  # a struct built in the kernel, a member assigned, methods called on both
        for i in bodies:
            b = Body(pos=bodies[i].pos * 2.0, mass=bodies[i].mass)
            b.mass += 1.0
            loss[None] += b.kinetic(state[i].vel) + bodies[i].kinetic(b.pos)

    taichi_and_kerndiff_agree(methods)

    def method_assigning_self():
        for i in bodies:
            b = bodies[i]
            m = b.spin(1.5)
            loss[None] += b.pos.dot(state[i].vel) * m + b.mass

    taichi_and_kerndiff_agree(method_assigning_self)

    @kd.kernel
    def method_assigning_a_field_element():
        for i in bodies:
            loss[None] += bodies[i].spin(1.5)

    with pytest.raises(kd.KernDiffError, match="called on a field element"):
        method_assigning_a_field_element()

    def member_components():  # components of a copied element's vector member, assigned
        for i in bodies:
            b = bodies[i]
            for d in ti.static(range(2)):
                b.pos[d] = b.pos[d] * b.mass
            b.pos.y += 1.0
            loss[None] += b.pos.norm_sqr() + state[i].vel.dot(b.pos)

    taichi_and_kerndiff_agree(member_components)

    @kd.kernel
    def member_components_at_run_time():  # the same with a runtime index (Taichi's grad aborts)
        for i in bodies:
            b = bodies[i]
            for d in range(2):
                b.pos[d] = b.pos[d] * b.mass
            b.pos.y += 1.0
            loss[None] += b.pos.norm_sqr() + state[i].vel.dot(b.pos)

    reset()
    assert kd.check_grad(member_components_at_run_time, [bodies.pos, bodies.mass, state.vel], loss) < 1e-6

    @kd.kernel
    def flatten():
        for i in bodies:
            b = bodies[i]
            bodies[i].pos.x = 0.0
            loss[None] += b.pos.x ** 2 * b.mass + bodies[i].pos.y

    reset()
    with kd.Tape(loss):
        flatten()
    np.testing.assert_allclose(loss[None], np.sum(pos0[:, 0] ** 2 * mass0 + pos0[:, 1]), rtol=1e-12)
    np.testing.assert_array_equal(bodies.pos.to_numpy()[:, 0], 0.0)
    np.testing.assert_allclose(bodies.pos.grad.to_numpy(), np.stack([2 * pos0[:, 0] * mass0, np.ones(n)], 1),
                               rtol=1e-12)
    np.testing.assert_allclose(bodies.mass.grad.to_numpy(), pos0[:, 0] ** 2, rtol=1e-12)


def test_components_indexed_at_run_time(runtime):
    """`for d in range(3): v[d]`: Taichi indexes vector and matrix components with runtime values;
    kerndiff selects among the (few) components on reads and updates the matching one on writes.
    Reads against Taichi's grad; writes (locals, field components, matrix rows) against numpy and
    finite differences."""
    from harness import check, check_path

    n = 4
    rng = np.random.default_rng(7)
    x = ti.Vector.field(3, ti.f64, shape=n, needs_grad=True)
    m = ti.Matrix.field(2, 3, ti.f64, shape=n, needs_grad=True)
    y = ti.Vector.field(3, ti.f64, shape=n, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    xv, mv = rng.random((n, 3)), rng.random((n, 2, 3))
    x.from_numpy(xv)
    m.from_numpy(mv)

    def reads():
        for i in x:
            v = x[i] * 2.0
            for d in range(3):
                loss[None] += x[i][d] ** 2 * (d + 1) + v[d] * m[i][d % 2, 2 - d]

    tk, kk = both(reads)
    for k in (tk, kk):
        loss[None] = 0
        k()
        if k is tk:
            expected = loss[None]
    np.testing.assert_allclose(loss[None], expected, rtol=1e-12)
    # Taichi's own grad of this kernel is wrong (x.grad has only its last component), so the
    # derivative reference is analytic, and finite differences
    x.grad.fill(0)
    m.grad.fill(0)
    loss.grad[None] = 1
    kk.grad()
    d = np.arange(3)
    picked = mv[:, d % 2, 2 - d]
    np.testing.assert_allclose(x.grad.to_numpy(), 2 * xv * (d + 1) + 2 * picked, rtol=1e-12)
    m_grad = np.zeros_like(mv)
    m_grad[:, d % 2, 2 - d] = 2 * xv
    np.testing.assert_allclose(m.grad.to_numpy(), m_grad, rtol=1e-12)
    check(kk, "reverse")
    check_path(kk, "reverse", "forward")
    # m[i][d % 2, 2 - d] reaches (0, 2), (1, 1) and (0, 0) only; each adjoint is added under the
    # one condition of its branch, reading what that branch fixes (not the whole select chain)
    src = kk.reverse.source
    assert "m[i][1, 0]" not in src and "m_adj[i][0, 1]" not in src and "if not" not in src, src
    assert re.search(r"if d == 0:\n +v_0_adj = v_0_adj \+ (m\[i\]\[0, 2\]|m_i_0_2) \* loss_adj_v\n", src), src

    @kd.kernel
    def writes():
        for i in x:
            v = ti.Vector([0.0, 0.0, 0.0])
            A = m[i]
            for d in range(3):
                v[d] = x[i][(d + 1) % 3] * (d + 1.0)
                v[d] += 0.5 * v[d] ** 2
                A[d % 2, d] = A[d % 2, d] * v[d]
            for r in range(2):
                A[r] = A[r] + 1.0
            for d in range(3):
                y[i][2 - d] = v[d] * x[i][d] + A[1, d]

    writes()
    w = np.roll(xv, -1, axis=1) * np.arange(1.0, 4.0)
    w = w + 0.5 * w ** 2
    A = mv.copy()
    for d in range(3):
        A[:, d % 2, d] *= w[:, d]
    A += 1.0
    np.testing.assert_allclose(y.to_numpy()[:, ::-1], w * xv + A[:, 1, :], rtol=1e-12)
    check(writes, "reverse")
    check(writes, "forward")


@cpu_only("Taichi 1.7.4's grad of `v @ M` is zero on CUDA (it loads a matmul temporary before storing it)")
def test_elementwise_vector_operations_match_taichi_grad(runtime):
    """ti.select with a vector condition, ti.max/ti.min of vectors, v @ M, the 2-d cross product,
    elementwise powers and matrix powers, against Taichi's grad."""
    n = 4
    rng = np.random.default_rng(8)
    v = ti.Vector.field(3, ti.f64, shape=n, needs_grad=True)
    M = ti.Matrix.field(3, 3, ti.f64, shape=n, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    v.from_numpy(rng.standard_normal((n, 3)))
    M.from_numpy(rng.standard_normal((n, 3, 3)))

    def vector_ops():
        for i in v:
            a = v[i]
            b = ti.max(a, 0.1 * a) + ti.min(a, ti.Vector([0.2, 0.3, 0.4]))
            c = a @ M[i]
            d = ti.select(a > 0, a, -0.5 * a)
            e = ti.math.cross(ti.Vector([a.x, a.y]), ti.Vector([c.x, c.y]))
            f = ti.abs(a) ** 1.5 + a.dot(M[i] @ a)
            loss[None] += b.sum() + c.norm() + d.dot(a) + e + f.sum() + (M[i] ** 2).sum()

    for expected, got in zip(*grads_of_both(vector_ops, [v, M], loss)):
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_a_local_reassigned_from_itself_reads_its_old_value(runtime):
    """`v = M @ v`, `v = v.normalized()`, `v = ti.Vector([v.y, -v.x, v.z])`, `p, q = q, p`,
    `s.x, s.y = s.y, s.x`, `c = d = c.yzx * a`, a struct member rotated in place and
    ti.math.rot_by_axis (which does `axis = normalize(axis)`): every right side is evaluated before
    any component changes, as in Taichi. kerndiff once assigned the components one after another,
    so later ones read the new values: wrong results without a word. Values and gradients against
    Taichi's."""
    n = 3
    rng = np.random.default_rng(12)
    v = ti.Vector.field(3, ti.f64, shape=n, needs_grad=True)
    M = ti.Matrix.field(3, 3, ti.f64, shape=n, needs_grad=True)
    a = ti.field(ti.f64, shape=n, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    v.from_numpy(rng.standard_normal((n, 3)))
    M.from_numpy(rng.standard_normal((n, 3, 3)))
    a.from_numpy(rng.standard_normal(n))
    Body = ti.types.struct(vel=ti.math.vec2, m=ti.f64)

    def self_reassigned():
        for i in v:
            w = v[i]
            w = M[i] @ w
            u = v[i]
            u = u.normalized()
            r = v[i]
            r = ti.Vector([r.y, -r.x, r.z]) * a[i] + r
            p, q = a[i], w.x
            p, q = q, p
            s = v[i]
            s.x, s.y = s.y * 2.0, s.x
            b = Body(vel=ti.Vector([v[i].x, a[i]]), m=1.0)
            b.vel = ti.Vector([b.vel.y, -b.vel.x]) * b.vel.norm()
            R = ti.math.rot_by_axis(v[i], a[i])
            c = v[i]
            c = d = c.yzx * a[i]  # chained: one value, computed before c changes
            loss[None] += w.dot(ti.Vector([1.0, 2.0, 3.0])) + u.x * 3.0 + r.norm_sqr() + p * 5.0 + q \
                + s.dot(ti.Vector([1.0, -1.0, 0.5])) + b.vel.x * 2.0 + b.vel.y \
                + (R @ ti.Vector([1.0, 0.0, 0.0, 1.0])).y + c.x * d.y

    for expected, got in zip(*grads_of_both(self_reassigned, [v, M, a], loss)):
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_ti_func_arguments_are_passed_by_value(runtime):
    """A ti.func that assigns components of its vector parameter (`v[0] = v[1]`, `v.y *= s`)
    changes its own copy, as in Taichi; kerndiff once wrote through to the caller's local. A
    ti.template() parameter is the caller's local itself, as in Taichi (kerndiff once copied it)."""
    n = 3
    v = ti.Vector.field(2, ti.f64, shape=n, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    v.from_numpy(np.random.default_rng(13).standard_normal((n, 2)))

    @ti.func
    def shuffle(p, s):
        p[0] = p[1] * s
        p.y *= s
        return p.sum()

    @ti.func
    def shuffle_in_place(p: ti.template(), s: ti.template()):  # template arguments: by reference
        p[0] = p[1] * s
        s += p.x

    def by_value():
        for i in v:
            w = v[i]
            r = shuffle(w, 3.0)
            u = v[i] * 2.0
            c = v[i].y
            shuffle_in_place(u, c)
            loss[None] += w.x * 5.0 + w.y * w.y + r * w.x + u.x * u.y + c * c

    for expected, got in zip(*grads_of_both(by_value, [v], loss)):
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_a_task_function_passed_to_a_neighbour_loop_accumulates_by_reference(runtime):
    """The SPH idiom (DFSPH_difftaichi's boundary volumes): a ti.func loops over neighbours and
    calls a task ti.func it was given as an argument, which adds into the caller's local through a
    ti.template() parameter; the task's kernel value through a ti.func that starts from
    `ti.cast(0.0, ti.f32)` (a local that stays f32, as in Taichi) and a `ti.pow`. Against Taichi's
    kernel.grad()."""
    n = 6
    x = ti.field(ti.f64, shape=n, needs_grad=True)
    volume = ti.field(ti.f64, shape=n, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    x.from_numpy(np.linspace(0.1, 0.9, n) + np.random.default_rng(4).uniform(-0.03, 0.03, n))

    @ti.func
    def smoothing(r):
        res = ti.cast(0.0, ti.f32)
        q = r / 0.5
        if q <= 1.0:
            res = 2 * ti.pow(1 - q, 3.0)
        return res

    @ti.func
    def add_weight(p_i, p_j, delta: ti.template()):
        delta += smoothing(ti.abs(x[p_i] - x[p_j]))

    @ti.func
    def for_all_neighbours(p_i, task: ti.template(), ret: ti.template()):
        for p_j in range(n):
            if p_j != p_i:
                task(p_i, p_j, ret)

    def volumes():
        for p_i in range(n):
            delta = smoothing(0.0)
            for_all_neighbours(p_i, add_weight, delta)
            volume[p_i] = 1.0 / delta * 3.0
        for i in range(n):
            loss[None] += volume[i] * x[i]

    (t_loss, t_grad), (k_loss, k_grad) = grads_of_both(volumes, [x], loss)
    assert k_loss == pytest.approx(t_loss, rel=1e-12) and np.abs(t_grad).max() > 0.1
    np.testing.assert_allclose(k_grad, t_grad, rtol=1e-12)


def test_norm_safeguards_match_taichi(runtime):
    """v.norm(eps), v.norm_inv(eps) and v.normalized(eps) with Taichi's placement of eps (under the
    root for norm, outside it for normalized), at a zero vector too, where the eps keeps norm's
    gradient finite (kerndiff once dropped the argument: NaN there, slightly off elsewhere)."""
    v = ti.Vector.field(3, ti.f64, shape=3, needs_grad=True)
    eps = ti.field(ti.f64, shape=())
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    v.from_numpy(np.array([[0.0, 0.0, 0.0], [0.1, -0.2, 0.3], [0.0, 0.0, 1e-3]]))
    eps[None] = 1e-4

    def safeguards():
        for i in v:
            w = ti.Matrix.diag(3, v[i].x) @ v[i] + v[i]
            loss[None] += v[i].norm(1e-6) + w.norm_inv(0.01) + (v[i] + 1.0).normalized(eps=eps[None]).dot(
                ti.Vector([1.0, 2.0, 3.0])) + (v[i] - 1.0).normalized(1e-3).y \
                + ti.Vector.normalized(v[i] + 2.0, 1e-3).x + ti.Vector.norm(v[i], eps=1e-6)  # through the class

    for expected, got in zip(*grads_of_both(safeguards, [v], loss)):
        assert np.all(np.isfinite(expected))
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_rounding_to_an_integer_type_and_keyword_arguments(runtime):
    """ti.floor/ceil/round(x, dtype) give integers (usable as indices and with bit operators),
    positional or by keyword, and ti.cast(x, dtype=...), as in Taichi (kerndiff once refused the
    positional dtype and dropped the keyword one). Values and gradients against Taichi's."""
    a = ti.field(ti.f64, shape=4, needs_grad=True)
    v = ti.Vector.field(2, ti.f64, shape=4, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    a.from_numpy(np.array([1.7, -2.3, 0.4, 3.9]))
    v.from_numpy(np.array([[1.7, -2.3], [0.4, 3.9], [2.5, -0.5], [1.2, 7.7]]))

    def rounding():
        for i in a:
            k = ti.floor(a[i], ti.i32) & 3
            m = ti.ceil(a[i], dtype=ti.i32) % 4
            r = ti.floor(v[i] + 0.5, ti.i32)
            c = ti.cast(a[i] * 2.0, dtype=ti.i32)
            loss[None] += a[k] * a[i] + v[m].dot(v[i]) * (r.x ^ 1) + a[i] * (c // 3) + ti.sqrt(x=a[i] ** 2)

    for expected, got in zip(*grads_of_both(rounding, [a, v], loss)):
        np.testing.assert_allclose(got, expected, rtol=1e-12)

    def round_values():  # Taichi's grad has no rule for round: values only
        for i in v:
            loss[None] += a[i] * (ti.round(v[i], dtype=ti.i32) ^ 1).sum()

    values = []
    for k in both(round_values):
        loss[None] = 0
        k()
        values.append(loss[None])
    np.testing.assert_allclose(values[1], values[0], rtol=1e-12)
    assert values[0] != 0


def test_python_lists_repeat_and_join_as_in_taichi(fields):
    """In a Taichi kernel `[0.0] * 4` is a Python list of four zeros and `[a] + [b]` joins two lists
    (kerndiff once multiplied the one-element list elementwise: a 1-vector, silently). Values and
    gradients against Taichi's; with components chosen at run time, values against Taichi's and
    gradients against finite differences."""
    x, _, loss = fields

    def lists():
        for i in x:
            w = ti.Vector([x[i]] * 3 + [1.0, x[(i + 1) % N]])
            p = ti.Vector((x[i], 2.0) * 2)
            loss[None] += w.dot(ti.Vector([1.0, 2.0, 3.0, 4.0, 5.0])) * w.norm() + p.norm_sqr() * w[4]

    for expected, got in zip(*grads_of_both(lists, [x], loss)):
        np.testing.assert_allclose(got, expected, rtol=1e-12)

    def runtime_chosen():
        for i in x:
            arr = ti.Vector([0.0] * 4)
            for k in range(4):
                arr[k] = x[(i + k) % N] * (k + 1)
            s = 0.0
            for k in range(4):
                s += arr[k] * arr[3 - k]
            loss[None] += s

    values = []
    for k in both(runtime_chosen):  # Taichi's grad of this aborts in its scalarize pass: values only
        loss[None] = 0
        k()
        values.append(loss[None])
    np.testing.assert_allclose(values[1], values[0], rtol=1e-12)
    assert kd.check_grad(kd.kernel(runtime_chosen), [x], loss) < 1e-6


def test_a_runtime_index_is_read_before_the_components_it_chooses_change(runtime):
    """v[int(v[0])] = 1.0 with v[0] == 0 writes v[0] only: the index is taken once, before the
    write, as in Taichi (choosing again after writing v[0] would write v[1] too)."""
    x = ti.Vector.field(2, ti.f64, shape=2)
    y = ti.Vector.field(2, ti.f64, shape=2)

    def k():
        for i in x:
            v = x[i]
            v[int(v[0])] = 1.0
            y[i] = v
            x[i][int(x[i][0])] = 1.0

    results = []
    for kernel in both(k):
        x.from_numpy(np.array([[0.0, 5.0], [1.0, 7.0]]))
        kernel()
        results.append((y.to_numpy(), x.to_numpy()))
    for expected, got in zip(*results):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(results[1][0], [[1.0, 5.0], [1.0, 1.0]])


def test_a_field_vector_updated_in_place_reads_its_old_components(runtime):
    """`x[i] = M[i] @ x[i]`, `x[i] = x[i].normalized()`, `q[i] += ti.Vector([q[i].y, -q[i].x])`: a
    vector is stored one component at a time, and the right side must see the components as they
    were (kerndiff once read the ones it had just stored). Values against Taichi's; gradients of
    the in-place update under kd.Tape against f64 finite differences (Taichi's own AD needs the
    values an in-place store overwrites, so it is not the reference here)."""
    n = 3
    rng = np.random.default_rng(14)
    x = ti.Vector.field(2, ti.f64, shape=n, needs_grad=True)
    q = ti.Vector.field(2, ti.f64, shape=n, needs_grad=True)
    M = ti.Matrix.field(2, 2, ti.f64, shape=n, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    x0, q0, m0 = rng.standard_normal((n, 2)), rng.standard_normal((n, 2)), rng.standard_normal((n, 2, 2))

    def rotate():
        for i in x:
            x[i] = M[i] @ x[i]
            x[i] = x[i].normalized() * (1.0 + x[i].x ** 2)
            q[i] += ti.Vector([q[i].y, -q[i].x]) * x[i].y
            M[i] = M[i] @ M[i]

    def measure():
        for i in x:
            loss[None] += x[i].dot(ti.Vector([1.0, 2.0])) + q[i].norm_sqr() + M[i].sum()

    def run(make, xs=x0, qs=q0, tape=False):
        x.from_numpy(xs)
        q.from_numpy(qs)
        M.from_numpy(m0)
        loss[None] = 0
        step, final = make(rotate), make(measure)
        if tape:
            with kd.Tape(loss):
                step()
                final()
        else:
            step()
            final()
        return loss[None]

    expected = run(ti.kernel)
    final_x = x.to_numpy()
    assert run(kd.kernel, tape=True) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(x.to_numpy(), final_x, rtol=1e-12)
    gx, gq = x.grad.to_numpy(), q.grad.to_numpy()
    h = 1e-6
    d, e = rng.standard_normal((n, 2)), rng.standard_normal((n, 2))
    fd = (run(kd.kernel, x0 + h * d, q0 + h * e) - run(kd.kernel, x0 - h * d, q0 - h * e)) / (2 * h)
    assert np.sum(gx * d) + np.sum(gq * e) == pytest.approx(fd, rel=1e-6)

    history = ti.Vector.field(2, ti.f64, shape=(3, n))

    @kd.kernel
    def advance():  # another time slice of the field cannot be the stored element: no copies
        for i in range(n):
            history[1, i] = history[0, i].yx * 0.5
            history[2, i] = history[2, i].yx + history[1, i]

    start = np.arange(6 * n, dtype=np.float64).reshape(3, n, 2)
    history.from_numpy(start)
    advance()
    np.testing.assert_allclose(history.to_numpy()[1], start[0, :, ::-1] * 0.5)
    np.testing.assert_allclose(history.to_numpy()[2], start[2, :, ::-1] + start[0, :, ::-1] * 0.5)
    src = advance.source
    assert "history[1, i][0] = history[0, i][1] * 0.5" in src and src.count("history_new") == 4, src


def test_boundary_ternaries_add_their_adjoints_only_inside(runtime):
    """`u[i - 1] if i > 0 else 0.0` reads outside the field at i = 0, as in Taichi, where the value
    is then discarded; its adjoint is added under the condition (`if i > 0: u_adj[i - 1] += ...`),
    not as an atomic add of zero that writes outside the field; also where the select's value
    reaches a square root (its partial then multiplies by mul_or_zero). Gradients against
    Taichi's and the HVP against finite differences."""
    n = 6
    u = ti.field(ti.f64, shape=n, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    u.from_numpy(np.random.default_rng(15).standard_normal(n))

    def diffusion():
        for i in u:
            left = u[i - 1] if i > 0 else 0.0
            right = ti.select(i < n - 1, u[i + 1], 0.0)
            loss[None] += (left + right - 2.0 * u[i]) ** 2 * ti.exp(0.1 * u[i]) + ti.sqrt(1.0 + left * left)

    for expected, got in zip(*grads_of_both(diffusion, [u], loss)):
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    k = kd.kernel(diffusion)
    src = k.reverse.source
    assert "if i > 0:" in src and "if i < 5:" in src and "+= ti.select" not in src, src
    assert kd.check_grad(k, [u], loss, order=2) < 1e-6


def test_vector_and_matrix_kernel_parameters(runtime):
    """`g: ti.math.vec2, A: ti.math.mat2` parameters, passed as Taichi vectors, lists or arrays:
    values and gradients against Taichi's, the HVP against finite differences; a wrong shape is
    refused."""
    x = ti.Vector.field(2, ti.f64, shape=3, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    x.from_numpy(np.array([[1.0, 2.0], [3.0, 4.0], [0.5, -1.0]]))

    def pushed(g: ti.math.vec2, A: ti.math.mat2, s: ti.f64):
        for i in x:
            loss[None] += (A @ x[i] + g * s).norm_sqr() * ti.exp(0.1 * x[i].x)

    g, A = ti.math.vec2(0.1, -9.8), ti.math.mat2([[1.0, 0.5], [0.2, 2.0]])
    results = []
    for k in both(pushed):
        x.grad.fill(0)
        loss[None] = 0
        k(g, A, 0.5)
        loss.grad[None] = 1
        k.grad(g, A, 0.5)
        results.append((loss[None], x.grad.to_numpy()))
    for expected, got in zip(*results):
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    k = kd.kernel(pushed)
    loss[None] = 0
    k([0.1, -9.8], np.array([[1.0, 0.5], [0.2, 2.0]]), 0.5)
    assert loss[None] == pytest.approx(results[0][0], rel=1e-12)
    assert kd.check_grad(k, [x], loss, args=(g, A, 0.5), order=2) < 1e-6
    with pytest.raises(kd.KernDiffError, match=r"argument 'g' of pushed must have shape \(2,\)"):
        k([0.1], A, 0.5)


def test_slices_of_vectors_and_matrices(runtime):
    """`A[1, :]`, `A[:, 2]`, `A[0:2, 1:3]`, `v[1:3]` with compile-time bounds, as Taichi allows
    (refused before). Values and gradients against Taichi's."""
    M = ti.Matrix.field(3, 3, ti.f64, shape=2, needs_grad=True)
    v = ti.Vector.field(4, ti.f64, shape=2, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    rng = np.random.default_rng(17)
    M.from_numpy(rng.standard_normal((2, 3, 3)))
    v.from_numpy(rng.standard_normal((2, 4)))

    def slices():
        for i in M:
            A = M[i]
            row, col, block = A[1, :], A[:, 2], A[0:2, 1:3]
            loss[None] += row.dot(col) + block.determinant() * v[i][1:3].norm() + v[i][::2].dot(row[:2])

    for expected, got in zip(*grads_of_both(slices, [M, v], loss)):
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_stores_into_slices_of_vectors_and_matrices(runtime):
    """`A[2, :] = v`, `A[:, 0] = ...`, `v[1:3] = v[0:2]`, `v[0:2] += w` on locals, and `m[i][2, :]
    = v`, `x[i][0:2] += w` on field elements, and `A[j, :]` with j known at run time, as Taichi
    allows (refused before: "a vector is used where a scalar is needed", "needs 2 compile-time
    indices"). Values and gradients against Taichi's; every part of the value
    is read before a component changes (`v[1:3] = v[0:2]` shifts, as in Taichi)."""
    M = ti.Matrix.field(3, 3, ti.f64, shape=2, needs_grad=True)
    x = ti.Vector.field(3, ti.f64, shape=2, needs_grad=True)
    out_m = ti.Matrix.field(3, 3, ti.f64, shape=2, needs_grad=True)
    out_v = ti.Vector.field(3, ti.f64, shape=2, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    rng = np.random.default_rng(23)
    M.from_numpy(rng.standard_normal((2, 3, 3)))
    x.from_numpy(rng.standard_normal((2, 3)))

    def locals_():
        for i in M:
            A = M[i]
            A[2, :] = x[i] * 2
            A[:, 0] = A[0, :] * A[1, 1]
            v = x[i]
            v[1:3] = v[0:2]
            v[0:2] += ti.Vector([A[0, 0], 1.0])
            loss[None] += (A @ v).sum() + v[2] * 10

    def fields_():
        for i in M:
            out_m[i][2, :] = x[i] * M[i][0, 0]
            out_m[i][0:2, 1] += ti.Vector([M[i][1, 1], x[i][2]]) * 3
            out_v[i][0:2] = M[i][1, 1:3] ** 2

    def rows_at_run_time():
        for i in M:
            A = M[i]
            for j in range(2):
                A[j + 1, :] = A[j, :] * A[j + 1, j]
            loss[None] += (A @ x[i]).sum()

    for expected, got in zip(*grads_of_both(locals_, [M, x], loss)):
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    # Taichi's kernel.grad() crashes the process on rows_at_run_time: its value, then differences
    expected, got = values_of_both(rows_at_run_time, loss)
    np.testing.assert_allclose(got, expected, rtol=1e-14)
    assert kd.check_grad(kd.kernel(rows_at_run_time), [M, x], loss, order=2) < 1e-6
    for out in (out_m, out_v):
        expected, got = values_of_both(fields_, out)
        np.testing.assert_allclose(got, expected, rtol=1e-14)
        assert np.count_nonzero(got) >= 4
        assert kd.check_grad(kd.kernel(fields_), [M, x], out, order=2) < 1e-6


def test_a_row_stored_into_a_local_matrix_reads_its_old_components(runtime):
    """`A[1] = ti.Vector([A[1, 1], A[1, 0] * 2, A[1, 2]])` swaps: the row is read whole before
    its first component changes (before, A[1, 0] was stored first and the second component read
    the new one: a wrong value and gradient). Taichi refuses a row store into a local matrix, so
    numpy is the reference, and finite differences for the derivatives."""
    M = ti.Matrix.field(3, 3, ti.f64, shape=2, needs_grad=True, needs_dual=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True, needs_dual=True)
    Mv = np.random.default_rng(29).standard_normal((2, 3, 3))
    M.from_numpy(Mv)

    @kd.kernel
    def swap():
        for i in M:
            A = M[i]
            A[1] = ti.Vector([A[1, 1], A[1, 0] * 2, A[1, 2]])
            loss[None] += A[1, 0] * 100 + A[1, 1] * 10 + A[1, 0] * A[1, 1]

    loss[None] = 0
    swap()
    a, b = Mv[:, 1, 1], Mv[:, 1, 0] * 2
    np.testing.assert_allclose(loss[None], np.sum(a * 100 + b * 10 + a * b), rtol=1e-14)
    assert kd.check_grad(swap, [M], loss, order=2) < 1e-6


def test_a_row_stored_into_a_matrix_field_element(runtime):
    """`m[i][1] = v` with a constant row (Taichi refuses it; kerndiff already took a row known at
    run time, `m[i][r] = v`): the frontend failed ("cannot lower this statement (IndexError)").
    Now the row's three components, against numpy and finite differences."""
    M = ti.Matrix.field(3, 3, ti.f64, shape=2, needs_grad=True, needs_dual=True)
    out = ti.Matrix.field(3, 3, ti.f64, shape=2, needs_grad=True, needs_dual=True)
    x = ti.Vector.field(3, ti.f64, shape=2, needs_grad=True, needs_dual=True)
    Mv, xv = np.random.default_rng(31).standard_normal((2, 3, 3)), np.random.default_rng(37).standard_normal((2, 3))
    M.from_numpy(Mv)
    x.from_numpy(xv)

    @kd.kernel
    def rows():
        for i in M:
            out[i][1] = ti.sin(x[i]) * M[i][1, 2]
            out[i][2] += x[i] * M[i][0, 0]

    rows()
    expected = np.zeros((2, 3, 3))
    expected[:, 1] = np.sin(xv) * Mv[:, 1, 2:3]
    expected[:, 2] = xv * Mv[:, 0, 0:1]
    np.testing.assert_allclose(out.to_numpy(), expected, rtol=1e-14)
    assert kd.check_grad(rows, [M, x], out, order=2) < 1e-6


def test_atomic_add_on_a_local(fields):
    """`ti.atomic_add(s, v)` / `ti.atomic_sub` on a local: `s += v`, in a serial inner loop
    (gradients against Taichi's) and as a top-level reduction over the parallel loop (Taichi's grad
    refuses that kernel: its value against Taichi's, its gradients against finite differences).
    It failed inside the frontend before."""
    x, _, loss = fields

    def inner_atomics():
        for i in x:
            s = 0.0
            for j in range(3):
                ti.atomic_add(s, x[(i + j) % N] ** 2)
            ti.atomic_sub(s, 0.5 * x[i])
            loss[None] += ti.sqrt(s * s + 1.0)

    for expected, got in zip(*grads_of_both(inner_atomics, [x], loss)):
        np.testing.assert_allclose(got, expected, rtol=1e-12)

    def reduced():
        total = 0.0
        for i in x:
            ti.atomic_add(total, ti.sin(x[i]) * x[i])
        loss[None] = total

    values = []
    for k in both(reduced):
        k()
        values.append(loss[None])
    np.testing.assert_allclose(values[1], values[0], rtol=1e-12)
    assert kd.check_grad(kd.kernel(reduced), [x], loss, order=2) < 1e-6


def test_comparisons_of_comparisons_keep_their_grouping(fields):
    """`(x > 0) == (i > 5)` is one comparison of two truth values; generated as `x > 0 == i > 5`
    Python would chain it into `x > 0 and 0 == i and i > 5` (kerndiff once did, silently).
    Values and gradients against Taichi's."""
    x, _, loss = fields

    def agreement():
        for i in x:
            same = (x[i] > 0.6) == (i > 5)
            loss[None] += x[i] ** 2 * same + x[i] * ((x[i] < 0.5) != (i % 2 == 0)) + x[i] * (0.3 < x[i] < 0.7)

    (t_loss, t_grad), (k_loss, k_grad) = grads_of_both(agreement, [x], loss)
    np.testing.assert_allclose(k_loss, t_loss, rtol=1e-12)
    np.testing.assert_allclose(k_grad, t_grad, rtol=1e-12)
    xv, i = x.to_numpy(), np.arange(N)
    expected = (2 * xv * ((xv > 0.6) == (i > 5)) + ((xv < 0.5) != (i % 2 == 0)) + ((0.3 < xv) & (xv < 0.7)))
    np.testing.assert_allclose(k_grad, expected, rtol=1e-12)


def test_c_division_and_remainder_and_builtin_pow(runtime):
    """ti.raw_div / ti.raw_mod truncate toward zero (C), where // and % floor; on floats raw_div is
    true division and raw_mod is C's fmod (Taichi's CPU backend fails to compile that: checked
    against numpy). Python's pow(a, b) is a ** b. Integer results against Taichi's kernel."""
    m = ti.field(ti.i32, shape=12)
    r = ti.field(ti.i32, shape=(12, 5))
    m.from_numpy(np.arange(12, dtype=np.int32) - 6)

    def c_style():
        for i in m:
            a = m[i]
            r[i, 0] = ti.raw_div(a, 4)
            r[i, 1] = ti.raw_mod(a, 4)
            r[i, 2] = ti.raw_div(a, -3)
            r[i, 3] = ti.raw_mod(a, -5)
            r[i, 4] = ti.raw_mod(-7, 3) * 10 + pow(a, 2)

    got = values_of_both(c_style, r)
    np.testing.assert_array_equal(got[1], got[0])
    a = np.arange(12) - 6
    np.testing.assert_array_equal(got[1][:, 0], np.trunc(a / 4))
    np.testing.assert_array_equal(got[1][:, 3], np.fmod(a, -5))

    x = ti.field(ti.f64, shape=12, needs_grad=True, needs_dual=True)
    y = ti.field(ti.f64, shape=12, needs_grad=True, needs_dual=True)
    x.from_numpy(np.linspace(-3.3, 3.1, 12) + 0.013)

    @kd.kernel
    def fmod():
        for i in x:
            y[i] = (ti.raw_mod(x[i], 1.3) + ti.raw_mod(x[i] * 2, -0.7) * x[i] + ti.raw_div(x[i], 3)
                    + ti.raw_mod(ti.Vector([x[i], -x[i]]), 0.9).y + pow(ti.abs(x[i]) + 1, 1.5))

    fmod()
    xv = x.to_numpy()
    expected = (np.fmod(xv, 1.3) + np.fmod(2 * xv, -0.7) * xv + xv / 3 + np.fmod(-xv, 0.9)
                + (np.abs(xv) + 1) ** 1.5)
    np.testing.assert_allclose(y.to_numpy(), expected, rtol=1e-13)
    kd.check_grad(fmod, [x], y, order=2)


def test_infinite_constants_start_a_running_maximum(runtime):
    """`m = -ti.math.inf` before a max loop (a stable log-sum-exp): the generated kernels once wrote
    `-inf`, a name Taichi does not know. Values and gradient (the softmax) against numpy."""
    x = ti.field(ti.f64, shape=(3, 5), needs_grad=True, needs_dual=True)
    y = ti.field(ti.f64, shape=3, needs_grad=True, needs_dual=True)
    xv = np.random.default_rng(4).standard_normal((3, 5)) * 3
    x.from_numpy(xv)

    @kd.kernel
    def logsumexp():
        for i in y:
            m = -ti.math.inf
            for j in range(5):
                m = ti.max(m, x[i, j])
            s = 0.0
            for j in range(5):
                s += ti.exp(x[i, j] - m)
            y[i] = m + ti.log(s) + (0.0 if m < ti.math.inf else ti.math.nan)

    logsumexp()
    np.testing.assert_allclose(y.to_numpy(), np.log(np.exp(xv).sum(1)), rtol=1e-13)
    y.grad.fill(1)
    x.grad.fill(0)
    logsumexp.reverse()
    np.testing.assert_allclose(x.grad.to_numpy(), np.exp(xv) / np.exp(xv).sum(1, keepdims=True), rtol=1e-12)
    kd.check_grad(logsumexp, [x], y, order=2)


def test_a_matrix_indexed_by_a_grouped_index(runtime):
    """`M[i, j][o]` with `o` from ti.static(ti.grouped(ti.ndrange(2, 2))) (or a run-time grouped
    loop) means M[i, j][o[0], o[1]], as in Taichi; kerndiff once refused it. Values against
    Taichi's, gradients against the analytic ones (Taichi's grad misses part of the run-time
    loop's: 1.81 where the derivative is 0.91)."""
    M = ti.Matrix.field(2, 2, ti.f64, shape=3, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    M.from_numpy(np.random.default_rng(9).standard_normal((3, 2, 2)))

    def weighted():
        for i in M:
            for o in ti.static(ti.grouped(ti.ndrange(2, 2))):
                loss[None] += M[i][o] ** 2 * (o[0] * 2 + o[1] + 1)
            for I in ti.grouped(ti.ndrange(2, (1, 2))):
                loss[None] += ti.sin(M[i][I]) * i

    (t_loss, _), (k_loss, k_grad) = grads_of_both(weighted, [M], loss)
    np.testing.assert_allclose(k_loss, t_loss, rtol=1e-12)
    m = M.to_numpy()
    expected = 2 * m * np.array([[1, 2], [3, 4]])
    expected[:, :, 1] += np.cos(m[:, :, 1]) * np.arange(3)[:, None]
    np.testing.assert_allclose(k_grad, expected, rtol=1e-12)


def test_swizzle_stores_and_letter_sets(runtime):
    """`v.xy = v.yx` (a swap: every component read first), `v.yz += ...`, `W[i].zx = ...`,
    `W[i].yz -= ...` (atomic per component) and the rgba / stpq letters, as Taichi has them; kerndiff
    once refused all but single letters. Values and gradients against Taichi's."""
    V = ti.Vector.field(3, ti.f64, shape=4, needs_grad=True)
    W = ti.Vector.field(3, ti.f64, shape=4, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    V.from_numpy(np.random.default_rng(10).standard_normal((4, 3)))

    def swizzled():
        for i in V:
            v = V[i]
            v.xy = v.yx * 2.0
            v.yz += ti.Vector([1.0, v.x ** 2])
            v.gb *= v.r
            W[i] = v
            W[i].zx = ti.Vector([v.z, v.y * v.s])
            W[i].yz -= v.pt
        for i in W:
            loss[None] += W[i].dot(ti.Vector([1.0, 2.0, 3.0])) * W[i].x

    W.grad.fill(0)
    (t_loss, t_grad), (k_loss, k_grad) = grads_of_both(swizzled, [V], loss)
    np.testing.assert_allclose(k_loss, t_loss, rtol=1e-12)
    np.testing.assert_allclose(k_grad, t_grad, rtol=1e-12)


def test_static_loops_over_python_iterators(runtime):
    """ti.static(enumerate(fields)) and ti.static(zip(names, fields)) unroll over Python data, as in
    Taichi (kerndiff once refused enumerate and zip).
    Values and gradients against Taichi's."""
    a = ti.field(ti.f64, shape=5, needs_grad=True)
    b = ti.field(ti.f64, shape=5, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    a.from_numpy(np.linspace(0.1, 1.0, 5))
    b.from_numpy(np.linspace(-1.0, 0.5, 5))
    fields = [a, b]
    weight = {"a": 2.0, "b": -1.0}

    def over_python_data():
        for i in a:
            for j, f in ti.static(enumerate(fields)):
                loss[None] += f[i] ** 2 * (j + 1)
            for name, f in ti.static(zip(["a", "b"], fields)):
                loss[None] += ti.static(weight[name]) * ti.sin(f[i])

    (t_loss, *t_grads), (k_loss, *k_grads) = grads_of_both(over_python_data, [a, b], loss)
    np.testing.assert_allclose(k_loss, t_loss, rtol=1e-12)
    for got, expected in zip(k_grads, t_grads):
        np.testing.assert_allclose(got, expected, rtol=1e-12)


OPTIONS = {"c": 4.0}


def test_star_arguments_unpack_vectors_tuples_and_dicts(fields):
    """f(*t) with a tuple, f(*v) with a vector's components, f(a, b, **OPTIONS) with a dict of
    Python values, as Taichi binds them (kerndiff once failed on the vector). Values and
    gradients against Taichi's."""
    x, _, loss = fields

    @ti.func
    def f(a, b, c=10.0):
        return a * b + 3 * c * ti.sin(a)

    def unpacked():
        for i in x:
            t = (x[i], 1.5)
            v = ti.Vector([x[i] ** 2, 2.0, 0.5])
            loss[None] += f(*t) + f(*v) * 10 + f(x[i], 1.0, **OPTIONS) * 100

    (t_loss, t_grad), (k_loss, k_grad) = grads_of_both(unpacked, [x], loss)
    np.testing.assert_allclose(k_loss, t_loss, rtol=1e-12)
    np.testing.assert_allclose(k_grad, t_grad, rtol=1e-12)


MODE = None


def test_compile_time_comparisons_of_python_values(fields):
    """ti.static(MODE == None), ti.static(x.dtype == ti.f64) and string comparisons run in Python,
    as in Taichi (kerndiff once tried to make None a kernel value). Values and gradients against
    Taichi's."""
    x, _, loss = fields

    def configured():
        for i in x:
            if ti.static(MODE == None and x.dtype == ti.f64):  # noqa: E711 (Taichi has no `is`)
                loss[None] += x[i] ** 3
            for name in ti.static(["sin", "cos"]):
                if ti.static(name != "cos"):
                    loss[None] += ti.sin(x[i])

    (t_loss, t_grad), (k_loss, k_grad) = grads_of_both(configured, [x], loss)
    np.testing.assert_allclose(k_loss, t_loss, rtol=1e-12)
    np.testing.assert_allclose(k_grad, t_grad, rtol=1e-12)
    np.testing.assert_allclose(k_grad, 3 * x.to_numpy() ** 2 + np.cos(x.to_numpy()), rtol=1e-12)


def test_bit_counts(fields):
    """ti.math.popcnt / clz of integers (folded where constant), piecewise constant for
    derivatives; kerndiff once refused them. Integer results against Taichi's kernel, gradients
    against the closed form (Taichi's grad has no rule for them)."""
    x, _, loss = fields
    r = ti.field(ti.i32, shape=N)

    def bits():
        for i in x:
            m = ti.cast(x[i] * 100, ti.i32)
            r[i] = ti.math.popcnt(m) * 100 + ti.math.clz(m) + ti.math.popcnt(-7) * 10000

    counts = values_of_both(bits, r)
    np.testing.assert_array_equal(counts[1], counts[0])
    m = (x.to_numpy() * 100).astype(np.int64)
    popcnt = np.array([bin(v).count("1") for v in m])
    clz = 32 - np.array([int(v).bit_length() for v in m])
    np.testing.assert_array_equal(counts[1], popcnt * 100 + clz + 30 * 10000)  # popcnt(-7) is 30

    @kd.kernel
    def weighted():
        for i in x:
            loss[None] += x[i] ** 2 * ti.math.popcnt(ti.cast(x[i] * 100, ti.i32)) + ti.math.clz(i + 1) * x[i]

    x.grad.fill(0)
    loss.grad[None] = 1
    weighted.reverse()
    clz_of_index = 32 - np.array([int(i + 1).bit_length() for i in range(N)])
    np.testing.assert_allclose(x.grad.to_numpy(), 2 * x.to_numpy() * popcnt + clz_of_index, rtol=1e-13)


def test_conditional_expressions_run_only_the_chosen_branch(runtime, tmp_path):
    """`a if c else b` in Taichi runs one branch (short-circuit), ti.select both. A branch that
    reads outside a field where the condition guards the index, or divides integers where it
    guards the divisor, must not run: the latter crashed the process (SIGFPE) when kerndiff
    emitted ti.select. Run in a child process, so that a regression fails this test only."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent('''
        import numpy as np, taichi as ti, kerndiff as kd
        ti.init(arch=ti.cpu, default_fp=ti.f64, log_level=ti.ERROR)
        a, n = ti.field(ti.i32, 4), ti.field(ti.i32, 4)
        x, out = ti.field(ti.f64, 4, needs_grad=True), ti.field(ti.f64, 4, needs_grad=True)
        a.from_numpy(np.array([7, 8, 9, 10], np.int32))
        n.from_numpy(np.array([2, 0, 3, 0], np.int32))
        x.from_numpy(np.array([1.0, 2.0, 3.0, 4.0]))

        @kd.kernel
        def quotient():
            for i in a:
                q = a[i] // n[i] if n[i] != 0 else -1
                out[i] = x[i] * q

        quotient()
        print(out.to_numpy().tolist())
        print(quotient.source)
    ''')
    path = tmp_path / "quotient.py"  # a file: kerndiff reads a kernel's source through inspect
    path.write_text(script)
    run = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    values = next(line for line in run.stdout.splitlines() if line.startswith("[") and "Taichi" not in line)
    assert eval(values) == [3.0, -2.0, 9.0, -4.0]
    assert "q = a[i] // n[i] if n[i] != 0 else -1" in run.stdout

    o = ti.field(ti.f64, 8, offset=-2, needs_grad=True)
    p = ti.field(ti.f64, 8, offset=-2, needs_grad=True)
    o.from_numpy(np.linspace(0.5, 1.2, 8))

    def shifted():
        for i in o:
            p[i] = o[i] * i + (o[i - 1] if i > -2 else 0.0)

    got = values_of_both(shifted, p)
    np.testing.assert_allclose(got[1], got[0], rtol=1e-15)
    k = kd.kernel(shifted)
    assert "(o[i - 1] if i > -2 else 0.0)" in k.source
    kd.check_grad(k, [o], p, order=2)


def _unguarded_lines(source, access, guard):
    """Lines of generated code that make `access` outside both `if <guard>:` blocks and
    `... if <guard> else ...` expressions."""
    bad, guards = [], []  # indentation of the enclosing `if <guard>:` lines
    for line in source.splitlines():
        code = line.split("#")[0].rstrip()
        if not code.strip():
            continue
        indent = len(code) - len(code.lstrip())
        guards = [g for g in guards if g < indent]
        if code.strip() == f"if {guard}:":
            guards.append(indent)
        elif access in code and not guards and f"if {guard} else" not in code:
            bad.append(code.strip())
    return bad


def test_guarded_reads_stay_guarded_in_derivative_kernels(runtime):
    """The reverse of `ti.sqrt(o[i - 1]) * o[i - 1] if i > 0 else 1.0` once computed
    ti.sqrt(o[i - 1]) ahead of its conditional (shared with the adjoint) and added into
    o_adj[i - 1] on every trip, zero at i = 0 but into o_adj[-1]: a read and a write out of range
    (an illegal address on a GPU; on the CPU, whatever lies before the field). No derivative
    kernel touches o[i - 1] outside `i > 0` now."""
    o = ti.field(ti.f64, N, needs_grad=True, needs_dual=True)
    p = ti.field(ti.f64, N, needs_grad=True, needs_dual=True)
    o.from_numpy(np.linspace(0.5, 2.0, N))

    def shifted():
        for i in o:
            p[i] = (ti.sqrt(o[i - 1]) * o[i - 1] if i > 0 else 1.0) * o[i]

    got = values_of_both(shifted, p)
    np.testing.assert_allclose(got[1], got[0], rtol=1e-15)
    k = kd.kernel(shifted)
    k()
    for kernel in (k, k.forward, k.reverse, k.reverse.forward):
        assert _unguarded_lines(kernel.source, "[i - 1]", "i > 0") == [], kernel.source
    kd.check_grad(k, [o], p, order=2)


def test_a_name_bound_in_both_branches_with_different_types_is_two_locals(fields):
    """`t = 1` in one branch and `t = 0.25` in the other are two locals in Taichi, an i32 and an
    f64. kerndiff, which lets a name bound in both branches live on after the if, once made them
    one i32 local and truncated 0.25 to 0: values and derivatives wrong without a word. Where the
    types agree the name still lives on; where they differ, reading it after the if is refused."""
    x, _, loss = fields

    def typed_per_branch():
        for i in x:
            if x[i] > 0.5:
                t = 1
                loss[None] += t * x[i] ** 2
            else:
                t = 0.25
                v = ti.Vector([x[i], 2])  # an f64 vector here, an integer one there
                loss[None] += t * x[i] ** 3 + v.sum()
            if x[i] > 0.7:
                v = ti.Vector([1, 2])
                loss[None] += v.sum() * x[i]

    xv = x.to_numpy()
    analytic = np.where(xv > 0.5, 2 * xv, 0.75 * xv ** 2 + 1.0) + np.where(xv > 0.7, 3.0, 0.0)
    assert (xv > 0.5).any() and (xv <= 0.5).any()
    for expected, got in zip(*grads_of_both(typed_per_branch, [x], loss)):
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(got, analytic, rtol=1e-12)

    @kd.kernel
    def read_after():
        for i in x:
            if x[i] > 0.5:
                t = 1
            else:
                t = 0.25
            loss[None] += t * x[i]

    with pytest.raises(kd.KernDiffError, match="bind it as an i32 and an f64"):
        read_after()


def test_scalar_annotations_of_ti_func_parameters_and_results_cast_as_in_taichi(fields):
    """Taichi 1.7 casts a ti.func's scalar arguments to their annotated types (`a: ti.i32` passed
    1.4 is 1, `b: ti.f32` rounds) and its result to a scalar return type (`-> ti.i32`), but
    leaves vector and matrix annotations alone. kerndiff ignored the annotations: 1.6 returned
    from a `-> ti.i32` function stayed 1.6. Values and gradients against Taichi's."""
    x, _, loss = fields

    @ti.func
    def scaled(a: ti.i32, b: ti.f32) -> ti.i32:
        return a * b + 0.9

    @ti.func
    def as_f32(a) -> ti.f32:
        return a * 1.1

    @ti.func
    def untouched(v: ti.math.ivec2) -> ti.math.ivec2:
        return v * 1.5

    def annotated():
        for i in x:
            loss[None] += scaled(x[i] * 3, x[i]) * x[i] + as_f32(x[i]) * x[i] \
                + untouched(ti.Vector([x[i], 0.5])).sum() * x[i]

    (t_loss, t_grad), (k_loss, k_grad) = grads_of_both(annotated, [x], loss)
    assert k_loss == t_loss
    np.testing.assert_allclose(k_grad, t_grad, rtol=1e-12)
    xv = x.to_numpy()
    f32 = (xv * 1.1).astype(np.float32).astype(np.float64)
    integer = np.trunc(np.trunc(xv * 3) * xv.astype(np.float32).astype(np.float64) + 0.9)
    assert abs(k_loss - np.sum(integer * xv + f32 * xv + (xv + 0.5) * 1.5 * xv)) < 1e-6


def test_sum_of_exponentials_in_a_local_is_right_where_taichi_is_not(fields):
    """A Gaussian pair energy summed in a local, `e += ti.exp(-r2)` over an inner loop: Taichi
    1.7.4's grad of it is off by several times its size (with 1.0 / r2 in place of the exponential
    it is right); kerndiff's gradient and HVP match the analytic ones."""
    x, pos, loss = fields

    def gaussians():
        for i in range(N):
            e = 0.0
            for j in range(N):
                e += ti.exp(-(pos[i] - pos[j]).norm_sqr())
            loss[None] += e

    p = pos.to_numpy()
    d = p[:, None, :] - p[None, :, :]
    w = np.exp(-(d * d).sum(-1))
    grad = -4.0 * (w[:, :, None] * d).sum(1)
    v = np.random.default_rng(1).standard_normal(p.shape)
    # H v for E = sum_ij w_ij: d/dt of grad along p + t v
    dv = v[:, None, :] - v[None, :, :]
    wdot = -2.0 * w * (d * dv).sum(-1)
    hv = -4.0 * (wdot[:, :, None] * d + w[:, :, None] * dv).sum(1)

    kk = kd.kernel(gaussians)
    got = kd.backward(kk, inputs=[pos], output=loss)(p)[0]
    np.testing.assert_allclose(got, grad, rtol=1e-10, atol=1e-12)
    got_hv = kd.hvp(kk, inputs=[pos], output=loss)(p, tangents=[v])[0]
    np.testing.assert_allclose(got_hv, hv, rtol=1e-10, atol=1e-12)


def test_two_vector_updates_in_a_row_read_the_new_component(runtime):
    """`v[i] += ti.Vector([...]) * ti.sin(v[i][1])` twice in a row: the second reads v[i][1] as
    the first left it. Taichi 1.7.4's optimizer reads the old value (its ti.kernel of the same
    code is off; right with advanced_optimization=False); kerndiff's primal stores the components
    one by one and matches numpy, and its forward matches finite differences. Found by
    tests/test_fuzz_programs.py (whose generator now stores a whole vector once per loop)."""
    from harness import check_path

    v = ti.Vector.field(2, ti.f64, shape=4)
    v0 = np.random.default_rng(0).uniform(-1, 1, (4, 2))

    def updates():
        for i in range(4):
            v[i] += ti.Vector([0.5, 0.7]) * ti.sin(v[i][1])
            v[i] += ti.Vector([0.2, 0.3]) * ti.cos(v[i][1])

    expected = v0.copy()
    for i in range(4):
        expected[i] += np.array([0.5, 0.7]) * np.sin(expected[i][1])
        expected[i] += np.array([0.2, 0.3]) * np.cos(expected[i][1])
    kk = kd.kernel(updates)
    v.from_numpy(v0)
    kk()
    np.testing.assert_allclose(v.to_numpy(), expected, rtol=1e-14, atol=1e-15)
    v.from_numpy(v0)
    check_path(kk, "", "forward", rtol=1e-6, atol=1e-8)
    # its reverse alone needs v from before the launch, which the kernel overwrote: kd.Tape's case
    with pytest.raises(kd.KernDiffError, match="kd.Tape"):
        kk.reverse()


def test_a_kernel_taichis_verifier_refuses_runs_compiled_without_its_cfg_pass(runtime):
    """Taichi 1.7.4's IR verifier refuses valid code where its store-to-load forwarding meets two
    `if`s on one condition (`block->parent != current_container_stmt`): Taichi's own kernel of
    this shape raises. Generated kernels meet it too (about one order-three device-function
    kernel in 300, tests/test_fuzz_funcs.py seed 2112 of session 34): kerndiff's loader then
    compiles the kernel once more without Taichi's cfg_optimization pass, warns, and the kernel
    computes what it says."""
    import linecache

    from kerndiff.codegen.load import compile_source

    x = ti.field(ti.f64, shape=4)
    out = ti.field(ti.f64, shape=4)
    x.from_numpy(np.array([0.05, 0.5, -1.0, 0.2]))
    src = """
@ti.kernel
def shape():
    for i in range(4):
        w = 0.0
        dead = 0.0
        if x[i] > 0.1:
            pass
        else:
            w = 1.0
        y = w
        if x[i] > 0.1:
            y = 0.0
        dead = y
        out[i] = w
"""
    filename = "<taichi verifier reproduction>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    g = {"ti": ti, "x": x, "out": out}
    exec(compile(src, filename, "exec"), g)
    with pytest.raises(RuntimeError, match=r"verify\.cpp"):
        g["shape"]()
    run = compile_source(src, {"ti": ti, "x": x, "out": out}, "shape")
    with pytest.warns(RuntimeWarning, match="cfg_optimization"):
        run()
    np.testing.assert_array_equal(out.to_numpy(), [1.0, 0.0, 1.0, 0.0])
    assert ti.lang.impl.current_cfg().cfg_optimization  # (set for that one compilation)
    out.fill(0)
    run()  # compiled once: no second warning, same values
    np.testing.assert_array_equal(out.to_numpy(), [1.0, 0.0, 1.0, 0.0])
