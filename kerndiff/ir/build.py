"""Smart constructors: the only way passes build expressions.

They insert Taichi's implicit casts explicitly, fold constants and apply the algebraic identities
(x+0, x*1, 0*x, --x, x**1, select(c, a, a)) that keep derivative code small. Folding 0*x to 0 is
deliberate: a structurally zero derivative must stay zero even where x is inf or NaN.
"""
from __future__ import annotations

import math

import numpy as np

from .nodes import Call, Const, Expr, Load, Var
from .ops import COMMUTATIVE, OPAQUE, OPS, RANDOM, fold, operand_dtype, result_dtype
from .types import is_float, promote

NARROW_FLOATS = {"f32": np.float32, "f16": np.float16}
LARGEST = {name: float(np.finfo(t).max) for name, t in NARROW_FLOATS.items()}


def const(value, dtype: str) -> Const:
    """A constant holds a value of its own type, as Taichi's do: a literal of an f32 kernel is
    rounded to f32 before it meets an f64 operand (`d * 0.1` multiplies by 0.1f), and `ti.f32(0.2)`
    rounds even where the result is cast back to f64."""
    if not is_float(dtype):
        return Const(dtype, int(value))
    value = float(value)
    narrow = NARROW_FLOATS.get(dtype)
    if narrow and math.isfinite(value):
        if abs(value) <= LARGEST[dtype]:
            value = float(narrow(value))
        else:
            with np.errstate(over="ignore"):  # 1e40 in f32 is inf (or the largest f32), as in Taichi
                value = float(narrow(value))
    return Const(dtype, value)


def is_const(e: Expr, value=None) -> bool:
    return isinstance(e, Const) and (value is None or e.value == value)


def cast(x: Expr, dtype: str) -> Expr:
    if x.dtype == dtype:
        return x
    if isinstance(x, Const):
        return const(x.value, dtype)
    if isinstance(x, Call) and x.op == "cast" and x.args[0].dtype == dtype and _widens(dtype, x.dtype):
        return x.args[0]  # f32 -> f64 -> f32 gives back the same value
    return Call(dtype, "cast", (x,))


def _widens(narrow: str, wide: str) -> bool:
    """Does every `narrow` float have an exact `wide` value?"""
    order = ("f16", "f32", "f64")
    return narrow in order and wide in order and order.index(narrow) < order.index(wide)


def call(op: str, *args: Expr) -> Expr:
    assert op in OPS, op
    if op == "cast":
        raise ValueError("use cast()")
    if op == "select":
        return select(*args)
    if op == "mul_or_zero" and isinstance(args[1], Const) and math.isfinite(args[1].value):
        return mul(*args)  # zero where a is anyway
    if op == "mul_or_zero" and isinstance(args[0], Const):
        return mul(*args) if args[0].value != 0 else const(0, promote(args[0].dtype, args[1].dtype))
    if op in OPAQUE or op in RANDOM:  # its inputs keep their dtypes (random's: the draw's); nothing folds
        return Call(args[0].dtype, op, tuple(args))
    od = operand_dtype(op, [a.dtype for a in args])
    if op == "pow" and is_float(od) and not is_float(args[1].dtype):
        # Keep integer exponents integral: x ** 2 stays exact (and defined for x < 0 on every backend).
        args = (cast(args[0], od), args[1])
    else:
        args = tuple(cast(a, od) for a in args)
    dtype = result_dtype(op, od)
    if all(isinstance(a, Const) for a in args):
        v = fold(op, [a.value for a in args], od)
        if v is not None:
            return const(v, dtype)
    simple = _identity(op, args, dtype)
    if simple is not None:
        return simple
    if op in COMMUTATIVE and isinstance(args[0], Const) and not isinstance(args[1], Const):
        args = (args[1], args[0])  # canonical order: constant last, so CSE sees one form
    return Call(dtype, op, args)


def _int_offset(e):
    """(x, k) with e == x + k, k a Python int: an integer add or subtract of a constant, else
    (e, 0)."""
    if isinstance(e, Call) and e.op in ("add", "sub") and isinstance(e.args[1], Const) and not is_float(e.dtype):
        k = int(e.args[1].value)
        return e.args[0], k if e.op == "add" else -k
    return e, 0


def _offset(x, k, dtype):
    """x + k for an integer k, written `x + k` or `x - |k|`."""
    if k == 0:
        return x
    return Call(dtype, "add" if k > 0 else "sub", (x, const(abs(k), dtype)))


