"""Conjunctions of conditions, simplified by the equalities they contain.

Indexing a vector at a runtime index selects among its components (`v[j]` is `v[0] if j == 0
else v[1] if j == 1 else v[2]`), and the adjoint of each branch is added under that branch's
condition and the negations of the ones before it. Written as they come, those guards nest
(`if j == 2: if not j == 1: if not j == 0: ...`) and a matrix index `A[j, (j + 1) % 3]` lists
all nine components, six of which no j can reach. Within a conjunction, a conjunct `x == k` fixes
x for all the others: `not j == 0` is true where `j == 1`, and `(j + 1) % 3 == 0` is false where
`j == 0`. So each conjunct is rewritten with the values the *other* conjuncts fix; what becomes
true is dropped, and one that becomes false makes the whole conjunction false.

Sound because a conjunct only matters where all the others hold. Two conjuncts never rewrite each
other: a conjunct `x == k` rewrites another only where x is part of it, so a pair that did so
both ways would fix the same x, and identical conjuncts are merged first (different values of
the same x are a contradiction, found as such).
"""
from __future__ import annotations

from . import build as B
from . import nodes as N
from .ops import COMPARE, LOGIC
from .types import is_float
from .walk import map_expr


def conjuncts(c):
    """The operands of a chain of `and`s, left to right (c itself when it is not one)."""
    if isinstance(c, N.Call) and c.op == "and" and all(_is_boolean(a) for a in c.args):
        return conjuncts(c.args[0]) + conjuncts(c.args[1])
    return [c]


def _is_boolean(e):
    """A value that is 0 or 1: a comparison or a logical op (and a constant 0 or 1)."""
    if isinstance(e, N.Const):
        return e.value in (0, 1)
    return isinstance(e, N.Call) and (e.op in COMPARE or e.op in LOGIC)


def fixed_value(c):
    """(x, k) when c is `x == k` for an integer x that is not a constant, else None."""
    if isinstance(c, N.Call) and c.op == "eq":
        x, k = c.args
        if isinstance(k, N.Const) and not isinstance(x, N.Const) and not is_float(x.dtype):
            return x, k
    return None


def _assuming(e, values):
    """e with every subexpression that `values` fixes replaced by its value (then folded)."""
    return map_expr(e, lambda x: values.get(x, x))


def all_of(conds):
    """The conjunction of conds (None entries are true), simplified as the module says; a
    constant 0 when it can never hold, None when it always does."""
    parts = []
    for c in conds:
        if c is None:
            continue
        for p in conjuncts(c):
            if p not in parts:
                parts.append(p)
    if not all(_is_boolean(p) for p in parts):  # `n and ...` of an arbitrary int: leave it as written
        return _join(parts)
    facts = [fixed_value(p) for p in parts]
    kept = []
    for i, p in enumerate(parts):
        values = {f[0]: f[1] for j, f in enumerate(facts) if f is not None and j != i}
        q = _assuming(p, values) if values else p
        if isinstance(q, N.Const):
            if not q.value:
                return B.const(0, "i32")
            continue
        kept.append(q)
    return _join(kept)


def _join(parts):
    out = None
    for p in parts:
        out = p if out is None else B.call("and", out, p)
    return out
