"""Workloads W4 (PINN Laplacian and weight gradient), W5 (100-step simulation under a Tape), W6
(time integration inside a kernel) and compile latency; registered into workloads.WORKLOADS."""
import time

import numpy as np

from .workloads import WORKLOADS, emit, energy_systems, init_taichi, jax_energy_system, jax_mod, run_systems, \
    spring_data, spring_fields, wants


# ----------------------------------------------------------------------------- W4
def mlp_weights(H, rng):
    shapes = {"W1": (H, 2), "b1": (H,), "W2": (H, H), "b2": (H,), "W3": (H, H), "b3": (H,), "W4": (H,), "b4": ()}
    return {k: (rng.standard_normal(s) / np.sqrt(s[-1] if s else 1)).astype(np.float32) * (1 if s else 0.1)
            for k, s in shapes.items()}


def w4(args):
    H = 16 if args.quick else 64
    npts = 500 if args.quick else 10000
    rng = np.random.default_rng(0)
    wv = mlp_weights(H, rng)
    X = rng.random(npts, dtype=np.float32)
    Y = rng.random(npts, dtype=np.float32)
    f = (np.sin(np.pi * X) * np.sin(np.pi * Y)).astype(np.float32)
    ti = init_taichi(args.arch)
    import kerndiff as kd
    W = {k: ti.field(ti.f32, shape=v.shape) for k, v in wv.items()}
    for k, v in wv.items():
        if v.shape:
            W[k].from_numpy(v)
        else:
            W[k][None] = float(v)
    x, y, src = (ti.field(ti.f32, shape=npts) for _ in range(3))
    h1, h2, h3 = (ti.field(ti.f32, shape=(npts, H)) for _ in range(3))
    u = ti.field(ti.f32, shape=npts)
    lap = ti.field(ti.f32, shape=npts)
    loss = ti.field(ti.f32, shape=())
    x.from_numpy(X)
    y.from_numpy(Y)
    src.from_numpy(f)
    W1, b1, W2, b2, W3, b3, W4, b4 = (W[k] for k in ("W1", "b1", "W2", "b2", "W3", "b3", "W4", "b4"))

    @kd.kernel
    def net():
        for p in range(npts):
            for j in range(H):
                h1[p, j] = ti.tanh(W1[j, 0] * x[p] + W1[j, 1] * y[p] + b1[j])
            for j in range(H):
                s = b2[j]
                for k in range(H):
                    s += W2[j, k] * h1[p, k]
                h2[p, j] = ti.tanh(s)
            for j in range(H):
                s = b3[j]
                for k in range(H):
                    s += W3[j, k] * h2[p, k]
                h3[p, j] = ti.tanh(s)
            s = b4[None]
            for k in range(H):
                s += W4[k] * h3[p, k]
            u[p] = s

    uxx_field = kd.dual(kd.dual(u), 2)  # f''[e, e] of the direction e seeded below
    x1, x2, y1, y2 = kd.dual(x), kd.dual(x, 2), kd.dual(y), kd.dual(y, 2)
    lap_kernel = net.forward.forward

    @kd.kernel
    def seed(axis: ti.i32):
        for p in range(npts):
            x1[p] = ti.cast(axis == 0, ti.f32)
            x2[p] = ti.cast(axis == 0, ti.f32)
            y1[p] = ti.cast(axis == 1, ti.f32)
            y2[p] = ti.cast(axis == 1, ti.f32)

    uxx, uyy = ti.field(ti.f32, shape=npts), ti.field(ti.f32, shape=npts)

    @kd.kernel
    def keep(out: ti.template()):
        for p in range(npts):
            out[p] = uxx_field[p]

    @kd.kernel
    def residual():
        for p in range(npts):
            lap[p] = uxx[p] + uyy[p]
            loss[None] += (uxx[p] + uyy[p] + src[p]) ** 2 / npts

    def laplacian():
        for axis, out in ((0, uxx), (1, uyy)):
            seed(axis)
            lap_kernel()
            keep(out)

    def primal():
        net()

    for k in wv:
        kd.adjoint(W[k])

    def weight_grad():
        loss[None] = 0
        with kd.Tape(loss):
            laplacian()
            residual()

    probe = rng.standard_normal(W2.shape)
    systems = {"kerndiff": (ti.sync, {
        "primal": (primal, lambda: float(np.sum(u.to_numpy()))),
        "laplacian": (laplacian, lambda: float(np.sum(uxx.to_numpy() + uyy.to_numpy()))),
        "weight_grad": (weight_grad, lambda: float(np.sum(kd.adjoint(W2).to_numpy() * probe)))})}

    if wants("jax"):
        jax = jax_mod()
        jnp = jax.numpy
        jw = {k: jnp.asarray(v) for k, v in wv.items()}

        def u_point(w, px, py):
            a = jnp.tanh(w["W1"] @ jnp.stack([px, py]) + w["b1"])
            a = jnp.tanh(w["W2"] @ a + w["b2"])
            a = jnp.tanh(w["W3"] @ a + w["b3"])
            return w["W4"] @ a + w["b4"]

        def lap_point(w, px, py):
            uxx = jax.grad(jax.grad(u_point, argnums=1), argnums=1)(w, px, py)
            uyy = jax.grad(jax.grad(u_point, argnums=2), argnums=2)(w, px, py)
            return uxx + uyy

        jX, jY, jf = jnp.asarray(X), jnp.asarray(Y), jnp.asarray(f)
        u_all = jax.jit(jax.vmap(u_point, in_axes=(None, 0, 0)))
        lap_all = jax.jit(jax.vmap(lap_point, in_axes=(None, 0, 0)))
        res = jax.jit(jax.grad(lambda w: jnp.mean((jax.vmap(lap_point, in_axes=(None, 0, 0))(w, jX, jY) + jf) ** 2)))
        jprobe = jnp.asarray(probe, dtype=jnp.float32)
        systems["jax"] = (lambda: None, {
            "primal": (lambda: u_all(jw, jX, jY).block_until_ready(), lambda: jnp.sum(u_all(jw, jX, jY))),
            "laplacian": (lambda: lap_all(jw, jX, jY).block_until_ready(), lambda: jnp.sum(lap_all(jw, jX, jY))),
            "weight_grad": (lambda: res(jw)["W2"].block_until_ready(), lambda: jnp.sum(res(jw)["W2"] * jprobe))})
    systems["taichi"] = (ti.sync, {"primal": None, "laplacian": None, "weight_grad": None})
    run_systems("W4", systems, 2e-2)


