"""Literals and constant casts have Taichi's precision: a float literal has the type default_fp
gives it (an f32 kernel multiplies an f64 field by 0.1f, not by 0.1, and ti.cast(0.3, ti.f64)
widens 0.3f), `ti.f64(0.1)` is an f64 literal, and `ti.f32(0.2)` rounds even where the result
meets f64. Checked bit for bit against Taichi's own kernel and grad."""
import re

import numpy as np
import pytest
import taichi as ti

import kerndiff as kd

N = 7


def values_and_grads(fn, out, inputs):
    """fn as Taichi's kernel and as kerndiff's: [(out values, input gradients...)] for each."""
    results = []
    for k in (ti.kernel(fn), kd.kernel(fn)):
        for f in inputs:
            f.grad.fill(0)
        out.fill(0)
        k()
        out.grad.fill(1)
        k.grad()
        results.append((out.to_numpy(),) + tuple(f.grad.to_numpy() for f in inputs))
    return results


@pytest.fixture(params=[ti.f32, ti.f64], ids=["default_f32", "default_f64"])
def fields(request):
    ti.init(arch=ti.cpu, default_fp=request.param)
    rng = np.random.default_rng(0)
    x = ti.field(ti.f32, shape=N, needs_grad=True)
    d = ti.field(ti.f64, shape=N, needs_grad=True)
    y = ti.field(ti.f64, shape=N, needs_grad=True)
    x.from_numpy(rng.standard_normal(N).astype(np.float32))
    d.from_numpy(rng.standard_normal(N))
    yield x, d, y
    ti.reset()


def test_literals_and_constant_casts_round_as_in_taichi(fields):
    x, d, y = fields

    def scaled():
        for i in d:
            a = 0.1
            y[i] = (d[i] * 0.3 + a * d[i] + ti.f32(0.2) * d[i] + ti.exp(0.7) * d[i] + x[i] * 1.1
                    + (d[i] * 2.2 if x[i] > 0 else 0.7 * d[i]) + d[i] * d[i] * ti.cast(1.3, ti.f32)
                    + ti.f64(0.1) * x[i] + ti.cast(0.3, ti.f64) * x[i] + ti.math.pi * x[i] * d[i] + ti.f64(ti.math.pi))

    (ty, tx, td), (ky, kx, kd_) = values_and_grads(scaled, y, [x, d])
    # A literal of the wrong precision moves the f64 results by 1e-8 relative; the order of the
    # multiplications (kerndiff collects like factors) by an ulp.
    np.testing.assert_allclose(ky, ty, rtol=1e-14)
    np.testing.assert_allclose(kx, tx, rtol=1e-14)
    np.testing.assert_allclose(kd_, td, rtol=1e-14)
    # And against the derivative written out, each literal rounded to default_fp as Taichi does.
    f32 = ti.lang.impl.get_runtime().default_fp == ti.f32
    lit = (lambda v: float(np.float32(v))) if f32 else float
    e07 = float(np.exp(np.float32(0.7))) if f32 else float(np.exp(0.7))
    dv = d.to_numpy()
    expected = (lit(0.3) + lit(0.1) + float(np.float32(0.2)) + e07
                + np.where(x.to_numpy() > 0, lit(2.2), lit(0.7)) + 2 * dv * float(np.float32(1.3))
                + lit(np.pi) * x.to_numpy().astype(np.float64))
    np.testing.assert_allclose(kd_, expected, rtol=1e-6 if f32 else 1e-14)


def test_negative_constants_are_written_as_subtractions(fields):
    x, d, y = fields

    def shifted():
        for i in range(1, N):
            acc = 0.0
            for k in ti.static(range(-1, 1)):
                acc += d[i + k] * (k + 2)
            y[i] = acc + d[i] * -0.5 - (-1.5) * x[i] + (i - -2) * d[i - 1]

    (ty, tx, td), (ky, kx, kd_) = values_and_grads(shifted, y, [x, d])
    for got, want in ((ky, ty), (kx, tx), (kd_, td)):
        np.testing.assert_allclose(got, want, rtol=1e-14)
    k = kd.kernel(shifted)
    code = "\n".join(line for src in (k.source, k.reverse.source) for line in src.splitlines()
                     if not line.strip().startswith("#"))  # comments quote the user's source
    assert "+ -" not in code and "- -" not in code and "-(" not in code
    assert "d[i - 1]" in code
    assert not re.search(r"ti\.cast\(ti\.cast\(\w+, ti\.f64\), ti\.f32\)", code)  # f32 -> f64 -> f32: the value


