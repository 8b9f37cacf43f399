"""Copies forwarded within a block (for the reader of derived kernels).

Reverse sweeps of loops with loop-carried locals are full of copies that go round in a circle:

    for k_rev in range(16):
        s_2_adj = s_1_adj                  # the SSA merge at the loop head, reversed
        s_1_adj = s_2_adj                  # ... and back
        h_adj[p, k] = h_adj[p, k] + W[k] * s_2_adj

opt.propagate only forwards locals assigned once in the whole kernel, and both of these are
assigned in every iteration. Here, after `a = b` in a block, later reads of `a` in that block (and
in statements nested in it) read `b` instead, until either is assigned again; a statement with
loop that assigns either one anywhere inside is left alone, and ends the copy; the branches of an
if start with the copies in force before it, and a copy survives the if where neither branch
assigns either name. The copy-back `b = a` becomes `b = b` and goes (in a branch too: the
reverse of `if c: e += ...` reads `e_3_adj = e_1_adj`, then `e_1_adj = e_3_adj` in both branches),
and opt.dce removes `a = b` once nothing reads `a`.
"""
from __future__ import annotations

import dataclasses

from ..ir import nodes as N
from ..ir.walk import (assigned_names, blocks_of, expr_children_of_stmt, iter_stmts, map_stmt_exprs, mentions,
                       rebuild_stmt, substitute, vars_in)


def forward_copies(body):
    return _block(body, {})


def coalesce_copies(body):
    """`b = e; ...; a = b` in one block, where that copy is the only read of b anywhere, b is
    assigned nowhere else and nothing in between mentions a, becomes `a = e; ...` (a recomputed
    loop-carried sum: `s_2 = s_1 + w * h; s_1 = s_2` -> `s_1 = s_1 + w * h`). Likewise where b is
    the merge of an if's two branches (`if c: s_3 = s_1 + v  else: s_3 = s_1`, then `s_1 = s_3`
    is `if c: s_1 = s_1 + v`)."""
    reads, writes = {}, {}
    for s in iter_stmts(body):
        for e in expr_children_of_stmt(s):
            for v in vars_in(e):
                reads[v.name] = reads.get(v.name, 0) + 1
        for name in (s.name,) if isinstance(s, N.Assign) else s.vars if isinstance(s, N.For) else ():
            writes[name] = writes.get(name, 0) + 1
    return _coalesce(body, reads, writes)


def _coalesce(stmts, reads, writes):
    stmts = [rebuild_stmt(s, [_coalesce(b, reads, writes) for b in blocks_of(s)]) if blocks_of(s) else s
             for s in stmts]
    for j, copy in enumerate(stmts):
        if not (isinstance(copy, N.Assign) and isinstance(copy.value, N.Var)):
            continue
        a, b = copy.name, copy.value.name
        if a == b or reads.get(b) != 1 or writes.get(b) not in (1, 2):
            continue
        for i in range(j - 1, -1, -1):
            s = stmts[i]
            if isinstance(s, N.Assign) and s.name == b and writes[b] == 1:
                stmts[i] = dataclasses.replace(s, name=a)
                stmts[j] = None
                break
            if isinstance(s, N.If) and writes[b] == 2:
                merged = _merged_in_branches(s, a, b)
                if merged is not None:
                    stmts[i], stmts[j] = merged, None
                break
            if mentions(s, a) or mentions(s, b):
                break
    return tuple(s for s in stmts if s is not None)


def _merged_in_branches(s, a, b):
    """The merge of an if, `if c: ...; b = x  else: ...; b = y` then `a = b`, as `a = x` and `a = y`
    in the branches (`a = a` goes): or None where either branch lacks its one top-level `b = `,
    or mentions a after it (it would see the new value)."""
    branches = []
    for block in (s.then, s.orelse):
        at = [k for k, t in enumerate(block) if isinstance(t, N.Assign) and t.name == b]
        if len(at) != 1 or any(mentions(t, a) for t in block[at[0] + 1:]):
            return None
        moved = dataclasses.replace(block[at[0]], name=a)
        keep = () if isinstance(moved.value, N.Var) and moved.value.name == a else (moved,)
        branches.append(block[:at[0]] + keep + block[at[0] + 1:])
    return dataclasses.replace(s, then=branches[0], orelse=branches[1])


def _block(stmts, outer):
    """outer: copies in force where this block starts {a: Var b} (read only)."""
    copies = dict(outer)
    out = []
    for s in stmts:
        if isinstance(s, N.If):  # its branches start with the copies in force; each ends its own
            s = rebuild_stmt(_substituted(s, copies), [_block(b, copies) for b in blocks_of(s)])
        elif blocks_of(s):  # a loop: later iterations start with what the body assigned
            written = _assigns(s)
            inner = {a: b for a, b in copies.items() if a not in written and b.name not in written}
            s = _substituted(s, inner)
            s = rebuild_stmt(s, [_block(b, inner) for b in blocks_of(s)])
        else:
            s = _substituted(s, copies)
        if isinstance(s, N.Assign) and isinstance(s.value, N.Var) and s.value.name == s.name:
            continue  # b = b, what the copy-back became
        written = _assigns(s)
        copies = {a: b for a, b in copies.items() if a not in written and b.name not in written}
        if isinstance(s, N.Assign) and isinstance(s.value, N.Var):
            copies[s.name] = s.value
        out.append(s)
    return tuple(out)


def _assigns(s):
    if isinstance(s, N.Assign):
        return {s.name}
    return assigned_names((s,)) if blocks_of(s) else set()


def _substituted(s, copies):
    """s with its own expressions (conditions, bounds, values; not its nested blocks) rewritten."""
    if not copies:
        return s
    return map_stmt_exprs(s, lambda e: substitute(e, copies))
