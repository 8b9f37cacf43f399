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
the most operations is kept. The W3 HVP's inner loop loses seven products. k may be negative
(-1, -2, ...): a sign moves as a scale does (`t1_adj = -t6 - t6` is t6 times -2).

Some chains only pay at their end: `t5 = t10 * t13; t6 = t1 * t5; t1_adj = -t6 - t6` (and t7,
t8 alike) gain nothing from the -2 going into t6, but once t6, t7 and t8 carry it, t5 takes it
for all three, and t10's 0.5 cancels it. After the gainful moves, the moves of a use's factor
into a definition at no cost are made together, then the gainful ones again; the result is
kept where the block is then cheaper (`1.0 / d.norm(0.01)`: the HVP's pair loop 52 -> 45
operators, 80 -> 64 ms at N = 4096).

A local that ends up holding k times its value is renamed to say so (`r2_adj` holding twice the
adjoint is `twice_r2_adj`, `t1_dual2` holding -2 times the tangent `minus_twice_t1_dual2`), so
that the generated source does not call a multiple by the name of the value.
"""
from __future__ import annotations

import dataclasses
import re

from ..ad.names import NameAllocator, scaled_name
from ..ir import build as B
from ..ir import nodes as N
from ..ir.types import is_float
from ..ir.walk import (assigned_names, expr_children_of_stmt, iter_stmts, map_stmts, renamed_block,
                       substitute, used_names, vars_in)
from .algebra import GiveUp, Terms, Writer, arith_ops, is_sum
from .reciprocal import exact_names

SCALES = (2.0, 0.5, 4.0, 0.25, -1.0, -2.0, -0.5, -4.0, -0.25)  # signs move as scales do
MAX_ROUNDS = 4


def rescale_locals(body, is_derivative, exact=None):
    if exact is None:
        exact = exact_names(body, is_derivative)
    terms_of = _TermsOf()
    body, scales = _settle(body, {}, exact, terms_of)
    # Then moves that gain nothing by themselves but let others gain: in `t6 = t1 * t5` used as
    # `-t6 - t6`, the -2 goes into t6 at no gain (and into t6_dual, beside it), and on into t5,
    # which t6, t7 and t8 share. They are made together, after the gainful ones (so that none
    # takes a factor a gainful chain wanted: W2's HVP), and kept only where the moves they open
    # make the block cheaper.
    for _ in range(MAX_ROUNDS):
        moved = _neutral_moves(body, exact, terms_of, scales)
        if moved is None:
            break
        settled, settled_scales = _settle(*moved, exact=exact, terms_of=terms_of)
        if _total_ops(settled) >= _total_ops(body):
            break
        body, scales = settled, settled_scales
    return _named_for_scales(body, scales)


def _settle(body, scales, exact, terms_of):
    """(body after the moves that save operations, round after round until none does, the scale
    each local then holds: scales updated)."""
    scales = dict(scales)
    tried = {}  # local -> the statements it was last tried with (kept, so their ids stay theirs)
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
                (body, k), changed = rescaled, True
                scales[name] = scales.get(name, 1.0) * k
                mentions = _mentions(body)
        if not changed:
            break
    return body, scales


def _neutral_moves(body, exact, terms_of, scales):
    """(body with every power of two that a use carries moved into its local's definition where
    that costs nothing more, the scales then held), or None where none is."""
    moved, mentions, scales = None, _mentions(body), dict(scales)
    for name in _candidates(body, exact):
        rescaled = _rescaled(body, mentions.get(name, []), name, terms_of, neutral=True)
        if rescaled is not None:
            body, k = rescaled
            scales[name] = scales.get(name, 1.0) * k
            moved = (body, scales)
            mentions = _mentions(body)  # (only after a move: the statements changed)
    return moved


def _named_for_scales(body, scales):
    """body with each local renamed where it holds a multiple of what its name says, to say so.

    A name says what it holds relative to the locals it is derived from: `t3_dual` is the tangent
    of t3 as t3 is now written, `x_adj` the adjoint of x, `t5_inv` the reciprocal of t5. A plain
    temporary (t3) says nothing but its definition, so when it holds k times its former value
    its tangent should hold k times too (and its adjoint and reciprocal 1 / k times) to keep its
    name. A local whose value is off from what its name then says by a factor (the product of the
    moves kept, over the factor its name implies) is renamed for that factor: `r2_adj` holding
    twice the adjoint is `twice_r2_adj`, `t1_dual2` holding -2 times t1's tangent
    `minus_twice_t1_dual2` (W4's weight gradient read like k.forward.forward's t1_dual2)."""
    if not scales:
        return body
    implied = {}

    def implied_scale(name):
        """The factor by which a local of this name holds more than its former value where its
        name is true: a temporary's own (it says only its definition), a derived name's from what
        it is derived from, 1 for any other name."""
        if name not in implied:
            suffix = _DERIVED.search(name)
            if suffix is None:
                implied[name] = scales.get(name, 1.0) if _TEMPORARY.fullmatch(name) else 1.0
            else:
                base = implied_scale(name[:suffix.start()])
                implied[name] = base if suffix.group(1).startswith("dual") else 1.0 / base
        return implied[name]

    renames, names = {}, None
    for name in dict.fromkeys(s.name for s in iter_stmts(body) if isinstance(s, N.Assign)):  # in order
        off = scales.get(name, 1.0) / implied_scale(name)
        if off != 1.0:
            names = names or NameAllocator(assigned_names(body) | used_names(body))
            renames[name] = names.fresh(scaled_name(name, off))
    return renamed_block(body, renames) if renames else body


_TEMPORARY = re.compile(r"t\d+")
_DERIVED = re.compile(r"_(dual\d*|adj\d*|inv)$")  # a tangent, an adjoint, a reciprocal of what precedes


def _total_ops(body):
    return sum(arith_ops(s.value) for s in iter_stmts(body) if isinstance(s, N.Assign))


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
    ks, inward = set(), set()
    for s in targets:
        terms = terms_of(s)
        if not terms:
            continue
        if s.name == name:
            carried = {c for m, c in terms.items() if m != ()}
            if len(carried) == 1 and 1.0 / min(carried) in SCALES:
                ks.add(1.0 / min(carried))
        for m, c in terms.items():
            if c in SCALES and _power(m, name):
                ks.add(c)
                inward.add(c)
    return [(k, k in inward) for k in SCALES if k in ks and (k > 0 or _may_flip(name))]


def _may_flip(name):
    """A sign may move into a derivative local or a temporary, not into a local the user named:
    the reverse's recomputed `d_0 = x[t, a] - x[t, b]` keeps reading as the user wrote it."""
    return re.fullmatch(r"t\d+(_inv)?", name) is not None or re.search(r"_(adj|dual)\d*(_|$)", name) is not None


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


