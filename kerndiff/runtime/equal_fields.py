"""Whether two fields hold the same bits: the launch-time test of k.forward.forward's
equal-directions variant (ad/equal_directions.py). Bits, not values, so that a NaN in one seed
and a number in the other count as different (a comparison under fast math may not see it), and
-0.0 against 0.0 too (the variant would then write a tangent's sign the kernel as generated
might not)."""

import taichi as ti


@ti.kernel
def _count_unequal(a: ti.template(), b: ti.template(), bits: ti.template()) -> ti.i32:
    n = 0
    for I in ti.grouped(a):
        if ti.static(isinstance(a, ti.MatrixField)):
            if ti.static(a.ndim == 2):
                for i, j in ti.static(ti.ndrange(a.n, a.m)):
                    if ti.bit_cast(a[I][i, j], bits) != ti.bit_cast(b[I][i, j], bits):
                        n += 1
            else:
                for i in ti.static(range(a.n)):
                    if ti.bit_cast(a[I][i], bits) != ti.bit_cast(b[I][i], bits):
                        n += 1
        else:
            if ti.bit_cast(a[I], bits) != ti.bit_cast(b[I], bits):
                n += 1
    return n


@ti.kernel
def _count_unequal_arrays(a: ti.types.ndarray(), b: ti.types.ndarray(), bits: ti.template()) -> ti.i32:
    n = 0
    for I in ti.grouped(a):
        if ti.bit_cast(a[I], bits) != ti.bit_cast(b[I], bits):
            n += 1
    return n


def fields_equal(a, b) -> bool:
    """Whether fields (or ndarrays) a and b (same shape and float dtype) are equal bit for bit."""
    from .registry import element_shape, is_ndarray
    if is_ndarray(a) and element_shape(a):  # (vectors and matrices: compared on the host)
        return a.to_numpy().tobytes() == b.to_numpy().tobytes()
    bits = {ti.f64: ti.i64, ti.f16: ti.i16}.get(a.dtype, ti.i32)
    count = _count_unequal_arrays if is_ndarray(a) else _count_unequal
    return count(a, b, bits) == 0
