"""A corpus of kernels crossed with transform paths, each against central finite differences in f64.

For a path p = (…, last), the kernel K = k.<p without last> is checked in mode `last`: K.forward
against finite differences of K, K.reverse by the dot-product test. So `reverse.forward` checks
the Hessian-vector kernel against finite differences of the reverse kernel.
"""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import check, derivatives, make_derivative_fields, make_outer_duals, random_inner_directions

PATHS = ["forward", "reverse", "reverse.forward", "forward.forward", "forward.reverse"]
N = 6


pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)


def build_corpus(dt=ti.f64):
    """The kernels, with fields of float dtype dt (f64 here; f32 for the Vulkan run)."""
    rng = np.random.default_rng(1)
    corpus = {}

    # --- elementwise math -------------------------------------------------------------------
    x = ti.field(dt, shape=N)
    y = ti.field(dt, shape=N)
    out = ti.field(dt, shape=())
    x.from_numpy(rng.uniform(0.3, 0.9, N))
    y.from_numpy(rng.uniform(0.3, 0.9, N))

    @kd.kernel
    def elementwise():
        for i in x:
            a = ti.sin(x[i]) * ti.exp(y[i]) + ti.log(1.0 + x[i] ** 2) / ti.sqrt(y[i])
            b = ti.tanh(a) + ti.atan2(x[i], y[i]) + ti.cos(x[i] * y[i]) ** 3 + ti.tan(0.5 * x[i])
            c = ti.asin(0.5 * x[i]) + ti.acos(0.4 * y[i]) + ti.rsqrt(x[i] + 1.0) + ti.abs(x[i] - y[i])
            d = ti.max(x[i], y[i]) * ti.min(x[i], 0.5) + x[i] ** y[i] + (x[i] % 0.25) + ti.floor(3 * x[i])
            out[None] += a * b + c * d

    corpus["elementwise"] = (elementwise, ())

    # --- mass-spring energy: gather/scatter on Vector fields --------------------------------
    P, S = 5, 7
    pos = ti.Vector.field(2, dt, shape=P)
    ends = ti.Vector.field(2, ti.i32, shape=S)
    rest = ti.field(dt, shape=S)
    energy = ti.field(dt, shape=())
    pos.from_numpy(rng.standard_normal((P, 2)))
    ends.from_numpy(np.array([[i % P, (i + 1 + i // P) % P] for i in range(S)], dtype=np.int32))
    rest.from_numpy(rng.uniform(0.5, 1.0, S))

    @ti.func
    def spring_energy(d, l0):
        r = d.norm()
        return 0.5 * (r - l0) ** 2

    @kd.kernel
    def springs():
        for s in range(S):
            a, b = ends[s][0], ends[s][1]
            energy[None] += spring_energy(pos[a] - pos[b], rest[s])

    corpus["mass_spring"] = (springs, ())

    # --- pairwise n-body with an inner serial loop ------------------------------------------
    q = ti.Vector.field(3, dt, shape=4)
    pot = ti.field(dt, shape=())
    q.from_numpy(rng.standard_normal((4, 3)) * 2)

    @kd.kernel
    def nbody():
        for i in q:
            e = 0.0
            for j in range(4):
                if i != j:
                    r = (q[i] - q[j]).norm_sqr() + 0.1
                    e += 1.0 / ti.sqrt(r) - 0.5 / r
            pot[None] += e

    corpus["nbody"] = (nbody, ())

    # --- 2-D stencil into an output field ----------------------------------------------------
    g = ti.field(dt, shape=(4, 5))
    lap = ti.field(dt, shape=(4, 5))
    g.from_numpy(rng.standard_normal((4, 5)))

    @kd.kernel
    def stencil():
        for i, j in ti.ndrange((1, 3), (1, 4)):
            lap[i, j] = g[i + 1, j] + g[i - 1, j] + g[i, j + 1] + g[i, j - 1] - 4 * g[i, j] + g[i, j] ** 3

    corpus["stencil"] = (stencil, ())

    # --- matrix energy with determinant / inverse ---------------------------------------------
    F = ti.Matrix.field(2, 2, dt, shape=3)
    psi = ti.field(dt, shape=())
    F.from_numpy(np.eye(2)[None] + 0.2 * rng.standard_normal((3, 2, 2)))

    @kd.kernel
    def neo_hookean():
        for k in F:
            M = F[k]
            J = M.determinant()
            C = M.transpose() @ M
            Minv = M.inverse()
            psi[None] += 0.5 * (C.trace() - 2) - ti.log(J) + 0.5 * ti.log(J) ** 2 + 0.1 * (Minv @ Minv).trace()

    corpus["matrix_energy"] = (neo_hookean, ())

    # --- branches ------------------------------------------------------------------------------
    z = ti.field(dt, shape=N)
    zout = ti.field(dt, shape=N)
    z.from_numpy(np.array([-1.3, -0.4, 0.2, 0.7, 1.6, 2.4]))

    @kd.kernel
    def branches():
        for i in z:
            v = z[i]
            if v < -1.0:
                zout[i] = v ** 2
            elif v < 0.5:
                w = ti.sin(v)
                zout[i] = w * v
            else:
                zout[i] = ti.exp(-v) if v > 2.0 else ti.select(v > 1.0, v ** 3, 2 * v)

    corpus["branches"] = (branches, ())

    # --- loop-carried recurrence (+ tuple assignment) -----------------------------------------
    r = ti.field(dt, shape=3)
    rout = ti.field(dt, shape=3)
    r.from_numpy(np.array([0.9, 1.05, 0.97]))

    @kd.kernel
    def recurrence():
        for i in r:
            v = 1.0
            p, s = 0.0, 1.0
            for k in range(12):
                v = v * r[i] + 0.01 * ti.sin(v)
                p, s = s, p + s * r[i]
            rout[i] = v + 0.1 * s

    corpus["recurrence"] = (recurrence, ())

    # --- a local carried through a serialized outermost loop ---------------------------------
    steps = ti.field(dt, shape=N)
    scan_out = ti.field(dt, shape=())
    steps.from_numpy(rng.uniform(0.2, 0.8, N))

    @kd.kernel
    def serial_scan():
        acc = 0.5
        ti.loop_config(serialize=True)
        for i in range(N):
            acc = ti.sin(acc) * 0.8 + steps[i] * acc
            scan_out[None] += acc * steps[i]
        scan_out[None] += acc * acc

    corpus["serial_scan"] = (serial_scan, ())

    # --- intermediate field between two loops, ti.static unrolling -----------------------------
    a = ti.field(dt, shape=N)
    mid = ti.field(dt, shape=N)
    total = ti.field(dt, shape=())
    a.from_numpy(rng.standard_normal(N))

    @kd.kernel
    def two_loops():
        for i in a:
            mid[i] = ti.sin(a[i]) * a[i]
        for i in range(1, N - 1):
            acc = 0.0
            for k in ti.static(range(-1, 2)):
                acc += mid[i + k] * (k + 2)
            total[None] += acc ** 2

    corpus["two_loops"] = (two_loops, ())

    # --- template and scalar args -------------------------------------------------------------
    src = ti.field(dt, shape=N)
    dst = ti.field(dt, shape=())
    src.from_numpy(rng.standard_normal(N))

    @kd.kernel
    def weighted(f: ti.template(), o: ti.template(), scale: dt, n: ti.i32):
        for i in range(n):
            o[None] += scale * f[i] ** 2 + ti.cos(f[i])

    corpus["template_args"] = (weighted, (src, dst, 0.7, N - 1))

    # --- return value ------------------------------------------------------------------------------
    h = ti.field(dt, shape=3)
    h.from_numpy(np.array([0.3, -0.2, 0.5]))

    @kd.kernel
    def returns() -> dt:
        s = 0.0
        for k in range(3):
            s += h[k] ** 3 + ti.sin(h[k])
        return s * h[0]

    corpus["return_value"] = (returns, ())

    # --- grouped struct-for over a 2-D field ---------------------------------------------------
    m2 = ti.field(dt, shape=(3, 3))
    m2o = ti.field(dt, shape=())
    m2.from_numpy(rng.standard_normal((3, 3)))

    @kd.kernel
    def grouped():
        for I in ti.grouped(m2):
            m2o[None] += m2[I] ** 2 * (I[0] + 1) + ti.exp(0.1 * m2[I])

    corpus["grouped"] = (grouped, ())

    # --- a dense layer built in place: its element is read after being accumulated into -------
    Wd = ti.field(dt, shape=(N, N))
    bias, layer_in, layer_out = (ti.field(dt, shape=N) for _ in range(3))
    Wd.from_numpy(rng.uniform(-0.5, 0.5, (N, N)))
    bias.from_numpy(rng.uniform(-0.2, 0.2, N))
    layer_in.from_numpy(rng.standard_normal(N))

    @kd.kernel
    def dense_layer():
        for i in layer_out:
            layer_out[i] = bias[i]
            for j in range(N):
                layer_out[i] += Wd[i, j] * layer_in[j]
            layer_out[i] = ti.tanh(layer_out[i])

    corpus["dense_layer"] = (dense_layer, ())

    # --- Taichi's library: ti.math, complex helpers, inline types, a matrix decomposition ----
    lib_out = ti.field(dt, shape=())
    vec3 = ti.types.vector(3, dt)

    @kd.kernel
    def taichi_library():
        for i in x:
            z = ti.math.vec2(x[i], y[i])
            w = ti.math.cmul(z, ti.math.cexp(z)) + ti.math.csqrt(z) + ti.math.clog(z)
            r = ti.math.rotation2d(x[i]) @ ti.math.reflect(z, ti.math.normalize(ti.math.vec2(1.0, y[i])))
            u, p = ti.polar_decompose(ti.types.matrix(2, 2, dt)([[x[i] + 1.0, y[i]], [0.2, 1.0 + y[i]]]))
            v = vec3(ti.math.smoothstep(0.0, 1.2, x[i]), ti.math.mix(x[i], y[i], 0.3), ti.math.distance(z, r)) \
                + ti.Vector.unit(3, 1, dt) * x[i] ** 2
            guard = ti.select(ti.math.isnan(v.z) or ti.math.isinf(v.z), 0.0, v.z)
            lib_out[None] += w.x * v.x + w.y * v.y + guard + u[0, 1] * p[1, 1] + ti.math.log2(1.0 + v.x)

    corpus["taichi_library"] = (taichi_library, ())

    # --- a while loop with a break, then an atomic max: its derivative kernels' recompute and
    # tangent loops use the loop's locals again; declared once at the kernel's top, those were
    # one variable for every thread, and Taichi's SPIR-V backend mixed the iterations' values
    walked = ti.field(dt, shape=N)
    highest = ti.field(dt, shape=())

    @kd.kernel
    def walks_and_their_maximum():
        highest[None] = 0.0  # (not the last launch's maximum: finite differences at a tie would mislead)
        for i in x:
            a = x[i]
            trips = 0
            while trips < 3 and a < 1.5:
                trips += 1
                a = ti.tanh(a * 2.0 + y[i])
                walked[i] += a
                if a > 0.95:
                    break
            ti.atomic_max(highest[None], a * x[i])

    corpus["walks_and_their_maximum"] = (walks_and_their_maximum, ())

    # --- a 3x3 polar decomposition (Taichi's rotation refined by two Newton steps, whose
    # derivatives are the rotation's: frontend/polar.py), in a fixed-corotated energy; the first
    # element is the identity, where the SVD's own derivatives are undefined
    F3 = ti.Matrix.field(3, 3, dt, shape=N)
    corotated = ti.field(dt, shape=())
    F3.from_numpy(np.concatenate([np.eye(3)[None], np.eye(3) + 0.3 * rng.standard_normal((N - 1, 3, 3))]))

    @kd.kernel
    def corotated_3d():
        for i in F3:
            R, S = ti.polar_decompose(F3[i])
            J = F3[i].determinant()
            corotated[None] += (F3[i] - R).norm_sqr() + 0.5 * (J - 1.0) ** 2 + S[0, 1] * R[2, 0]

    corpus["corotated_3d"] = (corotated_3d, ())

    # --- counters every trip steps alike (induction variables): the reverse sets them from the
    # trip's number (`k_1 = k - 2 * it`) where it replayed or checkpointed them before
    counted = ti.field(dt, shape=N)

    @kd.kernel
    def stepped_counters():
        for i in x:
            k = 2 * N + i
            a = x[i]
            while k > 0:
                a += ti.sin(y[k % N] * x[i] + 0.1 * k)
                k -= 3
            j = i
            for t in range(40):
                j += 5
                a += 0.1 * ti.cos(x[j % N] * y[i])
            counted[i] = a

    corpus["stepped_counters"] = (stepped_counters, ())
    return corpus


CORPUS_NAMES = ["elementwise", "mass_spring", "nbody", "stencil", "matrix_energy", "branches", "recurrence",
                "serial_scan", "two_loops", "template_args", "return_value", "grouped", "dense_layer", "taichi_library",
                "walks_and_their_maximum", "corotated_3d", "stepped_counters"]


@pytest.fixture(scope="module")
def corpus(runtime):
    return build_corpus()


def kernel_at(k, path):
    for step in path:
        k = getattr(k, step)
    return k


NOT_BY_FINITE_DIFFERENCES = {
    # k.reverse reads the maximum the primal left, and finds the winners by comparing with it: as
    # an input of its own that value moves the winners, a jump finite differences cannot follow
    # (kd.check_grad(..., order=2) checks second derivatives of such kernels in test_minmax)
    ("walks_and_their_maximum", "reverse.forward"),
    # refused: the winner counts are cleared before the kernel returns (test_minmax)
    ("walks_and_their_maximum", "forward.reverse"),
}


@pytest.mark.parametrize("name,path", [pytest.param(name, path, id=f"{name}-{path}") for name in CORPUS_NAMES
                                       for path in PATHS if (name, path) not in NOT_BY_FINITE_DIFFERENCES])
def test_path_against_finite_differences(corpus, name, path):
    k, args = corpus[name]
    *prefix, last = path.split(".")
    K = kernel_at(k, prefix)
    if prefix:  # (run before the module's other tests, the recurrence's k.reverse was `pass`)
        make_derivative_fields(k, args)
        make_outer_duals(K, args)
    k(*args)  # the primal results, as a user would have them
    check(K, last, args, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["elementwise", "mass_spring", "matrix_energy", "recurrence", "dense_layer"])
def test_third_order_reverse_forward_forward(corpus, name):
    """k.reverse.forward.forward (levels: adjoint 1, dual 1, dual 2) against finite differences
    of k.reverse.forward; and k.forward.forward.forward against finite differences of k.forward.forward."""
    k, args = corpus[name]
    make_derivative_fields(k, args)  # (run alone, the module had made none: both checks compared nothing)
    make_outer_duals(k.forward, args)
    for K in (k.reverse.forward, k.forward.forward):
        make_outer_duals(K, args)
    random_inner_directions(k, args)  # (left zero, the third-order terms dropped out)
    k(*args)
    check(k.reverse.forward, "forward", args, rtol=5e-6, atol=1e-7)
    check(k.forward.forward, "forward", args, rtol=5e-6, atol=1e-7)


# ----------------------------------------------------------------------------- other backends
def cpu_derivatives(names):
    """harness.derivatives of each named corpus kernel, in f64 on the CPU: what the other backends'
    runs (test_cuda, test_vulkan) are compared with."""
    ti.init(arch=ti.cpu, default_fp=ti.f64)
    corpus = build_corpus(ti.f64)
    refs = {name: derivatives(*corpus[name]) for name in names}
    ti.reset()
    return refs


def start_backend(arch, default_fp):
    """ti.init on `arch`; False (after ti.reset) where Taichi fell back to another backend."""
    ti.init(arch=arch, default_fp=default_fp)
    from taichi.lang import impl
    if impl.current_cfg().arch != arch:
        ti.reset()
        return False
    return True


def assert_same_derivatives(got, ref, tol):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol * max(1.0, float(np.max(np.abs(r)))))
