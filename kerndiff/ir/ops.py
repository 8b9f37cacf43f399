"""The primitive ops of the IR: arity, result dtype and how to evaluate them on constants."""
from __future__ import annotations

import math

from .types import default_fp, is_float, promote

ARITH = {"add", "sub", "mul", "div", "floordiv", "mod", "pow", "min", "max", "atan2"}
UNARY_FLOAT = {"sin", "cos", "tan", "asin", "acos", "atan", "exp", "log", "sqrt", "rsqrt", "tanh"}
UNARY_SAME = {"neg", "abs", "floor", "ceil", "round"}
COMPARE = {"lt", "le", "gt", "ge", "eq", "ne"}
LOGIC = {"and", "or", "not"}
BITWISE = {"bit_and", "bit_or", "bit_xor", "shl", "shr", "bit_not"}  # integers only (the frontend checks)
CLASSIFY = {"isnan", "isinf"}  # float -> i32 (0 or 1)
BIT_COUNT = {"popcnt", "clz"}  # integer -> the same integer type
SPECIAL = {"cast", "select"}
# Ops of several outputs, one Call per output: args are the inputs (one float dtype), then i32
# constants (which output, and how many derivatives have been taken of it so far; see
# ad.rules.ORDER_LIMITED). polar_rotation: the rotation of a 3x3 matrix's polar decomposition
# (its 9 entries, row by row), by Taichi's own ti.polar_decompose (frontend.polar).
OPAQUE = {"polar_rotation"}
# mul_or_zero(a, b): a * b, and 0 where a is 0 even if b is infinite or NaN. The transforms
# multiply so where a zero derivative may meet an infinite partial (ad.zero_adjoints: an adjoint
# zero by a guard; ad.piecewise_zeros: a max's zero partial under a root).
GUARDED_PRODUCT = {"mul_or_zero"}
# random(k, seed, *indexes): a number drawn (codegen/draws.py), of k's dtype; k, a constant,
# numbers the draws of a kernel apart, so that no pass takes two draws for one value (CSE would,
# were they alike); seed (the launch's) and the indexes of the loops around the draw (a while
# loop's: a count of its trips) key it, so that a kernel given the same seed draws it again. Its
# value depends on no input: no derivative passes through it.
RANDOM = {"random"}
# what hardware has no single instruction for (SPIR-V has no f64 version of them; recomputed, they
# cost more than a scattered add: opt.transposed_gathers)
TRANSCENDENTAL = (UNARY_FLOAT - {"sqrt", "rsqrt"}) | {"pow", "atan2"}
OPS = ARITH | UNARY_FLOAT | UNARY_SAME | COMPARE | LOGIC | BITWISE | CLASSIFY | BIT_COUNT | SPECIAL | OPAQUE \
    | GUARDED_PRODUCT | RANDOM

COMMUTATIVE = {"add", "mul", "min", "max", "eq", "ne", "and", "or", "bit_and", "bit_or", "bit_xor"}


def operand_dtype(op: str, dtypes: list[str]) -> str:
    """The dtype all operands are cast to before the op runs."""
    if op in UNARY_FLOAT or op in CLASSIFY:
        return dtypes[0] if is_float(dtypes[0]) else default_fp()
    if op in ("div", "atan2"):
        d = promote(*dtypes)
        return d if is_float(d) else default_fp()
    if op in ARITH or op in GUARDED_PRODUCT or op in COMPARE or op in BITWISE and len(dtypes) == 2:
        return promote(*dtypes)
    return dtypes[0]


def result_dtype(op: str, operand: str) -> str:
    if op in COMPARE or op in LOGIC or op in CLASSIFY:
        return "i32"
    return operand


def _py(op):
    import numpy as np

    def rsqrt(x):
        return 1 / np.sqrt(x)

    table = {
        "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
        "mul_or_zero": lambda a, b: a * b if a != 0 else 0 * a,
        "div": lambda a, b: a / b, "floordiv": lambda a, b: a // b, "mod": lambda a, b: a % b,
        "pow": lambda a, b: a ** b, "min": lambda a, b: min(a, b), "max": lambda a, b: max(a, b),
        "atan2": np.arctan2, "sin": np.sin, "cos": np.cos, "tan": np.tan, "asin": np.arcsin,
        "acos": np.arccos, "atan": np.arctan, "exp": np.exp, "log": np.log, "sqrt": np.sqrt,
        "rsqrt": rsqrt, "tanh": np.tanh, "neg": lambda a: -a, "abs": abs, "floor": np.floor,
        "ceil": np.ceil, "round": np.round,
        "lt": lambda a, b: int(a < b), "le": lambda a, b: int(a <= b), "gt": lambda a, b: int(a > b),
        "ge": lambda a, b: int(a >= b), "eq": lambda a, b: int(a == b), "ne": lambda a, b: int(a != b),
        "and": lambda a, b: int(bool(a) and bool(b)), "or": lambda a, b: int(bool(a) or bool(b)),
        "not": lambda a: int(not a), "isnan": lambda a: int(np.isnan(a)), "isinf": lambda a: int(np.isinf(a)),
        "bit_and": lambda a, b: a & b, "bit_or": lambda a, b: a | b, "bit_xor": lambda a, b: a ^ b,
        "shl": lambda a, b: a << b, "shr": lambda a, b: a >> b, "bit_not": lambda a: ~a,
        "popcnt": lambda a: bin(a & 0xFFFFFFFF).count("1"), "clz": lambda a: 32 - (a & 0xFFFFFFFF).bit_length(),
    }
    return table[op]


def fold(op: str, values: list, dtype: str):
    """Evaluate op on constant values in dtype's precision; None when it should not be folded."""
    import numpy as np

    if op in ("div", "floordiv", "mod") and values[1] == 0:
        return None
    if op == "pow" and not is_float(dtype) and values[1] < 0:
        return None
    if op in BIT_COUNT and dtype not in ("i32", "u32"):  # the folding above counts 32 bits
        return None
    np_t = {"f16": np.float16, "f32": np.float32, "f64": np.float64}.get(dtype)
    with np.errstate(all="ignore"):
        try:
            args = [np_t(v) for v in values] if np_t is not None else [int(v) for v in values]
            out = _py(op)(*args)
        except (ArithmeticError, ValueError, OverflowError):
            return None
    out = float(out) if is_float(result_dtype(op, dtype)) else int(out)
    if isinstance(out, float) and not math.isfinite(out):
        return None
    return out
