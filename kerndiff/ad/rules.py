"""The derivative rule table: the ONLY place where derivative math lives.

Each differentiable primitive declares one partial derivative per argument, as IR built with the
smart constructors, given the arguments and the op's own output. Forward mode forms
ẏ = Σ ∂ᵢ·ẋᵢ over arguments with a nonzero tangent; reverse mode adds ∂ᵢ·ȳ to each active x̄ᵢ.
Because the partials are IR, the transforms differentiate them again: higher orders are free.
"""
from __future__ import annotations

from ..ir import build as B
from ..ir.ops import OPS

PARTIALS = {}

# Piecewise-constant ops: derivative zero almost everywhere (and exactly zero in both modes).
NO_DERIVATIVE = {"floor", "ceil", "round", "floordiv", "lt", "le", "gt", "ge", "eq", "ne", "and",
                 "or", "not", "bit_and", "bit_or", "bit_xor", "shl", "shr", "bit_not", "isnan", "isinf",
                 "popcnt", "clz", "random"}  # (random: a number drawn, of no input; ir.ops.RANDOM)
# Ops whose derivative is handled by the passes' structure rather than by partials: cast, and
# mul_or_zero, whose derivatives are products of the same kind (zero_safe_jvp, zero_safe_vjp).
STRUCTURAL = {"cast", "mul_or_zero"}

# Ops whose value is right but whose derivatives are left to the code around them, which is
# exact only up to some order: polar_rotation is Taichi's rotation of a 3x3 polar decomposition,
# taken as constant, and frontend.polar refines it by two Newton steps, which converge cubically:
# a step from a value right to order k gives one right to order 3k + 2, so two steps from a
# constant (order 0) give the true rotation's derivatives up to the eighth. Each transform that
# takes a derivative of code holding such an op counts one more in the op's last argument; one
# past its limit is refused.
ORDER_LIMITED = {"polar_rotation": (8, "a 3x3 ti.polar_decompose",
                                    "two Newton steps refine Taichi's rotation, which is a constant to the transforms")}
NO_DERIVATIVE |= set(ORDER_LIMITED)


def count_derivative(stmts):
    """stmts with one more derivative counted in each order-limited op (ORDER_LIMITED): every
    transform (forward or reverse, of a kernel or of a device function) calls this on the code it
    differentiates. Raises KernDiffError at the statement of an op past its limit."""
    from ..errors import KernDiffError
    from ..ir import nodes as N
    from ..ir.walk import expr_children_of_stmt, iter_expr, iter_stmts, map_expr, map_stmt_exprs, map_stmts

    if not any(isinstance(x, N.Call) and x.op in ORDER_LIMITED
               for s in iter_stmts(stmts) for e in expr_children_of_stmt(s) for x in iter_expr(e)):
        return stmts  # most code: nothing to count

    def counted(stmt):
        def bump(e):
            if isinstance(e, N.Call) and e.op in ORDER_LIMITED:
                limit, what, why = ORDER_LIMITED[e.op]
                taken = e.args[-1].value + 1
                if taken > limit:
                    raise KernDiffError(f"this takes derivative {taken} of {what}, whose derivatives kerndiff "
                                        f"gives exactly only up to order {limit} ({why})", stmt.src,
                                        f"take at most {limit} derivatives through it")
                return N.Call(e.dtype, e.op, e.args[:-1] + (B.const(taken, "i32"),))
            return e
        return map_stmt_exprs(stmt, lambda e: map_expr(e, bump))

    return map_stmts(stmts, counted)


# Ops with a partial that is infinite somewhere (at 0 for a divisor, log, sqrt, rsqrt, ...). A
# select with a branch holding one is a guard (`0.5 / d if d != 0 else 0`): where it does not
# take that branch, the branch's partials may be infinite, and its zero cotangent times them is
# NaN. The transforms keep such a branch's derivatives under the select's condition instead.
SINGULAR = {"div", "log", "sqrt", "rsqrt", "pow", "asin", "acos", "tan", "atan2", "mod"}


def is_singular(e):
    """e is a call of an op whose partial is infinite somewhere: of SINGULAR, but for a power with
    a constant exponent of 0 or at least 1 (x ** 2, x ** 1.5: b * a ** (b - 1) is finite)."""
    from ..ir import nodes as N
    if not isinstance(e, N.Call) or e.op not in SINGULAR:
        return False
    if e.op == "pow" and isinstance(e.args[1], N.Const):
        return 0 < e.args[1].value < 1 or e.args[1].value < 0
    return True


def guards_a_singularity(e):
    """e is a select with a branch that computes an op of SINGULAR."""
    from ..ir import nodes as N
    from ..ir.walk import iter_expr
    return isinstance(e, N.Call) and e.op == "select" and any(
        isinstance(x, N.Call) and x.op in SINGULAR for branch in e.args[1:] for x in iter_expr(branch))