def _rescaled(body, targets, name, terms_of, neutral=False):
    """(body with `name` holding k times its value, k) for the k that saves the most operations
    over the assignments that mention it (targets), or None where none saves any. neutral: instead,
    the first k from a use (into the definition) that costs nothing more."""
    worth = [k for k, inward in _proposals(targets, name, terms_of)
             if (inward or not neutral) and _estimate(targets, name, k, terms_of) < (2 if neutral else 0)]
    if not worth:
        return None
    best, best_ops = None, sum(arith_ops(s.value) for s in targets)
    for k in worth:
        try:
            rewritten = {id(s): _rewrite(s, name, k) for s in targets}
        except GiveUp:
            continue
        ops = sum(arith_ops(s.value) for s in rewritten.values())
        if ops < best_ops or (neutral and ops == best_ops):
            best, best_ops, best_k = rewritten, ops, k
            if neutral:
                break
    if best is None:
        return None
    return map_stmts(body, lambda s: best.get(id(s), s)), best_k


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
        terms = terms_of(s) or {}
        scaled = {m: c * (k if s.name == name else 1.0) * k ** -_power(m, name) for m, c in terms.items()}
        change += sum(cost(m, scaled[m]) - cost(m, c) for m, c in terms.items())
        change += _negated(scaled) - _negated(terms)  # -(x * 2.0): a negation besides the product
    return change


def _negated(terms):
    return bool(terms) and all(c < 0 for c in terms.values())


def _power(mono, name):
    """The power of the local `name` in a monomial (0: it is not a factor of it)."""
    return sum(p for key, p in mono if isinstance(key, N.Var) and key.name == name)


def _rewrite(s, name, k):
    dtype = s.value.dtype
    value = substitute(s.value, {name: B.mul(B.var(name, dtype), B.const(1.0 / k, dtype))})
    if s.name == name:
        value = B.mul(value, B.const(k, dtype))
    reader = Terms(dtype, {})
    terms = reader.of(value)
    return dataclasses.replace(s, value=Writer(dtype, quotients=reader.quotients).terms(terms))
