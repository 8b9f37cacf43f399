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
opt.algebra. Locals are taken one by one, in the order they are first assigned, until a round
changes nothing. The k tried are the powers of two attached to the local (one that every term of
its definition carries, one that a use multiplies it by), each only where a count on the
statements' terms says a product goes (writing is what costs transform time); the k that saves
the most operations is kept. The W3 HVP's inner loop loses seven products.
"""
from __future__ import annotations

import dataclasses

from ..ir import build as B
from ..ir import nodes as N
from ..ir.types import is_float
from ..ir.walk import expr_children_of_stmt, iter_stmts, map_stmts, substitute, vars_in
from .algebra import GiveUp, Terms, Writer, arith_ops, is_sum
from .reciprocal import exact_names

SCALES = (2.0, 0.5, 4.0, 0.25)
MAX_ROUNDS = 4


def rescale_locals(body, is_derivative, exact=None):
    if exact is None:
        exact = exact_names(body, is_derivative)
    tried = {}  # local -> the statements it was last tried with (kept, so their ids stay theirs)
    terms_of = _TermsOf()
    for _ in range(MAX_ROUNDS):
        changed = False
        mentions = _mentions(body)
        for name in _candidates(body, exact):
            targets = mentions.get(name, [])
            if [id(s) for s in tried.get(name, ())] == [id(s) for s in targets]:
                continue  # nothing it is in has changed since: the same answer
            tried[name] = targets
            rescaled = _rescaled(body, targets, name, terms_of)
            if rescaled is not None:
                body, changed = rescaled, True
                mentions = _mentions(body)
        if not changed:
            break
    return body


def _mentions(body):
    """local -> the assignments that assign or read it."""
    out = {}
    for s in iter_stmts(body):
        if isinstance(s, N.Assign):
            for name in {s.name} | {v.name for v in vars_in(s.value)}:
                out.setdefault(name, []).append(s)
    return out


def _proposals(targets, name, terms_of):
    """The k worth trying, from the powers of two attached to `name`: one that every term of its
    definition carries (1/k of it moves out: `r2_dual = (...) * 2.0`), and one that a term of a
    use multiplies it by (k moves in: `t1 * r2_adj * 2.0`). Anything else has nothing to move."""
    ks = set()
    for s in targets:
        terms = terms_of(s)
        if not terms:
            continue
        if s.name == name:
            carried = {abs(c) for m, c in terms.items() if m != ()}
            if len(carried) == 1 and 1.0 / min(carried) in SCALES:
                ks.add(1.0 / min(carried))
        for m, c in terms.items():
            if abs(c) in SCALES and _power(m, name):
                ks.add(abs(c))
    return [k for k in SCALES if k in ks]


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


def _rescaled(body, targets, name, terms_of):
    """body with `name` holding k times its value, for the k that saves the most operations over
    the assignments that mention it (targets), or None where none saves any."""
    worth = [k for k in _proposals(targets, name, terms_of) if _estimate(targets, name, k, terms_of) < 0]
    if not worth:
        return None
    best, best_ops = None, sum(arith_ops(s.value) for s in targets)
    for k in worth:
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


class _TermsOf:
    """Each statement's terms, computed once per pass (statements are immutable; the statement is
    kept with its terms, so an id is not reused while the entry lives)."""

    def __init__(self):
        self.got = {}

    def __call__(self, s):
        got = self.got.get(id(s))
        if got is None or got[0] is not s:
            try:
                got = (s, Terms(s.value.dtype, {}).of(s.value))
            except GiveUp:
                got = (s, None)
            self.got[id(s)] = got
        return got[1]


def _estimate(targets, name, k, terms_of):
    """How many more terms would need a product by their constant (negative: fewer) if `name`
    held k times its value: a quick count on the terms, before anything is written, to skip the
    k that cannot pay. A term with a sum factor takes a power of two for free; one where `name`
    is inside another factor (a sum, a root) counts as unchanged."""
    def cost(m, c):
        return m != () and abs(c) != 1.0 and not any(is_sum(key) for key, _ in m)

    change = 0
    for s in targets:
        for m, c in (terms_of(s) or {}).items():
            scaled = c * (k if s.name == name else 1.0) * k ** -_power(m, name)
            change += cost(m, scaled) - cost(m, c)
    return change


def _power(mono, name):
    """The power of the local `name` in a monomial (0: it is not a factor of it)."""
    return sum(p for key, p in mono if isinstance(key, N.Var) and key.name == name)


def _rewrite(s, name, k):
    dtype = s.value.dtype
    value = substitute(s.value, {name: B.mul(B.var(name, dtype), B.const(1.0 / k, dtype))})
    if s.name == name:
        value = B.mul(value, B.const(k, dtype))
    return dataclasses.replace(s, value=Writer(dtype).terms(Terms(dtype, {}).of(value)))
