"""The helper generated kernels call for ti.random and ti.randn: counter-based random numbers.

Taichi's ti.random draws from per-thread state, so a kernel launched again draws other numbers,
and a reverse kernel could never recompute the numbers its primal drew. kerndiff's kernels draw
`keyed_random(dtype, seed, site, index)` instead: a hash of the launch's seed (runtime/draws.py
chooses it), the draw's place in the kernel (`site`: the frontend numbers the draws) and the loop
indices of the iteration making it (`index`, a vector). The same seed gives the same numbers in
every kernel of a family, so the reverse kernel draws exactly what its primal drew, on every arch
(the CPU and Vulkan draw alike). The hash is the 32-bit finalizer of MurmurHash3 with the
"lowbias32" constants, chained over the key's parts with boost's hash_combine: uniform, and
without visible correlation between neighbouring indices, for simulation noise (not for
cryptography).

(No `from __future__ import annotations` here: Taichi reads ti.template() annotations as objects.)
"""

import taichi as ti


@ti.func
def mixed_bits(h):
    """h's bits mixed (each input bit flips about half of the output bits)."""
    h ^= ti.bit_shr(h, 16)
    h *= ti.u32(0x7FEB352D)
    h ^= ti.bit_shr(h, 15)
    h *= ti.u32(0x846CA68B)
    h ^= ti.bit_shr(h, 16)
    return h


@ti.func
def combined(h, part):
    """The key h with one more part mixed in (boost's hash_combine, then mixed_bits)."""
    return mixed_bits(h ^ (ti.cast(part, ti.u32) + ti.u32(0x9E3779B9) + (h << 6) + ti.bit_shr(h, 2)))


@ti.func
def keyed_random(dtype: ti.template(), seed, site, index):
    """A number of dtype as ti.random(dtype) draws one (floats uniform in [0, 1), integers over
    all their bits: a second word for 64-bit ones), fixed by (seed, site, index)."""
    h = combined(mixed_bits(ti.cast(seed, ti.u32)), site)
    for k in ti.static(range(index.n)):
        h = combined(h, index[k])
    out = ti.cast(0, dtype)
    if ti.static(dtype == ti.f64):
        low = mixed_bits(h ^ ti.u32(0x68E31DA4))  # a second word: 53 random bits in all
        out = (ti.cast(ti.bit_shr(h, 5), ti.f64) * 67108864.0 + ti.cast(ti.bit_shr(low, 6), ti.f64)) \
            * (1.0 / 9007199254740992.0)
    elif ti.static(dtype == ti.f32):
        out = ti.cast(ti.bit_shr(h, 8), ti.f32) * (1.0 / 16777216.0)
    elif ti.static(dtype == ti.f16):  # (11 bits, which f16 holds exactly: never rounded up to 1)
        out = ti.cast(ti.cast(ti.bit_shr(h, 21), ti.f32) * (1.0 / 2048.0), dtype)
    elif ti.static(dtype == ti.i64 or dtype == ti.u64):
        low = mixed_bits(h ^ ti.u32(0x68E31DA4))
        out = ti.cast((ti.cast(h, ti.u64) << ti.u64(32)) | ti.cast(low, ti.u64), dtype)
    else:
        out = ti.cast(h, dtype)
    return out
