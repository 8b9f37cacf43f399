"""Reversed loops whose iterations share nothing but sums run forward again (for the reader).

Reverse mode runs a serial loop's adjoint last iteration first, since in general an iteration
needs what the later ones left in the carried adjoints:

    for j_rev in range(4096):
        j = 4095 - j_rev
        ...

Where the iterations carry nothing but sums from one to the next — adjoints added into fields,
and locals only ever incremented (`pos_adj_0 = pos_adj_0 - t2`) — running them in either order
adds the same terms, in another order (as a parallel loop's atomic adds do from run to run), and
the loop reads as it was written: `for j in range(4096):`. The same holds where each iteration
also reads and writes field elements of its own: a layer of neurons' reverse (a tanh network's
`k.forward.forward.reverse`) takes `h_adj[p, j]` of neuron j, zeroes it, recomputes the neuron's
sum in an inner loop and adds into the weights' and the previous layer's adjoints; its neurons
run `for j in range(64):` again, and so do the inner loops.

A loop qualifies when:
  * it is a reversed loop: `for k in range(T)` whose body starts with `v = X - k` and reads k
    nowhere else (v then runs from X down to X - T + 1);
  * its body holds only assignments, stores, atomic adds, ifs and serial loops of those (no
    while, break, continue, other atomic or print);
  * every local it assigns is either a sum, assigned only as `s = s + e` / `s = s - e` and read
    nowhere else in the loop, or a temporary, assigned in each iteration before it is read there
    and dead at the loop's exit (so no value of a particular iteration outlives it; the forward
    sweep's copy of the loop may use the same names);
  * every field it writes is either only added into, or touched by each of its accesses in the
    loop at an index with v itself in one and the same position (`h_adj[p, v]`), so that no two
    iterations touch one element.
"""
from __future__ import annotations

import dataclasses
import re

from ..ir import build as B
from ..ir import nodes as N
from ..ir.walk import (assigned_names, blocks_of, expr_children_of_stmt, iter_stmts, loads_in, mentioned_names,
                       rebuild_stmt, used_names, vars_in)
from .liveness import Sweep


def run_forward(body):
    """body with every qualifying reversed loop running forward, and the reversed loops whose
    iterations do not read their index named as written (`for k in range(3):` for a `k_rev` no
    statement reads: its iterations are alike, so whether it runs forward or backward is all
    one). Outer loops are tried first; turning one keeps the statements of its body as they were,
    so the loops inside are found again by identity, and whether they qualify does not depend on
    the outer loop's order."""
    out = body
    for loop in [s for s in iter_stmts(body) if isinstance(s, N.For) and not s.parallel]:
        turned = _forward(loop, out) or _named_as_written(loop, out)
        if turned is not None:
            out = _replaced(out, loop, turned)
    return out


def _named_as_written(loop, kernel_body):
    """The loop with its variable `k_rev` (or `k_rev_1`) named `k` where nothing reads it and `k`
    is free there (not mentioned in the loop, nor read after it); None otherwise."""
    reversed_ = re.fullmatch(r"(.+)_rev(_\d+)?", loop.vars[0]) if len(loop.vars) == 1 else None
    if reversed_ is None:
        return None
    var, written = loop.vars[0], reversed_.group(1)
    if var in used_names(loop.body) or written in mentioned_names(loop) or written in _live_after(kernel_body, loop):
        return None
    return dataclasses.replace(loop, vars=(written,))


def _forward(loop, kernel_body):
    """The loop running forward, or None where it does not qualify."""
    index = _reversed_index(loop)
    if index is None:
        return None
    var, top = index
    body = loop.body[1:]
    if {v.name for v in vars_in(top)} & assigned_names(body):
        return None
    if not all(_allowed(s) for s in iter_stmts(body)) or not _own_elements(body, var, top):
        return None
    sums = _sums(body)
    temporaries = (assigned_names(body) - sums) | {var, loop.vars[0]}
    if not _defined_before_read(body, {var}, sums) or temporaries & _live_after(kernel_body, loop):
        return None
    trips = loop.bounds[0][1]
    upper = top.args[0] if _is_minus_one(top) else B.add(top, B.const(1, top.dtype))
    if trips == upper:
        lower = B.const(0, upper.dtype)
    elif isinstance(trips, N.Call) and trips.op == "sub" and trips.args[0] == upper:
        lower = trips.args[1]  # range(lo, hi) reversed: hi - lo trips
    else:
        lower = B.sub(upper, trips)
    return dataclasses.replace(loop, vars=(var,), bounds=((lower, upper),), body=body)


def _reversed_index(loop):
    """(v, X) for a loop `for k in range(T)` whose body starts `v = X - k` and reads k nowhere
    else; None for any other loop."""
    if len(loop.vars) != 1 or not loop.body:
        return None
    (lo, _), = loop.bounds
    first, k = loop.body[0], loop.vars[0]
    if not (isinstance(lo, N.Const) and lo.value == 0 and isinstance(first, N.Assign)):
        return None
    value = first.value
    if not (isinstance(value, N.Call) and value.op == "sub" and isinstance(value.args[1], N.Var)
            and value.args[1].name == k and k not in {v.name for v in vars_in(value.args[0])}):
        return None
    rest = loop.body[1:]
    if k in {v.name for s in iter_stmts(rest) for e in expr_children_of_stmt(s) for v in vars_in(e)} \
            or k in assigned_names(rest) or first.name in assigned_names(rest):
        return None
    return first.name, value.args[0]


