"""A term a sum takes several times, taken once with its count (`-t7 - t7` -> `t7 * -2.0`).

Why: opt.algebra collects like terms over monomials, for sums of up to MAX_TERMS terms and where
its form takes fewer operations; what the passes after it make alike (copies forwarded, held
values read from their locals) and longer sums keep their repeats, and the last CSE pass then
names the repeated term (`t7 = x[i] * (...)`) for a sum that reads it twice. (Derived kernels
only: the sums of a chain of device-function transforms called in a primal kernel, `d45 - d46 +
d45 + ...` at order three, keep theirs; their blocks hold recomputed primal values too.) Here, before that pass, each sum of the statements whose values feed
derivatives alone is written with each distinct term once, scaled by how many times it came
(with its sign), in the order the terms first appear: one product where there were additions.

Numerics: `a + a` is `a * 2.0` exactly, and `a + a + a`, rounded once either way, `a * 3.0`; with
other terms between, the sum's order changes (roundings of the same size: derivative values
only, as in opt.algebra). A term whose count comes to zero (`a + b - a`) is left where it was: `a
- a` is NaN for an infinite a, where dropping it would not be.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

from ..ir import build as B
from ..ir import nodes as N
from ..ir.types import is_float
from ..ir.walk import map_stmts
from .reciprocal import exact_names, rewritable

SUM_OPS = ("add", "sub", "neg")


def merge_repeated_terms(body, is_derivative):
    """body with the repeated terms of its derivative-only sums merged (see the module docstring)."""
    exact = None

    def rewrite(s):
        nonlocal exact
        if not isinstance(s, (N.Assign, N.Store, N.Atomic)) or not _has_repeats(s.value):
            return s
        exact = exact if exact is not None else exact_names(body, is_derivative)
        return dataclasses.replace(s, value=merged(s.value)) if rewritable(s, exact, is_derivative) else s

    return tuple(map_stmts(body, rewrite))


def merged(e):
    """e with each sum in it written with its repeated terms once."""
    if not isinstance(e, N.Call):
        return e
    if not (e.op in SUM_OPS and is_float(e.dtype)):
        return dataclasses.replace(e, args=tuple(merged(a) for a in e.args))
    terms = []
    _flatten(e, 1.0, terms)
    if not _repeats(terms):  # nothing to merge here: as written, inner sums merged
        return dataclasses.replace(e, args=tuple(merged(a) for a in e.args))
    terms = [(count, merged(term)) for count, term in terms]
    counts = Counter()
    for count, term in terms:
        counts[term] += count
    out, done = [], set()
    for count, term in terms:
        if counts[term] == 0.0 or isinstance(term, N.Const):
            out.append((count, term))
        elif term not in done:
            done.add(term)
            out.append((counts[term], term))
    return _rebuilt(out, e.dtype)


def _has_repeats(e):
    """Some float sum in e takes one term twice (a quick test before the rewrite)."""
    stack = [e]
    while stack:
        x = stack.pop()
        if not isinstance(x, N.Call):
            continue
        if x.op in SUM_OPS and is_float(x.dtype):
            terms = []
            _flatten(x, 1.0, terms)
            if _repeats(terms):
                return True
            stack.extend(t for _, t in terms)
        else:
            stack.extend(x.args)
    return False


def _repeats(terms):
    """Some term other than a constant comes twice (constants stay as written: `y - 1.0 - 1.0`
    is not `y - 2.0` in floating point)."""
    seen = set()
    for _, t in terms:
        if t in seen and not isinstance(t, N.Const):
            return True
        seen.add(t)
    return False


def _flatten(e, sign, out):
    """(count, term) of each term of the sum e, in order: its sign, times its constant factor."""
    if isinstance(e, N.Call) and e.dtype == getattr(e.args[0], "dtype", None):
        if e.op == "add":
            _flatten(e.args[0], sign, out)
            _flatten(e.args[1], sign, out)
            return
        if e.op == "sub":
            _flatten(e.args[0], sign, out)
            _flatten(e.args[1], -sign, out)
            return
        if e.op == "neg":
            _flatten(e.args[0], -sign, out)
            return
    if isinstance(e, N.Call) and e.op == "mul" and isinstance(e.args[1], N.Const) and is_float(e.dtype) \
            and float(e.args[1].value).is_integer() and abs(e.args[1].value) <= 2 ** 20:
        out.append((sign * e.args[1].value, e.args[0]))  # `t * 2.0`: the term t, twice (counts add exactly)
        return
    out.append((sign, e))


def _scaled(term, count, dtype):
    size = abs(count)
    return term if size == 1.0 else N.Call(dtype, "mul", (term, B.const(size, dtype)))


def _rebuilt(terms, dtype):
    """The sum of count * term, left to right: `a * 2.0 - b` (as written: no builder's rewrites,
    which would fold the `a - a` of a count that came to zero)."""
    (count, term), rest = terms[0], terms[1:]
    out = term if count == 1.0 else N.Call(dtype, "neg", (term,)) if count == -1.0 \
        else N.Call(dtype, "mul", (term, B.const(count, dtype)))
    for count, term in rest:
        out = N.Call(dtype, "add" if count > 0 else "sub", (out, _scaled(term, count, dtype)))
    return out
