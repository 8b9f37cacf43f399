"""A parallel loop that sums into a 0-D field reads and writes vector and matrix components through
the components' scalar fields (`pos_0[i]` for `pos[i][0]`, codegen/components.py): Taichi keeps
such a sum per thread only then. Values and gradients against Taichi's own kernel and grad, and
against finite differences; the source shows the scalar fields only where they matter."""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import assert_same, grads_of_both

pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)

P, S = 16, 64


@pytest.fixture(scope="module")
def fields(runtime):
    rng = np.random.default_rng(3)
    f = dict(
        pos=ti.Vector.field(2, ti.f64, P, needs_grad=True),
        M=ti.Matrix.field(2, 2, ti.f64, 4, needs_grad=True),
        V=ti.Vector.field(3, ti.f64, 8, offset=5, needs_grad=True),
        ends=ti.Vector.field(2, ti.i32, S),
        E=ti.field(ti.f64, (), needs_grad=True),
        Ev=ti.Vector.field(2, ti.f64, (), needs_grad=True),
        out=ti.field(ti.f64, S, needs_grad=True),
    )
    f["pos"].from_numpy(rng.standard_normal((P, 2)))
    f["M"].from_numpy(rng.standard_normal((4, 2, 2)))
    f["V"].from_numpy(rng.standard_normal((8, 3)))
    e = rng.integers(0, P, (S, 2))
    e[:, 1] = np.where(e[:, 1] == e[:, 0], (e[:, 0] + 1) % P, e[:, 1])
    f["ends"].from_numpy(e.astype(np.int32))
    return f


def assert_as_taichi(fn, outs, inputs):
    results, k = grads_of_both(fn, outs, inputs)
    assert_same(results)
    return k


def test_summing_loop_reads_components_through_scalar_fields(fields):
    pos, M, ends, E, Ev = (fields[n] for n in ("pos", "M", "ends", "E", "Ev"))

    def energy():
        for s in range(S):
            d = pos[ends[s][0]] - pos[ends[s][1]]
            E[None] += 0.5 * (d.norm() - 0.1) ** 2 + M[s % 4][0, 1] * d[0]
            Ev[None][1] += d[1] ** 2

    k = assert_as_taichi(energy, [E, Ev], [pos, M])
    for source in (k.source, k.forward.source):  # both sum into E and Ev
        code = "\n".join(line.split("#")[0] for line in source.splitlines())
        assert "pos_0[ends_0[s]] - pos_0[ends_1[s]]" in code, source
        assert "M_01[s % 4]" in code and "Ev_1[None] +=" in code and "pos[" not in code, source
    assert "scalar fields let Taichi sum E, Ev[1] per thread" in k.source
    assert "pos_0" not in k.reverse.source  # it scatters into pos_adj and sums nothing
    kd.check_grad(k, [pos, M], E, order=2)
    kd.check_grad(k, [pos], Ev)


def test_running_maximum_and_offset_vector_field(fields):
    V, E = fields["V"], fields["E"]

    def largest():
        for i in V:  # i runs from 5 to 12
            ti.atomic_max(E[None], V[i][0] * V[i][2] + i)

    fields["E"].fill(-1e9)
    k = kd.kernel(largest)
    k()
    expected = np.max(V.to_numpy()[:, 0] * V.to_numpy()[:, 2] + np.arange(5, 13))
    assert E[None] == pytest.approx(expected, rel=1e-14)
    assert "V_0[i] * V_2[i]" in k.source
    fields["E"].fill(-1e9)
    kd.check_grad(k, [V], E, order=2)


def test_loops_without_a_scalar_sum_keep_component_indexing(fields):
    pos, ends, out = fields["pos"], fields["ends"], fields["out"]

    def lengths():
        for s in range(S):
            out[s] = (pos[ends[s][0]] - pos[ends[s][1]]).norm()

    k = assert_as_taichi(lengths, [out], [pos])
    assert "pos[ends[s][0]][0]" in k.source and "pos_0" not in k.source


def test_a_summed_vector_reset_in_the_same_kernel(runtime):
    """A centre of mass: `c[None] = vec(0)` before a loop that sums into c's components and a
    read after it, in one kernel. Stored as `c[None][0] = 0.0` beside the loop's `c_0[None] +=`,
    Taichi 1.7 failed to compile the kernel (an assertion in its scalarize pass, the process
    killed); every access of c now goes through the scalar fields. Values, and the gradient
    against finite differences."""
    n = 7
    x = ti.Vector.field(3, ti.f64, shape=n)
    c = ti.Vector.field(3, ti.f64, shape=())
    loss = ti.field(ti.f64, shape=())
    xs = np.random.default_rng(4).random((n, 3))
    x.from_numpy(xs)

    @kd.kernel
    def centre_of_mass():
        c[None] = ti.Vector([0.0, 0.0, 0.0])
        for p in range(n):
            c[None] += x[p] / n
        loss[None] = (c[None] - ti.Vector([0.7, 0.1, 0.6])).norm_sqr()

    centre_of_mass()
    np.testing.assert_allclose(c.to_numpy(), xs.mean(axis=0), rtol=1e-14)
    assert loss[None] == pytest.approx(np.sum((xs.mean(axis=0) - [0.7, 0.1, 0.6]) ** 2), rel=1e-13)
    assert "c[None][" not in centre_of_mass.source and "c_0[None] = 0.0" in centre_of_mass.source
    assert kd.check_grad(centre_of_mass, inputs=[x], output=loss, order=2) < 1e-7
