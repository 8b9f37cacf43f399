"""W3's reverse on CUDA, three ways: kerndiff's generated kernel (three atomic adds into
pos_adj[j] per pair, from 32 threads of a warp at once), the same kernel with each pair's
pos_adj[j] terms summed across the warp first (shuffles; one lane adds), and without those adds
(a lower bound, not a derivative kernel). The measurement behind bench/RESULTS.md's H200 section
and docs/design.md "Scattered adds on GPUs: warp sums".

    python -m bench.warp_sums        (needs an NVIDIA GPU; the kernels use ti.simt.warp)

The two hand-edited kernels are kept as they ran on the H200 (session 39), whole and side by side
rather than one kernel with static switches, so that the numbers in RESULTS.md are these kernels'.
The warp-sum kernel relies on the CUDA backend giving iteration i of `for i in range(n)` to lane
i % 32 (a grid-stride loop with a block size that is a multiple of 32): its lane i % 32 == 0 adds.
"""
import time

import numpy as np
import taichi as ti

import kerndiff as kd

ti.init(arch=ti.cuda, default_fp=ti.f32, offline_cache=False)
if ti.lang.impl.current_cfg().arch != ti.cuda:
    raise SystemExit("bench.warp_sums needs Taichi's CUDA backend (no CUDA device here)")
n = 4096
pos = ti.Vector.field(3, ti.f32, shape=n, needs_grad=True)
E = ti.field(ti.f32, shape=(), needs_grad=True)
pos.from_numpy((np.random.default_rng(0).random((n, 3), dtype=np.float32) * 10))

@kd.kernel
def energy():
    for i in range(n):
        e = 0.0
        for j in range(n):
            if i != j:
                r2 = (pos[i] - pos[j]).norm_sqr() + 0.01
                e += 1.0 / ti.sqrt(r2) + 0.1 / r2
        E[None] += 0.5 * e

FULL = -1  # ti.simt.warp.active_mask() of a warp whose 32 lanes all run this trip

@ti.kernel
def rev_warp():
    E_adj_v = E.grad[None]
    for i in range(n):
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        e_1_adj = E_adj_v * 0.5
        p0, p1, p2 = pos[i][0], pos[i][1], pos[i][2]
        lane = i % 32
        for j in range(n):
            s0 = 0.0
            s1 = 0.0
            s2 = 0.0
            if i != j:
                t1 = p0 - pos[j][0]
                t2 = p1 - pos[j][1]
                t3 = p2 - pos[j][2]
                r2 = t1 * t1 + t2 * t2 + t3 * t3 + 0.01
                t4_inv = 1.0 / ti.sqrt(r2)
                w = (t4_inv * -0.2 - 1.0) * e_1_adj * (t4_inv * t4_inv * t4_inv)
                s0 = w * t1
                s1 = w * t2
                s2 = w * t3
                a0 += s0
                a1 += s1
                a2 += s2
            m = ti.simt.warp.active_mask()
            if m == FULL:
                for o in ti.static([16, 8, 4, 2, 1]):
                    s0 += ti.simt.warp.shfl_down_f32(m, s0, o)
                    s1 += ti.simt.warp.shfl_down_f32(m, s1, o)
                    s2 += ti.simt.warp.shfl_down_f32(m, s2, o)
                if lane == 0:
                    pos.grad[j][0] -= s0
                    pos.grad[j][1] -= s1
                    pos.grad[j][2] -= s2
            else:
                pos.grad[j][0] -= s0
                pos.grad[j][1] -= s1
                pos.grad[j][2] -= s2
        pos.grad[i][0] += a0
        pos.grad[i][1] += a1
        pos.grad[i][2] += a2

@ti.kernel
def rev_noscatter():
    E_adj_v = E.grad[None]
    for i in range(n):
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        e_1_adj = E_adj_v * 0.5
        p0, p1, p2 = pos[i][0], pos[i][1], pos[i][2]
        for j in range(n):
            if i != j:
                t1 = p0 - pos[j][0]
                t2 = p1 - pos[j][1]
                t3 = p2 - pos[j][2]
                r2 = t1 * t1 + t2 * t2 + t3 * t3 + 0.01
                t4_inv = 1.0 / ti.sqrt(r2)
                w = (t4_inv * -0.2 - 1.0) * e_1_adj * (t4_inv * t4_inv * t4_inv)
                a0 += w * t1
                a1 += w * t2
                a2 += w * t3
        pos.grad[i][0] += 2 * a0
        pos.grad[i][1] += 2 * a1
        pos.grad[i][2] += 2 * a2

def timed(f, reps=20):
    E.grad[None] = 1.0
    pos.grad.fill(0)
    f()
    ti.sync()
    ts = []
    for _ in range(reps):
        pos.grad.fill(0)
        ti.sync()
        t = time.perf_counter()
        f()
        ti.sync()
        ts.append(time.perf_counter() - t)
    pos.grad.fill(0)
    f()
    return np.median(ts) * 1e3, pos.grad.to_numpy()

energy()
kd_rev = energy.reverse
res = {}
for name, f in [("generated", kd_rev), ("warp", rev_warp), ("no scatter (2x own)", rev_noscatter),
                ("generated again", kd_rev)]:
    ms, g = timed(f)
    res[name] = g
    print(f"{name:22s} {ms:7.3f} ms  |g|={np.abs(g).sum():.6g}", flush=True)
ref = res["generated"]
for k, g in res.items():
    print(k, "max rel diff vs generated", float(np.abs(g - ref).max() / np.abs(ref).max()))