def zero_safe_jvp(a, b, ta, tb):
    """The tangent of mul_or_zero(a, b) (a * b, 0 where a is 0), from the tangents ta, tb (None:
    zero): the product rule with each product of the same kind, ȧ·b zero where ȧ is, a·ḃ zero
    where a is. Where a is zero by a guard its tangent is too, and b's infinite partials stay out
    at every order; where a is zero by chance its tangent is kept (ȧ·b)."""
    terms = []
    if ta is not None:
        terms.append(B.call("mul_or_zero", ta, b))
    if tb is not None:
        terms.append(B.call("mul_or_zero", a, tb))
    return terms


def zero_safe_vjp(a, b, g):
    """The cotangents of mul_or_zero(a, b)'s arguments given its cotangent g: g·b, zero where g
    is (b may be infinite there), and a·g, zero where a is."""
    return B.call("mul_or_zero", g, b), B.call("mul_or_zero", a, g)


def defpartials(op, *partials):
    assert op in OPS and op not in PARTIALS, op
    PARTIALS[op] = partials


def _c(v, like):
    return B.const(v, like.dtype)


def _sq(x):
    return B.mul(x, x)


def _ties(a, b):
    """∂ min(a, b)/∂a: 1 where a wins, ½ on a tie (ties split evenly), 0 where b wins."""
    return B.select(B.call("lt", a, b), _c(1, a), B.select(B.call("eq", a, b), _c(0.5, a), _c(0, a)))


defpartials("add", lambda a, b, out: _c(1, out), lambda a, b, out: _c(1, out))
defpartials("sub", lambda a, b, out: _c(1, out), lambda a, b, out: _c(-1, out))
defpartials("mul", lambda a, b, out: b, lambda a, b, out: a)
defpartials("div", lambda a, b, out: B.div(_c(1, out), b), lambda a, b, out: B.neg(B.div(out, b)))
defpartials("neg", lambda a, out: _c(-1, out))


def _pow_base(a, b, out):
    """∂ a**b/∂a = b·a**(b-1), and 0 where b = 0: a**0 is 1 everywhere, where 0·0**-1 would give
    NaN at a = 0 (JAX's rule too)."""
    return B.select(B.call("eq", b, _c(0, b)), _c(0, out), B.mul(b, B.call("pow", a, B.sub(b, _c(1, b)))))


def _pow_exponent(a, b, out):
    """∂ a**b/∂b = log(a)·a**b, and 0 where a = 0: 0**b is constant in b, where log(0)·0 would
    give NaN (JAX's rule too)."""
    return B.mul(B.call("log", B.select(B.call("eq", a, _c(0, a)), _c(1, a), a)), out)


defpartials("pow", _pow_base, _pow_exponent)
defpartials("mod", lambda a, b, out: _c(1, out),
            lambda a, b, out: B.neg(B.call("floor", B.div(a, b))))
defpartials("min", lambda a, b, out: _ties(a, b), lambda a, b, out: _ties(b, a))
defpartials("max", lambda a, b, out: _ties(b, a), lambda a, b, out: _ties(a, b))
defpartials("abs", lambda x, out: B.select(B.call("gt", x, _c(0, x)), _c(1, x),
                                           B.select(B.call("lt", x, _c(0, x)), _c(-1, x), _c(0, x))))
defpartials("sin", lambda x, out: B.call("cos", x))
defpartials("cos", lambda x, out: B.neg(B.call("sin", x)))
defpartials("tan", lambda x, out: B.add(_c(1, out), _sq(out)))
defpartials("asin", lambda x, out: B.call("rsqrt", B.sub(_c(1, x), _sq(x))))
defpartials("acos", lambda x, out: B.neg(B.call("rsqrt", B.sub(_c(1, x), _sq(x)))))
defpartials("atan", lambda x, out: B.div(_c(1, x), B.add(_c(1, x), _sq(x))))
defpartials("atan2",
            lambda y, x, out: B.div(x, B.add(_sq(x), _sq(y))),
            lambda y, x, out: B.neg(B.div(y, B.add(_sq(x), _sq(y)))))
defpartials("exp", lambda x, out: out)
defpartials("log", lambda x, out: B.div(_c(1, x), x))
defpartials("sqrt", lambda x, out: B.div(_c(0.5, out), out))
defpartials("rsqrt", lambda x, out: B.mul(_c(-0.5, out), B.div(out, x)))
defpartials("tanh", lambda x, out: B.sub(_c(1, out), _sq(out)))
defpartials("select", None,
            lambda c, a, b, out: B.select(c, _c(1, out), _c(0, out)),
            lambda c, a, b, out: B.select(c, _c(0, out), _c(1, out)))


def partials(op: str, args, out):
    """The partials of op at args (None where an argument has no derivative)."""
    return tuple(None if p is None else p(*args, out) for p in PARTIALS[op])
