"""Flow-sensitive dead-store elimination (backward liveness over structured code).

Reverse mode recomputes primal values in a forward sweep and again in each backward iteration;
values the forward sweep computes that are overwritten before anything reads them are dead even
though the local itself is live. This pass removes such assignments. Loops iterate to a fixed
point (a parallel loop's iterations share no locals, so its body is swept once); break/continue
make the liveness at the loop's exit and head flow in.
"""
from __future__ import annotations

import dataclasses

from ..ir import nodes as N
from ..ir.walk import expr_children_of_stmt, vars_in


def _uses(s):
    out = set()
    for e in expr_children_of_stmt(s):
        out.update(v.name for v in vars_in(e))
    return out


class Sweep:
    def __init__(self):
        self.loops = []  # (live at exit, live at head) of enclosing loops

    def block(self, stmts, live):
        """(new statements, live-in) given the set live after the block."""
        out = []
        live = set(live)
        for s in reversed(stmts):
            s, live = self.stmt(s, live)
            if s is not None:
                out.append(s)
        out.reverse()
        return tuple(out), live

    def stmt(self, s, live):
        if isinstance(s, N.Assign):
            if s.name not in live:
                return None, live
            live = (live - {s.name}) | _uses(s)
            return s, live
        if isinstance(s, N.Atomic) and s.result:  # `slot = ti.atomic_add(count[c], 1)`
            return s, (live - {s.result}) | _uses(s)
        if isinstance(s, (N.Store, N.Atomic, N.Return, N.Print)):
            return s, live | _uses(s)
        if isinstance(s, N.Break):
            return s, live | self.loops[-1][0] if self.loops else live
        if isinstance(s, N.Continue):
            return s, live | self.loops[-1][1] if self.loops else live
        if isinstance(s, N.If):
            then, lt = self.block(s.then, live)
            orelse, le = self.block(s.orelse, live)
            if not then and not orelse:
                return None, live if not _uses(s) else live
            return dataclasses.replace(s, then=then, orelse=orelse), lt | le | _uses(s)
        if isinstance(s, N.For) and s.parallel:
            # the iterations of a parallel loop share no locals: none flows from the end of its
            # body round to its start
            self.loops.append((live, live))  # (a continue ends the iteration)
            body, body_in = self.block(s.body, live)
            self.loops.pop()
            return dataclasses.replace(s, body=body), live | (body_in - set(s.vars)) | _uses(s)
        if isinstance(s, (N.For, N.While)):
            # head: live where an iteration starts, before a For assigns its variables (each
            # iteration assigns them anew, so they are never live there, nor before the loop)
            fresh = set(s.vars) if isinstance(s, N.For) else set()
            head = set(live)
            while True:
                self.loops.append((live, head))
                body, body_in = self.block(s.body, live | head)
                self.loops.pop()
                new_head = head | (body_in - fresh) | _uses(s)
                if new_head == head:
                    break
                head = new_head
            if isinstance(s, N.For) and not s.parallel and not body:
                return None, live | _uses(s)
            return dataclasses.replace(s, body=body), live | head
        return s, live | _uses(s)


def remove_dead_stores(ir: N.KernelIR) -> N.KernelIR:
    body, _ = Sweep().block(ir.body, set())
    return dataclasses.replace(ir, body=body)