def _is_minus_one(e):
    return isinstance(e, N.Call) and e.op == "sub" and isinstance(e.args[1], N.Const) and e.args[1].value == 1


def _allowed(s):
    return (isinstance(s, (N.Assign, N.If, N.Store)) or (isinstance(s, N.Atomic) and s.op == "add")
            or (isinstance(s, N.For) and not s.parallel))


def _own_elements(body, var, top):
    """Whether every field body writes is only added into, or accessed by each statement touching
    it at an index with var in one and the same position; and top reads none of them."""
    accesses = {}  # id(field) -> [(kind, index)]
    for s in iter_stmts(body):
        for e in expr_children_of_stmt(s):
            for x in loads_in(e):
                accesses.setdefault(id(x.ref.field), []).append(("load", x.index))
        if isinstance(s, (N.Store, N.Atomic)):
            accesses.setdefault(id(s.ref.field), []).append((type(s).__name__, s.index))
    for field, found in accesses.items():
        kinds = {kind for kind, _ in found}
        if kinds == {"load"} or kinds == {"Atomic"}:
            continue
        positions = [{d for d, i in enumerate(index) if isinstance(i, N.Var) and i.name == var} for _, index in found]
        if not set.intersection(*positions):
            return False
    written = {f for f, found in accesses.items() if any(kind != "load" for kind, _ in found)}
    return not any(id(x.ref.field) in written for x in loads_in(top))


def _sums(body):
    """The locals body assigns only as `s = s + e` / `s = e + s` / `s = s - e` and reads nowhere
    else. (A sum that another one's e reads is not one: as a temporary it is read before it is
    assigned, and the loop stays as it is.)"""
    assigns = [s for s in iter_stmts(body) if isinstance(s, N.Assign)]
    candidates = {s.name for s in assigns} - {s.name for s in assigns if _increment(s) is None}
    read = set()
    for s in iter_stmts(body):
        for e in expr_children_of_stmt(s):
            if isinstance(s, N.Assign) and s.name in candidates:
                e = _increment(s)  # its own term aside
            read.update(v.name for v in vars_in(e))
    return candidates - read


def _increment(s):
    """e where s is `n = n + e`, `n = e + n` or `n = n - e` (n = s.name), else None."""
    v = s.value
    if not (isinstance(v, N.Call) and v.op in ("add", "sub") and len(v.args) == 2):
        return None
    a, b = v.args
    if isinstance(a, N.Var) and a.name == s.name:
        return b
    if v.op == "add" and isinstance(b, N.Var) and b.name == s.name:
        return a
    return None


def _defined_before_read(stmts, defined, sums):
    """Whether every local read in stmts, other than the sums and names assigned nowhere in them,
    is assigned before on every path through one iteration. defined: assigned so far (updated)."""
    local = assigned_names(stmts) - sums

    def block(stmts, defined):
        for s in stmts:
            for e in expr_children_of_stmt(s):
                if isinstance(s, N.Assign) and s.name in sums:
                    e = _increment(s)
                if any(v.name in local and v.name not in defined for v in vars_in(e)):
                    return None
            if isinstance(s, N.If):
                then, orelse = block(s.then, set(defined)), block(s.orelse, set(defined))
                if then is None or orelse is None:
                    return None
                defined |= then & orelse
            elif isinstance(s, N.For):
                # what its iterations read is assigned before the loop or earlier in the same
                # iteration (nothing carried from the last iteration of the outer loop); what it
                # assigns counts as assigned only inside it (it may run no iteration)
                if block(s.body, defined | set(s.vars)) is None:
                    return None
            elif isinstance(s, N.Assign):
                defined.add(s.name)
        return defined

    return block(stmts, set(defined)) is not None


def _live_after(stmts, loop):
    """The locals whose value at the loop's exit something may read (backward liveness over the
    kernel, as dead-store elimination computes it)."""
    probe = _Probe(loop)
    probe.block(stmts, set())
    return probe.after


class _Probe(Sweep):
    """A liveness sweep that notes what is live after one statement (its results are dropped)."""

    def __init__(self, target):
        super().__init__()
        self.target, self.after = target, set()

    def stmt(self, s, live):
        if s is self.target:
            self.after |= live
        return super().stmt(s, live)


def _replaced(stmts, old, new):
    """stmts with `new` in place of the statement `old`; only the statements on the way to it are
    rebuilt, so every other loop keeps its identity (run_forward finds the next one by it)."""
    out = []
    for s in stmts:
        if s is old:
            out.append(new)
            continue
        blocks = blocks_of(s)
        if any(t is old for b in blocks for t in iter_stmts(b)):
            s = rebuild_stmt(s, [_replaced(b, old, new) for b in blocks])
        out.append(s)
    return tuple(out)
