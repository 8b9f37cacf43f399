"""W2's kernels timed back to back, and this machine's cache as random gathers see it.

    python -m bench.back_to_back [--quick] [--reps N] [--touched]

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

`--touched` adds a third table: W2's primal, reverse and HVP with every spring end folded into the
first M particles (M from a sixteenth of them to all), so that the random working set grows with M while
the work stays the same. Where a kernel's time jumps is where its working set leaves the cache: in
session 47's phase (a 16 MB step in the gather curve) the reverse (24 bytes a particle: position
and two private adjoint copies) jumped between half and three quarters of the 1e6 particles, the
HVP (48 bytes: the packed position and tangent, two private copies of both adjoints) between a
quarter and three eighths, and HVP / reverse read 1.8-2.0 below both jumps, 4-5 between them and
2.4-2.6 above both (bench/RESULTS.md, "Session 47").
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
    return w2_setup(ti, kd, quick)[0]


def w2_setup(ti, kd, quick):
    """(w2_kernels' dict, the springs' ends field, the ends it holds as an array)."""
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
    kernels = {"kerndiff primal": kk, "kerndiff forward": kk.forward, "kerndiff reverse": kk.reverse,
               "kerndiff HVP": kk.reverse.forward, "Taichi primal": tk, "Taichi grad": tk.grad}
    return kernels, ends, endsv


def folded_ends(endsv, touched):
    """The springs' ends folded into the first `touched` particles, never both ends the same."""
    folded = endsv % touched
    folded[:, 1] = np.where(folded[:, 1] == folded[:, 0], (folded[:, 0] + 1) % touched, folded[:, 1])
    return folded


def touched_curve(ti, kernels, ends, endsv, reps):
    """{particles touched: {kernel: ms}} for W2's primal, reverse and HVP, every spring's ends folded
    into the first M particles (the same work on a working set that grows with M); `ends` gets
    back the data it held."""
    P = int(endsv.max()) + 1
    sizes = [P * k // 16 for k in (1, 2, 3, 4, 6, 8, 12, 16)]
    names = ("kerndiff primal", "kerndiff reverse", "kerndiff HVP")
    curve = {}
    try:
        for m in sizes:
            ends.from_numpy(folded_ends(endsv, m))
            curve[m] = {name: median_ms(ti, kernels[name], reps) for name in names}
    finally:
        ends.from_numpy(endsv)
    return curve


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
    parser.add_argument("--touched", action="store_true",
                        help="also time W2's primal, reverse and HVP on springs folded into fewer particles")
    args = parser.parse_args(argv)
    ti = init_taichi("cpu")
    import kerndiff as kd
    kernels, ends, endsv = w2_setup(ti, kd, args.quick)
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
    if args.touched:
        print("\n| particles touched | reverse's set | HVP's set | primal | reverse | HVP | HVP / reverse |\n"
              "|---|---|---|---|---|---|---|")
        for m, t in touched_curve(ti, kernels, ends, endsv, args.reps).items():
            print(f"| {m} | {m * 24 / 2**20:.1f} MB | {m * 48 / 2**20:.1f} MB | {t['kerndiff primal']:.2f} ms | "
                  f"{t['kerndiff reverse']:.2f} ms | {t['kerndiff HVP']:.2f} ms | "
                  f"{t['kerndiff HVP'] / t['kerndiff reverse']:.2f} |")


if __name__ == "__main__":
    main()
