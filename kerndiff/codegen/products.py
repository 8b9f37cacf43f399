"""The helper generated derivative kernels call for a product that is zero where its first factor
is (ir.ops GUARDED_PRODUCT; ad.zero_adjoints and ad.piecewise_zeros say where)."""

import taichi as ti


@ti.func
def mul_or_zero(a, b):
    """a * b, and 0 where a is 0 even if b is infinite or NaN there: `adjoint * partial` for a
    local whose adjoint is zero where a guard skipped its uses, and whose partial (the norm's
    d / r, a reciprocal's -1 / r^2) is infinite exactly there; a max's zero partial times a
    root's infinite one (ti.sqrt(ti.max(x, 0.0)))."""
    return ti.select(a != 0, a * b, 0 * a)