# ----------------------------------------------------------------------------- W5
def w5(args):
    steps = 100
    rng = np.random.default_rng(0)
    posv, endsv, restv = spring_data(True, rng) if args.quick else spring_data(True, rng)
    if not args.quick:  # 1e5 particles, 4e5 springs, 100 steps
        P, S = 10**5, 4 * 10**5
        posv = rng.random((P, 2), dtype=np.float32)
        endsv = rng.integers(0, P, (S, 2)).astype(np.int32)
        endsv[:, 1] = np.where(endsv[:, 1] == endsv[:, 0], (endsv[:, 0] + 1) % P, endsv[:, 1])
        restv = (rng.random(S, dtype=np.float32) * 0.01).astype(np.float32)
    ti = init_taichi(args.arch)
    import kerndiff as kd
    kd_run, ti_run, stiff, kd_hvp = spring_simulation(ti, kd, ti.f32, steps, posv, endsv, restv)
    # The parameter's gradient sums 4e7 per-spring terms that mostly cancel, so f32 results depend
    # on the summation order: both systems are checked against the same simulation in f64.
    kd64, _, stiff64, hvp64 = spring_simulation(ti, kd, ti.f64, steps, posv, endsv, restv)
    kd64()
    grad64 = float(stiff64.grad[None])
    hv = {}
    # sim_hvp: d²loss/dk² by kd.hvp of the whole simulation (kd.Tape over its forward kernels;
    # Taichi's AD has no H·v), against the f64 simulation's
    systems = {"kerndiff": (ti.sync, {"sim_grad": (kd_run, lambda: stiff.grad[None]),
                                      "sim_hvp": (lambda: hv.update(v=kd_hvp()), lambda: hv["v"])}),
               "taichi": (ti.sync, {"sim_grad": (ti_run, lambda: stiff.grad[None]), "sim_hvp": None})}
    run_systems("W5", systems, 2e-2, truth={"sim_grad": grad64, "sim_hvp": hvp64()})


