"""Like terms collected in derivative expressions (a last rewrite, for speed).

Product rules applied to adjoint expressions (the tangent of a reverse kernel: Hessian-vector
products) give sums of products of the same few values, spread over temporaries:

    t7 = r_inv * r_inv;  t9 = r_inv * 0.5;  t4_dual = r_inv * 0.5 * r2_dual
    r2_adj_dual = t8 * (t9 * r_inv * t4_dual) - t9 * (g * (-(r_inv * (t7 * t4_dual)) - ...)) - ...

As a sum of monomials over the same atoms (r_inv, g, r2_dual, ...), looking through the
temporaries that are single monomials themselves, that is g * (r2_dual * (r_inv**5 * 0.75 +
r2_inv**3 * 0.2)). The pass writes the collected form, common factors pulled out, where it takes
fewer operations than the statement had, counting those of the temporaries it read through that
it was the one reader of (they die with the rewrite).

A temporary that is a sum of a few products (`r_adj_dual = m * s**9 * t15 * -42.0 + e * s**15 *
t15 * 288.0`), or a product over such a sum, is read through by its one reader as its terms,
where that pays: the reader, collected so, takes fewer operations than collected without it plus
the sum's own. A Lennard-Jones HVP's tangent of the force factor, `(r_adj_dual - t5 * r_dual) *
r_inv`, meets like terms in it: `(s6_adj * 48.0 + e * s**6 * 288.0) * s**10 * t15`, and
r_adj_dual, s6_adj_dual and s6_dual die. finalize runs the pass a second time, after zero
starts are folded, when such sums are assigned once.

Numerics: like terms merge and common factors come out (m*a + m*b -> m*(a + b), which removes
roundings). A product is not distributed over a sum that may be exact (m*(x - c) -> m*x - m*c
would lose the exactness of x - c when x is close to c): such a sum inside a product stays one
factor, except under a power-of-two constant, which scales exactly. A sum of rounded terms,
products such as `s_adj * r2_dual * r_inv**3 * 6.0 + s_adj_dual * t7`, may be distributed over
(each term's own rounding already bounds the error of the sum's cancellation; the products of
m with the terms add roundings of the same size): the statement is collected both ways and the
cheaper kept, which lets the terms of an HVP's product rules meet their like terms. As in
opt.reciprocal, only statements whose values feed derivatives alone are rewritten.

Reciprocals: a local assigned `1.0 / r` (opt.reciprocal's `r_inv`) is read as r to the power -1,
so `r * r_inv` cancels (`r_dual = t15 * r_inv; t4_dual = r_dual * r * 4.0` is `t15 * 4.0`), and a
negative power is written back through that local (nothing is written where no local holds it).
r * (1/r) is 1 to within an ulp, the same allowance as opt.reciprocal's; at r = 0 a product that
was 0 * inf (NaN) becomes what the other factors give, where the terms around it are infinite.

Powers: x ** p for a whole p up to 16 is p factors x (`(1.0 / r) ** 6` and its derivative's
`r_inv ** 5` meet `r_inv * r_inv` as powers of one atom) and costs the products Taichi computes it
with by squaring (x ** 6: three), as _power writes it back.

Quotients: a / b is read as a * b**-1 (where b's constant has an exact reciprocal), so that the
chain rule's constants meet across it: the adjoint of a norm's square, `(t1 - r) * (0.5 / t1) *
g * 2.0` (the root's 0.5, the square's 2), is `(t1 - r) * g / t1`. A negative power no local
holds the reciprocal of is written back as one division after the products (`a * b / t1`,
`2.0 / t1` where nothing multiplies), except that a quotient the statement had as a factor
stays whole (`d_0 * (t2 / t1)`, which CSE shares with `d_1 * (t2 / t1)`). A factor that some
terms divide by and others multiply by is not pulled out of a sum (`(r * r * a + b) / r`). A
statement is rewritten only where it then takes no more divisions than before (counting those
of the definitions it looks through, where the statement is their only reader: a division that
two statements would each take over stays in its local, `t3 = t2 / t1; d_0_adj = d_0 * t3`), and
a local that holds a quotient is read as itself, not looked through (each use would divide
again).
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import NamedTuple

import numpy as np

from ..ir import build as B
from ..ir import nodes as N
from ..ir.types import is_float
from ..ir.walk import (assigned_names, blocks_of, expr_children_of_stmt, iter_expr, iter_stmts, loads_in, map_expr,
                       rebuild_stmt, vars_in)
from .reciprocal import exact_names, is_reciprocal, rewritable

MAX_TERMS = 12  # sums with more terms are left as written
ARITH_OPS = ("add", "sub", "mul", "neg", "pow")
SMALL_POWERS = range(2, 17)  # x ** p read as p factors x (and written back by squaring, _power)


class GiveUp(Exception):
    """The statement stays as written: too many terms, or constants out of the dtype's range."""


