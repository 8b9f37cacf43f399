"""Locals whose adjoint is zero where a guard skipped their every use.

    r = d.norm()
    if r > 1e-6:
        f += k / r          # or: q = 1.0 / r; f += q if r > 1e-6 else 0.0

is how a pair force skips a particle's own pair. Its forward mode is finite there (r's tangent,
0/0, is only read in the branch not taken), but a reverse sweep adds the branch's contribution
into r_adj, zero where the branch was skipped, and then multiplies r_adj by the norm's partials
d / r: zero times 0/0, NaN, in every gradient the pair reaches. JAX and Taichi's own AD give
the same NaN. kerndiff instead adds such a local's contributions as `mul_or_zero(r_adj,
partial)` (ir.ops GUARDED_PRODUCT): the product, and zero where r_adj is zero.

A local qualifies (`guarded_locals`) where its value holds an op with an infinite partial
somewhere (rules.is_singular: a norm's sqrt, a division, ...) and each use of it that carries a
derivative is behind a guard: in a branch of an `if` or of a select, or in the value of another
such local (`q = 1.0 / r` above, whose own adjoint is zero where the select is not taken). Where
the adjoint is not zero nothing changes; where it is, the contribution is zero times the
partials, which is zero wherever they are finite, and now also where they are not. Where the
adjoint is zero by chance (a weight of 0) its derivatives are not: mul_or_zero's own derivatives
(rules.zero_safe_jvp, zero_safe_vjp) keep them, where `select(r_adj != 0, ...)` would drop them.
Locals used unguarded anywhere (`e += r`) keep their plain adjoint: NaN at r = 0 there is the
function's own (|d| has no derivative at d = 0).
"""
from __future__ import annotations

from collections import Counter

from ..ir import nodes as N
from ..ir.walk import blocks_of, expr_children, expr_children_of_stmt, iter_expr, mentions, read_counts
from .rules import NO_DERIVATIVE, is_singular


def guarded_locals(stmts):
    """Names of the locals of stmts (in SSA form) whose reverse contributions are
    `mul_or_zero(adjoint, partial)`: a singular op in their value, every derivative-carrying use
    guarded."""
    stmts = tuple(stmts)
    behind_guards = set()
    _collect(stmts, read_counts(stmts), behind_guards)
    return {name for name, singular in behind_guards if singular}


def _collect(stmts, reads, out):
    """Add (name, value holds a singular op) to out for the locals of stmts (and of the blocks
    nested in them) whose every derivative-carrying use is behind a guard. reads: the whole
    body's read counts; a local read anywhere but after its definition in its own block (after
    the `if` whose branch defined it, or by the next trip of a loop carrying it, `e = e + t`)
    does not qualify: its adjoint there is a running sum, not one definition's."""
    for s in stmts:
        for b in blocks_of(s):
            _collect(b, reads, out)
    guarded = {name for name, _ in out}
    reads_after = Counter()
    for at in range(len(stmts) - 1, -1, -1):
        s = stmts[at]
        if isinstance(s, N.Assign) and reads_after[s.name] == reads[s.name] \
                and _uses_guarded(s.name, stmts[at + 1:], guarded):
            out.add((s.name, any(is_singular(x) for x in iter_expr(s.value))))
            guarded.add(s.name)
        reads_after.update(read_counts((s,)))


def _uses_guarded(name, later, guarded):
    """Every use of `name` in the statements after its definition that carries a derivative is in
    a branch (of an if or a select) or in the value of a local in `guarded`."""
    for s in later:
        if not mentions(s, name):
            continue
        if isinstance(s, N.If):
            continue  # its condition carries no derivative; its branches are guarded
        if isinstance(s, N.Assign):
            if s.name == name or _bare_use(s.value, name) and s.name not in guarded:
                return False
            continue
        if any(_bare_use(e, name) for e in expr_children_of_stmt(s)):
            return False
        if isinstance(s, (N.For, N.While)) and not all(_uses_guarded(name, b, guarded) for b in blocks_of(s)):
            return False
    return True


def _bare_use(e, name):
    """`name` is read in e outside a select (whose condition carries no derivative and whose
    branches are guarded) and outside ops without derivatives (comparisons)."""
    if isinstance(e, N.Var):
        return e.name == name
    if isinstance(e, N.Call) and (e.op == "select" or e.op in NO_DERIVATIVE):
        return False
    return any(_bare_use(c, name) for c in expr_children(e))
