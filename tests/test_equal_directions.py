"""k.forward.forward with both levels seeded alike (a Laplacian's or a Hessian diagonal's passes)
runs a variant that computes the shared tangent once (ad/equal_directions.py). It must give what
the kernel as generated gives, run only when the seeds are equal, and compare at launch only the
seeds the kernel can read before writing them."""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import equal_directions_against_generated, get, put, second_order_outputs, signature
from test_corpus import CORPUS_NAMES, build_corpus

pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)


@pytest.fixture(scope="module")
def corpus(runtime):
    return build_corpus()


WITHOUT_A_VARIANT = {"walks_and_their_maximum"}  # an atomic max: its forward mode keeps winners' tangents


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_corpus_variant_gives_the_generated_kernels_numbers(corpus, name, variant_runs):
    got, generated = equal_directions_against_generated(*corpus[name])
    for a, b in zip(got, generated):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * max(1.0, float(np.max(np.abs(b)))))
    expected = [] if name in WITHOUT_A_VARIANT else [("forward", "forward")]
    assert [r.path for r in variant_runs] == expected


def test_unequal_seeds_run_the_generated_kernel(corpus, variant_runs):
    k, args = corpus["elementwise"]
    k(*args)
    ins, outs, _ = signature(k, args)
    rng = np.random.default_rng(4)
    v = [rng.standard_normal(np.shape(get(f))) for f in ins]
    for f, vv in zip(ins, v):
        put(kd.dual(f), vv)
        put(kd.dual(f, 2), vv)
    x = ins[0]
    flipped = get(kd.dual(x, 2))
    flipped.flat[-1] = -flipped.flat[-1]
    put(kd.dual(x, 2), flipped)
    k.forward.forward(*args)
    assert not variant_runs
    put(kd.dual(x, 2), get(kd.dual(x)))
    k.forward.forward(*args)
    assert len(variant_runs) == 1


# ----------------------------------------------------------------------------- a small PINN
H, P = 5, 4


@pytest.fixture(scope="module")
def mlp(runtime):
    rng = np.random.default_rng(0)
    x, y, u = (ti.field(ti.f64, shape=P) for _ in range(3))
    W1, W2 = ti.field(ti.f64, shape=(H, 2)), ti.field(ti.f64, shape=(H, H))
    b1, W3 = ti.field(ti.f64, shape=H), ti.field(ti.f64, shape=H)
    h1, h2 = ti.field(ti.f64, shape=(P, H)), ti.field(ti.f64, shape=(P, H))
    for f in (x, y, W1, W2, b1, W3):
        f.from_numpy(rng.standard_normal(f.shape))

    @kd.kernel
    def net():
        for p in range(P):
            for j in range(H):
                h1[p, j] = ti.tanh(W1[j, 0] * x[p] + W1[j, 1] * y[p] + b1[j])
            for j in range(H):
                s = 0.0
                for k in range(H):
                    s += W2[j, k] * h1[p, k]
                h2[p, j] = ti.tanh(s)
            s = 0.0
            for k in range(H):
                s += W3[k] * h2[p, k]
            u[p] = s

    def u_of(xv):
        x.from_numpy(xv)
        net()
        return u.to_numpy()

    return net, x, y, u, h1, h2, u_of


def test_laplacian_term_against_finite_differences(mlp, variant_runs):
    """u_xx by seeding x at both levels: the variant, against central differences of u (f64)."""
    net, x, y, u, h1, h2, u_of = mlp
    x0 = x.to_numpy()
    eps = 1e-4
    fd = (u_of(x0 + eps) - 2 * u_of(x0) + u_of(x0 - eps)) / eps ** 2
    x.from_numpy(x0)
    for d in (kd.dual(x), kd.dual(x, 2)):
        d.fill(1)
    kd.dual(y).fill(0)
    kd.dual(y, 2).fill(0)
    net.forward.forward()
    assert len(variant_runs) == 1
    np.testing.assert_allclose(kd.dual(kd.dual(u), 2).to_numpy(), fd, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kd.dual(u, 2).to_numpy(), kd.dual(u).to_numpy(), rtol=0, atol=0)


def test_only_seeds_read_at_launch_are_compared(mlp):
    """The hidden layers' duals are written whole before they are read: not compared at launch."""
    net, x, y, u, h1, h2, _ = mlp
    for f in (x, y):  # the seeds (alone, no earlier test made them)
        kd.dual(f)
        kd.dual(f, 2)
    K = net.forward.forward
    _, pairs, _, _ = K._equal_directions(K._compiled({}), {})
    assert {(id(a), id(b)) for a, b in pairs} == {(id(kd.dual(x)), id(kd.dual(x, 2))),
                                                  (id(kd.dual(y)), id(kd.dual(y, 2)))}
    # the variant's source reads no level-2 seed and no level-2 dual of a hidden layer
    src = K.equal_directions_source
    assert "x_dual2[" in K.source and "h1_dual2[p, k]" in K.source
    assert "x_dual2[" not in src and "h1_dual2[p, k]" not in src and "u_dual_dual2[p] =" in src
    assert net.forward.equal_directions_source is None


# ----------------------------------------------------------------------------- what the analysis finds
N = 4


