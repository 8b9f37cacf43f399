"""What Taichi (and Python) functions mean inside a kernel: one table from function object to
the IR it lowers to. Anything not in the table (a numpy call, an unknown library) is refused."""
from __future__ import annotations

import inspect
import math

import taichi as ti

from ..ir import build as B
from ..ir.types import is_float
from . import vec as V
from .values import Method
from .vec import Vec

UNARY_MATH = ["sin", "cos", "tan", "asin", "acos", "atan", "exp", "log", "sqrt", "rsqrt", "tanh", "floor",
              "ceil", "round", "abs"]


def _unary(op):
    def handler(lw, node, args, kwargs):
        x, *dtype = args  # ti.floor/ceil/round(x, dtype): the result cast, as in Taichi
        out = lw.elementwise(lambda e: B.call(op, e), x, node)
        return lw.cast(out, dtype[0], node) if dtype and dtype[0] is not None else out
    return handler


def _bit_count(op):
    """ti.math.popcnt / clz: bits of an integer (Taichi's builtin ops, which kernels call directly)."""
    def handler(lw, node, args, kwargs):
        def count(e):
            if is_float(e.dtype):
                raise lw.error(node, f"ti.math.{op} counts the bits of an integer", "cast the value with ti.cast")
            return B.call(op, e)
        return lw.elementwise(count, args[0], node)
    return handler


def _minmax(op):
    def handler(lw, node, args, kwargs):
        if len(args) == 1 and isinstance(args[0], Vec):
            args = args[0].items
        out = args[0]
        for a in args[1:]:
            out = lw.binary(op, out, a, node)
        return out
    return handler


def _select(lw, node, args, kwargs):
    c, a, b = args
    return lw.select(c, a, b, node)


def _cast(lw, node, args, kwargs):
    x, dt = args
    return lw.cast(x, dt, node)


def _dot(lw, node, args, kwargs):
    return V.dot(lw.vec(args[0], node), lw.vec(args[1], node))


def _length(lw, node, args, kwargs):
    return V.norm(lw.vec(args[0], node))


def _normalize(lw, node, args, kwargs):
    return V.normalized(lw.vec(args[0], node))


def _cross(lw, node, args, kwargs):
    return V.cross(lw.vec(args[0], node), lw.vec(args[1], node))


def _clamp(lw, node, args, kwargs):
    x, lo, hi = args
    return lw.binary("min", lw.binary("max", x, lo, node), hi, node)


def _sign(lw, node, args, kwargs):
    def sgn(e):
        z = B.const(0, e.dtype)
        return B.select(B.call("gt", e, z), B.const(1, e.dtype), B.select(B.call("lt", e, z), B.const(-1, e.dtype), z))
    return lw.elementwise(sgn, args[0], node)


def _vector(lw, node, args, kwargs):
    items = args[0]
    dt = kwargs.get("dt") or (args[1] if len(args) > 1 else None)
    if isinstance(items, Vec):
        v = items
    else:
        v = V.uniform(Vec((len(items),), [lw.scalar(e, node) for e in items]))
    return lw.cast(v, dt, node) if dt is not None else v


def _matrix(lw, node, args, kwargs):
    rows = args[0]
    dt = kwargs.get("dt") or (args[1] if len(args) > 1 else None)
    v = rows if isinstance(rows, Vec) else lw.from_list(rows, node)
    return lw.cast(v, dt, node) if dt is not None else v


def _rows_cols(by_columns):
    """ti.Matrix.rows([v1, v2]) / ti.Matrix.cols([v1, v2]): a matrix from vectors."""
    def handler(lw, node, args, kwargs):
        vs = [lw.vec(v, node) for v in args[0]]
        if any(not v.is_vector or len(v.items) != len(vs[0].items) for v in vs):
            raise lw.error(node, "ti.Matrix.rows/cols take vectors of one length", "pass a list of such vectors")
        m = Vec((len(vs), len(vs[0].items)), [e for v in vs for e in v.items])
        return V.transpose(m) if by_columns else m
    return handler


