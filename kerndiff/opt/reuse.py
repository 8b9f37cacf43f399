"""A value a local already holds is read from it: after `t7 = t5_inv * t5_inv`, a later
`t5_inv * t5_inv * (t5_inv * t5_inv) * t5_inv` (a fifth power, as opt.algebra writes it by
squaring) reads `t7 * t7 * t5_inv`. Exact: the same operations on the same values, while neither
the local nor what its value reads has been assigned since. A last rewrite (finalize), where CSE
has already run and the rewrites after it write such repeats again. Not in a while condition
that the loop's body changes what it reads: the condition is evaluated after every trip.

A local that gets such a value only after a statement of its block already computed it moves up
to just before that statement, where nothing in between reads or assigns it or assigns what its
value reads (copies forwarded late leave `t1_dual2 = (1.0 - t2 * t2) * s_dual2` before
`t3 = 1.0 - t2 * t2`, which CSE saw as `1.0 - t1 * t1`): the statement then reads it too.
Only from the statements' own expressions, not from inside their blocks (an if's branch would
then compute it whether taken or not).

In derivative code (is_derivative given; statements whose values only derivatives read, as
opt.reciprocal's `rewritable` says), a product also reads a held product of some of its factors:
after `t2 = t3_inv * t5`, `d_0_adj = d_0 * t3_inv * t5` is `d_0 * t2`. That regroups the
product, which may change its last bit, as opt.algebra's rewrites of derivative code do (a
product that opt.algebra wrote from looked-through definitions before opt.scales gave t2 its
final factors: W2's HVP, two products per spring)."""
from __future__ import annotations

import dataclasses
from collections import Counter

from ..ir import build as B
from ..ir import nodes as N
from ..ir.types import is_float
from ..ir.walk import (assigned_names, blocks_of, expr_children_of_stmt, iter_expr, loads_in, map_expr,
                       map_stmt_exprs, mentioned_names, rebuild_stmt, vars_in)
from .reciprocal import exact_names, rewritable


def reuse_held_values(body, is_derivative=None):
    """is_derivative: None (whole values only), or a test for derivative fields (products read
    held products of some of their factors where only derivatives read them)."""
    return tuple(_block(body, {}, None if is_derivative is None else _Regrouping(body, is_derivative)))


def _block(stmts, held, regroup=None):
    out = []
    held = _Held(held)
    for s in _held_earlier(list(stmts)):
        if held.values:
            # a while condition is evaluated again after every trip of the body
            now = _surviving(held.values, assigned_names((s,))) if isinstance(s, N.While) else held.values
            s = map_stmt_exprs(s, lambda e: map_expr(e, lambda x: now.get(x, x)))
            if regroup is not None and regroup.applies(s):
                s = _with_held_factors(s, lambda: regroup.products(now))
        blocks = blocks_of(s)
        if blocks:
            s = rebuild_stmt(s, [tuple(_block(b, _surviving(held.values, assigned_names(b)), regroup))
                                 for b in blocks])
        held.drop({s.name} if isinstance(s, N.Assign) else assigned_names((s,)))
        if isinstance(s, N.Assign) and _holdable(s):
            held.add(s.value, N.Var(s.value.dtype, s.name))
            if regroup is not None:
                regroup.note(s.value)
        out.append(s)
    return out


class _Held:
    """The values locals hold (value -> the local), with the entries each local's assignment
    ends: those it holds and those whose value reads it. Dropping them by that index keeps a
    block of n statements linear where filtering every entry after every statement was
    quadratic (a 1300-statement HVP block through a 3x3 polar decomposition: 2.5 s)."""

    def __init__(self, values):
        self.values = {}
        self.ended_by = {}  # local -> [(value, whether the local holds it)]
        for e, v in values.items():
            self.add(e, v)

    def add(self, e, v):
        self.values[e] = v
        self.ended_by.setdefault(v.name, []).append((e, True))
        for x in vars_in(e):
            self.ended_by.setdefault(x.name, []).append((e, False))

    def drop(self, written):
        """Forget what writing these locals ends (an entry listed for a local that held it once
        but holds it no more, the value held again elsewhere since, stays)."""
        for name in written:
            for e, holds in self.ended_by.pop(name, ()):
                v = self.values.get(e)
                if v is not None and (not holds or v.name == name):
                    del self.values[e]


