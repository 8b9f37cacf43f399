"""Fields indexed from an offset (`ti.field(..., offset=-2)`): struct-fors run over the field's own
index range, derivative fields, private copies and helper fields are indexed like the field.
Values and gradients against Taichi's own kernel and grad where Taichi has them, and against
finite differences (kd.check_grad, forward and reverse) everywhere."""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import assert_same, cpu_only, grads_of_both

pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)

N, SCATTERS = 8, 2048  # the scatter loop is long enough to get private copies


@pytest.fixture(scope="module")
def fields(runtime):
    rng = np.random.default_rng(0)
    f = dict(
        o=ti.field(ti.f64, N, offset=-2, needs_grad=True),
        p=ti.field(ti.f64, N, offset=-2, needs_grad=True),
        g=ti.field(ti.f64, (N, N), offset=(-1, 3), needs_grad=True),
        h=ti.field(ti.f64, (N, N), offset=(-1, 3), needs_grad=True),
        V=ti.Vector.field(2, ti.f64, N, offset=5, needs_grad=True),
        hist=ti.field(ti.f64, (4, N), offset=(2, -2), needs_grad=True),
        loss=ti.field(ti.f64, (), needs_grad=True),
        idx=ti.field(ti.i32, SCATTERS),
    )
    f["o"].from_numpy(rng.standard_normal(N))
    f["g"].from_numpy(rng.standard_normal((N, N)))
    f["V"].from_numpy(rng.standard_normal((N, 2)))
    f["idx"].from_numpy(rng.integers(-2, N - 2, SCATTERS).astype(np.int32))
    return f


def test_struct_for_and_boundary_ternary_over_an_offset_field(fields):
    o, p = fields["o"], fields["p"]

    def shifted():
        for i in o:  # i runs from -2 to 5
            p[i] = o[i] * i + (o[i - 1] if i > -2 else 0.0)

    results, k = grads_of_both(shifted, [p], [o])
    assert_same(results)
    kd.check_grad(k, [o], p, order=2)


def test_inner_loop_reads_at_negative_indices_of_an_offset_field(fields):
    """o[-2] and o[i] repeat in every trip of the inner loop: read once before it (as `o_m2`,
    `o_i`: the first version of that pass named the local `o_-2`, which did not compile)."""
    o, p = fields["o"], fields["p"]

    def inner():
        for i in o:
            s = 0.0
            for j in range(-2, 6):
                s += ti.sin(o[i] * o[j]) + o[-2] * o[j]
            p[i] = s

    results, k = grads_of_both(inner, [p], [o])
    assert_same(results)
    kd.check_grad(k, [o], p, order=2)
    assert "o_m2 = o[-2]" in k.reverse.source


def test_grouped_loop_over_a_2d_offset_field(fields):
    g, h = fields["g"], fields["h"]

    def grouped():
        for I in ti.grouped(g):
            h[I] = ti.sin(g[I]) * (I[0] + I[1]) + (g[I[0], I[1] - 1] if I[1] > 3 else 1.0)

    results, k = grads_of_both(grouped, [h], [g])
    assert_same(results)
    kd.check_grad(k, [g], h, order=2)


@cpu_only("private copies are made on Taichi's CPU backends only")
def test_private_copies_of_offset_fields(fields):
    """Scattered adds into an offset field and into one time slice of an offset history: the
    reverse kernel adds through private copies indexed like the field."""
    o, p, hist, idx = fields["o"], fields["p"], fields["hist"], fields["idx"]

    def scatter():
        for k in range(SCATTERS):
            p[idx[k]] += ti.exp(o[idx[(k * 7) % SCATTERS]]) * 0.01
            hist[3, idx[k]] += o[idx[k]] ** 2 * 0.01

    results, k = grads_of_both(scatter, [p, hist], [o])
    assert_same(results)
    assert "claim_slot" in k.reverse.source and "o_adj_private" in k.reverse.source
    kd.check_grad(k, [o], p, order=2)
    kd.check_grad(k, [o], hist)
    assert "hist_private[slot, idx[k]]" in k.forward.source  # the copy of slice 3, from index -2


def test_atomic_max_and_tape_on_offset_fields(fields):
    o, V, loss, idx = fields["o"], fields["V"], fields["loss"], fields["idx"]
    best = ti.field(ti.f64, N, offset=-2)  # no needs_grad: kerndiff allocates its derivative fields

    @kd.kernel
    def largest():
        for k in range(64):
            ti.atomic_max(best[idx[k]], o[idx[(k + 3) % 64]] * k)

    kd.check_grad(largest, [o], best, order=2)

    @kd.kernel
    def energy():
        for i in V:  # i runs from 5 to 12
            loss[None] += V[i].norm_sqr() * i + ti.sin(o[i - 7])

    with kd.Tape(loss):
        energy()
    v, ov = V.to_numpy(), o.to_numpy()
    np.testing.assert_allclose(V.grad.to_numpy(), 2 * v * np.arange(5, 5 + N)[:, None], rtol=1e-13)
    np.testing.assert_allclose(o.grad.to_numpy(), np.cos(ov), rtol=1e-13)
    assert kd.adjoint(best).shape == best.shape and kd.adjoint(best)[-2] == kd.adjoint(best).to_numpy()[0]
