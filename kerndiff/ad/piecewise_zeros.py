"""Where a piecewise op's zero derivative meets a singular op's infinite one.

    ti.sqrt(ti.max(x, 0.0))            # a "safe" square root
    ti.max(0.0, overlap) ** 1.5        # a Hertz contact energy

Where max chooses 0 the function is constant (zero), and so are its derivatives. But the chain
rule multiplies max's partial there, 0, by sqrt's, 0.5 / sqrt(0) = inf (the reverse: x_adj =
ties * 0.5 / t1 * g), and the forward multiplies sqrt's partial by max's tangent, 0: NaN either
way. The contact energy's gradient is finite (1.5 * 0 ** 0.5 = 0) but its HVP differentiates
0 ** 0.5 once more: NaN for every pair not in contact. JAX and Taichi's own AD give the same.

kerndiff multiplies such pairs with mul_or_zero (ir.ops GUARDED_PRODUCT: zero where its first
factor is zero), in both directions:
- forward: a steep op's term (a root, asin, acos, atan2 or fractional power: `is_steep`) whose
  argument is piecewise (holds a min, max, abs or select, or a local computed from one:
  `piecewise_locals`) is mul_or_zero(tangent, partial);
- reverse: a piecewise op's contribution where the cotangent may be infinite (the op inside a
  steep op's argument, or in the value of a local that reaches one: `steep_inputs`) is
  mul_or_zero(partial, cotangent).
Everything else multiplies as before: kernels without both kinds of op are unchanged.
"""
from __future__ import annotations

from ..ir import nodes as N
from ..ir.walk import expr_children_of_stmt, iter_expr, iter_stmts, vars_in
from .rules import is_singular

# Ops whose partials are exactly zero where they choose another argument or a constant.
PIECEWISE = {"min", "max", "abs", "select"}
# Singular ops whose partial is infinite where their value is finite (a root's at 0, asin's at 1):
# there a constant chosen below them makes the function constant. A division's, a log's, a
# negative power's partials are infinite only where the value is too, so the derivative there
# has nothing finite to keep (and under a guard, `h / det if det != 0 else 0`, the select's own
# rule keeps the branch's tangent out): they multiply as before.
STEEP = {"sqrt", "asin", "acos", "atan2", "pow"}


def is_steep(e):
    """e is a call of a STEEP op with an infinite partial somewhere (rules.is_singular), a power
    only with an exponent that is not a negative constant (0 ** 0.5 is 0, 0 ** -1 is not finite)."""
    if not is_singular(e) or e.op not in STEEP:
        return False
    return not (e.op == "pow" and isinstance(e.args[1], N.Const) and e.args[1].value < 0)


def is_piecewise(e, locals_):
    """e holds a piecewise op, or reads a local in `locals_` (piecewise_locals)."""
    return any(isinstance(x, N.Call) and x.op in PIECEWISE or isinstance(x, N.Var) and x.name in locals_
               for x in iter_expr(e))


def piecewise_locals(stmts):
    """Locals some assignment of stmts gives a piecewise value (`m = ti.max(x, 0.0)`, or `o = m *
    2` after it): their tangents may be zero where a singular op's partial is infinite."""
    out, grew = set(), True
    assigns = [s for s in iter_stmts(stmts) if isinstance(s, N.Assign)]
    while grew:
        grew = False
        for s in assigns:
            if s.name not in out and is_piecewise(s.value, out):
                out.add(s.name)
                grew = True
    return out


def steep_inputs(stmts):
    """Locals that reach an argument of a steep op (directly or through other locals' values):
    their adjoints may be infinite where a piecewise partial is zero."""
    out = set()
    for s in iter_stmts(stmts):
        for e in expr_children_of_stmt(s):
            for x in iter_expr(e):
                if is_steep(x):
                    out.update(v.name for a in x.args for v in vars_in(a))
    assigns = [s for s in iter_stmts(stmts) if isinstance(s, N.Assign)][::-1]  # uses before definitions
    grew = True
    while grew:
        grew = False
        for s in assigns:
            if s.name in out:
                new = {v.name for v in vars_in(s.value)} - out
                if new:
                    out |= new
                    grew = True
    return out
