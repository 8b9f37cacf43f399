"""Two ifs on one condition, one after the other, become one if.

Reverse mode writes an iteration of a loop as a recomputation followed by its adjoint, and each
pass has its own copy of the loop body's branches:

    if i != j:              # recompute
        r2 = ...
    e_3_adj = e_1_adj
    if i != j:              # adjoint
        r2_adj = ...

One `if` is what a person would write. It also lets later passes see that the adjoints zeroed
before the first if are still zero inside the second one (opt.zero_start). Statements between the
two ifs move above the first if when that cannot change anything: they are plain assignments
that read no field, assign nothing the first if or the condition reads or assigns, and read
nothing the first if assigns. The first if must not assign what the condition reads, nor hold a
`break`, `continue` or `return`: on the path that leaves, a statement moved above it would run
where it did not before.
"""
from __future__ import annotations

import dataclasses

from ..ir import nodes as N
from ..ir.walk import assigned_names, blocks_of, iter_stmts, loads_in, rebuild_stmt, used_names, vars_in


def fuse_ifs(stmts):
    out = list(stmts)
    i = 0
    while i < len(out):
        fused = _fuse_at(out, i) if isinstance(out[i], N.If) else None
        if fused is not None:
            out = fused  # the fused if may meet a third one: look at it again
            continue
        i += 1
    return tuple(rebuild_stmt(s, [fuse_ifs(b) for b in blocks_of(s)]) if blocks_of(s) else s for s in out)


def _fuse_at(stmts, i):
    """stmts with the if at i fused with the next if on its condition, or None."""
    first = stmts[i]
    cond_names = {v.name for v in vars_in(first.cond)}
    written = assigned_names((first,))
    if cond_names & written or loads_in(first.cond) or _leaves(first):
        return None
    read = used_names((first,)) | cond_names
    moved = []
    for k in range(i + 1, len(stmts)):
        s = stmts[k]
        if isinstance(s, N.If) and s.cond == first.cond:
            merged = dataclasses.replace(first, then=first.then + s.then, orelse=first.orelse + s.orelse, tag="")
            return stmts[:i] + moved + [merged] + stmts[k + 1:]
        movable = (isinstance(s, N.Assign) and not loads_in(s.value) and s.name not in read | written
                   and not {v.name for v in vars_in(s.value)} & written)
        if not movable:
            return None
        moved.append(s)
    return None


def _leaves(s):
    return any(isinstance(x, (N.Break, N.Continue, N.Return)) for x in iter_stmts((s,)))