class _Regrouping:
    """Which statements may have their products regrouped (values only derivatives read), and
    the factors of each held product, counted once for the pass."""

    def __init__(self, body, is_derivative):
        self.exact, self.is_derivative = exact_names(body, is_derivative), is_derivative
        self.counted = {}  # id(held product) -> (it, its factors counted)
        self.factor_names = set()  # the locals that products held so far multiply

    def note(self, held_value):
        """A value now held: where a product, its locals may lead a statement to it."""
        if held_value.op == "mul":
            self.factor_names.update(f.name for f in _factors(held_value) if type(f) is N.Var)

    def applies(self, s):
        """s computes a value only derivatives read, and reads a local some held product has."""
        return rewritable(s, self.exact, self.is_derivative) \
            and any(v.name in self.factor_names for v in vars_in(s.value))

    def products(self, held):
        """[(factors counted, the local holding their product)], the most factors first: products
        of locals and constants (counting a factor hashes it, and a whole expression's hash walks
        all of it)."""
        out = []
        for e, v in held.items():
            if e.op == "mul":
                got = self.counted.get(id(e))
                if got is None or got[0] is not e:
                    factors = _factors(e)
                    got = self.counted[id(e)] = (e, Counter(factors) if all(map(_atom, factors)) else None)
                if got[1] is not None:
                    out.append((got[1], v))
        out.sort(key=lambda p: -len(p[0]))
        return out


def _atom(e):
    return type(e) is N.Var or type(e) is N.Const


def _factors(e):
    """The factors of a chain of products, in order (e itself where it is not a product)."""
    if isinstance(e, N.Call) and e.op == "mul":
        return _factors(e.args[0]) + _factors(e.args[1])
    return [e]


def _with_held_factors(s, held_products):
    """s (an assignment, store or atomic add) with each chain of products in its value that has
    among its factors those of a held product (the largest first; in any association: `(e * r)`
    after `t2 = r * e`) reading the local that holds it, in the place of the first of them.
    held_products() -> see _Regrouping.products (asked only where the value has a product)."""
    products = None

    def visit(e):
        nonlocal products
        if not isinstance(e, N.Call):
            return e
        if e.op != "mul":
            args = tuple(visit(a) for a in e.args)
            return e if all(a is b for a, b in zip(args, e.args)) else N.Call(e.dtype, e.op, args)
        if products is None:
            products = held_products()
        chain = _factors(e)
        factors = [visit(f) for f in chain]
        have = Counter(filter(_atom, factors))
        for wanted, v in products:
            if v.dtype == e.dtype and all(have[f] >= n for f, n in wanted.items()):
                factors = _replaced(factors, wanted, v)
                have = Counter(filter(_atom, factors))
        if len(factors) == len(chain) and all(a is b for a, b in zip(factors, chain)):
            return e  # (rebuilt, it would be associated from the left)
        out = factors[0]
        for f in factors[1:]:
            out = B.mul(out, f)
        return out

    value = visit(s.value)
    return s if value is s.value else dataclasses.replace(s, value=value)


def _replaced(factors, wanted, v):
    """factors with those in `wanted` (a multiset of them) taken out and v in the place of the first."""
    left, out, placed = Counter(wanted), [], False
    for f in factors:
        if left[f]:
            left[f] -= 1
            if not placed:
                out.append(v)
                placed = True
        else:
            out.append(f)
    return out


def _held_earlier(stmts):
    """stmts with each holdable assignment moved up to just before the first statement that
    computes its value in its own expressions, where nothing in between stands in the way."""
    holds = [isinstance(s, N.Assign) and _holdable(s) for s in stmts]
    wanted = {s.value for s, held in zip(stmts[1:], holds[1:]) if held}
    if not wanted:
        return stmts
    first = _first_computed(stmts, wanted)
    for j in range(1, len(stmts)):
        s = stmts[j]
        if not holds[j] or first.get(s.value, j) >= j:
            continue
        i = first[s.value]
        if isinstance(stmts[i], N.Assign) and stmts[i].value == s.value:
            continue  # a local holds it already: s reads that one (and keeps its name, `t4_inv`)
        between = stmts[i:j]
        reads = {v.name for v in vars_in(s.value)} | {s.name}
        if not (assigned_names(between) & reads) and not any(s.name in mentioned_names(x) for x in between):
            stmts[i:j + 1] = [s] + between
            holds[i:j + 1] = [True] + holds[i:j]
            first = {v: k + 1 if i <= k < j else k for v, k in first.items()}
            first[s.value] = i
    return stmts


def _first_computed(stmts, wanted):
    """value in wanted -> the index of the first statement that computes it in its own
    expressions (a while loop's condition, evaluated again after every trip, does not count).
    Only calls of an operation and arity some wanted value has are looked up (hashing an
    expression walks all of it)."""
    shapes = {(v.op, len(v.args)) for v in wanted}
    first = {}
    for k, t in enumerate(stmts):
        if not isinstance(t, N.While):
            for e in expr_children_of_stmt(t):
                for x in iter_expr(e):
                    if type(x) is N.Call and (x.op, len(x.args)) in shapes and x in wanted:
                        first.setdefault(x, k)
    return first


def _holdable(s):
    """A float computation of locals and constants (a field may change under it) that does not
    read the local it is assigned to."""
    return isinstance(s.value, N.Call) and is_float(s.value.dtype) and not loads_in(s.value) \
        and all(v.name != s.name for v in vars_in(s.value))


def _surviving(held, written):
    if not written:
        return dict(held)
    return {e: v for e, v in held.items()
            if v.name not in written and not any(x.name in written for x in vars_in(e))}
