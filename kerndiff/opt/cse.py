"""Common-subexpression elimination within each block.

Repeated subexpressions (same expression, same versions of the locals and fields it reads) are
computed once into a temporary `t1 = ...` placed before their first use. Besides speed, this is
what keeps nested derivatives readable and small: forward(forward(f)) repeats f's partials.
"""
from __future__ import annotations

import dataclasses

from ..ad.names import unscaled_name
from ..ir import build as B
from ..ir import nodes as N
from ..ir.ops import COMMUTATIVE
from ..ir.types import is_float
from ..ir.walk import blocks_of, expr_children, guarded_select, rebuild_stmt, writes_of
from .algebra import exact_scale

CHEAP = {"neg", "cast"}


def _size(e, limit=3):
    n, stack = 0, [e]
    while stack and n < limit:
        x = stack.pop()
        n += 1
        stack.extend(expr_children(x))
    return n


def _operations(e, limit=2):
    """How many operations e computes (a field load's index not counted), up to limit."""
    n, stack = 0, [e]
    while stack and n < limit:
        x = stack.pop()
        if isinstance(x, N.Call):
            n += 1
            stack.extend(x.args)
    return n


def _candidate(e):
    """Worth a temporary: float computations (integer index arithmetic stays inline and readable),
    except a product by a power of two: written out at each use, opt.algebra merges its constant
    with the others there, and opt.scales can move it into a local the uses share (a temporary
    `t14 = d * 2.0` would hold it apart: `t2 = t14 * r2_adj` could not become `t2 = d * r2_adj`)."""
    if not isinstance(e, N.Call) or not is_float(e.dtype):
        return False
    if e.op == "select":
        return _size(e) >= 4
    if e.op == "mul" and any(isinstance(a, N.Const) and exact_scale(a.value) for a in e.args):
        return False
    return e.op not in CHEAP or _size(e) >= 3


def _deps(e, memo):
    """(locals, fields) e reads, each sorted: the parts of its key that versions qualify."""
    got = memo.get(id(e))
    if got is None:
        vs, fs = set(), set()
        if isinstance(e, N.Var):
            vs.add(e.name)
        elif isinstance(e, N.Load):
            fs.add(id(e.ref.field))
        for c in expr_children(e):
            cv, cf = _deps(c, memo)
            vs.update(cv)
            fs.update(cf)
        got = (tuple(sorted(vs)), tuple(sorted(fs)), e)
        memo[id(e)] = got
    return got[0], got[1]


def _exprs(s):
    from ..ir.walk import expr_children_of_stmt
    return expr_children_of_stmt(s)


