"""Fields a loop gathers together, read from one record (opt.packed_gathers), on the CPU.

The pass is made for fields of several megabytes; these tests lower its size threshold so that
small fields take it, and check the kernels that do against the same kernels without it, against
finite differences and against the analytic derivative of a gather."""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import check, cpu_only
from harness import springs as make_springs
from kerndiff.opt import packed_gathers

pytestmark = [pytest.mark.usefixtures("runtime"),  # one f64 CPU runtime per module (conftest)
              cpu_only("records are made on Taichi's CPU backends only")]

P, S = 300, 2048  # particles, springs


@pytest.fixture
def any_size(monkeypatch):
    monkeypatch.setattr(packed_gathers, "MIN_BYTES", 0)


@pytest.fixture(scope="module")
def springs(runtime):
    return make_springs(P, S, 5)


def hvp(pos, E, k, v):
    k()
    kd.adjoint(pos).fill(0)
    kd.dual(kd.adjoint(pos)).fill(0)
    kd.adjoint(E)[None] = 1.0
    kd.dual(kd.adjoint(E))[None] = 0.0
    kd.dual(pos).from_numpy(v)
    k.reverse.forward()
    return kd.adjoint(pos).to_numpy(), kd.dual(kd.adjoint(pos)).to_numpy()


def test_the_hvp_gathers_positions_and_tangents_from_one_record(springs, any_size, monkeypatch):
    pos, E, energy = springs
    v = np.random.default_rng(6).standard_normal((P, 2))
    packed = kd.kernel(energy)
    got = hvp(pos, E, packed, v)
    src = packed.reverse.forward.source
    assert "# pos and pos_dual side by side, one record per element" in src
    assert "pos_packed[p, 0] = pos[p][0]" in src and "pos_packed[p, 3] = pos_dual[p][1]" in src
    assert "d_0_dual = pos_packed[ends[s][0], 2] - pos_packed[ends[s][1], 2]" in src
    assert "pos_packed" not in packed.reverse.source  # one field gathered: nothing to pack
    monkeypatch.setattr(packed_gathers, "MIN_BYTES", 1 << 62)
    plain = kd.kernel(energy)
    expected = hvp(pos, E, plain, v)
    assert "pos_packed" not in plain.reverse.forward.source
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert np.abs(got[1]).max() > 1.0
    check(packed.reverse, "forward", rtol=1e-6, atol=1e-8)  # the HVP against finite differences


def test_a_forward_gather_of_two_fields_and_where_the_loop_is_too_short(runtime, any_size):
    n = 5
    x, w, out = (ti.field(ti.f64, shape=n) for _ in range(3))
    idx = ti.field(ti.i32, shape=n)
    x.from_numpy(np.linspace(0.2, 1.0, n))
    w.from_numpy(np.linspace(-1.0, 0.5, n))
    idx.from_numpy(np.array([3, 0, 4, 4, 1], dtype=np.int32))

    @kd.kernel
    def gather():
        for i in range(n):
            out[i] = ti.sin(x[idx[i]]) * w[idx[i]]

    @kd.kernel
    def short():  # 2 iterations: copying 5 elements would cost more than it saves
        for i in range(2):
            out[i] = ti.sin(x[idx[i]]) * w[idx[i]]

    xd, wd = np.linspace(1.0, 2.0, n), np.linspace(0.5, -0.5, n)
    kd.dual(x).from_numpy(xd)
    kd.dual(w).from_numpy(wd)
    gather.forward()
    src = gather.forward.source
    assert "x[p]" in src and "w_dual[p]" in src and "x_packed[idx[i], " in src
    j = idx.to_numpy()
    xv, wv = x.to_numpy(), w.to_numpy()
    expected = np.cos(xv[j]) * xd[j] * wv[j] + np.sin(xv[j]) * wd[j]
    np.testing.assert_allclose(kd.dual(out).to_numpy(), expected, rtol=1e-13)
    check(gather, "forward")
    check(gather, "reverse")
    short.forward()
    assert "_packed" not in short.forward.source