def exact_scale(c):
    """Multiplying by c is exact: a power of two (or its negative)."""
    return c != 0 and math.isfinite(c) and math.frexp(abs(c))[0] == 0.5


def _add(a, b, sign=1.0):
    out = dict(a)
    for m, c in b.items():
        v = out.get(m, 0.0) + sign * c
        if v == 0.0:
            out.pop(m, None)
        else:
            out[m] = v
    if len(out) > MAX_TERMS:
        raise GiveUp
    return out


def _mono_mul(a, b):
    powers = dict(a)
    for k, p in b:
        powers[k] = powers.get(k, 0) + p
    return _ordered((k, p) for k, p in powers.items() if p != 0)  # r * r_inv: r's powers cancel


def _ordered(powers):
    """A monomial's (atom, power) pairs in one order, whatever the order they came in."""
    return tuple(sorted(powers, key=lambda kp: repr(kp[0])))


def _mono_without(mono, key, power=1):
    return tuple((k, p - power if k == key else p) for k, p in mono if k != key or p != power)


class Terms:
    """Expressions of one dtype as {monomial: coefficient}; a monomial is ((atom, power), ...), an
    atom an expression kept whole (a local, a load, a call) or a sum kept as one factor,
    ('sum', its terms in order). defs: local -> its Definition (its terms are read in its place)."""

    def __init__(self, dtype, defs, distribute=False):
        self.dtype, self.defs, self.distribute = dtype, defs, distribute
        self.quotients = []  # (monomial, the division as written): see Writer

    @staticmethod
    def atom(e):
        return {((e, 1),): 1.0}

    def of(self, e):
        if e.dtype != self.dtype:
            return self.atom(e)
        if isinstance(e, N.Const):
            return {(): float(e.value)} if e.value != 0 else {}
        if isinstance(e, N.Var):
            got = self.defs.get(e.name)
            return dict(got.terms) if got is not None else self.atom(e)
        if not (isinstance(e, N.Call) and (e.op in ARITH_OPS or e.op == "div")):
            return self.atom(e)
        if e.op in ("add", "sub"):
            return _add(self.of(e.args[0]), self.of(e.args[1]), -1.0 if e.op == "sub" else 1.0)
        if e.op == "neg":
            return {m: -c for m, c in self.of(e.args[0]).items()}
        if e.op == "mul":
            return self.product(self.of(e.args[0]), self.of(e.args[1]))
        if e.op == "div":
            inverse = self.reciprocal(self.of(e.args[1]))
            if inverse is None:
                return self.atom(e)
            above = self.of(e.args[0])
            if _plain(e.args[0]) and _plain(e.args[1]) and _single(above):  # (a / b: see Writer)
                self.quotients.append((_mono_mul(next(iter(above)), next(iter(inverse))), e))
            return self.product(above, inverse)
        exponent = e.args[1]
        if isinstance(exponent, N.Const) and exponent.value in SMALL_POWERS:
            base = self.of(e.args[0])
            out = base
            for _ in range(int(exponent.value) - 1):
                out = self.product(out, base)
            return out
        return self.atom(e)

    def reciprocal(self, terms):
        """1 / terms, as negative powers (a / r is a * r**-1, so that r * (a / r) cancels and
        `a * (0.5 / r) * 2.0` is `a / r`); None where the divisor's constant has no exact
        reciprocal (or is zero): the division is then kept whole."""
        if not terms:
            return None
        (mono, c), = self.factor(terms).items()
        if not exact_scale(c):
            return None
        return {tuple((k, -p) for k, p in mono): 1.0 / c}

    def product(self, a, b):
        if not a or not b:
            return {}
        for x, y in ((a, b), (b, a)):
            if len(y) == 1 and () in y and exact_scale(y[()]):
                return {m: c * y[()] for m, c in x.items()}
        if self.distribute and _rounded(a) and _rounded(b) and len(a) * len(b) <= MAX_TERMS:
            out = {}
            for ma, ca in a.items():
                for mb, cb in b.items():
                    out = _add(out, {_mono_mul(ma, mb): ca * cb})
            return out
        a, b = self.factor(a), self.factor(b)
        (ma, ca), = a.items()
        (mb, cb), = b.items()
        return {_mono_mul(ma, mb): ca * cb}

    def factor(self, terms):
        """terms as one factor: a monomial already, or a sum kept whole (a constant that all its
        terms share comes out, to meet the other constants of the product)."""
        if len(terms) == 1:
            return terms
        scale = {abs(c) for c in terms.values()}
        k = scale.pop() if len(scale) == 1 else 1.0
        key = ("sum", tuple((m, c / k) for m, c in terms.items()))  # a tuple: no hash-seed order
        return {((key, 1),): k}


