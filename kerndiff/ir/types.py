"""Scalar dtypes as short strings, and Taichi's promotion rules between them."""
from __future__ import annotations

FLOATS = ("f16", "f32", "f64")
INTS = ("i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64")


def is_float(dtype: str) -> bool:
    return dtype in FLOATS


def is_int(dtype: str) -> bool:
    return dtype in INTS


def bits(dtype: str) -> int:
    return int(dtype[1:])


def promote(a: str, b: str) -> str:
    """The dtype of a binary arithmetic op on a and b, as Taichi computes it."""
    if a == b:
        return a
    if is_float(a) and is_float(b):
        return a if bits(a) >= bits(b) else b
    if is_float(a):
        return a
    if is_float(b):
        return b
    # Both integers: widest wins, signed preferred on a tie.
    if bits(a) != bits(b):
        return a if bits(a) > bits(b) else b
    return a if a.startswith("i") else b


def from_taichi(dt) -> str:
    """Map a Taichi dtype (or Python float/int) to kerndiff's dtype string."""
    import taichi as ti
    from taichi.lang import impl

    if dt is float:
        return from_taichi(impl.get_runtime().default_fp)
    if dt is int:
        return from_taichi(impl.get_runtime().default_ip)
    table = {ti.f16: "f16", ti.f32: "f32", ti.f64: "f64", ti.i8: "i8", ti.i16: "i16", ti.i32: "i32",
             ti.i64: "i64", ti.u8: "u8", ti.u16: "u16", ti.u32: "u32", ti.u64: "u64"}
    for k, v in table.items():
        if dt == k:
            return v
    raise KeyError(dt)


def to_taichi(dtype: str):
    import taichi as ti

    return getattr(ti, dtype)


def default_fp() -> str:
    from taichi.lang import impl

    return from_taichi(impl.get_runtime().default_fp)


def default_ip() -> str:
    from taichi.lang import impl

    return from_taichi(impl.get_runtime().default_ip)
