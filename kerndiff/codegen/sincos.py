"""The sine and cosine of one f32 value from one range reduction (see opt.sincos for when).

How: as glibc's own sinf does for |x| < 120, in double precision. q = the nearest integer to
x * 2/pi, r = x - q * pi/2 (pi/2 as a double is good to 55 bits, and no f32 below 120 lies close
enough to a multiple of pi/2 for the rounding of q * pi/2 to matter much), then one polynomial in
r for sin r and one for cos r (weighted least-squares fits in relative error on |r| <= 0.8), and
the quadrant q mod 4 picks and signs them. Other arguments (|x| >= 120, infinities, NaN, zeros and
subnormals, which the CPU may flush to zero when it widens them) go to Taichi's ti.sin / ti.cos.

Accuracy, checked against the double-precision sine and cosine of every normal f32 with
|x| < 120 (tests/test_sincos.py checks a sample): at most 0.501 ulp for the sine and 0.776 ulp for
the cosine (at x = 64.40265, where cos x = 4.7e-7), against 0.561 ulp for glibc's sinf and cosf;
the f32 result differs from theirs on about one argument in a hundred, by one ulp.

(No `from __future__ import annotations` here: Taichi reads a ti.func's annotations as objects.)
"""

import taichi as ti

SIN_COEFFS = tuple(float.fromhex(h) for h in (  # sin r = r + r^3 (s1 + s2 r^2 + s3 r^4 + s4 r^6)
    "-0x1.5555554aa135fp-3", "0x1.1111072df61c3p-7", "-0x1.a00e8b34e28a0p-13", "0x1.6c99af7376c00p-19"))
COS_COEFFS = tuple(float.fromhex(h) for h in (  # cos r = 1 + r^2 (c1 + c2 r^2 + c3 r^4 + c4 r^6)
    "-0x1.ffffffc099db4p-2", "0x1.555538dc9321cp-5", "-0x1.6c0694b922d70p-10", "0x1.98c783077c600p-16"))
TWO_OVER_PI = 0.6366197723675814
HALF_PI = 1.5707963267948966
REDUCED_BELOW = 120.0


@ti.func
def _poly(r2, c: ti.template()):
    return ti.f64(c[0]) + r2 * (ti.f64(c[1]) + r2 * (ti.f64(c[2]) + r2 * ti.f64(c[3])))


@ti.func
def sincos(x):
    """(sin x, cos x) of an f32 x, as f32."""
    s, c = ti.f32(0.0), ti.f32(0.0)
    if ti.abs(x) < REDUCED_BELOW:
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
        s = ti.bit_cast(ti.bit_cast(s_abs, ti.u32) ^ sign, ti.f32)
        c = ti.bit_cast(ti.bit_cast(c_abs, ti.u32) ^ sign, ti.f32)
    else:
        s, c = ti.sin(x), ti.cos(x)
    return s, c