def _identity(op, args, dtype):
    a = args[0]
    b = args[1] if len(args) > 1 else None
    if op in ("add", "sub") and not is_float(dtype) and isinstance(b, Const) and not isinstance(a, Const):
        # integer offsets gather into one (`i - 1 + 1` is i; `s - -1` is s + 1): exact, wrapping
        # arithmetic is associative; floats would round differently
        x, k = _int_offset(a)
        total = k + (int(b.value) if op == "add" else -int(b.value))
        if (x is not a or b.value < 0) and -2 ** 31 < total < 2 ** 31:
            return _offset(x, total, dtype)
    if op == "add":
        if is_const(a, 0):
            return b
        if is_const(b, 0):
            return a
        if _is_neg(b):
            return call("sub", a, b.args[0])
        if _is_neg(a):
            return call("sub", b, a.args[0])
        if a == b and is_float(dtype):
            return call("mul", a, const(2, dtype))
    elif op == "sub":
        if a == b and is_float(dtype):
            return const(0, dtype)
        if is_const(b, 0):
            return a
        if is_const(a, 0):
            return call("neg", b)
        if _is_neg(b):
            return call("add", a, b.args[0])
    elif op == "mul":
        for x, y in ((a, b), (b, a)):
            if is_const(x, 0):
                return const(0, dtype)
            if is_const(x, 1):
                return y
            if is_const(x, -1):
                return call("neg", y)
            if isinstance(x, Call) and x.op == "select" and is_const(x.args[1]) and is_const(x.args[2]) \
                    and (is_const(x.args[1], 0) or is_const(x.args[2], 0)):
                # select(c, k1, k2) * y with one k zero: select(c, k1*y, k2*y); no NaN*0 leaks.
                return select(x.args[0], call("mul", x.args[1], y), call("mul", x.args[2], y))
        if _is_neg(a) and _is_neg(b):
            return call("mul", a.args[0], b.args[0])
        if _is_neg(a):
            return call("neg", call("mul", a.args[0], b))
        if _is_neg(b):
            return call("neg", call("mul", a, b.args[0]))
    elif op == "div":
        if is_const(b, 1):
            return a
        if is_const(a, 0) and is_float(dtype):
            return const(0, dtype)
        if _is_neg(a):
            return call("neg", call("div", a.args[0], b))
    elif op == "and" and (is_const(a, 0) or is_const(b, 0)):  # both sides are pure: nothing to run
        return const(0, dtype)
    elif op == "or" and any(isinstance(x, Const) and x.value != 0 for x in (a, b)):
        return const(1, dtype)
    elif op in ("floordiv", "mod") and not is_float(dtype) and is_const(b, 1):
        return a if op == "floordiv" else const(0, dtype)
    elif op in ("eq", "ne") and a.dtype in INT_RANGE and (isinstance(a, Const) != isinstance(b, Const)):
        return _solved(op, *((a, b) if isinstance(b, Const) else (b, a)))
    elif op == "not" and isinstance(a, Call) and (a.op in ("eq", "ne") or a.op in INVERSE and not is_float(a.args[0].dtype)):
        # not (j == 0) is j != 0 (also for NaN); not (i < n) is i >= n for integers only
        return call(INVERSE.get(a.op) or {"eq": "ne", "ne": "eq"}[a.op], *a.args)
    elif op == "neg":
        if _is_neg(a):
            return a.args[0]
        if isinstance(a, Call) and a.op == "sub":
            return call("sub", a.args[1], a.args[0])
        if isinstance(a, Call) and a.op == "mul" and isinstance(a.args[1], Const) and is_float(dtype):
            return call("mul", a.args[0], const(-a.args[1].value, dtype))  # -(y * -1.5) is y * 1.5, exactly
    elif op == "pow":
        if is_const(b, 1):
            return a
        if is_const(b, 0):
            return const(1, dtype)
    return None


INVERSE = {"lt": "ge", "ge": "lt", "gt": "le", "le": "gt"}
INT_RANGE = {"i32": (-2 ** 31, 2 ** 31 - 1), "i64": (-2 ** 63, 2 ** 63 - 1)}


def _solved(op, x, k):
    """`2 - d == 0` as `d == 2`: an integer compared with a constant, with the constant terms of
    x moved across (exact in wrapping integer arithmetic while the new constant is in range), so
    that `d == 2` reads as it would be written and ir.conditions sees d fixed. None if x is not
    such a sum."""
    if not (isinstance(x, Call) and x.op in ("add", "sub")):
        return None
    u, w = x.args
    if isinstance(w, Const):
        target, value = u, k.value - w.value if x.op == "add" else k.value + w.value
    elif isinstance(u, Const):
        target, value = w, k.value - u.value if x.op == "add" else u.value - k.value
    else:
        return None
    low, high = INT_RANGE[x.dtype]
    if not low <= value <= high:
        return None
    return call(op, target, const(value, x.dtype))


def _is_neg(e):
    return isinstance(e, Call) and e.op == "neg"


def select(c: Expr, a: Expr, b: Expr) -> Expr:
    from .types import promote

    dtype = promote(a.dtype, b.dtype)
    a, b = cast(a, dtype), cast(b, dtype)
    if a == b:
        return a
    if isinstance(c, Const):
        return a if c.value else b
    return Call(dtype, "select", (c, a, b))


# Readable helpers for the rule table and the passes.
def add(a, b):
    return call("add", a, b)


def sub(a, b):
    return call("sub", a, b)


def mul(a, b):
    return call("mul", a, b)


def div(a, b):
    return call("div", a, b)


def neg(a):
    return call("neg", a)


def sum_of(terms, dtype: str) -> Expr:
    out = None
    for t in terms:
        out = t if out is None else add(out, t)
    return const(0, dtype) if out is None else cast(out, dtype)


def var(name: str, dtype: str) -> Var:
    return Var(dtype, name)


def load(ref, index) -> Load:
    return Load(ref.dtype, ref, tuple(index))