def _single(terms):
    """terms are one atom, nothing multiplied or scaled."""
    if len(terms) != 1:
        return False
    (mono, c), = terms.items()
    return c == 1.0 and len(mono) == 1 and mono[0][1] == 1


def _plain(e):
    """e is written as nothing the writer would write otherwise: a local, a load, a call such as
    a root (not arithmetic, whose constants it would merge, `q * 4.0 * 0.25`)."""
    return isinstance(e, (N.Var, N.Load)) or isinstance(e, N.Call) and e.op not in ARITH_OPS and e.op != "div"


def _rounded(terms):
    """terms may be distributed over: one monomial, or a sum none of whose terms is exact by
    itself (a constant, or one atom times a power of two: x - c, whose difference may be exact)."""
    return len(terms) == 1 or not any(
        exact_scale(c) and (mono == () or (len(mono) == 1 and mono[0][1] == 1)) for mono, c in terms.items())


def is_sum(key):
    return isinstance(key, tuple) and key[0] == "sum"


def _atom_exprs(terms):
    """The expressions among the atoms of terms, inside sums too."""
    for mono in terms:
        for key, _ in mono:
            if is_sum(key):
                yield from _atom_exprs(dict(key[1]))
            else:
                yield key


class Writer:
    """inverses: atom -> the local holding its reciprocal, for negative powers (opt.collect_terms
    reads `r_inv = 1.0 / r` as r to the power -1, so that r * r_inv cancels). quotients: the
    divisions the expression had as written (Terms.quotients), (monomial, division): a monomial
    that has one of them as a factor is written with it whole, so that `d_0 * (t2 / t1)` and
    `d_1 * (t2 / t1)` stay alike for CSE (which computes `t2 / t1` once) rather than being
    written `d_0 * t2 / t1`, one division each."""

    def __init__(self, dtype, inverses=None, quotients=()):
        self.dtype, self.inverses, self.quotients = dtype, inverses or {}, quotients

    def atom(self, key):
        return self.terms(dict(key[1])) if is_sum(key) else key

    def divides(self, key, p):
        """key ** p is written as a division: a negative power that no local holds the
        reciprocal of here."""
        return p < 0 and key not in self.inverses

    def power(self, key, p):
        """key ** p as a product (for a negative power, of the local holding 1 / key); a power
        that divides is written by the caller, as a division by key ** -p."""
        return _power(self.atom(key), p) if p > 0 else _power(self.inverses[key], -p)

    def monomial(self, mono, scale=1.0):
        """scale times the monomial: its factors multiplied, then divided by those it divides
        by (`a * b / r`, or `2.0 / r` where nothing multiplies); None for the bare monomial ()
        at scale 1."""
        held, mono = self._quotient_in(mono)
        out = below = None
        for key, p in mono:
            if self.divides(key, p):
                x = _power(self.atom(key), -p)
                below = x if below is None else B.mul(below, x)
            else:
                x = self.power(key, p)
                out = x if out is None else B.mul(out, x)
        if held is not None:
            out = held if out is None else B.mul(out, held)
        if (scale != 1.0 and out is not None) or (below is not None and out is None):
            out = B.const(scale, self.dtype) if out is None else B.mul(out, B.const(scale, self.dtype))
        return out if below is None else B.div(out, below)

    def _quotient_in(self, mono):
        """(a division the expression had that is a factor of mono, mono without it), or (None,
        mono)."""
        powers = dict(mono)
        for qmono, division in self.quotients:
            if all(p * powers.get(k, 0) > 0 and abs(powers[k]) >= abs(p) for k, p in qmono):
                rest = dict(powers)
                for k, p in qmono:
                    rest[k] -= p
                return division, _ordered((k, p) for k, p in rest.items() if p != 0)
        return None, mono

    def terms(self, terms):
        """A sum of monomials, with the factor shared by the most terms (two at least) pulled out:
        an atom (x * (a + b)), else a constant ((a + b) * 0.5)."""
        if not terms:
            return B.const(0, self.dtype)
        counts, signs = {}, {}
        for mono in terms:
            for key, p in mono:
                counts[key] = counts.get(key, 0) + 1
                signs.setdefault(key, set()).add(p > 0)
        # (not a factor some terms divide by and others multiply by: r * a + b / r taken as
        # (r * r * a + b) / r computes r * r besides)
        shared = [k for k, n in counts.items() if n >= 2 and len(signs[k]) == 1]
        if len(terms) > 1 and shared:
            key = max(shared, key=lambda k: (counts[k], repr(k)))
            # the lowest power of it those terms share comes out whole: t⁴ * (t * a + b), squared
            # (t * t) * (t * t), not t * (t * (t * (t * (t * a + b)))), a chain of 4 products
            # (of a reciprocal, r**-3 * (a + r**-1 * b): the power nearest zero, so what stays
            # inside is further powers of the reciprocal, not of r)
            powers = [p for m in terms for k, p in m if k == key]
            power = max(powers) if max(powers) < 0 else min(powers)
            inner = {_mono_without(m, key, power): c for m, c in terms.items() if any(k == key for k, _ in m)}
            rest = {m: c for m, c in terms.items() if not any(k == key for k, _ in m)}
            if self.divides(key, power):
                return self._plus(rest, B.div(self.terms(inner), _power(self.atom(key), -power)))
            return self._plus(rest, B.mul(self.power(key, power), self.terms(inner)))
        scales = {}
        for c in terms.values():
            if abs(c) != 1.0:
                scales[abs(c)] = scales.get(abs(c), 0) + 1
        k = max((k for k, n in scales.items() if n >= 2), key=lambda k: (scales[k], k), default=None)
        if k is not None:
            if all(c < 0 for c in terms.values() if abs(c) == k):
                k = -k  # (a + b) * -2.0, not (-a - b) * 2.0
            inner = {m: c / k for m, c in terms.items() if abs(c) == abs(k)}
            rest = {m: c for m, c in terms.items() if abs(c) != abs(k)}
            return self._plus(rest, B.mul(self.terms(inner), B.const(k, self.dtype)))
        return self._sum(terms)

    def _plus(self, rest, pulled):
        return pulled if not rest else B.add(self.terms(rest), pulled)

    def _sum(self, terms):
        out = None
        # in the order the terms came (the original's summation order), a constant last (x - 1.0)
        for mono, c in sorted(terms.items(), key=lambda mc: mc[0] == ()):
            if not _representable(abs(c), self.dtype):
                raise GiveUp  # merged constants would overflow (or underflow) where the original did not
            scale = abs(c)
            if scale != 1.0 and exact_scale(scale):
                mono, scale = _scaled_sum(mono, scale, self.dtype)
            if out is None and c < 0 and scale != 1.0:  # x * -2.0, not -(x * 2.0)
                scale, c = -scale, -c
            term = self.monomial(mono, scale)
            if term is None:
                term = B.const(scale, self.dtype)
            if out is None:
                out = term if c > 0 else B.neg(term)
            else:
                out = B.add(out, term) if c > 0 else B.sub(out, term)
        return out


