"""kerndiff's own f32 math for derived kernels on the CPU (see opt.cpu_math for where it is used).

Taichi's CPU backend calls libm for ti.sin, ti.cos and ti.tanh. Two of its costs are avoidable
in derivative code: the reverse of sin needs cos of the same argument, and libm reduces the
argument once for each; and ti.tanh (glibc's tanhf) takes 6-9 times as long as ti.exp (it is
also 2.2 ulp off at worst). Both are computed here in double precision from one cheap step, as
accurately as libm's or more so. Subnormal arguments count as zero and zeros may lose their sign,
as everywhere in Taichi's CPU kernels (which flush subnormals and compile with fast math).

sincos(x): the sine and cosine of x from one range reduction, as glibc's own sinf does for
|x| < 120: q = the nearest integer to x * 2/pi, r = x - q * pi/2 (pi/2 as a double is good to 55
bits, and no f32 below 120 lies close enough to a multiple of pi/2 for the rounding of q * pi/2 to
matter much), one polynomial in r for sin r and one for cos r (weighted least-squares fits in
relative error on |r| <= 0.8), and the quadrant q mod 4 swaps and signs them. Other arguments
(|x| >= 120, infinities, NaN) go to Taichi's ti.sin / ti.cos. Checked against the double-precision
functions on every normal f32 with |x| < 120 (tests/test_cpu_math.py checks a sample): at most
0.501 ulp for the sine and 0.776 ulp for the cosine (at x = 64.40265, where cos x = 4.7e-7),
against 0.561 ulp for glibc's sinf and cosf; the f32 results differ from theirs on about one
argument in a hundred, by one ulp.

exp4(a, b, c, d): the exponentials of four values, for loops that opt.element_groups runs four
elements per pass. libm's expf is one call per element, which LLVM cannot pack; this is straight
double-precision arithmetic it packs across the four: q = the nearest integer to x / ln 2 (read
from the low bits of x / ln 2 + 1.5 * 2^52, as the SSE2 code Taichi compiles has no rounding
instruction and would call libm's floor), r = x - q ln 2 (|r| <= ln 2 / 2), a polynomial for exp r
(1 + r + r^2 P(r), P of degree 5 fitted as above, 5e-11 relative), and 2^q put into the exponent
bits. For |x| < 87 (where exp x and exp -x are normal f32s); otherwise all four take ti.exp. On 3e6
arguments (uniform in |x| < 87, and in |x| < 1; tests/test_cpu_math.py checks a sample): at most
0.5007 ulp, against 0.5016 for Taichi's ti.exp (glibc's expf); the f32 results differ from its on
about one argument in 1,500, by one ulp.

tanh_via_exp(x): for |x| >= 0.55, 1 - 2 / (exp(2|x|) + 1) with the sign of x, from libm's f32 exp
(2|x| is exact) and the rest in double (no cancellation: the result is at least 0.5 there; the exp
is inf beyond 44, giving 1); below, an odd polynomial in double (x + x^3 P(x^2), fitted as above,
4e-11 relative). On every normal f32 with |x| < 20 (above, both give 1): at most 0.818 ulp, where
Taichi's ti.tanh (glibc's tanhf) is 2.19 ulp off at worst. 3.3x faster than ti.tanh.

(No `from __future__ import annotations` here: Taichi reads a ti.func's annotations as objects.)
"""

import taichi as ti

SIN_COEFFS = tuple(float.fromhex(h) for h in (  # sin r = r + r^3 (s1 + s2 r^2 + s3 r^4 + s4 r^6)
    "-0x1.5555554aa135fp-3", "0x1.1111072df61c3p-7", "-0x1.a00e8b34e28a0p-13", "0x1.6c99af7376c00p-19"))
COS_COEFFS = tuple(float.fromhex(h) for h in (  # cos r = 1 + r^2 (c1 + c2 r^2 + c3 r^4 + c4 r^6)
    "-0x1.ffffffc099db4p-2", "0x1.555538dc9321cp-5", "-0x1.6c0694b922d70p-10", "0x1.98c783077c600p-16"))
EXP_COEFFS = tuple(float.fromhex(h) for h in (  # exp r = 1 + r + r^2 (e0 + e1 r + ... + e5 r^5)
    "0x1.0000003903316p-1", "0x1.555554465ca6fp-3", "0x1.55548f738c630p-5", "0x1.11126ca1698a6p-7",
    "0x1.6d8bdade9e769p-10", "0x1.9f0db94320b0ep-13"))
LOG2_E = 1.4426950408889634
LN_2 = 0.6931471805599453
ROUNDING_SHIFT = 6755399441055744.0  # 1.5 * 2^52: y + it, a double, holds round(y) in its low bits (|y| < 2^31)
EXP_REDUCED_BELOW = 87.0
TWO_OVER_PI = 0.6366197723675814
HALF_PI = 1.5707963267948966
REDUCED_BELOW = 120.0


@ti.func
def _poly(z, c: ti.template()):
    """c[0] + c[1] z + c[2] z^2 + ... in double (Horner; unrolled at compile time)."""
    total = ti.f64(c[ti.static(len(c) - 1)])
    for k in ti.static(range(len(c) - 2, -1, -1)):
        total = ti.f64(c[k]) + z * total
    return total