def _decomposition(name, by_size, why_not, instead=""):
    """ti.polar_decompose, ti.svd, ti.sym_eig, ti.eig are Python functions that pick a ti.func by
    the matrix's size at compile time; do the same, and inline that ti.func (or, where by_size
    gives a function of kerndiff's own, call it: (lw, node, A, dt) -> the result; frontend.polar).
    `why_not`: why the other sizes cannot be differentiated here; `instead`: what differentiable
    call does the usual job of the refused one, if any (the remedy names it first)."""
    def handler(lw, node, args, kwargs):
        from ..ir.types import default_fp, is_float, to_taichi
        from .calls import inline_function, unwrap_ti_func

        A = args[0] if args else None
        if not isinstance(A, Vec) or len(A.shape) != 2:
            raise lw.error(node, f"ti.{name} takes a square matrix", "pass a ti.Matrix")
        impl = by_size.get(A.shape[0]) if A.shape[0] == A.shape[1] else None
        dt = args[1] if len(args) > 1 else kwargs.get("dt")
        if dt is None:  # Taichi's default is default_fp; the matrix's own float type keeps an f64 one f64
            dt = to_taichi(A.dtype if is_float(A.dtype) else default_fp())
        if impl is not None and not getattr(impl, "_is_taichi_function", False):
            return impl(lw, node, A, dt)
        if impl is None:
            sizes = " and ".join(f"{n}x{n}" for n in sorted(by_size))
            raise lw.error(node, f"kerndiff differentiates ti.{name} of {sizes} matrices only (this one is "
                                 f"{A.shape[0]}x{A.shape[1]}): {why_not}",
                           instead + "write the decomposition as a ti.func, or keep it out of the differentiated "
                                     "kernel")
        return inline_function(lw, unwrap_ti_func(impl), [A, dt], {}, node)
    return handler


def _decompositions(table):
    from taichi import _funcs as TF

    builtin = "Taichi computes the 3x3 one with a builtin statement, which has no Taichi source to differentiate"
    from .polar import lower_polar3

    table[TF.polar_decompose] = _decomposition("polar_decompose", {2: TF._polar_decompose2d, 3: lower_polar3},
                                               "Taichi itself supports only 2x2 and 3x3 matrices here")
    table[TF.svd] = _decomposition("svd", {2: TF._svd2d}, builtin,
                                   "for the rotation U @ V.transpose() or the stretch V @ sig @ V.transpose(), use "
                                   "ti.polar_decompose (differentiable for 3x3 matrices, also where singular values "
                                   "repeat, as at the identity); otherwise ")
    table[TF.sym_eig] = _decomposition("sym_eig", {2: TF._sym_eig2x2},
                                       "Taichi's 3x3 solver indexes its vectors with runtime indices, which "
                                       "kerndiff's scalarized kernels do not have")
    table[TF.eig] = _decomposition("eig", {2: TF._eig2x2}, "Taichi itself supports only 2x2 matrices here")


def _fill(lw, dt, shape, value):
    from ..ir.types import from_taichi

    d = from_taichi(dt)
    n = 1
    for s in shape:
        n *= s
    return Vec(shape, [B.const(value, d)] * n)


def _vec_zero(lw, node, args, kwargs):
    return _fill(lw, args[0], tuple(args[1:]), 0)


def _vec_one(lw, node, args, kwargs):
    return _fill(lw, args[0], tuple(args[1:]), 1)


def _vec_unit(lw, node, args, kwargs):
    """ti.Vector.unit(n, i, dt=None): the i-th unit vector (n and i compile-time, as in Taichi),
    of integers unless dt says otherwise, as Taichi's: `u[I + ti.Vector.unit(2, d)]` indexes."""
    from ..ir.types import default_ip, from_taichi

    n, i = args[0], args[1]
    dt = args[2] if len(args) > 2 else kwargs.get("dt")
    if not isinstance(n, int) or not isinstance(i, int):
        raise lw.error(node, "ti.Vector.unit takes compile-time n and i", "pass constants (ti.static loop indices)")
    d = from_taichi(dt) if dt is not None else default_ip()
    return Vec((n,), [B.const(1 if k == i else 0, d) for k in range(n)])


def _identity(lw, node, args, kwargs):
    from ..ir.types import from_taichi

    dt, n = args
    d = from_taichi(dt)
    return Vec((n, n), [B.const(1 if i == j else 0, d) for i in range(n) for j in range(n)])


def _diag(lw, node, args, kwargs):
    """ti.Matrix.diag(dim, val): val on the diagonal, zeros of its type elsewhere."""
    dim, val = args
    if not isinstance(dim, int):
        raise lw.error(node, "ti.Matrix.diag takes a compile-time dim", "pass a constant")
    val = lw.scalar(val, node)
    zero = B.const(0, val.dtype)
    return Vec((dim, dim), [val if i == j else zero for i in range(dim) for j in range(dim)])


VECTOR_METHODS = ("norm", "norm_sqr", "norm_inv", "normalized", "dot", "cross", "outer_product", "transpose",
                  "trace", "determinant", "inverse", "sum", "max", "min", "any", "all", "cast")


