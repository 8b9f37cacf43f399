"""Constant and copy propagation.

A local assigned exactly once, with a constant or with another local that is itself never
reassigned afterwards, is replaced by that value wherever its assignment dominates the use (in
structured code: later in the same block, or inside a later statement's nested blocks); a local
only ever assigned zero is zero everywhere.
Reverse mode produces many such copies (SSA merges, zero-initialized adjoints that nothing
accumulates into); folding them lets the smart constructors collapse `0 * x` chains. An if whose
condition folds to a constant is replaced by the branch it takes.
"""
from __future__ import annotations

from ..ir import nodes as N
from ..ir.walk import blocks_of, expr_children_of_stmt, map_stmt_exprs, rebuild_stmt, substitute, vars_in


def _positions(body):
    """name -> list of ('def'|'use', path) where path is ((index, branch), ..., index)."""
    occ = {}

    def walk(stmts, prefix):
        for i, s in enumerate(stmts):
            here = prefix + (i,)
            for e in expr_children_of_stmt(s):
                for v in vars_in(e):
                    occ.setdefault(v.name, []).append(("use", here))
            if isinstance(s, N.Assign):
                occ.setdefault(s.name, []).append(("def", here))
            if isinstance(s, N.Atomic) and s.result:  # an old value: nothing to propagate
                occ.setdefault(s.result, []).append(("atomic", here))
            if isinstance(s, N.For):
                for v in s.vars:
                    occ.setdefault(v, []).append(("loop", here))
            for b, blk in enumerate(blocks_of(s)):
                walk(blk, prefix + ((i, b),))
    walk(body, ())
    return occ


def _dominates(d, u):
    """Does the statement at path d run before, and on every path to, the one at path u?"""
    *dpre, di = d
    if len(u) <= len(dpre) or tuple(u[:len(dpre)]) != tuple(dpre):
        return False
    nxt = u[len(dpre)]
    idx = nxt[0] if isinstance(nxt, tuple) else nxt
    return idx > di


def _find_assign(body, path):
    stmts = body
    for step in path[:-1]:
        i, b = step
        stmts = blocks_of(stmts[i])[b]
    return stmts[path[-1]]


def propagate(ir: N.KernelIR) -> N.KernelIR:
    import dataclasses

    occ = _positions(ir.body)
    params = {p.name for p in ir.params}
    defs = {n: [p for k, p in o if k in ("def", "atomic")] for n, o in occ.items()}
    mapping = {}
    for name, o in occ.items():
        ds = defs.get(name, [])
        if not ds or name in params or any(k in ("loop", "atomic") for k, _ in o):
            continue
        zeros = [_find_assign(ir.body, d).value for d in ds]
        if all(isinstance(z, N.Const) and z.value == 0 for z in zeros) and len({z.dtype for z in zeros}) == 1:
            # only ever assigned zero: every read sees 0, also one that no assignment dominates
            # (codegen declares such a local 0 where its scope begins). A reverse sweep writes
            # these: an adjoint zeroed in one branch and read in another `if` on the same
            # condition, whose derivative code then folds away.
            mapping[name] = zeros[0]
            continue
        if len(ds) != 1:
            continue
        s = _find_assign(ir.body, ds[0])
        value = s.value
        if isinstance(value, N.Var):
            src = value.name
            if len(defs.get(src, [])) > 1:
                continue
            if defs.get(src) and not _dominates(defs[src][0], ds[0]):
                continue
        elif not isinstance(value, N.Const):
            continue
        uses = [p for k, p in o if k == "use"]
        if all(_dominates(ds[0], u) for u in uses):
            mapping[name] = value
    if not mapping:
        return ir
    # Resolve chains a -> b -> c.
    changed = True
    while changed:
        changed = False
        for k, v in list(mapping.items()):
            if isinstance(v, N.Var) and v.name in mapping:
                mapping[k] = mapping[v.name]
                changed = True
    body = _rewrite(ir.body, mapping)
    return dataclasses.replace(ir, body=body)


def _rewrite(stmts, mapping):
    out = []
    for s in stmts:
        if isinstance(s, N.Assign) and s.name in mapping:
            continue
        s = map_stmt_exprs(s, lambda e: substitute(e, mapping))
        if isinstance(s, N.Assign) and isinstance(s.value, N.Var) and s.value.name == s.name:
            continue
        blocks = blocks_of(s)
        if blocks:
            s = rebuild_stmt(s, [_rewrite(b, mapping) for b in blocks])
        if isinstance(s, N.If) and isinstance(s.cond, N.Const):  # `elif v > 2.0 and c == 0.0`, c = 0.2
            out.extend(s.then if s.cond.value else s.orelse)
            continue
        if isinstance(s, N.Atomic) and s.op == "add" and isinstance(s.value, N.Const) and s.value.value == 0:
            continue
        out.append(s)
    return tuple(out)
