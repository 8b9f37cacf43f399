"""Dead-code elimination for locals, by marking.

Roots are the expressions of statements with effects (stores, atomics, returns) and of control
flow (conditions, loop bounds); a local is live when a root or the assignment of a live local
reads it. Everything else is dead — including cycles of copies that only feed each other, as a
loop-carried primal value does in a reverse sweep that never needs it. Flow-insensitive, which
suits the SSA-shaped code the transforms produce.
"""
from __future__ import annotations

from ..ir import nodes as N
from ..ir.walk import blocks_of, expr_children_of_stmt, iter_stmts, rebuild_stmt, vars_in


def live_names(stmts, candidates=None, keep=()):
    """(live, dead) assigned names. candidates: names that may die (None: all); keep: never die."""
    sources = {}
    live, work = set(), []

    def mark(name):
        if name not in live:
            live.add(name)
            work.append(name)

    for s in iter_stmts(stmts):
        if isinstance(s, N.Assign):
            sources.setdefault(s.name, []).append(s.value)
            continue
        for e in expr_children_of_stmt(s):
            for v in vars_in(e):
                mark(v.name)
        if isinstance(s, N.For):
            for v in s.vars:
                mark(v)
    assigned = set(sources)
    for name in assigned:
        if name in keep or (candidates is not None and name not in candidates):
            mark(name)
    while work:
        name = work.pop()
        for value in sources.get(name, ()):
            for v in vars_in(value):
                mark(v.name)
    return assigned & live, assigned - live


def remove_dead(stmts, dead):
    out = []
    for s in stmts:
        if isinstance(s, N.Assign) and s.name in dead:
            continue
        blocks = blocks_of(s)
        if blocks:
            new = [remove_dead(b, dead) for b in blocks]
            if isinstance(s, N.If) and not new[0] and not new[1]:
                continue
            if isinstance(s, N.For) and not new[0]:  # parallel or not: an empty loop does nothing
                continue
            s = rebuild_stmt(s, new)
        out.append(s)
    return tuple(out)


def dce(stmts, candidates=None, keep=()):
    _, dead = live_names(stmts, candidates, keep)
    return remove_dead(stmts, dead)