@ti.func
def _reduced_sincos(x):
    """(sin x, cos x) of an f32 x with |x| < REDUCED_BELOW, as f32."""
    nearest = ti.floor(ti.f64(x) * ti.f64(TWO_OVER_PI) + 0.5)
    q = ti.cast(nearest, ti.i32)
    r = ti.f64(x) - nearest * ti.f64(HALF_PI)  # |r| <= pi/4
    r2 = r * r
    # rounded to f32 before the quadrant's swaps and signs, which are exact (and cheaper so)
    sin_r = ti.f32(r + r * r2 * _poly(r2, SIN_COEFFS))
    cos_r = ti.f32(ti.f64(1.0) + r2 * _poly(r2, COS_COEFFS))
    odd = (q & 1) != 0  # quadrants 1 and 3: sin x = +-cos r, cos x = -+sin r
    s_abs = ti.select(odd, cos_r, sin_r)
    c_abs = ti.select(odd, -sin_r, cos_r)
    sign = ti.cast(q & 2, ti.u32) << 30  # quadrants 2 and 3: both change sign (the f32 sign bit)
    return ti.bit_cast(ti.bit_cast(s_abs, ti.u32) ^ sign, ti.f32), ti.bit_cast(ti.bit_cast(c_abs, ti.u32) ^ sign, ti.f32)


@ti.func
def sincos(x):
    """(sin x, cos x) of an f32 x, as f32."""
    s, c = ti.f32(0.0), ti.f32(0.0)
    if ti.abs(x) < REDUCED_BELOW:
        s, c = _reduced_sincos(x)
    else:
        s, c = ti.sin(x), ti.cos(x)
    return s, c


@ti.func
def sincos4(a, b, c, d):
    """The sines and cosines of four f32 values, as f32: (sin a, cos a, sin b, cos b, ...), each
    as sincos gives it where all four are within its range, else libm's for all four (one branch
    for the four, so that LLVM packs their steps: opt.element_groups)."""
    s0, c0, s1, c1 = ti.f32(0.0), ti.f32(0.0), ti.f32(0.0), ti.f32(0.0)
    s2, c2, s3, c3 = ti.f32(0.0), ti.f32(0.0), ti.f32(0.0), ti.f32(0.0)
    if ti.max(ti.max(ti.abs(a), ti.abs(b)), ti.max(ti.abs(c), ti.abs(d))) < REDUCED_BELOW:
        s0, c0 = _reduced_sincos(a)
        s1, c1 = _reduced_sincos(b)
        s2, c2 = _reduced_sincos(c)
        s3, c3 = _reduced_sincos(d)
    else:
        s0, c0, s1, c1 = ti.sin(a), ti.cos(a), ti.sin(b), ti.cos(b)
        s2, c2, s3, c3 = ti.sin(c), ti.cos(c), ti.sin(d), ti.cos(d)
    return s0, c0, s1, c1, s2, c2, s3, c3


@ti.func
def _reduced_exp(x):
    """exp x of an f32 x with |x| < EXP_REDUCED_BELOW, as f32."""
    shifted = ti.bit_cast(ti.f64(x) * ti.f64(LOG2_E) + ti.f64(ROUNDING_SHIFT), ti.i64)
    q = ti.cast(shifted, ti.i32)  # the nearest integer to x / ln 2
    r = ti.f64(x) - ti.f64(q) * ti.f64(LN_2)  # |r| <= ln 2 / 2
    power = ti.bit_cast((shifted + 1023) << 52, ti.f64)  # 2^q: q + 1023 in the exponent bits, the rest shifted out
    return ti.f32((ti.f64(1.0) + r + r * r * _poly(r, EXP_COEFFS)) * power)


@ti.func
def exp4(a, b, c, d):
    """The exponentials of four f32 values, as f32, each as _reduced_exp gives it where all four
    are within its range, else ti.exp's for all four (one branch for the four, as in sincos4)."""
    ea, eb, ec, ed = ti.f32(0.0), ti.f32(0.0), ti.f32(0.0), ti.f32(0.0)
    if ti.max(ti.max(ti.abs(a), ti.abs(b)), ti.max(ti.abs(c), ti.abs(d))) < EXP_REDUCED_BELOW:
        ea, eb, ec, ed = _reduced_exp(a), _reduced_exp(b), _reduced_exp(c), _reduced_exp(d)
    else:
        ea, eb, ec, ed = ti.exp(a), ti.exp(b), ti.exp(c), ti.exp(d)
    return ea, eb, ec, ed


TANH_COEFFS = tuple(float.fromhex(h) for h in (  # tanh x = x + x^3 (t1 + t2 x^2 + ... + t6 x^10)
    "-0x1.555554ce026bep-2", "0x1.1110d0280cccep-3", "-0x1.ba06a0b032dfap-5", "0x1.64ba08140381cp-6",
    "-0x1.12aae3e7cb8c2p-7", "0x1.351a021cfd760p-9"))
TANH_BY_POLYNOMIAL_BELOW = 0.55


@ti.func
def tanh_via_exp(x):
    """tanh of an f32 x, as f32 (branch-free: both forms are computed, one is selected)."""
    size = ti.abs(x)
    e = ti.f64(ti.exp(size * 2.0))
    far = 1.0 - 2.0 / (e + 1.0)
    x64 = ti.f64(x)
    x2 = x64 * x64
    near = x64 + x64 * x2 * _poly(x2, TANH_COEFFS)
    return ti.f32(ti.select(size < TANH_BY_POLYNOMIAL_BELOW, near, ti.select(x < 0.0, -far, far)))
