"""Replace break / continue by flags, so reverse mode sees structured code only.

`break` sets a flag that guards the rest of the body and, for later iterations, the whole body
(a `while` also tests it in its condition); `continue` sets a flag that guards the rest of the
iteration. The trip count of a `for` is unchanged — iterations after a break do nothing — which
is what lets reverse mode replay loops exactly. Only reverse mode uses this; the primal and
forward kernels keep their real break and continue.
"""
from __future__ import annotations

import dataclasses

from ..ir import build as B
from ..ir import nodes as N


def _jumps_here(stmts):
    """Does this block break/continue its own loop (not counting nested loops)?"""
    found = set()
    for s in stmts:
        if isinstance(s, N.Break):
            found.add("break")
        elif isinstance(s, N.Continue):
            found.add("continue")
        elif isinstance(s, N.If):
            found |= _jumps_here(s.then) | _jumps_here(s.orelse)
    return found


def _clear(flags):
    cond = None
    for f in flags:
        c = B.call("eq", B.var(f, "i32"), B.const(0, "i32"))
        cond = c if cond is None else B.call("and", cond, c)
    return cond


def _guard(stmts, brk, cont):
    out = []
    flags = [f for f in (brk, cont) if f]
    for i, s in enumerate(stmts):
        if isinstance(s, N.Break):
            out.append(N.Assign(brk, B.const(1, "i32"), src=s.src))
            return out
        if isinstance(s, N.Continue):
            out.append(N.Assign(cont, B.const(1, "i32"), src=s.src))
            return out
        if isinstance(s, N.If) and _jumps_here([s]):
            out.append(dataclasses.replace(s, then=tuple(_guard(s.then, brk, cont)),
                                           orelse=tuple(_guard(s.orelse, brk, cont))))
            rest = _guard(stmts[i + 1:], brk, cont)
            if rest:
                out.append(N.If(_clear(flags), tuple(rest), src=s.src))
            return out
        out.append(s)
    return out


def eliminate_jumps(stmts, names):
    out = []
    for s in stmts:
        if isinstance(s, (N.For, N.While)):
            body = eliminate_jumps(s.body, names)
            found = _jumps_here(body)
            if found:
                brk = names.fresh("broke") if "break" in found else None
                cont = names.fresh("skip") if "continue" in found else None
                new = _guard(list(body), brk, cont)
                if cont:
                    new = [N.Assign(cont, B.const(0, "i32"), src=s.src)] + new
                if brk:
                    out.append(N.Assign(brk, B.const(0, "i32"), src=s.src))
                    if isinstance(s, N.For):
                        new = [N.If(_clear([brk]), tuple(new), src=s.src)]
                    else:
                        s = dataclasses.replace(s, cond=B.call("and", s.cond, _clear([brk])))
                body = tuple(new)
            s = dataclasses.replace(s, body=tuple(body))
        elif isinstance(s, N.If):
            s = dataclasses.replace(s, then=tuple(eliminate_jumps(s.then, names)),
                                    orelse=tuple(eliminate_jumps(s.orelse, names)))
        out.append(s)
    return tuple(out)
