"""ti.atomic_max / ti.atomic_min reductions: Taichi 1.7.4's AD treats them as atomic adds in both
modes (silently wrong); kerndiff gives the winners the derivative, ties split evenly."""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd


pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)


@pytest.fixture(scope="module")
def fields(runtime):
    x = ti.field(ti.f64, shape=8)
    m = ti.field(ti.f64, shape=3)
    s = ti.field(ti.f64, shape=())
    y = ti.field(ti.f64, shape=2)
    r = ti.field(ti.f64, shape=())
    x.from_numpy(np.array([0.3, 1.2, -0.5, 0.9, 2.0, 0.1, -1.0, 0.7]))
    return x, m, s, y, r


def test_max_and_min_reductions_orders_1_and_2(fields):
    x, m, s, _, _ = fields

    @kd.kernel
    def k():
        for i in x:
            v = ti.sin(x[i]) * x[i]
            ti.atomic_max(m[i % 3], v)
            ti.atomic_min(s[None], x[i] ** 2 - 1.0)

    assert kd.check_grad(k, [x], m, order=2) < 1e-7
    assert kd.check_grad(k, [x], s, order=2) < 1e-7
    xv = x.to_numpy()
    g = kd.backward(k, inputs=[x], output=s)([xv])[0]
    winner = np.argmin(xv ** 2)
    expected = np.zeros(8)
    expected[winner] = 2 * xv[winner]
    np.testing.assert_allclose(g, expected, rtol=1e-12)  # Taichi's AD would give 2 x_i everywhere


def test_ties_split_evenly_and_the_initial_value_can_win(fields):
    _, _, _, y, r = fields

    @kd.kernel
    def tie():
        for i in y:
            ti.atomic_max(r[None], y[i] * 2.0)

    grad = kd.backward(tie, inputs=[y], output=r)
    np.testing.assert_allclose(grad([np.array([1.0, 1.0])])[0], [1.0, 1.0])
    assert kd.forward(tie, inputs=[y], output=r)([np.array([1.0, 1.0])], tangents=[np.array([1.0, 3.0])]) == 4.0
    # all contributions below the initial value 0 (the factory clears outputs): nothing flows back
    np.testing.assert_allclose(grad([np.array([-1.0, -2.0])])[0], [0.0, 0.0])


def test_second_derivatives_in_forward_mode_and_forward_reverse(fields):
    x, _, s, _, _ = fields

    @kd.kernel
    def peak():
        for i in x:
            ti.atomic_max(s[None], ti.sin(x[i]) * x[i])

    xv = x.to_numpy()
    w = int(np.argmax(np.sin(xv) * xv))
    # forward over forward: the winner's g''(x) = 2 cos x - x sin x, in the direction e_w twice
    kd.dual(x).from_numpy(np.eye(8)[w])
    kd.dual(x, 2).from_numpy(np.eye(8)[w])
    kd.dual(kd.dual(x), 2).fill(0)
    for f in (s, kd.dual(s), kd.dual(s, 2), kd.dual(kd.dual(s), 2)):
        f[None] = 0.0
    peak.forward.forward()
    assert kd.dual(kd.dual(s), 2)[None] == pytest.approx(2 * np.cos(xv[w]) - xv[w] * np.sin(xv[w]), rel=1e-12)
    # reverse over forward (refused before session 49: the forward kernel counts the winners in a
    # helper field and clears it): peak.reverse.forward with the adjoints' roles swapped
    # (ad/forward_reverse.py). With ẋ = c e_w, adj(s) = a, adj(dual(s)) = b: adj(x)_w = g' a + g'' b c,
    # adj(dual(x))_w = g' b, g = x sin x
    a, b, c = 0.7, -1.3, 0.4
    kd.dual(x).from_numpy(np.eye(8)[w] * c)
    for f in (kd.adjoint(x), kd.adjoint(kd.dual(x))):
        f.fill(0)
    s[None] = -100.0
    peak()
    kd.adjoint(s)[None], kd.adjoint(kd.dual(s))[None] = a, b
    peak.forward.reverse()
    g1, g2 = np.sin(xv[w]) + xv[w] * np.cos(xv[w]), 2 * np.cos(xv[w]) - xv[w] * np.sin(xv[w])
    np.testing.assert_allclose(kd.adjoint(x).to_numpy(), np.eye(8)[w] * (g1 * a + g2 * b * c), rtol=1e-12)
    np.testing.assert_allclose(kd.adjoint(kd.dual(x)).to_numpy(), np.eye(8)[w] * g1 * b, rtol=1e-12)
    assert peak.forward.reverse.source.splitlines()[2].startswith("    # peak.forward.reverse, computed as")
    # the reverse kernel reads the result s, which the kernel writes: its reverse is refused
    with pytest.raises(kd.KernDiffError) as err:
        peak.reverse.reverse()
    message = str(err.value)
    assert "ti.atomic_max(s[None], ti.sin(x[i]) * x[i])" in message  # the user's line, not a '?'
    assert "k.reverse.forward" in message and "reads 's'" in message
    for f in (kd.dual(x), kd.dual(x, 2), kd.adjoint(x), kd.adjoint(kd.dual(x))):
        f.fill(0)


