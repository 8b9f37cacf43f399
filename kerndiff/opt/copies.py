"""Copies forwarded within a block (for the reader of derived kernels).

Reverse sweeps of loops with loop-carried locals are full of copies that go round in a circle:

    for k_rev in range(16):
        s_2_adj = s_1_adj                  # the SSA merge at the loop head, reversed
        s_1_adj = s_2_adj                  # ... and back
        h_adj[p, k] = h_adj[p, k] + W[k] * s_2_adj

opt.propagate only forwards locals assigned once in the whole kernel, and both of these are
assigned in every iteration. Here, after `a = b` in a block, later reads of `a` in that block (and
in statements nested in it) read `b` instead, until either is assigned again; a statement with
nested blocks that assigns either one anywhere inside is left alone, and ends the copy. The
copy-back `b = a` becomes `b = b` and goes, and opt.dce removes `a = b` once nothing reads `a`.
"""
from __future__ import annotations

from ..ir import nodes as N
from ..ir.walk import assigned_names, blocks_of, map_stmt_exprs, rebuild_stmt, substitute


def forward_copies(body):
    return _block(body, {})


def _block(stmts, outer):
    """outer: copies in force where this block starts {a: Var b} (read only)."""
    copies = dict(outer)
    out = []
    for s in stmts:
        written = _assigns(s)
        if blocks_of(s):
            inner = {a: b for a, b in copies.items() if a not in written and b.name not in written}
            s = _substituted(s, inner)
            s = rebuild_stmt(s, [_block(b, inner) for b in blocks_of(s)])
        else:
            s = _substituted(s, copies)
        if isinstance(s, N.Assign) and isinstance(s.value, N.Var) and s.value.name == s.name:
            continue  # b = b, what the copy-back became
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