def _unbound_method(name):
    def handler(lw, node, args, kwargs):
        from .calls import vec_method
        return vec_method(lw, Method(name, lw.vec(args[0], node)), args[1:], kwargs, node)
    return handler


def _py_float(lw, node, args, kwargs):
    from ..ir.types import default_fp
    if isinstance(args[0], (int, float)):
        return float(args[0])
    return lw.cast(args[0], default_fp(), node)


def _py_int(lw, node, args, kwargs):
    if isinstance(args[0], (int, float)):
        return int(args[0])
    return lw.cast(args[0], "i32", node)


def _py_abs(lw, node, args, kwargs):
    return abs(args[0]) if isinstance(args[0], (int, float)) else _unary("abs")(lw, node, args, kwargs)


def _py_minmax(op, pyfn):
    def handler(lw, node, args, kwargs):
        if all(isinstance(a, (int, float)) for a in args):
            return pyfn(*args)
        return _minmax(op)(lw, node, args, kwargs)
    return handler


def _py_sum(lw, node, args, kwargs):
    items = args[0].items if isinstance(args[0], Vec) else list(args[0])
    out = args[1] if len(args) > 1 else 0
    for e in items:
        out = lw.binary("add", out, e, node)
    return out


def _py_all_any(op):
    """all(A == B) / any(v > 0) on a vector of conditions, as in Taichi: one logical chain."""
    def handler(lw, node, args, kwargs):
        items = args[0].items if isinstance(args[0], Vec) else list(args[0])
        out = op == "and"
        for e in items:
            out = lw.logic(op, out, e, node)
        return out
    return handler


def _raw_div_mod(op):
    """ti.raw_div / ti.raw_mod: C's division and remainder, which truncate toward zero where
    Python's // and % (Taichi's too) floor. Floor's remainder has the divisor's sign, C's the
    dividend's: where they differ and the remainder is not 0, C's quotient is one more and its
    remainder one divisor less. raw_div of floats is true division, raw_mod of floats C's fmod."""
    def python(a, b):
        q, r = a // b, a % b
        flip = r != 0 and (a < 0) != (b < 0)
        if op == "raw_mod":
            return r - b if flip else r
        return (q + 1 if flip else q) if isinstance(a, int) and isinstance(b, int) else a / b

    def scalar(a, b):
        r = B.call("mod", a, b)
        below = [B.call("lt", e, B.const(0, e.dtype)) for e in (a, b)]
        flip = B.call("and", B.call("ne", r, B.const(0, r.dtype)), B.call("ne", *below))
        if op == "raw_mod":
            return B.select(flip, B.call("sub", r, b), r)
        if is_float(r.dtype):
            return B.call("div", a, b)
        return B.call("add", B.call("floordiv", a, b), B.select(flip, B.const(1, r.dtype), B.const(0, r.dtype)))

    def handler(lw, node, args, kwargs):
        a, b = args
        if all(isinstance(v, (int, float)) for v in (a, b)):
            if b == 0:
                raise lw.error(node, f"ti.{op} by a constant zero", "check the divisor")
            return python(a, b)
        if isinstance(a, Vec) or isinstance(b, Vec):
            return V.broadcast(op, a if isinstance(a, Vec) else lw.scalar(a, node),
                               b if isinstance(b, Vec) else lw.scalar(b, node), scalar)
        return scalar(lw.scalar(a, node), lw.scalar(b, node))
    return handler


def _py_pow(lw, node, args, kwargs):
    if len(args) != 2:
        raise lw.error(node, "pow with a modulus cannot run inside a kernel", "use pow(a, b) or a ** b")
    return lw.binary("pow", args[0], args[1], node)


def _static(lw, node, args, kwargs):
    return args[0] if len(args) == 1 else tuple(args)


def _zero_like(lw, node, args, kwargs):
    return lw.elementwise(lambda e: B.const(0, e.dtype), args[0], node)


def _py_len(lw, node, args, kwargs):
    a = args[0]
    if isinstance(a, Vec):
        return a.shape[0]
    return len(a)