def test_forward_reverse_of_max_and_min_reductions(fields):
    """k.forward.reverse of a kernel with atomic max/min (since session 49): the same numbers as
    k.reverse.forward with the seeds' roles swapped, and, inside a program (H·v by kd.Tape over
    its forward kernels: each runs its k.forward.reverse on the way back), against differences of
    the program's gradient. (A derivative kernel alone is no fit for differences: it reads the
    reductions' results to find the winners, and moving a result by ε leaves it with none.)"""
    x, m, s, _, _ = fields
    loss = ti.field(ti.f64, shape=())
    q = ti.field(ti.f64, shape=3)

    @kd.kernel
    def reductions():
        for i in x:
            ti.atomic_max(m[i % 3], ti.sin(x[i]) * x[(i + 1) % 8])
            ti.atomic_min(s[None], x[i] ** 2 - 0.3 * x[i])
            q[i % 3] += -x[(i + 1) % 8]  # (linear: its second derivatives come from measure's sin)

    @kd.kernel
    def measure():
        for j in m:
            loss[None] += m[j] ** 2 * (j + 1.0) + ti.sin(m[j]) * s[None] + ti.sin(q[j]) * m[j]
        loss[None] += s[None] ** 3

    def program():
        m.fill(-10.0)
        s[None] = 10.0
        q.fill(0.0)
        reductions()
        measure()

    # (each reduction has one winner, no contribution within 0.05 of it: differences see no kink)
    x.from_numpy(np.array([0.3, 1.2, -0.5, 0.9, 2.0, 0.1, -1.0, 0.7]))
    assert kd.check_grad(program, [x], loss, order=2) < 1e-7

    rng = np.random.default_rng(0)
    xdot, a_m, b_m = rng.standard_normal(8), rng.standard_normal(3), rng.standard_normal(3)
    a_s, b_s = rng.standard_normal(2)
    m.fill(-10.0)
    s[None] = 10.0
    q.fill(0.0)
    reductions()

    def run(path, adj_of, adj_of_dual, read):
        kd.dual(x).from_numpy(xdot)
        for f in (x, kd.dual(x)):
            kd.adjoint(f).fill(0)
        kd.dual(kd.adjoint(x)).fill(0)
        adj_of(m).from_numpy(a_m)
        adj_of_dual(m).from_numpy(b_m)
        adj_of(s).fill(a_s)
        adj_of_dual(s).fill(b_s)
        path()
        return read()

    fr = run(reductions.forward.reverse, kd.adjoint, lambda f: kd.adjoint(kd.dual(f)),
             lambda: (kd.adjoint(x).to_numpy(), kd.adjoint(kd.dual(x)).to_numpy()))
    rf = run(reductions.reverse.forward, lambda f: kd.dual(kd.adjoint(f)), kd.adjoint,
             lambda: (kd.dual(kd.adjoint(x)).to_numpy(), kd.adjoint(x).to_numpy()))
    np.testing.assert_allclose(fr[0], rf[0], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(fr[1], rf[1], rtol=1e-13, atol=1e-15)
    assert np.any(fr[0]) and np.any(fr[1])
    kd.dual(x).fill(0)


def test_the_generated_passes_read_like_code_a_person_wrote(fields):
    x, m, s, _, _ = fields
    kd.dual(x)
    y = ti.field(ti.f64, shape=8)  # no dual: its contributions are constants, their tangent pass is empty

    @kd.kernel
    def both():
        for i in x:
            ti.atomic_max(s[None], x[i] ** 2)
            ti.atomic_min(m[i % 3], y[i])

    source = both.forward.source
    assert "if 1:" not in source  # a 0-d field's passes are plain statements, not a loop or an `if 1:`
    assert "pass" not in source  # and a pass with nothing to do is not emitted
    assert "if s_winners[None] > 0.0:\n        s_dual[None] = 0.0" in source
    assert "m_dual[e0] = 0.0" in source and "s_winners[None] = 0.0" in source
    kd.dual(x).fill(0)


def test_later_loops_reducing_again_or_updating_the_result(runtime):
    """A reverse finds an atomic max's winners by comparing them with the result left in the field,
    so a later loop adding into or storing to that result is refused (it returned a wrong gradient
    until session 31, found by a fuzzer of multi-loop programs); later maxima and minima into it,
    in loops of their own, and reads of it, are fine. Max and min into the same element in one
    loop depend on the order the iterations run in, and are refused in both modes; into different
    elements they are not."""
    x = ti.field(ti.f64, shape=5)
    m = ti.field(ti.f64, shape=2)
    z = ti.field(ti.f64, shape=5)
    x.from_numpy(np.array([0.3, -1.2, 0.8, 0.45, -0.1]))

    @kd.kernel
    def max_then_add():
        for i in x:
            ti.atomic_max(m[0], x[i])
        for i in x:
            m[0] += x[i] * 0.1

    @kd.kernel
    def max_then_store():
        for i in x:
            ti.atomic_max(m[0], x[i])
        for i in range(1):
            m[0] = 5.0

    @kd.kernel
    def mixed():
        for i in x:
            ti.atomic_max(m[0], x[i])
            ti.atomic_min(m[0], x[i] * 0.5)

    for k, line in ((max_then_add, "m[0] += x[i] * 0.1"), (max_then_store, "m[0] = 5.0")):
        with pytest.raises(kd.KernDiffError, match="finds the winners of ti.atomic_max") as err:
            k.reverse()
        assert line in str(err.value) and "ti.atomic_max(m[0], x[i])" in str(err.value)
    for path in ("forward", "reverse"):
        with pytest.raises(kd.KernDiffError, match="ti.atomic_max and ti.atomic_min into the same elements"):
            getattr(mixed, path)()

    @kd.kernel
    def max_min_max_read():
        for i in x:
            ti.atomic_min(m[0], x[i] ** 2)
            ti.atomic_max(m[1], ti.sin(x[i]))  # another element: no order question
        for i in x:
            ti.atomic_max(m[0], x[i] * 0.5 + 0.2)
        for i in x:
            z[i] = m[0] * x[i] + m[1]

    kd.adjoint(x)
    kd.dual(x)
    for start in ([0.01, 0.0], [5.0, -5.0]):  # the second loop's maximum wins, or the first's minimum
        m.from_numpy(np.array(start))
        assert kd.check_grad(max_min_max_read, [x], z, order=2) < 1e-7
        m.from_numpy(np.array(start))
        max_min_max_read()
        xv = x.to_numpy()
        first = min(start[0], np.min(xv ** 2))
        second = max(first, np.max(xv * 0.5 + 0.2))
        np.testing.assert_allclose(m.to_numpy(), [second, max(start[1], np.max(np.sin(xv)))], rtol=1e-15)
    # and against the analytic gradient of sum(w * z) in the second case: the first loop's
    # minimum (x[4] ** 2 = 0.01) stays below the second's maximum (0.8 * 0.5 + 0.2 = 0.6, from
    # x[2]), which is m[0]; m[1] = sin(x[2])
    w = np.array([0.5, -1.0, 2.0, 0.25, 1.5])
    m.from_numpy(np.array([5.0, -5.0]))
    max_min_max_read()
    kd.adjoint(x).fill(0)
    kd.adjoint(m).fill(0)
    kd.adjoint(z).from_numpy(w)
    max_min_max_read.reverse()
    expected = w * 0.6
    expected[2] += 0.5 * np.dot(w, xv) + np.cos(0.8) * w.sum()
    np.testing.assert_allclose(kd.adjoint(x).to_numpy(), expected, rtol=1e-14)
    for f in (kd.adjoint(x), kd.adjoint(m), kd.adjoint(z), kd.dual(x)):
        f.fill(0)



def test_winners_found_when_fast_math_recomputes_them_differently(runtime):
    """The passes after the loop recompute each contribution, and Taichi's fast math (its default)
    lets LLVM compile `w[(i + 1) % 4] ** 3 * ti.abs(y[idx[i]])` differently there than in the
    loop (beside the tangent's `w ** 2 * 3.0`): the winner missed the result by an ulp, the exact
    comparison found none, and the reverse returned a zero gradient (found by the program fuzzer in
    session 31, with these values). A contribution within 8 ulps of the result now reaches it
    (with minmax.REACH set to zero this test fails)."""
    w = ti.field(ti.f64, shape=4)
    y = ti.field(ti.f64, shape=4)
    idx = ti.field(ti.i32, shape=4)
    m = ti.field(ti.f64, shape=())
    rng = np.random.default_rng(5)
    rng.uniform(-1, 1, 4)  # (the fuzzer's x)
    w.from_numpy(rng.uniform(-1, 1, 4))
    y.from_numpy(rng.uniform(-1, 1, 4))
    idx.from_numpy(np.array([2, 0, 0, 3], dtype=np.int32))

    @kd.kernel
    def least():
        for i in range(4):
            ti.atomic_min(m[None], w[(i + 1) % 4] ** 3 * ti.abs(y[idx[i]]))

    wv, yv, iv = w.to_numpy(), y.to_numpy(), idx.to_numpy()
    values = np.roll(wv, -1) ** 3 * np.abs(yv[iv])
    a = int(np.argmin(values))
    assert np.sum(values == values[a]) == 1
    grad_w, grad_y = np.zeros(4), np.zeros(4)
    grad_w[(a + 1) % 4] = 3 * wv[(a + 1) % 4] ** 2 * abs(yv[iv[a]])
    grad_y[iv[a]] = wv[(a + 1) % 4] ** 3 * np.sign(yv[iv[a]])
    m[None] = 10.0
    least()
    assert m[None] == pytest.approx(values[a], rel=1e-14)
    kd.adjoint(w).fill(0)
    kd.adjoint(y).fill(0)
    kd.adjoint(m)[None] = 1.0
    least.reverse()
    np.testing.assert_allclose(kd.adjoint(w).to_numpy(), grad_w, rtol=1e-12)
    np.testing.assert_allclose(kd.adjoint(y).to_numpy(), grad_y, rtol=1e-12)
    tw, ty = rng.standard_normal(4), rng.standard_normal(4)
    kd.dual(w).from_numpy(tw)
    kd.dual(y).from_numpy(ty)
    m[None] = 10.0
    least.forward()
    assert kd.dual(m)[None] == pytest.approx(np.dot(grad_w, tw) + np.dot(grad_y, ty), rel=1e-12)
    for f in (kd.dual(w), kd.dual(y), kd.adjoint(w), kd.adjoint(y), kd.adjoint(m)):
        f.fill(0)


def test_a_contribution_the_loop_overwrites_afterwards_is_refused(runtime):
    """The passes after the loop recompute each contribution from the fields, so a loop that
    overwrites what a contribution read (`ti.atomic_max(m[None], v[i])` then `v[i] = ...`) would
    have them compare a new value (the forward kernel found no winner and left a zero tangent,
    until session 31): refused. Written before it is read, the value stays."""
    x = ti.field(ti.f64, shape=5)
    v = ti.field(ti.f64, shape=5)
    m = ti.field(ti.f64, shape=())
    x.from_numpy(np.array([0.3, -1.2, 0.8, 0.45, -0.1]))

    @kd.kernel
    def read_then_overwritten():
        for i in x:
            ti.atomic_max(m[None], v[i] * x[i])
            v[i] = x[i] * 2.0

    @kd.kernel
    def written_then_read():
        for i in x:
            v[i] = ti.sin(x[i]) * 2.0
            ti.atomic_max(m[None], v[i] * x[i])

    kd.dual(x)
    kd.adjoint(x)
    # (the reverse refuses it for the value the reverse pass needs, ad/hazards.py, before this)
    for path, why in (("forward", "recomputes what this loop read after the loop"), ("reverse", "overwrites 'v'")):
        with pytest.raises(kd.KernDiffError, match=why) as err:
            getattr(read_then_overwritten, path)()
        assert "v[i] = x[i] * 2.0" in str(err.value) and "ti.atomic_max(m[None], v[i] * x[i])" in str(err.value)
    m[None] = -5.0
    assert kd.check_grad(written_then_read, [x], m, order=2) < 1e-7
    xv = x.to_numpy()
    best = int(np.argmax(2 * np.sin(xv) * xv))
    g = kd.backward(written_then_read, inputs=[x], output=m)([xv])[0]
    expected = np.zeros(5)
    expected[best] = 2 * (np.cos(xv[best]) * xv[best] + np.sin(xv[best]))
    np.testing.assert_allclose(g, expected, rtol=1e-12)
    kd.dual(x).fill(0)
    kd.adjoint(x).fill(0)


def test_atomic_max_and_min_of_locals_in_a_parallel_loop(runtime):
    """`ti.atomic_max(hi, v)` / `ti.atomic_min(lo, w)` on locals bound before a parallel loop
    (Taichi makes them globals there; refused before: "ti.atomic_max of a local variable is not
    supported"), a vector local's components each their own minimum, and `ti.atomic_max(best,
    ...)` on an iteration's own local in an inner loop (`best = ti.max(best, ...)`). Values
    against Taichi's kernel; derivatives (the winners') against analytic ones and, to second
    order, finite differences; reducing one local two ways in one loop is refused."""
    x = ti.field(ti.f64, shape=6, needs_grad=True, needs_dual=True)
    out = ti.field(ti.f64, shape=3, needs_grad=True, needs_dual=True)
    xv = np.array([0.3, 1.4, 0.9, -0.2, 1.1, 0.5])
    x.from_numpy(xv)

    def extremes():
        hi = -1e9
        lo = ti.Vector([1e9, 1e9])
        for i in x:
            ti.atomic_max(hi, ti.sin(x[i]) * x[i])
            ti.atomic_min(lo, ti.Vector([x[i] ** 2, ti.cos(x[i])]))
            best = 0.0
            for j in range(3):
                ti.atomic_max(best, x[(i + j) % 6] * 0.5)
            out[2] += best
        out[0] = hi * 2.0
        out[1] = lo[0] + lo[1] * hi

    got = []
    for make in (ti.kernel, kd.kernel):
        out.fill(0)
        make(extremes)()
        got.append(out.to_numpy())
    np.testing.assert_allclose(got[1], got[0], rtol=1e-14)
    k = kd.kernel(extremes)
    g = kd.backward(k, inputs=[x], output=out)([xv], cotangent=np.array([1.0, 0.0, 0.0]))[0]
    expected = np.zeros(6)
    top = np.argmax(np.sin(xv) * xv)
    expected[top] = 2.0 * (np.cos(xv[top]) * xv[top] + np.sin(xv[top]))
    np.testing.assert_allclose(g, expected, rtol=1e-12)
    assert kd.check_grad(k, [x], out, order=2) < 1e-6

    @kd.kernel
    def two_ways():
        m = 0.0
        for i in x:
            m += x[i]
            ti.atomic_max(m, x[i])
        out[0] = m

    with pytest.raises(kd.KernDiffError, match="'m' is reduced two ways in one parallel loop") as e:
        two_ways()
    assert "ti.atomic_max(m, x[i])" in str(e.value)


def test_program_hvp_through_reductions_beside_own_elements_and_in_place_updates(fields):
    """The Tape restores what a kernel updates in place before running its reverse from its
    inputs. For a kernel with an atomic max/min, whose k.forward.reverse is k.reverse.forward
    renamed, that is the kernel's own restorable fields and their duals, not what the forward
    kernel's analysis names (its cleared winner count made it take `v`, stored and then read by
    its own iteration, for one: restored to its old values, the reverse read them as the results;
    the programs fuzzer's seed 7302, a wrong H·v)."""
    x, m, s, _, _ = fields
    v = ti.Vector.field(2, ti.f64, shape=8)
    z = ti.field(ti.f64, shape=8)
    loss = ti.field(ti.f64, shape=())

    @kd.kernel
    def own_then_max():
        for i in range(8):
            v[i] = ti.Vector([x[i] ** 2, ti.sin(x[i])])
            z[i] = v[i].dot(v[i]) * x[(i + 1) % 8]
        for i in range(8):
            ti.atomic_max(m[i % 3], ti.sin(z[i]) + x[i])

    q = ti.field(ti.f64, shape=8)

    @kd.kernel
    def in_place_then_min():
        for i in range(8):
            q[i] = q[i] * ti.cos(q[i]) + x[i]  # updated in place: restored before its reverse
        for i in range(8):
            ti.atomic_min(s[None], x[i] * x[i] - 0.3 * x[i])

    @kd.kernel
    def measure():
        for j in m:
            loss[None] += m[j] ** 2 * (j + 1.0)
        for i in range(8):
            loss[None] += v[i].norm_sqr() * z[i] + ti.sin(z[i]) + q[i] ** 3
        loss[None] += s[None] ** 3

    def program():
        m.fill(-10.0)
        s[None] = 10.0
        q.fill(0.5)
        own_then_max()
        in_place_then_min()
        measure()

    x.from_numpy(np.array([0.3, 1.2, -0.5, 0.9, 2.0, 0.1, -1.0, 0.7]))
    assert kd.check_grad(program, [x], loss, order=2) < 1e-7
