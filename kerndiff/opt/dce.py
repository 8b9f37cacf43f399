"""Dead-code elimination for locals, by marking.

Roots are the expressions of statements with effects (stores, atomics, returns, prints, jumps);
a local is live when a root or the assignment of a live local reads it, and the condition (or
bounds) of an `if`, `for` or `while` is a root when the statement holds an effect or assigns a
live local. Everything else is dead — including cycles of copies that only feed each other, as a
loop-carried primal value does in a reverse sweep that never needs it, and loops and branches
that only compute what nothing reads (a device function's while loop whose result its return
value does not use: each transform of a chain would otherwise carry it, recomputed and
checkpointed, into every derivative). Flow-insensitive, which suits the SSA-shaped code the
transforms produce.
"""
from __future__ import annotations

from ..ir import nodes as N
from ..ir.walk import blocks_of, expr_children_of_stmt, iter_stmts, rebuild_stmt, vars_in


def live_names(stmts, candidates=None, keep=()):
    """(live, dead) assigned names. candidates: names that may die (None: all); keep: never die."""
    sources = {}
    guarding = {}  # name -> the control statements that assign it and hold no effect
    live, work = set(), []

    def mark(name):
        if name not in live:
            live.add(name)
            work.append(name)

    def mark_reads(s):
        for e in expr_children_of_stmt(s):
            for v in vars_in(e):
                mark(v.name)

    for s in iter_stmts(stmts):
        if isinstance(s, N.Assign):
            sources.setdefault(s.name, []).append(s.value)
            continue
        if isinstance(s, N.For):
            for v in s.vars:
                mark(v)
        if blocks_of(s):
            inside = [x for b in blocks_of(s) for x in iter_stmts(b)]
            if all(isinstance(x, (N.Assign, N.If, N.For, N.While)) for x in inside):
                for x in inside:
                    if isinstance(x, N.Assign):
                        guarding.setdefault(x.name, []).append(s)
                continue
        mark_reads(s)
    assigned = set(sources)
    for name in assigned:
        if name in keep or (candidates is not None and name not in candidates):
            mark(name)
    while work:
        name = work.pop()
        for value in sources.get(name, ()):
            for v in vars_in(value):
                mark(v.name)
        for s in guarding.pop(name, ()):
            mark_reads(s)
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
            if isinstance(s, (N.For, N.While)) and not new[0]:  # parallel or not: an empty loop does nothing
                continue
            s = rebuild_stmt(s, new)
        out.append(s)
    return tuple(out)


def dce(stmts, candidates=None, keep=()):
    _, dead = live_names(stmts, candidates, keep)
    return remove_dead(stmts, dead)