class CSE:
    def __init__(self, names, late=False, stem="t"):
        self.names = names
        self.late = late
        self.stem = stem  # of the temporaries' names
        self.memo = {}
        self.canon = {}
        self.numbers = {}
        self.counter = 0
        self.stems = None  # the parts before "_" of taken names (fresh)

    def canonical(self, e):
        """A number for e's value up to the order of commutative operands, so a*b and b*a share
        one temporary. Numbered bottom-up (hash-consing): each node hashes its children's
        numbers, not their trees, so keying every subexpression stays linear in the IR's size."""
        got = self.canon.get(id(e))
        if got is not None:
            return got[0]
        if isinstance(e, N.Call):
            args = tuple(self.canonical(a) for a in e.args)
            if e.op in COMMUTATIVE and args[1] < args[0]:
                args = (args[1], args[0])
            shape = ("call", e.dtype, e.op, args)
        elif isinstance(e, N.Load):
            shape = ("load", e.dtype, e.ref, tuple(self.canonical(i) for i in e.index))
        else:
            shape = ("leaf", e)
        number = self.numbers.setdefault(shape, len(self.numbers))
        self.canon[id(e)] = (number, e)  # e kept alive, so its id is not reused
        return number

    def fresh(self):
        """A new temporary's name: `t<n>`, not taken (nor, late, the stem of a taken name, read
        past a scale: twice_t17_adj is t17's)."""
        if self.stems is None:
            self.stems = {unscaled_name(n).split("_", 1)[0] for n in self.names.taken if "_" in n} \
                if self.late else set()
        while True:
            self.counter += 1
            name = f"{self.stem}{self.counter}"
            if name not in self.names.taken and name not in self.stems:
                self.names.taken.add(name)
                return name

    def block(self, stmts):
        version = {}

        def key(e):
            vs, fs = _deps(e, self.memo)
            return (self.canonical(e), tuple((v, version.get(v, 0)) for v in vs),
                    tuple((f, version.get(("f", f), 0)) for f in fs))

        def count(e, counts):
            if _candidate(e) and (not self.late or _operations(e) >= 2):
                k = key(e)
                counts[k] = counts.get(k, 0) + 1
                if counts[k] > 1:
                    return  # children already counted with the first occurrence
            if guarded_select(e):  # its branches run only when chosen: nothing is taken out of them
                count(e.args[0], counts)
                return
            for c in expr_children(e):
                count(c, counts)

        counts, held = {}, set()
        for s in stmts:
            if self.late and isinstance(s, N.Assign) and _candidate(s.value):
                held.add(key(s.value))  # a local holds it already: no temporary (see cse)
            for e in _exprs(s):
                count(e, counts)
            names, fields = writes_of(s)
            for n in names:
                version[n] = version.get(n, 0) + 1
            for f in fields:
                version[("f", f)] = version.get(("f", f), 0) + 1

        for k in held:
            counts.pop(k, None)
        if not any(n > 1 for n in counts.values()):
            # nothing repeats here (most blocks): only inner blocks may change, and the rewrite
            # below would rebuild every statement as it is
            return [rebuild_stmt(s, [tuple(self.block(b)) for b in blocks_of(s)]) if blocks_of(s) else s
                    for s in stmts]
        version.clear()
        avail = {}
        out = []
        for s in stmts:
            pre = []

            def rewrite(e):
                if _candidate(e):
                    k = key(e)
                    if k in avail:
                        return avail[k]
                    if counts.get(k, 0) > 1:
                        new = self._rebuild(e, rewrite)
                        t = self.fresh()
                        pre.append(N.Assign(t, new, src=s.src, tag=s.tag))
                        avail[k] = N.Var(e.dtype, t)
                        return avail[k]
                if guarded_select(e):
                    return N.Call(e.dtype, e.op, (rewrite(e.args[0]),) + e.args[1:])
                return self._rebuild(e, rewrite)

            s2 = self._rewrite_stmt(s, rewrite)
            names, fields = writes_of(s)
            for n in names:
                version[n] = version.get(n, 0) + 1
            for f in fields:
                version[("f", f)] = version.get(("f", f), 0) + 1
            if names or fields:
                avail = {k: v for k, v in avail.items()
                         if not (set(n for n, _ in k[1]) & names or set(f for f, _ in k[2]) & fields)}
            blocks = blocks_of(s2)
            if blocks:
                s2 = rebuild_stmt(s2, [tuple(self.block(b)) for b in blocks])
            out.extend(pre)
            out.append(s2)
        return out

    @staticmethod
    def _rebuild(e, rewrite):
        if isinstance(e, N.Load):
            return N.Load(e.dtype, e.ref, tuple(rewrite(i) for i in e.index))
        if isinstance(e, N.Call):
            args = tuple(rewrite(a) for a in e.args)
            if e.op == "cast":
                return B.cast(args[0], e.dtype)
            if all(a is b for a, b in zip(args, e.args)):
                return e  # nothing below it changed
            return N.Call(e.dtype, e.op, args)
        return e

    @staticmethod
    def _rewrite_stmt(s, rewrite):
        if isinstance(s, N.Assign):
            return dataclasses.replace(s, value=rewrite(s.value))
        if isinstance(s, (N.Store, N.Atomic)):
            return dataclasses.replace(s, index=tuple(rewrite(i) for i in s.index), value=rewrite(s.value))
        if isinstance(s, N.If):
            return dataclasses.replace(s, cond=rewrite(s.cond))
        if isinstance(s, N.For):
            return dataclasses.replace(s, bounds=tuple((rewrite(a), rewrite(b)) for a, b in s.bounds))
        if isinstance(s, N.Return):
            return dataclasses.replace(s, values=tuple(rewrite(v) for v in s.values))
        if isinstance(s, N.Print):
            from ..ir.walk import map_stmt_exprs
            return map_stmt_exprs(s, rewrite)
        return s  # While conditions are re-evaluated each trip: leave them alone


def cse(ir: N.KernelIR, late=False) -> N.KernelIR:
    """late: the pass at the end of finalize, on a kernel its rewrites have made readable. It adds
    a temporary only for a value of two operations or more (`1.0 - t4 * t4`; one operation,
    `a * t1` out of `a * t1 * t1` or `x[i] * x_dual[i]`, reads as well twice as through a
    temporary) that no local holds whole (where one does, opt.reuse has read it from there, or
    deliberately not: `t4_adj = t15 * loss_adj_v * 2.0` beside an accumulator
    `t3_adj = t15 * loss_adj_v`, which a temporary would turn into a copy), and does not name it
    as the stem of another name: right after a transform, a stem's reuse is mostly the same value
    again (CSE numbers alike from pass to pass: `t1 = ti.tanh(...)` beside its tangent
    `t1_dual`), but this late a new `t1` beside `t1_dual2` would read as the value whose tangent
    that is."""
    from ..ad.names import NameAllocator

    names = NameAllocator.for_kernel(ir)
    return dataclasses.replace(ir, body=tuple(CSE(names, late).block(ir.body)))