def _scaled_sum(mono, scale, dtype):
    """(monomial, remaining scale): a power-of-two scale taken into the monomial's first sum factor
    whose constants all stay representable (t7 * (r2_dual * (t5_inv * 0.2 + 0.75)) * 4.0 is
    t7 * (r2_dual * (t5_inv * 0.8 + 3.0)), one product fewer and exactly the same value)."""
    def products(terms, k=1.0):  # the terms that need a product by their constant
        return sum(1 for m, c in terms if m != () and abs(c * k) != 1.0)

    for n, (key, p) in enumerate(mono):
        if (is_sum(key) and p == 1 and products(key[1], scale) <= products(key[1])
                and all(_representable(abs(c * scale), dtype) for _, c in key[1])):
            inner = ("sum", tuple((m, c * scale) for m, c in key[1]))
            rest = mono[:n] + mono[n + 1:]
            return _ordered(rest + ((inner, 1),)), 1.0
    return mono, scale


def _power(x, p):
    """x ** p by squaring: x ** 5 is (x * x) * (x * x) * x, and CSE computes x * x once (and shares
    it with an x * x the block has already): 3 multiplications instead of 4, in a chain of 3."""
    if p == 1:
        return x
    half = _power(x, p // 2)
    square = B.mul(half, half)
    return square if p % 2 == 0 else B.mul(square, x)


def _power_ops(e):
    """The products x ** p takes for a small whole p (as Taichi computes it, by squaring, and as
    _power writes it: x ** 6 is three), else one operation."""
    p = e.args[1].value if isinstance(e.args[1], N.Const) else None
    if p not in SMALL_POWERS:
        return 1
    return int(p).bit_length() - 1 + bin(int(p)).count("1") - 1


def _representable(c, dtype):
    info = np.finfo({"f16": np.float16, "f32": np.float32}.get(dtype, np.float64))
    return float(info.tiny) <= c <= float(info.max)


def arith_ops(e):
    """How many arithmetic operations e evaluates (with repeats). Kept on the immutable node, as
    vars_in keeps its locals: collect_terms and rescale_locals ask for the same statements'
    counts again and again."""
    if not isinstance(e, (N.Call, N.Load)):
        return 0
    got = e.__dict__.get("_arith_ops")
    if got is None:
        got, stack = 0, [e]
        while stack:  # no recursion: a long sum is a deep tree
            x = stack.pop()
            known = x.__dict__.get("_arith_ops") if x is not e else None
            if known is not None:
                got += known
            elif isinstance(x, N.Call):
                got += _power_ops(x) if x.op == "pow" else x.op in ARITH_OPS
                stack.extend(x.args)
            elif isinstance(x, N.Load):
                stack.extend(x.index)
        object.__setattr__(e, "_arith_ops", got)
    return got


def divisions(e):
    """How many different divisions e evaluates (CSE computes a repeated one once)."""
    found = [x for x in iter_expr(e) if type(x) is N.Call and x.op == "div"]
    return len(found) if len(found) < 2 else len(set(found))  # (hashing a node walks all of it)


def _cheaper(new, old, defs=None):
    """new takes fewer arithmetic operations than old, and no more divisions than old and the
    definitions it looks through compute (`a / r` is not cheaper than `a * t9` where t9 = 0.5 / r
    is computed already; it is where t9 = v * (0.5 / r) is looked through, as that statement would
    compute 0.5 / r again)."""
    if new is None or arith_ops(new) >= arith_ops(old) + _dying_ops(new, old, defs):
        return False
    return divisions(new) <= divisions(old) + _divisions_through(old, defs)


def _dying_ops(new, old, defs):
    """The operations of the definitions old reads and new no longer does, each of which old was
    the one reader of: they die with the rewrite (a sum that one statement reads, looked through)."""
    if not defs:
        return 0
    gone = {v.name for v in vars_in(old)} - {v.name for v in vars_in(new)}
    return sum(defs[name].dies for name in gone if name in defs)


def _divisions_through(e, defs):
    """The divisions of the definitions e's locals stand for (each local once)."""
    return sum(defs[name].divisions for name in {v.name for v in vars_in(e)} if name in defs) if defs else 0


class Definition(NamedTuple):
    """What collect_terms knows of a local it may look through."""
    terms: dict         # its value's terms, which a use reads in its place
    reads: set          # the locals those terms read (assigning one ends the definition)
    loads: set          # ids of the fields they load (storing into one ends it too)
    divisions: int      # the divisions its terms stand for that a use may take (see _cheaper)
    dies: int = 0       # its own operations, where its one reader reads through it (see _cheaper)
    spread: bool = False  # a sum of products, read through by its one reader only where that pays


def collect_terms(body, is_derivative, exact=None, readers=None):
    """body with derivative statements rewritten as collected sums of monomials where that is
    cheaper (is_derivative(taichi_field) -> bool). readers: local -> how many reads of it the
    whole kernel has (computed here for the outermost block)."""
    if exact is None:
        exact = exact_names(body, is_derivative)
    if readers is None:
        readers = Counter(v.name for s in iter_stmts(body) for e in expr_children_of_stmt(s) for v in vars_in(e))
    defs = {}  # local -> Definition
    out = []
    for s in body:
        if rewritable(s, exact, is_derivative) and any(_is_select(x) for x in iter_expr(s.value)):
            s = dataclasses.replace(s, value=map_expr(s.value, lambda x: _collected_branches(x, defs)
                                                      if _is_select(x) and is_float(x.dtype) else x))
        if rewritable(s, exact, is_derivative) and is_float(s.value.dtype) and arith_ops(s.value) >= 3:
            new = _collected(s.value, defs)
            sums = {v.name for v in vars_in(s.value) if v.name in defs and defs[v.name].spread}
            if sums and new is not None:
                # a sum its one reader reads through must pay for the reader's longer terms: the
                # statement collected without it, plus the sum's own operations, take more
                # (the force factor's tangent meets like terms in r's adjoint's: it does; a
                # tangent `d_0 * d_0_dual + ...` that would only inline `d_0_dual`'s difference
                # does not, and keeps reading it)
                base = _collected(s.value, {n: d for n, d in defs.items() if n not in sums})
                kept = s.value if base is None else base
                if arith_ops(new) >= arith_ops(kept) + _dying_ops(new, s.value, {n: defs[n] for n in sums}):
                    new = base
            if not _cheaper(new, s.value, defs) and _reads_definitions(s, defs):
                # looking through the locals it reads can cost more than it saves (-(1.0 / t3)
                # and its tangent, multiplied, are a fourth power of t3's reciprocal): the
                # statement's own terms, then
                new = _collected(s.value, {})
            if _cheaper(new, s.value, defs):
                s = dataclasses.replace(s, value=new)
        blocks = blocks_of(s)
        if blocks:
            s = rebuild_stmt(s, [collect_terms(b, is_derivative, exact, readers) for b in blocks])
        out.append(s)
        _forget(defs, s)
        if isinstance(s, N.Assign) and _reciprocal_of_local(s.value) and s.name != s.value.args[1].name:
            x = s.value.args[1]  # r_inv = 1.0 / r: r to the power -1
            defs[s.name] = Definition({((x, -1),): 1.0}, {x.name}, set(), 0)  # (written back through it)
        elif isinstance(s, N.Assign) and is_float(s.value.dtype) and not _quotient(s.value):
            try:
                terms = Terms(s.value.dtype, defs).of(s.value)
            except GiveUp:
                terms = None
            one_reader = readers[s.name] == 1
            if one_reader and terms is not None and len(terms) == 1 and \
                    any(is_sum(key) for key, _ in next(iter(terms))):
                try:  # a product over a rounded sum, spread: a sum of products its reader may take
                    spread = Terms(s.value.dtype, defs, distribute=True).of(s.value)
                except GiveUp:
                    spread = None
                terms = spread if _sum_of_products(spread) else terms
            if (_looked_through(terms) or one_reader and _sum_of_products(terms)) \
                    and s.name not in {v.name for v in vars_in(s.value)}:
                atoms = list(_atom_exprs(terms))
                # the divisions a use may take over: none where it has other readers, which keep
                # it (and its division) alive (`d_0 * t3 * 2.0` and `d_1 * t3 * 2.0`, t3 = 0.5 / t1 *
                # r_adj, would each divide by t1 themselves)
                taken = divisions(s.value) + _divisions_through(s.value, defs) if one_reader else 0
                defs[s.name] = Definition(terms, {v.name for a in atoms for v in vars_in(a)},
                                          {id(x.ref.field) for a in atoms for x in loads_in(a)}, taken,
                                          arith_ops(s.value) if one_reader else 0, not _looked_through(terms))
    return tuple(out)


def _is_select(e):
    return isinstance(e, N.Call) and e.op == "select"


def _collected_branches(value, defs):
    """A select's branches, each collected where that is cheaper: a norm's guarded tangent
    (ad.forward: `select(d_0_dual == 0 and d_1_dual == 0, 0, 0.5 / t1 * (d_0 * d_0_dual * 2.0 +
    ...))`) keeps the simple form its unguarded tangent had, `(d_0 * d_0_dual + ...) / t1`."""
    cond, *branches = value.args
    new = []
    for b in branches:
        c = _collected(b, defs) if arith_ops(b) >= 3 else None
        new.append(c if c is not None and _cheaper(c, b, defs) else b)
    return dataclasses.replace(value, args=(cond, *new))


def collected(value):
    """A float expression of locals and constants with its like terms collected, where that takes
    fewer operations (`n * m * 2.0 + n + n` -> `(m + 1.0) * n * 2.0`); else value as it is."""
    new = _collected(value, {}) if is_float(value.dtype) else None
    return new if _cheaper(new, value) else value


def _collected(value, defs):
    """value collected, the cheaper of its sums kept as factors and (where it has such sums) of
    them distributed over; None where the collection gives up."""
    def written(distribute):
        try:
            reader = Terms(value.dtype, defs, distribute)
            terms = reader.of(value)
            return terms, Writer(value.dtype, _inverses(defs), reader.quotients).terms(terms)
        except GiveUp:
            return None, None

    terms, new = written(False)
    if terms is not None and any(is_sum(key) for mono in terms for key, _ in mono):
        _, spread = written(True)
        if spread is not None and (new is None or _cheaper(spread, new)):
            return spread
    return new


def _reads_definitions(s, defs):
    """s reads a local that collect_terms can look through, and is not an accumulation (`a_adj =
    a_adj - ...`, which opt.zero_start folds into its zero start as it is written)."""
    names = {v.name for v in vars_in(s.value)}
    return any(name in defs for name in names) and not (isinstance(s, N.Assign) and s.name in names)


def _quotient(e):
    """e is a division: a local holding a quotient is read as itself (looked through, each use
    would divide again), as a local holding a root or a load is."""
    return isinstance(e, N.Call) and e.op == "div"


def _reciprocal_of_local(e):
    """e is `1.0 / r` for a float local r."""
    return is_reciprocal(e) and is_float(e.dtype) and isinstance(e.args[1], N.Var)


def _inverses(defs):
    """atom -> the local that holds its reciprocal, among the definitions in force."""
    out = {}
    for name, d in defs.items():
        if len(d.terms) == 1:
            (mono, c), = d.terms.items()
            if c == 1.0 and len(mono) == 1 and mono[0][1] == -1:
                out.setdefault(mono[0][0], N.Var(mono[0][0].dtype, name))
    return out


def _looked_through(terms):
    """A definition worth looking through: a product of atoms (or a copy of a local), not an atom
    itself or a product with a sum in it (a division, root, load or sum would be computed again)."""
    if terms is None or len(terms) > 1:
        return False
    for mono, c in terms.items():
        if len(mono) == 1 and mono[0][1] == 1 and c == 1.0 and not isinstance(mono[0][0], N.Var):
            return False
        if any(is_sum(key) for key, _ in mono):
            return False
    return True


def _sum_of_products(terms):
    """A definition its one reader may read through although it is a sum: a few products of atoms
    (no sum inside, no bare constant), each rounded already (`r_adj_dual = m * s**9 * t15 * -42.0
    + e * s**15 * t15 * 288.0`), so the reader's products may be distributed over it."""
    return terms is not None and 1 < len(terms) <= 4 and all(
        mono != () and not any(is_sum(key) for key, _ in mono) for mono in terms)


def _forget(defs, s):
    """Drop definitions that s invalidates: it reassigns the local, or a local or field it reads."""
    names = {s.name} if isinstance(s, N.Assign) else assigned_names((s,))
    fields = {id(x.ref.field) for x in iter_stmts((s,)) if isinstance(x, (N.Store, N.Atomic))}
    for name in list(defs):
        d = defs[name]
        if name in names or d.reads & names or d.loads & fields:
            del defs[name]
