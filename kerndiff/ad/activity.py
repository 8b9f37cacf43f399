"""Activity: which fields and locals carry derivatives at a given level.

Fields: a float field the kernel writes always gets a derivative field (allocated on demand); a
float field it only reads is active when it already has one of this kind and level (made with
needs_dual/needs_grad, by kd.dual/kd.adjoint, or by an earlier transform). Locals: a float local is
varied when some assignment to it depends on a varied local or an active field (a fixed point,
flow-insensitive, so loops and branches need no special care).
"""
from __future__ import annotations

from ..errors import KernDiffError
from ..ir import nodes as N
from ..ir.types import is_float
from ..ir.walk import expr_children_of_stmt, iter_expr, iter_stmts
from ..runtime.registry import REGISTRY


def written_fields(stmts):
    out = []
    for s in iter_stmts(stmts):
        if isinstance(s, (N.Store, N.Atomic)) and s.ref.field not in [f for f in out]:
            out.append(s.ref.field)
    return out


def read_refs(stmts):
    out = {}
    for s in iter_stmts(stmts):
        for e in expr_children_of_stmt(s):
            for x in iter_expr(e):
                if isinstance(x, N.Load):
                    out[id(x.ref)] = x.ref
    return list(out.values())


def field_activity(ir, kind: str, level: int):
    """A function FieldRef -> derivative FieldRef (or None), allocating outputs' fields."""
    written = [f for f in written_fields(ir.body) if is_float(REGISTRY.ref(f).dtype)]
    REGISTRY.allocate_many([(f, kind, level) for f in written])
    memo = {}

    def deriv(ref):
        got = memo.get(id(ref), False)
        if got is not False:
            return got
        out = None
        if is_float(ref.dtype):
            d = REGISTRY.get(ref.field, kind, level)
            if d is not None:
                out = REGISTRY.ref(d, ref.component)
        memo[id(ref)] = out
        return out

    return deriv


def expr_varied(e, varied, field_is_active):
    if not is_float(e.dtype):
        return False
    for x in iter_expr(e):
        if isinstance(x, N.Var) and x.name in varied:
            return True
        if isinstance(x, N.Load) and field_is_active(x.ref):
            return True
    return False


def varied_vars(stmts, field_is_active, seeds=()):
    varied = set(seeds)
    assigns = [s for s in iter_stmts(stmts) if isinstance(s, N.Assign)]
    changed = True
    while changed:
        changed = False
        for s in assigns:
            if s.name not in varied and expr_varied(s.value, varied, field_is_active):
                varied.add(s.name)
                changed = True
    return varied


def check_function_body(stmts):
    """A device function is differentiated as local code: it may not write fields, and its loops
    must be serial. Called outside any loop of the kernel, its loop is the kernel's outermost one,
    which Taichi runs in parallel (its `s += ...` become reductions), so say that instead of
    reporting the reduction as a field write."""
    for s in iter_stmts(stmts):
        if isinstance(s, N.For) and s.parallel:
            raise KernDiffError("this loop of a differentiated function is the kernel's outermost loop here (the "
                                "call is outside any loop), which Taichi runs in parallel",
                                s.src, "call the function inside a loop of the kernel, e.g. `for i in range(1):`")
    for s in iter_stmts(stmts):
        if isinstance(s, (N.Store, N.Atomic)):
            raise KernDiffError("a function that writes fields cannot be differentiated as a function",
                                s.src, "differentiate the kernel instead, or return the value")