def spring_simulation(ti, kd, dtype, steps, posv, endsv, restv):
    """W5 in one precision: (kerndiff run, Taichi run, the stiffness field, kerndiff's H·v) where a
    run is the simulation's forward and backward under kd.Tape / ti.ad.Tape, and H·v returns
    d²loss/dk² at k = 10 (kd.hvp of the simulation as a program)."""
    P, S = len(posv), len(endsv)
    host = np.float64 if dtype == ti.f64 else np.float32
    x = ti.Vector.field(2, dtype, shape=(steps + 1, P), needs_grad=True)
    v = ti.Vector.field(2, dtype, shape=(steps + 1, P), needs_grad=True)
    f = ti.Vector.field(2, dtype, shape=(steps, P), needs_grad=True)
    ends = ti.Vector.field(2, ti.i32, shape=S)
    rest = ti.field(dtype, shape=S)
    stiff = ti.field(dtype, shape=(), needs_grad=True)
    loss = ti.field(dtype, shape=(), needs_grad=True)
    ends.from_numpy(endsv)
    rest.from_numpy(restv)
    stiff[None] = 10.0

    def forces(t: ti.i32):
        for s in range(S):
            a, b = ends[s][0], ends[s][1]
            d = x[t, a] - x[t, b]
            r = d.norm() + 1e-6
            fs = -stiff[None] * (r - rest[s]) * d / r
            f[t, a] += fs
            f[t, b] -= fs

    def advance(t: ti.i32):
        for i in range(P):
            v[t + 1, i] = 0.99 * v[t, i] + 0.001 * (f[t, i] + ti.Vector([0.0, -1.0]))
            x[t + 1, i] = x[t, i] + 0.001 * v[t + 1, i]

    def measure():
        for i in range(P):
            loss[None] += x[steps, i].norm_sqr() / P

    kf, ka, km = kd.kernel(forces), kd.kernel(advance), kd.kernel(measure)
    tf, ta, tm = ti.kernel(forces), ti.kernel(advance), ti.kernel(measure)

    def reset():
        x.fill(0)
        v.fill(0)
        f.fill(0)
        x.from_numpy(np.concatenate([posv[None], np.zeros((steps, P, 2))]).astype(host))

    def sim(fk, ak, mk):
        for t in range(steps):
            fk(t)
            ak(t)
        mk()

    def kd_run():
        reset()
        with kd.Tape(loss):
            sim(kf, ka, km)

    def ti_run():
        reset()
        with ti.ad.Tape(loss):
            sim(tf, ta, tm)

    def program():
        reset()
        sim(kf, ka, km)

    hvp = kd.hvp(program, inputs=[stiff], output=loss)

    def kd_hvp():
        return hvp([10.0], tangents=[1.0])[0]

    return kd_run, ti_run, stiff, kd_hvp


