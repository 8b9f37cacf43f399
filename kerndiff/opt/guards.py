"""Adjoint contributions that are zero unless a condition holds are added under that condition.

The reverse of `x[i - 1] if i > 0 else 0.0` (a ti.select in Taichi) adds `select(i > 0, g, 0.0)`
into x_adj[i - 1]. As an atomic add that runs on every trip, it costs an atomic where nothing is
added, and at i = 0 it writes (a zero) outside the field: into whatever memory lies before it,
where even adding 0.0 can change bits (-0.0 becomes 0.0, a denormal is flushed under fast math),
and on a GPU it may fault. So `x_adj[i - 1] += select(c, e, 0.0) * k` becomes
`if c: x_adj[i - 1] += e * k`. Where the condition fails the sum was zero, so nothing changes but
that the add (and its out-of-range index) is skipped.
"""
from __future__ import annotations

import dataclasses

from ..ir import build as B
from ..ir import nodes as N
from ..ir.conditions import all_of
from ..ir.types import is_float
from ..ir.walk import blocks_of, iter_expr, map_stmts, rebuild_stmt


def guard_zero_adds(stmts):
    """stmts with every atomic add of a zero-unless-condition value put under its condition."""
    return _without_nothing(map_stmts(stmts, _guarded))


def _without_nothing(stmts):
    """stmts without the adds that no condition allows (left as `if <false>:` with no body)."""
    out = []
    for s in stmts:
        if isinstance(s, N.If) and isinstance(s.cond, N.Const) and not s.cond.value and not s.then \
                and not s.orelse:
            continue
        blocks = blocks_of(s)
        out.append(rebuild_stmt(s, [_without_nothing(b) for b in blocks]) if blocks else s)
    return tuple(out)


def _guarded(s):
    """One `if` for all the conditions a value is zero without (a product of several selects, as
    in the adjoint of one branch of `v[j]`), simplified (ir.conditions): `if j == 1:`, not
    `if j == 1: if not j == 0:`. An add that no condition allows is dropped. A local's
    accumulation `a = a + select(j == 1, e, 0.0)` is guarded too when the condition is an index
    test (integers only, nothing loaded), which a branch predicts as well as a select; a data-
    dependent one stays a select."""
    value = s.value if isinstance(s, N.Atomic) and s.op == "add" else _accumulation(s)
    if value is None:
        return s
    conds = []
    split = _conditional(value)
    while split is not None and (isinstance(s, N.Atomic) or _index_test(split[0])):
        conds.append(split[0])
        value = split[1]
        split = _conditional(value)
    if not conds:
        return s
    add = dataclasses.replace(s, value=value) if isinstance(s, N.Atomic) else \
        dataclasses.replace(s, value=B.add(B.var(s.name, s.value.dtype), value))
    cond = all_of(conds)
    if cond is None:
        return add
    if isinstance(cond, N.Const):  # never: nothing is added (_without_nothing drops it)
        return N.If(cond, (), src=s.src, tag=s.tag)
    return N.If(cond, (add,), src=s.src, tag=s.tag)


def _accumulation(s):
    """e for `a = a + e` (a float local), else None."""
    if isinstance(s, N.Assign) and is_float(s.value.dtype) and isinstance(s.value, N.Call) \
            and s.value.op == "add":
        a, e = s.value.args
        if isinstance(a, N.Var) and a.name == s.name:
            return e
        if isinstance(e, N.Var) and e.name == s.name:
            return a
    return None


def _index_test(c):
    return all(not is_float(x.dtype) and not isinstance(x, N.Load) for x in iter_expr(c))


def _is_zero(e):
    return isinstance(e, N.Const) and e.value == 0


def _conditional(e):
    """(c, v) when e is v where c holds and zero where it does not: a select with a zero branch,
    scaled by factors (products, negation, a quotient's numerator), or a sum of such terms under
    one condition (the partials of `ti.sqrt(o[i - 1]) * o[i - 1] if i > 0 else 1.0`); None
    otherwise."""
    if isinstance(e, N.Call) and e.op == "select":
        c, a, b = e.args
        if _is_zero(b) and not _is_zero(a):
            return c, a
        if _is_zero(a) and not _is_zero(b):
            return B.call("not", c), b
        return None
    if isinstance(e, N.Call) and e.op in ("add", "sub"):  # terms that are all zero unless one c
        left, right = _conditional(e.args[0]), _conditional(e.args[1])
        if left is not None and right is not None and left[0] == right[0]:
            return left[0], B.call(e.op, left[1], right[1])
        return None
    if isinstance(e, N.Call) and e.op == "neg":
        inner = _conditional(e.args[0])
        return None if inner is None else (inner[0], B.call("neg", inner[1]))
    if isinstance(e, N.Call) and e.op == "mul_or_zero":  # a product, zero where a is
        a, b = e.args
        inner = _conditional(a)
        if inner is not None:
            return inner[0], B.call("mul_or_zero", inner[1], b)
        inner = _conditional(b)
        if inner is not None:
            return inner[0], B.call("mul_or_zero", a, inner[1])
        return None
    if isinstance(e, N.Call) and e.op in ("mul", "div"):
        a, b = e.args
        inner = _conditional(a)
        if inner is not None:
            return inner[0], B.call(e.op, inner[1], b)
        inner = _conditional(b) if e.op == "mul" else None
        if inner is not None:
            return inner[0], B.call("mul", a, inner[1])
    return None
