"""Powers of two moved between a local's definition and its uses, where that saves products.

The derivatives of squares put factors of 2 on both sides of the locals between them (forward
over reverse of a pair potential):

    r2_dual = (t1 * t1_dual + t2 * t2_dual + t3 * t3_dual) * 2.0
    r2_adj_dual = t7 * t7 * t5_inv * (r2_dual * (e_1_adj * (t5_inv * 0.2 + 0.75)))
    t1_adj = t1 * r2_adj * 2.0
    t1_adj_dual = (r2_adj * t1_dual + t1 * r2_adj_dual) * 2.0

A local assigned once, whose definition and uses are all derivative assignments (opt.reciprocal's
rule: nothing exact reads it), may hold k times its value instead, k a power of two: its
definition is multiplied by k, each use by 1 / k, and opt.algebra's writer writes them again,
constants merged (`r2_dual = t1 * t1_dual + ...`, `t1_adj = t1 * r2_adj`, `(t5_inv * 0.8 + 3.0)`).
A product by a power of two is exact (the writer refuses constants that would leave the dtype's
range), so values change only where the writer orders a sum's terms differently, as in
opt.algebra. Locals are taken one by one, in the order they are first assigned, with the k of
{2, 1/2, 4, 1/4} that saves the most operations over the statements that mention them, until a
round changes nothing: the W3 HVP's inner loop loses seven products.
"""
from __future__ import annotations

import dataclasses

from ..ir import build as B
from ..ir import nodes as N
from ..ir.types import is_float
from ..ir.walk import expr_children_of_stmt, iter_stmts, map_stmts, substitute, vars_in
from .algebra import GiveUp, Terms, Writer, arith_ops
from .reciprocal import exact_names

SCALES = (2.0, 0.5, 4.0, 0.25)
MAX_ROUNDS = 4


def rescale_locals(body, is_derivative, exact=None):
    if exact is None:
        exact = exact_names(body, is_derivative)
    for _ in range(MAX_ROUNDS):
        changed = False
        for name in _candidates(body, exact):
            rescaled = _rescaled(body, name)
            if rescaled is not None:
                body, changed = rescaled, True
        if not changed:
            break
    return body


def _candidates(body, exact):
    """Float locals assigned once, not exact, mentioned only by assignments to locals that are
    not exact either, of their own dtype; in the order they are assigned."""
    assigned, dtypes, barred = {}, {}, set()
    for s in iter_stmts(body):
        names = {v.name: v.dtype for e in expr_children_of_stmt(s) for v in vars_in(e)}
        if isinstance(s, N.Assign):
            assigned[s.name] = assigned.get(s.name, 0) + 1
            dtypes.setdefault(s.name, s.value.dtype)
            if s.name in exact or any(t != s.value.dtype for t in names.values()):
                barred.update(names)
        else:
            barred.update(names)
            barred.update(getattr(s, "vars", ()))
    return [n for n, count in assigned.items()
            if count == 1 and n not in exact and n not in barred and is_float(dtypes[n])]


def _rescaled(body, name):
    """body with `name` holding k times its value, for the k that saves the most operations, or
    None where none saves any."""
    targets = [s for s in iter_stmts(body) if isinstance(s, N.Assign)
               and (s.name == name or any(v.name == name for v in vars_in(s.value)))]
    before = sum(arith_ops(s.value) for s in targets)
    best, best_ops = None, before
    for k in SCALES:
        try:
            rewritten = {id(s): _rewrite(s, name, k) for s in targets}
        except GiveUp:
            continue
        ops = sum(arith_ops(s.value) for s in rewritten.values())
        if ops < best_ops:
            best, best_ops = rewritten, ops
    if best is None:
        return None
    return map_stmts(body, lambda s: best.get(id(s), s))


def _rewrite(s, name, k):
    dtype = s.value.dtype
    value = substitute(s.value, {name: B.mul(B.var(name, dtype), B.const(1.0 / k, dtype))})
    if s.name == name:
        value = B.mul(value, B.const(k, dtype))
    return dataclasses.replace(s, value=Writer(dtype).terms(Terms(dtype, {}).of(value)))