def build_table():
    table = {}
    for name in UNARY_MATH:
        for mod in (ti, ti.math):
            f = getattr(mod, name, None)
            if f is not None:
                table[f] = _unary(name)
    for mod in (ti, ti.math):
        table[mod.atan2] = lambda lw, node, args, kwargs: lw.binary("atan2", args[0], args[1], node)
        table[mod.min] = _minmax("min")
        table[mod.max] = _minmax("max")
        if hasattr(mod, "pow"):
            table[mod.pow] = lambda lw, node, args, kwargs: lw.binary("pow", args[0], args[1], node)
    table[ti.select] = _select
    table[ti.raw_div] = _raw_div_mod("raw_div")
    table[ti.raw_mod] = _raw_div_mod("raw_mod")
    table[ti.cast] = _cast
    table[ti.math.dot] = _dot
    table[ti.math.length] = _length
    table[ti.math.normalize] = _normalize
    table[ti.math.cross] = _cross
    table[ti.math.clamp] = _clamp
    table[ti.types.vector] = _type_constructor(ti.types.vector)  # ti.types.matrix(2, 2, ti.f32)(...) inline
    table[ti.types.matrix] = _type_constructor(ti.types.matrix)
    table[ti.math.popcnt] = _bit_count("popcnt")
    table[ti.math.clz] = _bit_count("clz")
    table[ti.math.isnan] = _unary("isnan")  # emitted as Taichi's own (bit tests, immune to fast math)
    table[ti.math.isinf] = _unary("isinf")
    table[ti.math.sign] = _sign
    table[ti.static] = _static
    table[ti.zero] = _zero_like  # ti.math.refract starts from zero(x)
    table[ti.Vector] = _vector
    table[ti.Matrix] = _matrix
    table[ti.Vector.zero] = _vec_zero
    table[ti.Matrix.zero] = _vec_zero
    table[ti.Vector.one] = _vec_one
    table[ti.Matrix.one] = _vec_one
    table[ti.Matrix.identity] = _identity
    table[ti.Matrix.diag] = _diag
    for name in VECTOR_METHODS:  # ti.Vector.normalized(d, 1e-6): a method called through the class
        table[getattr(ti.Matrix, name)] = _unbound_method(name)
    table[ti.Vector.unit] = _vec_unit
    table[ti.Matrix.rows] = _rows_cols(False)
    table[ti.Matrix.cols] = _rows_cols(True)
    _decompositions(table)
    table[float] = _py_float
    table[int] = _py_int
    table[abs] = _py_abs
    table[pow] = _py_pow
    table[min] = _py_minmax("min", min)
    table[max] = _py_minmax("max", max)
    table[len] = _py_len
    table[all] = _py_all_any("and")
    table[any] = _py_all_any("or")
    table[sum] = _py_sum
    for fn in (enumerate, zip, reversed, list, tuple, dict, sorted, isinstance, hasattr, getattr, str):
        table[fn] = _python_data(fn)  # ti.static(enumerate(fields)), ti.static(zip(names, fields))
    for name in dir(math):  # math.* on compile-time numbers only
        f = getattr(math, name)
        if callable(f):
            table[f] = _compile_time(f)
    return table


def _type_constructor(fn):
    def handler(lw, node, args, kwargs):
        if any(isinstance(a, (B.Expr, Vec)) for a in list(args) + list(kwargs.values())):
            raise lw.error(node, f"ti.types.{fn.__name__} takes compile-time sizes and a dtype", "pass constants")
        return fn(*args, **kwargs)
    return handler


def _python_data(fn):
    """A Python builtin over compile-time values (lists of fields, names, numbers), which Taichi
    runs in Python too; over values of the kernel it means nothing Taichi would compile."""
    def handler(lw, node, args, kwargs):
        if any(isinstance(a, (B.Expr, Vec)) for a in list(args) + list(kwargs.values())):
            raise lw.error(node, f"{fn.__name__}() runs in Python, on compile-time values, not on values of the "
                                 "kernel", "apply it to Python data (wrapped in ti.static in a loop)")
        return fn(*args, **kwargs)
    return handler


def _compile_time(fn):
    def handler(lw, node, args, kwargs):
        if all(isinstance(a, (int, float)) for a in args):
            return fn(*args, **kwargs)
        raise lw.src.error(node, f"math.{fn.__name__} cannot run on a Taichi value inside a kernel",
                           f"use ti.{fn.__name__} (or ti.math.{fn.__name__}) instead")
    return handler


TABLE = None
_SIGNATURES = {}


def positional(fn, args, kwargs):
    """The call's arguments bound to fn's own signature, keywords turned positional where the
    parameter allows it (ti.floor(x, dtype=ti.i32) reaches its handler as (x, ti.i32)), so no
    handler drops an argument given by keyword. Raises TypeError as Python would for arguments
    fn does not take; functions without a signature pass through as they are."""
    try:
        sig = _SIGNATURES.get(fn)
        if sig is None:
            sig = _SIGNATURES[fn] = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins such as float and abs
        return args, kwargs
    bound = sig.bind(*args, **kwargs)
    return bound.args, bound.kwargs


def lookup(fn):
    global TABLE
    if TABLE is None:
        TABLE = build_table()
    try:
        return TABLE.get(fn)
    except TypeError:  # unhashable
        return None