@pytest.fixture(scope="module")
def fields(runtime):
    a, b, c = (ti.field(ti.f64, shape=N) for _ in range(3))
    m = ti.field(ti.f64, shape=(N, N))
    s = ti.field(ti.f64, shape=())
    rng = np.random.default_rng(1)
    for f in (a, b, c, m):
        f.from_numpy(rng.uniform(0.5, 1.5, f.shape))
    for f in (a, b, c, m):
        kd.dual(f)
        kd.dual(f, 2)
    return a, b, c, m, s


def variant_of(k):
    K = k.forward.forward
    return K._equal_directions(K._compiled({}), {})


def seed_ids(variant):
    return {id(a) for a, _ in variant[1]}


def test_partly_written_field_is_compared_at_launch(fields, variant_runs):
    """m[i, N - 1] is read but never written: m's seeds are compared (as well as a's), and
    seeds differing only there run the kernel as generated."""
    a, b, c, m, s = fields

    @kd.kernel
    def partly():
        for i in range(N):
            for j in range(N - 1):
                m[i, j] = ti.sin(a[i] * j)
            t = 0.0
            for k in range(N):
                t += m[i, k] ** 2
            b[i] = t

    assert seed_ids(variant_of(partly)) == {id(kd.dual(a)), id(kd.dual(m))}
    rng = np.random.default_rng(5)
    v = [rng.standard_normal(N), rng.standard_normal((N, N))]
    w = [rng.standard_normal(N), rng.standard_normal((N, N))]
    v2 = [v[0], v[1].copy()]
    v2[1][:, N - 1] += 1.0
    generated = second_order_outputs(partly, (), [a, m], [m, b], v, w, equal_directions=False, v2=v2)
    got = second_order_outputs(partly, (), [a, m], [m, b], v, w, equal_directions=True, v2=v2)
    assert not variant_runs
    for x, y in zip(got, generated):
        np.testing.assert_allclose(x, y, rtol=1e-13)
    assert not np.allclose(get(kd.dual(b, 2)), get(kd.dual(b)))  # the levels did differ


def test_whole_write_in_an_earlier_loop_covers_later_reads(fields):
    a, b, c, m, s = fields

    @kd.kernel
    def two_loops():
        for i in range(N):
            c[i] = ti.exp(a[i])
        for i in range(N):
            b[i] = c[i] * c[N - 1 - i]

    assert seed_ids(variant_of(two_loops)) == {id(kd.dual(a))}


def test_conditional_write_does_not_cover(fields):
    a, b, c, m, s = fields

    @kd.kernel
    def maybe():
        for i in range(N):
            if a[i] > 1.0:
                c[i] = a[i] ** 2
            b[i] = ti.sin(c[i])

    assert seed_ids(variant_of(maybe)) == {id(kd.dual(a)), id(kd.dual(c))}


def test_added_into_then_read(fields, variant_runs):
    """Adds into s, paired with their tangents' adds, keep the levels equal as stores do; s's own
    seeds (its value at launch is read) are compared. dense_layer in the corpus is the in-place
    spelling of the same (`y[i] = b[i]`, then `y[i] += ...`, then `y[i] = ti.tanh(y[i])`)."""
    a, b, c, m, s = fields

    @kd.kernel
    def accumulate():
        for i in range(N):
            s[None] += a[i] ** 2
        for i in range(N):
            b[i] = s[None] * a[i]

    assert seed_ids(variant_of(accumulate)) == {id(kd.dual(a)), id(kd.dual(s))}
    rng = np.random.default_rng(6)
    v, w = [rng.standard_normal(N), rng.standard_normal()], [rng.standard_normal(N), rng.standard_normal()]
    generated = second_order_outputs(accumulate, (), [a, s], [s, b], v, w, equal_directions=False)
    got = second_order_outputs(accumulate, (), [a, s], [s, b], v, w, equal_directions=True)
    assert len(variant_runs) == 1
    for x, y in zip(got, generated):
        np.testing.assert_allclose(x, y, rtol=1e-13)


def test_atomic_max_has_no_variant(fields):
    a, b, c, m, s = fields

    @kd.kernel
    def largest():
        for i in range(N):
            ti.atomic_max(s[None], a[i] ** 2)

    assert variant_of(largest) is None


def test_one_level_active_only_has_no_variant(runtime):
    x, y = ti.field(ti.f64, shape=N), ti.field(ti.f64, shape=N)
    kd.dual(x)  # a level-1 direction only: the two levels differ whatever the seeds
    x.from_numpy(np.arange(N, dtype=np.float64))

    @kd.kernel
    def square():
        for i in range(N):
            y[i] = x[i] ** 2

    assert variant_of(square) is None


def test_in_place_update_gives_the_generated_kernels_numbers(fields, variant_runs):
    """c[i] updated from its own old value, twice: whatever the analysis decides, the numbers
    are the kernel as generated's."""
    a, b, c, m, s = fields

    @kd.kernel
    def in_place():
        for i in range(N):
            c[i] = c[i] * a[i]
            c[i] = ti.sin(c[i]) + c[i]

    rng = np.random.default_rng(2)
    v, w = [rng.standard_normal(N) for _ in range(2)], [rng.standard_normal(N) for _ in range(2)]
    generated = second_order_outputs(in_place, (), [a, c], [c], v, w, equal_directions=False)
    got = second_order_outputs(in_place, (), [a, c], [c], v, w, equal_directions=True)
    for x, y in zip(got, generated):
        np.testing.assert_allclose(x, y, rtol=1e-13)