def test_augmented_updates_of_locals_cast_the_operand_first_as_taichi_does(fields):
    """Taichi runs `t += v` on a local as an atomic add, which casts v to t's type first: an i32
    counter adds int(v), an f32 accumulator adds v rounded to f32 and rounds the sum in f32.
    kerndiff once added in the wider type and cast the sum: 1 + (-0.85) gave 0 instead of 1.
    Values bit for bit against Taichi's; gradients to f32 rounding (through the f32 accumulator
    the two add the same terms in a different order)."""
    x, d, y = fields
    x.from_numpy(np.array([-1.7, 0.7, 2.4, -0.2, 0.3, -3.3, 1.1], dtype=np.float32))

    def updated():
        for i in d:
            t = 1
            t += 0.5 * x[i]
            t -= d[i]
            v = ti.Vector([1, 2])
            v += x[i] * 3.0
            acc = ti.f32(0.0)
            for k in range(5):
                acc += d[i] * 0.1 * k
            y[i] = (t + v.sum()) * d[i] + acc * d[i]

    (ty, tx, td), (ky, kx, kd_) = values_and_grads(updated, y, [x, d])
    np.testing.assert_array_equal(ky, ty)
    np.testing.assert_allclose(kd_, td, rtol=1e-6)
    np.testing.assert_allclose(kx, tx, rtol=1e-6)


M = ti.Matrix([[1.0, 2.0], [3.0, 4.0]])
C = ti.Vector([0.5, -1.0])
J = ti.Vector([1, 0])


def test_vectors_and_matrices_made_in_python_scope_are_constants(fields):
    """A ti.Matrix / ti.Vector made outside the kernel and captured (a global, or an attribute of
    a data-oriented object) is a constant of default_fp, as in Taichi; it once stopped the
    frontend with 'a vector is needed here'."""
    x, d, y = fields

    def captured():
        for i in d:
            v = ti.Vector([d[i], x[i]])
            w = M @ v + C * J[0]
            y[i] = w.norm_sqr() + v[1] * C[0] + M[1, 0] * v[J[1]]

    (ty, tx, td), (ky, kx, kd_) = values_and_grads(captured, y, [x, d])
    np.testing.assert_allclose(ky, ty, rtol=1e-14)
    np.testing.assert_allclose(kx, tx, rtol=1e-6)  # x is an f32 field: its gradient is f32 (order of sums)
    np.testing.assert_allclose(kd_, td, rtol=1e-14)
    # d/dv |M v + C|² = 2 Mᵀ (M v + C); v[1] * C[0]; and 3 * v[0]
    v = np.stack([d.to_numpy(), x.to_numpy().astype(np.float64)], 1)
    m, c = M.to_numpy().astype(np.float64), C.to_numpy().astype(np.float64)
    grad = 2 * (v @ m.T + c) @ m + np.array([3.0, 0.5])
    f32 = ti.lang.impl.get_runtime().default_fp == ti.f32
    np.testing.assert_allclose(kd_, grad[:, 0], rtol=1e-5 if f32 else 1e-13)

    @ti.data_oriented
    class Rotated:
        def __init__(self):
            self.R = ti.Matrix([[0.0, -1.0], [1.0, 0.0]])

        @kd.kernel
        def energy(self):
            for i in d:
                y[i] = (self.R @ ti.Vector([d[i], 2.0 * d[i]])).dot(C)

    y.fill(0)
    d.grad.fill(0)
    Rotated().energy()
    y.grad.fill(1)
    Rotated().energy.reverse()  # R (d, 2d) = (-2d, d): y = -2d * 0.5 + d * -1 = -2d
    np.testing.assert_allclose(y.to_numpy(), -2 * d.to_numpy(), rtol=1e-6 if f32 else 1e-14)
    np.testing.assert_allclose(d.grad.to_numpy(), -2.0, rtol=1e-14)


