"""Inside `if j == 0:`, j is 0: a local the branch does not assign is replaced there by the value
its condition fixes, so what the branch computes from it folds. The adjoint of `v[j]`, added under
`if j == 0:`, then reads `v[0]` instead of the whole `v[0] if j == 0 else v[1] if ...` chain, and
under `if j != 1 and j != 0:` the chain is down to its last choice."""
from __future__ import annotations

import dataclasses

from ..ir import build as B
from ..ir import nodes as N
from ..ir.conditions import conjuncts, fixed_value
from ..ir.walk import assigned_names, blocks_of, map_expr, map_stmt_exprs, map_stmts, rebuild_stmt


def use_branch_facts(stmts):
    out = []
    for s in stmts:
        if isinstance(s, N.If):
            then = _with_facts(s.then, s.cond)
            s = rebuild_stmt(s, [use_branch_facts(then), use_branch_facts(s.orelse)])
        elif blocks_of(s):
            s = rebuild_stmt(s, [use_branch_facts(b) for b in blocks_of(s)])
        out.append(s)
    return tuple(out)


def _with_facts(block, cond):
    """block with what cond's conjuncts say of locals it does not assign: `j == 0` makes j 0,
    `j != 1` makes `j == 1` false (and `j != 1` true). Field indices keep their locals: `y[i]`
    stays the loop's own element under `if i == 0:` (as `y[0]` it would not be, and the analyses
    that let an iteration overwrite its own elements would refuse the kernel)."""
    values, known = {}, {}
    for c in conjuncts(cond):
        fact = fixed_value(c)
        if fact is not None and isinstance(fact[0], N.Var):
            values[fact[0].name] = fact[1]
        elif isinstance(c, N.Call) and c.op == "ne" and isinstance(c.args[0], N.Var) \
                and isinstance(c.args[1], N.Const):
            known[B.call("eq", *c.args)] = B.const(0, c.dtype)
            known[c] = B.const(1, c.dtype)
    assigned = assigned_names(block)
    values = {n: v for n, v in values.items() if n not in assigned}
    known = {e: v for e, v in known.items() if e.args[0].name not in assigned}
    if not values and not known:
        return block

    def node(x):
        return values.get(x.name, x) if isinstance(x, N.Var) else known.get(x, x)

    def rewrite(e):
        return map_expr(e, node, indices=False)

    def statement(s):
        if isinstance(s, (N.Store, N.Atomic)):
            return dataclasses.replace(s, value=rewrite(s.value))
        return map_stmt_exprs(s, rewrite)
    return map_stmts(block, statement)