# ----------------------------------------------------------------------------- compile latency
def compile_latency(args):
    """First-call latency for primal, reverse and reverse.forward of W2, split into kerndiff's
    transform time and the rest (Taichi's compile plus one launch). With --cache-dir, Taichi's
    offline cache and kerndiff's (runtime/offline_cache.py, in <dir>/kerndiff) live there;
    KERNDIFF_OFFLINE_CACHE=0 leaves kerndiff's off."""
    rng = np.random.default_rng(0)
    posv, endsv, restv = spring_data(True, rng)
    S = len(endsv)
    import taichi as ti
    cache = {"offline_cache": True, "offline_cache_file_path": args.cache_dir} if args.cache_dir else \
        {"offline_cache": False}  # (Taichi refuses a path of None)
    ti.init(arch=ti.gpu if args.arch == "gpu" else ti.cpu, default_fp=ti.f32, **cache)
    import kerndiff as kd
    from kerndiff.runtime.kernel import TIMINGS
    pos, ends, rest, E = spring_fields(ti, posv, endsv, restv)

    @kd.kernel
    def energy():
        for s in range(S):
            d = pos[ends[s][0]] - pos[ends[s][1]]
            E[None] += 0.5 * (d.norm() - rest[s]) ** 2

    energy.forward()  # duals of results, as an HVP needs (its compile is not counted below)
    ti.sync()
    import gc
    for name, k in (("primal", energy), ("reverse", energy.reverse), ("reverse.forward", energy.reverse.forward)):
        # A full collection of Python's cyclic garbage can take tens of ms here (Taichi's compile
        # leaves much of it); collect first, so that the pause does not land on whichever part
        # of the call happens to cross the allocation threshold.
        gc.collect()
        before = TIMINGS["transform"]
        t0 = time.perf_counter()
        k()
        ti.sync()
        total = time.perf_counter() - t0
        transform = TIMINGS["transform"] - before
        emit(workload="compile", op=name, system="kerndiff", cache=args.cache_label,
             total=total, transform=transform, taichi=total - transform)


# ----------------------------------------------------------------------------- W6
def w6(args):
    """Pendulums integrated for `steps` time steps inside the kernel (a serial loop with two
    carried values per parallel iteration): reverse mode has to restore them backward. Taichi's
    AD keeps them on a per-thread stack (ad_stack_size >= steps); kerndiff recomputes them from
    two levels of checkpoints kept in locals; JAX's scan stores the whole trajectory."""
    n, steps, dt = (512, 100, 0.01) if args.quick else (8192, 1000, 0.01)
    rng = np.random.default_rng(0)
    qv = rng.uniform(-1.0, 1.0, n).astype(np.float32)
    v = rng.standard_normal(n).astype(np.float32)
    u = rng.standard_normal(n).astype(np.float32)
    ti = init_taichi(args.arch, ad_stack_size=steps + 8)
    import kerndiff as kd
    q = ti.field(ti.f32, shape=n, needs_grad=True)
    E = ti.field(ti.f32, shape=(), needs_grad=True)
    q.from_numpy(qv)

    def energy():
        for i in q:
            a, w = q[i], 0.0
            for t in range(steps):
                w = w - dt * (ti.sin(a) + 0.1 * w)
                a = a + dt * w
            E[None] += 0.5 * w * w + 1.0 - ti.cos(a)

    tk, kk = ti.kernel(energy), kd.kernel(energy)
    systems = energy_systems(ti, kd, kk, tk, q, E, v, u)
    if wants("jax"):
        jax = jax_mod()
        jnp = jax.numpy

        def jenergy(a0):
            def step(state, _):
                a, w = state
                w = w - dt * (jnp.sin(a) + 0.1 * w)
                return (a + dt * w, w), None
            (a, w), _ = jax.lax.scan(step, (a0, jnp.zeros_like(a0)), None, length=steps)
            return jnp.sum(0.5 * w * w + 1.0 - jnp.cos(a))

        systems["jax"] = jax_energy_system(jax, jenergy, qv, v, u)
    run_systems("W6", systems, 5e-3)


WORKLOADS.update({"W4": w4, "W5": w5, "W6": w6, "compile": compile_latency})