def test_locals_declared_before_branches_have_their_own_type(fields):
    """A local that both branches of an `if` assign and code after it reads is declared before
    the `if` (Taichi scopes a name first assigned in a branch to that branch): as `0.0` where its
    type is default_fp, which a plain literal has, and typed (`ti.f64(0.0)`) where it is not."""
    x, d, y = fields

    def branches():
        for i in d:
            u = d[i]
            v = x[i]
            if x[i] > 0:
                u = u * u
                v = v * 3.0
            else:
                u = -u
                v = ti.sin(v)
            y[i] = u * v + u

    (ty, tx, td), (ky, kx, kd_) = values_and_grads(branches, y, [x, d])
    for got, want in ((ky, ty), (kx, tx), (kd_, td)):
        np.testing.assert_allclose(got, want, rtol=1e-14)
    f32 = ti.lang.impl.get_runtime().default_fp == ti.f32
    declared = {}  # each u_n, v_n: its first assignment
    for name, text in re.findall(r"^\s+([uv]_\d+) = (.+)$", kd.kernel(branches).reverse.source, re.M):
        declared.setdefault(name, text)
    assert sorted(n[0] for n in declared) == ["u", "v"], declared
    wanted = {"u": "ti.f64(0.0)" if f32 else "0.0", "v": "0.0" if f32 else "ti.f32(0.0)"}
    assert {n[0]: text for n, text in declared.items()} == wanted


def test_unit_vectors_are_integers_as_in_taichi(fields):
    """ti.Vector.unit(n, i) holds integers unless a dtype is given, as Taichi's: it offsets an
    index (`d[i + e[0]]` for the stencils of grouped loops) and promotes when it scales floats."""
    x, d, y = fields

    def shifted():
        for i in range(1, N - 1):
            y[i] = 0.0
            for k in ti.static(range(2)):
                e = ti.Vector.unit(2, k)
                f = ti.Vector.unit(2, k, ti.f64)
                y[i] += (d[i + e[0]] - d[i - e[1]]) * d[i] + (e * d[i] + f * x[i]).sum() * 0.5

    (ty, tx, td), (ky, kx, kd_) = values_and_grads(shifted, y, [x, d])
    np.testing.assert_allclose(ky, ty, rtol=1e-14)
    np.testing.assert_allclose(kx, tx, rtol=1e-14)
    np.testing.assert_allclose(kd_, td, rtol=1e-14)
    dv = d.to_numpy()
    expected = np.zeros(N)
    expected[1:-1] = (dv[2:] - dv[1:-1]) * dv[1:-1] + (dv[1:-1] - dv[:-2]) * dv[1:-1] + dv[1:-1] + x.to_numpy()[1:-1]
    np.testing.assert_allclose(ky, expected, rtol=1e-5 if ti.lang.impl.get_runtime().default_fp == ti.f32 else 1e-13)


