"""Dead-code elimination for locals.

An assignment to a local is dead when nothing but assignments to that same local reads it (so
adjoint accumulators `a_adj = a_adj + ...` that nobody consumes die too). Flow-insensitive, which
suits the SSA-shaped code the transforms produce; iterated to a fixed point.
"""
from __future__ import annotations

from ..ir import nodes as N
from ..ir.walk import blocks_of, expr_children_of_stmt, iter_stmts, rebuild_stmt, vars_in


def readers(stmts):
    """name -> set of names of the Assigns that read it (None for a non-Assign reader)."""
    out = {}
    for s in iter_stmts(stmts):
        who = s.name if isinstance(s, N.Assign) else None
        for e in expr_children_of_stmt(s):
            for v in vars_in(e):
                out.setdefault(v.name, set()).add(who)
    return out


def live_names(stmts, candidates=None, keep=()):
    """Names some statement really needs. candidates: names that may die (None: all)."""
    r = readers(stmts)
    assigned = {s.name for s in iter_stmts(stmts) if isinstance(s, N.Assign)}
    dead = set()
    changed = True
    while changed:
        changed = False
        for name in assigned - dead:
            if name in keep or (candidates is not None and name not in candidates):
                continue
            users = r.get(name, set()) - {name} - dead
            if not users:
                dead.add(name)
                changed = True
    return assigned - dead, dead


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
            if isinstance(s, N.For) and not s.parallel and not new[0]:
                continue
            s = rebuild_stmt(s, new)
        out.append(s)
    return tuple(out)


def dce(stmts, candidates=None, keep=()):
    _, dead = live_names(stmts, candidates, keep)
    return remove_dead(stmts, dead) if dead else tuple(stmts)
