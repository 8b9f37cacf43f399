"""W2's kernels timed back to back, and this machine's cache as random gathers see it.

    python -m bench.back_to_back [--quick] [--reps N]

Why: `python -m bench` times every (system, op) in interleaved rounds, so each run starts on
caches the other systems' runs filled. A kernel timed back to back (warm-up, then N runs of the
same kernel, as a timing script written in a hurry does) finds its own data still cached, and a
kernel whose random working set fits the last-level cache gains far more from that than one whose
set does not. W2's primal gathers from 8 MB of positions; its forward kernel from 16 MB (positions
with their tangents), its reverse from 24 MB (positions and one private copy of the gradient per
thread), its HVP from 48 MB. So the ratios over W2's primal depend on how much of the cache this
process gets, which on a shared VM changes from phase to phase. This prints both: W2's medians
back to back, with the ratios the targets name, and the time of 4e6 random gathers from arrays of
2-64 MB (where it jumps is the cache this process has now). No target is asserted here.
"""

import argparse
import time

import numpy as np

from .workloads import init_taichi, spring_data, spring_fields

GATHER_SIZES_MB = (2, 4, 8, 12, 16, 24, 32, 64)


def median_ms(ti, fn, reps):
    """Median wall time of `fn` over `reps` runs after one warm-up run, each ended by ti.sync()."""
    fn()
    ti.sync()
    times = []
    for _ in range(reps):
        ti.sync()
        start = time.perf_counter()
        fn()
        ti.sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def w2_kernels(ti, kd, quick):
    """W2 as bench.workloads spells it: kerndiff's primal, forward, reverse and HVP kernels and
    Taichi's primal and grad of the same energy, set up to run (seeds, tangents) and ready to time."""
    rng = np.random.default_rng(0)
    posv, endsv, restv = spring_data(quick, rng)
    P, S = len(posv), len(endsv)
    pos, ends, rest, E = spring_fields(ti, posv, endsv, restv)
    pos.dual.from_numpy(rng.standard_normal((P, 2)).astype(np.float32))

    def energy():
        for s in range(S):
            d = pos[ends[s][0]] - pos[ends[s][1]]
            E[None] += 0.5 * (d.norm() - rest[s]) ** 2

    kk, tk = kd.kernel(energy), ti.kernel(energy)
    E.grad[None] = 1.0
    kk()
    kk.forward()
    return {"kerndiff primal": kk, "kerndiff forward": kk.forward, "kerndiff reverse": kk.reverse,
            "kerndiff HVP": kk.reverse.forward, "Taichi primal": tk, "Taichi grad": tk.grad}


def gather_curve(ti, quick, reps):
    """{working set in MB: ms for S random 16-byte-record gathers (two f32 of each record)}."""
    S = 4 * 10**5 if quick else 4 * 10**6
    rng = np.random.default_rng(1)
    out = ti.field(ti.f32, shape=())

    @ti.kernel
    def gather(data: ti.template(), index: ti.template()):
        for s in range(S):
            out[None] += data[index[s], 0] + data[index[s], 3]

    arrays = {}
    for mb in GATHER_SIZES_MB:
        records = mb * 2**20 // 16
        data, index = ti.field(ti.f32, shape=(records, 4)), ti.field(ti.i32, shape=S)
        index.from_numpy(rng.integers(0, records, S).astype(np.int32))
        arrays[mb] = (data, index)
    return {mb: median_ms(ti, lambda: gather(*arrays[mb]), reps) for mb in GATHER_SIZES_MB}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args(argv)
    ti = init_taichi("cpu")
    import kerndiff as kd
    kernels = w2_kernels(ti, kd, args.quick)
    ms = {name: median_ms(ti, k, args.reps) for name, k in kernels.items()}
    print("| W2, back to back | median |\n|---|---|")
    for name, t in ms.items():
        print(f"| {name} | {t:.2f} ms |")
    print(f"\nreverse / primal {ms['kerndiff reverse'] / ms['kerndiff primal']:.2f} (target <= 3), "
          f"HVP / reverse {ms['kerndiff HVP'] / ms['kerndiff reverse']:.2f} (<= 2), "
          f"reverse / Taichi grad {ms['kerndiff reverse'] / ms['Taichi grad']:.2f} (<= 0.8), "
          f"forward / primal {ms['kerndiff forward'] / ms['kerndiff primal']:.2f}")
    curve = gather_curve(ti, args.quick, args.reps)
    print("\nrandom gathers by working set: " + ", ".join(f"{mb} MB {t:.1f} ms" for mb, t in curve.items()))


if __name__ == "__main__":
    main()
