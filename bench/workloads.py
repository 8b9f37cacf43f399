"""Benchmark workloads, one per process: `python -m bench.workloads W2 [--quick] [--arch cpu|gpu]`.

Each workload is written the natural way in every system (kerndiff; Taichi 1.7.4's own AD;
JAX jit; PyTorch eager; and for W1-W3 derivative kernels written by hand in Taichi, bench.by_hand),
checks that the systems agree on each value, then times each operation after warm-up: median of
>= 7 runs with min and max, the systems' runs interleaved round by round so that their ratios are
measured under the same conditions. Prints one JSON object per row.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

from . import by_hand

REPS = 7
ARCH = "cpu"  # set by main(): "gpu" puts JAX and PyTorch on the GPU too, beside Taichi
SYSTEMS = None  # set by main() from --systems: the systems to run (None: all)


def wants(*systems):
    """Whether any of these systems runs (`--systems kerndiff,taichi` leaves JAX and PyTorch
    unimported: the targets' kernel-against-kernel ratios, measured as they are checked)."""
    return SYSTEMS is None or any(s in SYSTEMS for s in systems)


def emit(**kw):
    print(json.dumps(kw), flush=True)


def run_systems(workload, systems, rtol, reference=None, truth=None):
    """systems: {system: (sync, {op: (fn, value_fn) or None})}. Checks that the systems agree on
    each value, then times every (system, op) in interleaved rounds (one run of each per round,
    REPS rounds after a warm-up run), so that all of them see the same machine conditions: the
    ratios between systems are what the benchmark is for. reference: {op: kerndiff's value} measured
    in another group, to check against; truth: {op: the value computed in f64}, which every
    system is then checked against instead of kerndiff's."""
    values, timed = {}, []
    systems = {name: spec for name, spec in systems.items() if wants(name)}
    for system, (sync, ops) in systems.items():
        for op, spec in ops.items():
            if spec is None:
                emit(workload=workload, op=op, system=system, median=None, min=None, max=None, value=None)
                continue
            fn, value = spec
            fn()
            sync()
            v = float(value())
            values.setdefault(op, {})[system] = v
            timed.append((system, op, fn, sync, v))
    times = {(system, op): [] for system, op, *_ in timed}
    for _ in range(REPS):
        for system, op, fn, sync, _v in timed:
            quiesce()
            t0 = time.perf_counter()
            fn()
            sync()
            times[(system, op)].append(time.perf_counter() - t0)
    for system, op, fn, sync, v in timed:
        ts = times[(system, op)]
        emit(workload=workload, op=op, system=system, median=float(np.median(ts)), min=float(np.min(ts)),
             max=float(np.max(ts)), value=v)
    for op, v in (reference or {}).items():
        values.setdefault(op, {})["kerndiff"] = v
    for op, vs in values.items():
        ref = (truth or {}).get(op, vs.get("kerndiff", next(iter(vs.values()))))
        bad = {s: v for s, v in vs.items() if not np.isclose(v, ref, rtol=rtol, atol=rtol * abs(ref) + 1e-9)}
        against = f" (f64 value {ref:.7g})" if op in (truth or {}) else ""
        emit(workload=workload, op=op, check="agree" if not bad else f"DISAGREE{against} {vs}", disagree=sorted(bad))


def process_cpu_time():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def quiesce(window=0.01, busy=0.002, longest=1.0):
    """Wait until this process's threads are idle (less than `busy` seconds of CPU time in a
    `window`), at most `longest` seconds. Why: JAX's CPU runtime goes on working after a call has
    returned its result (W2's gradient: 12-15 ms of CPU time in the 30-50 ms after
    block_until_ready, measured in session 24), and on 2 cores that work landed in whatever the
    round timed next: W2's kerndiff primal, timed right after JAX's HVP, measured 12-25 ms against
    6-10 ms without JAX in the process. Each timed call now starts on an idle process, whichever
    system ran before it."""
    deadline = time.perf_counter() + longest
    while time.perf_counter() < deadline:
        before = process_cpu_time()
        time.sleep(window)
        if process_cpu_time() - before < busy:
            return


def init_taichi(arch, **kw):
    import taichi as ti
    ti.init(arch=ti.gpu if arch == "gpu" else ti.cpu, default_fp=ti.f32, offline_cache=False, **kw)
    return ti


def jax_mod():
    """JAX on the same processor as Taichi. On the GPU it must not take 75% of the GPU's memory up
    front (its default), which Taichi's and PyTorch's allocators need too."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    jax.config.update("jax_platforms", "cuda" if ARCH == "gpu" else "cpu")
    return jax


def torch_mod():
    """PyTorch on the same processor as Taichi: on the GPU every tensor the workload makes is a
    CUDA tensor (torch.set_default_device). Its OpenMP threads sleep when idle
    (OMP_WAIT_POLICY=PASSIVE, read when torch loads): by default they spin for a while after each
    operation, and on a 2-core machine the kernel timed next (the interleaved rounds run a
    kerndiff or Taichi kernel right after a PyTorch call) shared the cores with them: W2's primal
    measured 12-17 ms so against 6-7 ms alone, which flattered every ratio over a primal."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    if ARCH == "gpu":
        torch.set_default_device("cuda")
    return torch


def torch_sync(torch):
    """What a timed PyTorch call waits for: its GPU work (kernels launch asynchronously there)."""
    return torch.cuda.synchronize if ARCH == "gpu" else (lambda: None)


def jax_energy_system(jax, energy, p, v, u):
    """JAX-jit rows for a scalar energy of an array p: primal, gradient and Hessian-vector product
    H·v (jvp of grad), the last two dotted with u."""
    jnp = jax.numpy
    jp, jv, ju = jnp.asarray(p), jnp.asarray(v), jnp.asarray(u)
    f, g = jax.jit(energy), jax.jit(jax.grad(energy))
    h = jax.jit(lambda q, t: jax.jvp(jax.grad(energy), (q,), (t,))[1])
    return (lambda: None, {
        "primal": (lambda: f(jp).block_until_ready(), lambda: f(jp)),
        "grad": (lambda: g(jp).block_until_ready(), lambda: jnp.sum(g(jp) * ju)),
        "hvp": (lambda: h(jp, jv).block_until_ready(), lambda: jnp.sum(h(jp, jv) * ju))})


def torch_systems(torch, energy, p, u, second, quick):
    """PyTorch rows for a scalar energy of one tensor p: primal, gradient (dotted with u) and
    `second` = ("hvp", v) for H·v (dotted with u) or ("jvp", d) for the directional derivative.
    Eager always (HVP by double backward); torch.compile too at full sizes (it compiles for ~20 s
    per function; its HVP is jvp-of-grad through torch.func, since compiled autograd has no double
    backward), with "n/a" rows where compiling fails."""
    op, t = second
    pd = p.detach()

    def ops(energy, hvp_fn):
        def primal():
            with torch.no_grad():
                return energy(p)

        def grad():
            p.grad = None
            energy(p).backward()
            return p.grad

        def jvp():
            return torch.func.jvp(energy, (pd,), (t,))[1]

        nxt = (lambda: hvp_fn(pd, t)) if op == "hvp" else jvp
        value = (lambda: (nxt().double() * u.double()).sum()) if op == "hvp" else nxt
        return {"primal": (primal, primal), "grad": (grad, lambda: (grad().double() * u.double()).sum()),
                op: (nxt, value)}

    def double_backward(q, v):
        q = q.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(energy(q), q, create_graph=True)
        return torch.autograd.grad(g, q, grad_outputs=v)[0]

    out = {"torch": (torch_sync(torch), ops(energy, double_backward))}
    if not quick:
        compiled = {}
        hvp_c = torch.compile(lambda q, v: torch.func.jvp(torch.func.grad(energy), (q,), (v,))[1])
        for name, (fn, value) in ops(torch.compile(energy), hvp_c).items():
            try:
                fn()
                compiled[name] = (fn, value)
            except Exception as e:  # noqa: BLE001 (report any compiler failure as n/a)
                print(f"torch.compile {name}: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
                compiled[name] = None
        out["torch.compile"] = (torch_sync(torch), compiled)
    return out


def fwdmode_runner(ti, loss, param, seed, kernel, *args):
    """Taichi's forward mode: FwdMode seeds once; kernels called inside run forward-mode code."""
    mgr = ti.ad.FwdMode(loss=loss, param=param, seed=list(seed))
    mgr.__enter__()

    def run():
        loss.dual[None] = 0
        kernel(*args)

    return run, mgr


# ----------------------------------------------------------------------------- W1
def w1(args):
    n = 10**5 if args.quick else 10**7
    rng = np.random.default_rng(0)
    xv, yv = rng.random(n, dtype=np.float32), rng.random(n, dtype=np.float32)
    d = rng.standard_normal(n).astype(np.float32)
    ti = init_taichi(args.arch)
    import kerndiff as kd
    x = ti.field(ti.f32, shape=n, needs_grad=True, needs_dual=True)
    y = ti.field(ti.f32, shape=n, needs_grad=True, needs_dual=True)
    loss = ti.field(ti.f32, shape=(), needs_grad=True, needs_dual=True)
    x.from_numpy(xv)
    y.from_numpy(yv)

    def energy():
        for i in x:
            loss[None] += ti.sin(x[i]) * ti.exp(y[i])

    tk, kk = ti.kernel(energy), kd.kernel(energy)
    hand_grad, hand_jvp = by_hand.w1(ti, x, y, loss)
    rows = energy_systems(ti, kd, kk, tk, x, loss, None, d, hand=(hand_grad, None))

    def kd_jvp():
        loss.dual[None] = 0
        kk.forward()

    x.dual.from_numpy(d)
    kd_ops = dict(rows["kerndiff"][1], jvp=(kd_jvp, lambda: loss.dual[None]))
    kd_jvp()
    kd_jvp_value = float(loss.dual[None])
    # Taichi's forward mode in its own group: inside ti.ad.FwdMode every ti.kernel launch runs as a
    # forward-mode kernel (and a kerndiff kernel runs its forward), so nothing else may be timed there.
    ti_fwd, mgr = fwdmode_runner(ti, loss, x, d, tk)
    run_systems("W1", {"taichi": (ti.sync, {"jvp": (ti_fwd, lambda: loss.dual[None])})}, 2e-3,
                reference={"jvp": kd_jvp_value})
    mgr.__exit__(None, None, None)
    x.dual.from_numpy(d)  # leaving FwdMode cleared Taichi's seed, which is kerndiff's dual of x too

    def hand_jvp_run():
        loss.dual[None] = 0
        hand_jvp()

    systems = {"kerndiff": (ti.sync, kd_ops),
               "taichi": (ti.sync, {"primal": rows["taichi"][1]["primal"], "grad": rows["taichi"][1]["grad"]}),
               "hand": (ti.sync, dict(rows["hand"][1], jvp=(hand_jvp_run, lambda: loss.dual[None])))}

    if wants("jax"):
        jax = jax_mod()
        jnp = jax.numpy
        jx, jy, jd = jnp.asarray(xv), jnp.asarray(yv), jnp.asarray(d)
        f = jax.jit(lambda x, y: jnp.sum(jnp.sin(x) * jnp.exp(y)))
        g = jax.jit(jax.grad(f))
        jv = jax.jit(lambda x, y, d: jax.jvp(lambda a: f(a, y), (x,), (d,))[1])
        systems["jax"] = (lambda: None, {
            "primal": (lambda: f(jx, jy).block_until_ready(), lambda: f(jx, jy)),
            "grad": (lambda: g(jx, jy).block_until_ready(), lambda: jnp.dot(g(jx, jy), jd)),
            "jvp": (lambda: jv(jx, jy, jd).block_until_ready(), lambda: jv(jx, jy, jd))})
    if wants("torch", "torch.compile"):
        torch = torch_mod()
        tx, ty, td = torch.tensor(xv, requires_grad=True), torch.tensor(yv), torch.tensor(d)
        systems.update(torch_systems(torch, lambda a: (torch.sin(a) * torch.exp(ty)).sum(), tx, td, ("jvp", td),
                                     args.quick))
    run_systems("W1", systems, 2e-3)


def energy_systems(ti, kd, kk, tk, pos, E, v, u, hand=None, args=()):
    """kerndiff and Taichi rows for a scalar energy E of a field pos: primal, gradient (dotted
    with u) and, for kerndiff when a direction v is given, the Hessian-vector product H·v.
    hand: (gradient kernel, factory (v field, hv field) -> HVP kernel) written by hand
    (bench.by_hand), timed as the "hand" system. args: the kernels' arguments."""
    def primal(k):
        def run():
            E[None] = 0
            k(*args)
        return run, lambda: E[None]

    # Timed: the derivative kernel alone, as the targets compare kernels (the gradient it adds
    # into keeps growing across runs; zeroing it would time a fill kernel too, the same on both
    # sides). Checked: one run into zeroed gradients.
    def grad(rev):
        def run():
            E.grad[None] = 1
            rev(*args)

        def value():
            pos.grad.fill(0)
            run()
            return np.sum(pos.grad.to_numpy().astype(np.float64) * u)
        return run, value

    rows = {"kerndiff": (ti.sync, {"primal": primal(kk), "grad": grad(kk.reverse)}),
            "taichi": (ti.sync, {"primal": primal(tk), "grad": grad(tk.grad), "hvp": None})}
    if hand is not None:
        rows["hand"] = (ti.sync, {"grad": grad(hand[0])})
    if v is None:
        return rows
    kd.dual(pos).from_numpy(v)
    kk.forward(*args)
    hv = kd.dual(pos.grad)

    def hvp(kernel):
        def run():
            E.grad[None] = 1
            kernel(*args)

        def value():
            hv.fill(0)
            pos.grad.fill(0)
            run()
            return np.sum(hv.to_numpy().astype(np.float64) * u)
        return run, value

    rows["kerndiff"][1]["hvp"] = hvp(kk.reverse.forward)
    if hand is not None:
        rows["hand"][1]["hvp"] = hvp(hand[1](kd.dual(pos), hv))
    return rows


# ----------------------------------------------------------------------------- W2
def spring_data(quick, rng):
    P, S = (10**4, 4 * 10**4) if quick else (10**6, 4 * 10**6)
    pos = rng.random((P, 2), dtype=np.float32)
    ends = random_ends(P, S, rng)
    rest = (rng.random(S, dtype=np.float32) * 0.01).astype(np.float32)
    return pos, ends, rest


def spring_fields(ti, posv, endsv, restv):
    """W2's fields holding the given data, positions and energy with gradients and tangents:
    (pos, ends, rest, E)."""
    P, S = len(posv), len(endsv)
    pos = ti.Vector.field(2, ti.f32, shape=P, needs_grad=True, needs_dual=True)
    ends = ti.Vector.field(2, ti.i32, shape=S)
    rest = ti.field(ti.f32, shape=S)
    E = ti.field(ti.f32, shape=(), needs_grad=True, needs_dual=True)
    pos.from_numpy(posv)
    ends.from_numpy(endsv)
    rest.from_numpy(restv)
    return pos, ends, rest, E


def random_ends(P, S, rng):
    """S springs' two particle indices, drawn at random from P particles, never both the same."""
    ends = rng.integers(0, P, (S, 2)).astype(np.int32)
    ends[:, 1] = np.where(ends[:, 1] == ends[:, 0], (ends[:, 0] + 1) % P, ends[:, 1])
    return ends


def w2(args):
    rng = np.random.default_rng(0)
    posv, endsv, restv = spring_data(args.quick, rng)
    P, S = len(posv), len(endsv)
    v = rng.standard_normal((P, 2)).astype(np.float32)
    u = rng.standard_normal((P, 2)).astype(np.float32)
    ti = init_taichi(args.arch)
    import kerndiff as kd
    pos = ti.Vector.field(2, ti.f32, shape=P, needs_grad=True)
    ends = ti.Vector.field(2, ti.i32, shape=S)
    rest = ti.field(ti.f32, shape=S)
    E = ti.field(ti.f32, shape=(), needs_grad=True)
    pos.from_numpy(posv)
    ends.from_numpy(endsv)
    rest.from_numpy(restv)

    def energy():
        for s in range(S):
            d = pos[ends[s][0]] - pos[ends[s][1]]
            E[None] += 0.5 * (d.norm() - rest[s]) ** 2

    tk, kk = ti.kernel(energy), kd.kernel(energy)

    systems = energy_systems(ti, kd, kk, tk, pos, E, v, u, hand=by_hand.w2(ti, pos, ends, rest, E))

    if wants("jax"):
        jax = jax_mod()
        jnp = jax.numpy
        a, b, r = jnp.asarray(endsv[:, 0]), jnp.asarray(endsv[:, 1]), jnp.asarray(restv)

        def jenergy(p):
            d = p[a] - p[b]
            return jnp.sum(0.5 * (jnp.sqrt(jnp.sum(d * d, axis=1)) - r) ** 2)

        systems["jax"] = jax_energy_system(jax, jenergy, posv, v, u)
    if wants("torch", "torch.compile"):
        torch = torch_mod()
        ta, tb = torch.tensor(endsv[:, 0].astype(np.int64)), torch.tensor(endsv[:, 1].astype(np.int64))
        tr, tp = torch.tensor(restv), torch.tensor(posv, requires_grad=True)

        def tenergy(p):
            d = p[ta] - p[tb]
            return (0.5 * (torch.sqrt((d * d).sum(1)) - tr) ** 2).sum()

        systems.update(torch_systems(torch, tenergy, tp, torch.tensor(u), ("hvp", torch.tensor(v)), args.quick))
    run_systems("W2", systems, 5e-3)


# ----------------------------------------------------------------------------- W3
def w3(args):
    n = 512 if args.quick else 4096
    rng = np.random.default_rng(0)
    posv = (rng.random((n, 3), dtype=np.float32) * 10).astype(np.float32)
    v = rng.standard_normal((n, 3)).astype(np.float32)
    u = rng.standard_normal((n, 3)).astype(np.float32)
    ti = init_taichi(args.arch, ad_stack_size=n + 8)
    import kerndiff as kd
    pos = ti.Vector.field(3, ti.f32, shape=n, needs_grad=True)
    E = ti.field(ti.f32, shape=(), needs_grad=True)
    pos.from_numpy(posv)

    def energy():
        for i in range(n):
            e = 0.0
            for j in range(n):
                if i != j:
                    r2 = (pos[i] - pos[j]).norm_sqr() + 0.01
                    e += 1.0 / ti.sqrt(r2) + 0.1 / r2
            E[None] += 0.5 * e

    tk, kk = ti.kernel(energy), kd.kernel(energy)

    systems = energy_systems(ti, kd, kk, tk, pos, E, v, u, hand=by_hand.w3(ti, pos, E))
    if wants("jax"):
        jax = jax_mod()
        jnp = jax.numpy
        eye = jnp.eye(n, dtype=bool)

        def jenergy(p):
            d = p[:, None, :] - p[None, :, :]
            r2 = jnp.sum(d * d, axis=-1) + 0.01
            e = jnp.where(eye, 0.0, 1.0 / jnp.sqrt(r2) + 0.1 / r2)
            return 0.5 * jnp.sum(e)

        systems["jax"] = jax_energy_system(jax, jenergy, posv, v, u)
    if wants("torch", "torch.compile"):
        torch = torch_mod()
        tp = torch.tensor(posv, requires_grad=True)
        teye = torch.eye(n, dtype=torch.bool)

        def tenergy(p):
            d = p[:, None, :] - p[None, :, :]
            r2 = (d * d).sum(-1) + 0.01
            return 0.5 * torch.where(teye, 0.0, 1.0 / torch.sqrt(r2) + 0.1 / r2).sum()

        systems.update(torch_systems(torch, tenergy, tp, torch.tensor(u), ("hvp", torch.tensor(v)), args.quick))
    run_systems("W3", systems, 5e-3)


WORKLOADS = {"W1": w1, "W2": w2, "W3": w3}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workload")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--arch", default="cpu")
    p.add_argument("--cache-dir", default=None, help="compile latency: Taichi offline cache directory")
    p.add_argument("--cache-label", default="off", help="compile latency: which caches are warm")
    p.add_argument("--systems", default=None, help="comma-separated systems to run (default: all)")
    p.add_argument("--reps", type=int, default=REPS, help="timed rounds (at least 7)")
    args = p.parse_args()
    from . import more_workloads, variants  # noqa: F401  (register W4-W6, compile latency, variants)
    from . import workloads as registry  # the imported module (this file may be __main__)
    registry.ARCH = args.arch
    registry.SYSTEMS = set(args.systems.split(",")) if args.systems else None
    registry.REPS = max(7, args.reps)
    registry.WORKLOADS[args.workload](args)


if __name__ == "__main__":
    main()