def test_a_list_beside_a_vector_is_a_vector_as_in_taichi(fields):
    """`x[i] * [0.5, 3.0]`, `[1.0, 2.0] - v`, `M + [[..], [..]]`: Taichi's Matrix operators read a
    list operand as a vector or matrix; alone, a list stays a Python sequence (test_errors)."""
    x, d, y = fields
    rng = np.random.default_rng(3)
    v = ti.Vector.field(2, ti.f64, shape=N, needs_grad=True)
    m = ti.Matrix.field(2, 2, ti.f64, shape=N, needs_grad=True)
    v.from_numpy(rng.uniform(0.5, 1.5, (N, 2)))
    m.from_numpy(rng.standard_normal((N, 2, 2)))

    def with_lists():
        for i in range(N):
            scale = (0.5, 3.0)
            a = v[i] * [0.5, 3.0] + [1.0, 2.0] - v[i] / scale
            b = [2.0, 1.0] / v[i] + v[i] ** [2, 3]
            c = m[i] + [[0.5, 3.0], [1.0, x[i]]]
            y[i] = a.dot(b) + (c * c).sum()

    (ty, tv, tm, tx), (ky, kv, km, kx) = values_and_grads(with_lists, y, [v, m, x])
    for got, want in ((ky, ty), (kv, tv), (km, tm), (kx, tx)):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    vv, mv, xv = v.to_numpy(), m.to_numpy(), x.to_numpy().astype(np.float64)
    a = vv * [0.5, 3.0] + [1.0, 2.0] - vv / [0.5, 3.0]
    b = [2.0, 1.0] / vv + vv ** [2, 3]
    c = mv + np.stack([np.broadcast_to([[0.5, 3.0]], (N, 2)), np.stack([np.ones(N), xv], 1)], 1)
    np.testing.assert_allclose(ky, (a * b).sum(1) + (c * c).sum((1, 2)), rtol=1e-6)


def test_fill_sets_every_component_in_place_as_in_taichi(fields):
    """`v.fill(c)` on a local vector or matrix and on a field element (`m[i].fill(0)`), the value
    cast to the vector's type (an integer fill of a float matrix is 0.0; an f64 fill of a vector
    of an f32 and an f64 stays f64, Taichi's vector having one type), as Taichi's in-place fill."""
    x, d, y = fields
    rng = np.random.default_rng(5)
    m = ti.Matrix.field(2, 2, ti.f64, shape=N, needs_grad=True)
    m.from_numpy(rng.standard_normal((N, 2, 2)))

    def filled():
        for i in range(N):
            v = ti.Vector([x[i], d[i], 1.0])
            w = v * 2.0
            v.fill(d[i])
            a = m[i] * x[i]
            a.fill(0)
            a[0, 1] = d[i] ** 2
            m[i].fill(x[i])
            y[i] = v.sum() * w.dot(v) + a.sum() + m[i].sum()

    (ty, tx, td), (ky, kx, kd_) = values_and_grads(filled, y, [x, d])
    for got, want in ((ky, ty), (kx, tx), (kd_, td)):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    xv, dv = x.to_numpy().astype(np.float64), d.to_numpy()
    np.testing.assert_allclose(m.to_numpy(), np.broadcast_to(xv[:, None, None], (N, 2, 2)), rtol=1e-6)
    expected = 3 * dv * (2 * dv * (xv + dv + 1)) + dv ** 2 + 4 * xv
    np.testing.assert_allclose(ky, expected, rtol=1e-5)


def test_a_vector_of_mixed_entries_has_one_type_as_in_taichi(fields):
    """ti.Vector([x_f32, d_f64]) is an f64 vector in Taichi (its entries promoted to one type), so
    `v[0] = d[i]` and `v += ...` keep f64 there; kerndiff once kept each entry's own type and
    rounded them to f32. Bit for bit against Taichi's kernel and grad."""
    x, d, y = fields

    def mixed():
        for i in range(N):
            v = ti.Vector([x[i], d[i]])
            v[0] = d[i] * 1.1
            w = ti.Vector([x[i], d[i]])
            w += ti.Vector([d[i], d[i]])
            m = ti.Matrix([[x[i], 1], [d[i], 2]])
            m[0, 0] = d[i] / 3.0
            y[i] = v[0] + w[0] * 2.0 + m[0, 0] - m[0, 1]

    (ty, tx, td), (ky, kx, kd_) = values_and_grads(mixed, y, [x, d])
    np.testing.assert_array_equal(ky, ty)
    np.testing.assert_array_equal(kx, tx)
    np.testing.assert_array_equal(kd_, td)
    dv, xv = d.to_numpy(), x.to_numpy().astype(np.float64)
    np.testing.assert_allclose(ky, dv * 1.1 + 2 * (xv + dv) + dv / 3.0 - 1.0, rtol=1e-15 if ti.lang.impl.get_runtime()
                               .default_fp == ti.f64 else 1e-7)