def test_a_group_too_short_to_pack_does_not_hide_the_next(runtime, any_size):
    """Fields of two shapes gathered at two indices: a row of a 2 x n field (n of its 2n elements
    read: too few trips to copy it) met first, and a field of n with its tangent. The second group
    is packed; before session 41 only the first group found was considered, and nothing was."""
    n = 4
    x, out = ti.field(ti.f64, shape=n), ti.field(ti.f64, shape=n)
    y = ti.field(ti.f64, shape=(2, n))
    idx = ti.field(ti.i32, shape=n)
    rng = np.random.default_rng(3)
    x.from_numpy(rng.uniform(-1, 1, n))
    y.from_numpy(rng.uniform(-1, 1, (2, n)))
    idx.from_numpy(np.array([2, 0, 3, 1], dtype=np.int32))

    @kd.kernel
    def two_shapes():
        for i in range(n):
            a = ti.sin(y[1, idx[i]])  # (read first)
            out[i] = a * x[idx[i]] ** 2

    xd, yd = rng.standard_normal(n), rng.standard_normal((2, n))
    kd.dual(x).from_numpy(xd)
    kd.dual(y).from_numpy(yd)
    two_shapes.forward()
    src = two_shapes.forward.source
    assert "x_packed[idx[i], 1]" in src and "y_packed" not in src, src
    j = idx.to_numpy()
    xv, yv = x.to_numpy(), y.to_numpy()[1]
    expected = np.cos(yv[j]) * yd[1, j] * xv[j] ** 2 + np.sin(yv[j]) * 2 * xv[j] * xd[j]
    np.testing.assert_allclose(kd.dual(out).to_numpy(), expected, rtol=1e-13)
    check(two_shapes, "forward")


def test_kernels_share_records_by_shape(runtime, any_size):
    """A record's values live from its copy to the end of the loop that gathers from it, so loops
    packing records of one dtype and shape share one field, in any kernel: a second kernel
    gathering other fields makes no SNode tree, names the record after its own fields, and each
    kernel's tangents agree with the analytic ones, the first's again after the second ran."""
    from taichi.lang import impl
    n = 6
    idx = ti.field(ti.i32, shape=n)
    a, b, c, d, out = (ti.field(ti.f64, shape=n) for _ in range(5))
    rng = np.random.default_rng(11)
    for f in (a, b, c, d):
        f.from_numpy(rng.uniform(0.5, 1.5, n))
        kd.dual(f).from_numpy(rng.standard_normal(n))
    idx.from_numpy(np.array([5, 0, 3, 3, 1, 2], dtype=np.int32))

    @kd.kernel
    def on_ab():
        for i in range(n):
            out[i] = a[idx[i]] * b[idx[i]]

    @kd.kernel
    def on_cd():
        for i in range(n):
            out[i] = c[idx[i]] / d[idx[i]]

    j = idx.to_numpy()
    v = {f: f.to_numpy()[j] for f in (a, b, c, d)}
    t = {f: kd.dual(f).to_numpy()[j] for f in (a, b, c, d)}
    on_ab.forward()
    first = kd.dual(out).to_numpy()
    trees = impl.get_runtime().prog.get_snode_tree_size()
    on_cd.forward()
    assert impl.get_runtime().prog.get_snode_tree_size() == trees  # the same record field
    assert "b_packed[idx[i], 3]" in on_ab.forward.source and "b_packed" not in on_cd.forward.source
    assert "d_packed[idx[i], 3]" in on_cd.forward.source  # four entries: two fields and their tangents
    expected = t[c] / v[d] - v[c] * t[d] / v[d] ** 2
    np.testing.assert_allclose(kd.dual(out).to_numpy(), expected, rtol=1e-13)
    on_ab.forward()
    np.testing.assert_allclose(kd.dual(out).to_numpy(), first, rtol=0, atol=0)
    np.testing.assert_allclose(first, t[a] * v[b] + v[a] * t[b], rtol=1e-13)
