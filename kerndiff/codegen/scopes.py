"""Where each local must be declared in the generated source.

Taichi scopes locals by block, like C. A local whose first occurrence is an assignment in the
innermost block that holds all its occurrences needs nothing; any other local is declared (typed,
zero) at the start of that block. Blocks are named by paths: (statement index, branch) pairs.
"""
from __future__ import annotations

from ..ir import nodes as N
from ..ir.walk import expr_children_of_stmt, vars_in


def child_blocks(s, i, path):
    if isinstance(s, N.If):
        return [(s.then, path + ((i, 0),)), (s.orelse, path + ((i, 1),))]
    if isinstance(s, (N.For, N.While)):
        return [(s.body, path + ((i, 0),))]
    return []


def declarations(ir: N.KernelIR) -> dict:
    occ = {}
    dtypes = {}
    loop_vars = set()
    params = {p.name for p in ir.params}

    def note(name, path, kind, dtype):
        occ.setdefault(name, []).append((path, kind))
        dtypes.setdefault(name, dtype)

    def walk(stmts, path):
        for i, s in enumerate(stmts):
            for e in expr_children_of_stmt(s):
                for v in vars_in(e):
                    note(v.name, path, "use", v.dtype)
            if isinstance(s, N.Assign):
                note(s.name, path, "def", s.value.dtype)
            if isinstance(s, N.Atomic) and s.result:
                note(s.result, path, "def", s.ref.dtype)
            if isinstance(s, N.For):
                loop_vars.update(s.vars)
            for block, p in child_blocks(s, i, path):
                walk(block, p)

    walk(ir.body, ())
    out = {}
    for name, occs in occ.items():
        if name in params or name in loop_vars:
            continue
        for group in _per_parallel_loop(ir.body, occs):
            _declare(name, group, dtypes[name], out)
    return out


def _per_parallel_loop(body, occs):
    """The occurrences of one local, one group per top-level parallel loop where every occurrence
    is inside one (a name the kernel's loops each use for their own iterations' values, such as
    the primal loop and the recompute loop of a derivative kernel): declared once at the kernel's
    top, it would be one variable that every thread of every loop writes — a race, which Taichi's
    SPIR-V backend shows (the CPU's store forwarding happened to hide it)."""
    tops = sorted({path[0][0] for path, _ in occs if path})
    if len(tops) > 1 and all(path for path, _ in occs) and \
            all(isinstance(body[t], N.For) and body[t].parallel for t in tops):
        return [[o for o in occs if o[0][0][0] == t] for t in tops]
    return [occs]


def _declare(name, occs, dtype, out):
    """Declare `name` at the start of the innermost block holding all `occs`, unless its first
    occurrence there is an assignment."""
    lcb = _innermost_block(occs)
    if _assigned_first(occs, lcb) or _apart(occs, lcb):
        return
    out.setdefault(lcb, []).append((name, dtype))


def _innermost_block(occs):
    """The path of the innermost block holding all occurrences (their paths' common prefix)."""
    lcb = occs[0][0]
    for p, _ in occs[1:]:
        k = 0
        while k < len(lcb) and k < len(p) and lcb[k] == p[k]:
            k += 1
        lcb = lcb[:k]
    return lcb


def _assigned_first(occs, lcb):
    return occs[0] == (lcb, "def")


def _apart(occs, lcb):
    """Whether the occurrences lie in sibling blocks under lcb (none in lcb itself), each group
    starting with an assignment in its own innermost block: no value passes from one to another
    (split_ranges' loops over the trips either side of `i == j` each assign their own `t1`)."""
    if any(len(p) == len(lcb) for p, _ in occs):
        return False
    groups = {}
    for o in occs:
        groups.setdefault(o[0][len(lcb)], []).append(o)
    return len(groups) > 1 and all(_assigned_first(g, _innermost_block(g)) for g in groups.values())
