"""The global data access rule: reverse mode reads the primal values a kernel read from the fields.

A kernel that overwrites (or accumulates into) a field element after reading it has destroyed a
value its reverse pass needs. Rather than return a wrong gradient, kerndiff refuses, naming the
line, and says what to do instead.
"""
from __future__ import annotations

from ..errors import KernDiffError
from ..ir import nodes as N
from ..ir.walk import blocks_of, expr_children_of_stmt, iter_expr


def _events(stmts, top=None, out=None):
    """(position, kind, field, stmt, top-level loop index) in program order."""
    out = [] if out is None else out
    for i, s in enumerate(stmts):
        t = i if top is None else top
        for e in expr_children_of_stmt(s):
            for x in iter_expr(e):
                if isinstance(x, N.Load):
                    out.append((len(out), "read", x.ref.field, s, t))
        if isinstance(s, N.Store):
            out.append((len(out), "store", s.ref.field, s, t))
        elif isinstance(s, N.Atomic):
            out.append((len(out), "atomic", s.ref.field, s, t))
        for b in blocks_of(s):
            _events(b, t, out)
    return out


def check_overwrites(ir: N.KernelIR):
    ev = _events(ir.body)
    reads = {}
    for pos, kind, f, s, top in ev:
        if kind == "read":
            reads.setdefault(id(f), []).append((pos, s, top))
    for pos, kind, f, s, top in ev:
        if kind == "read" or id(f) not in reads:
            continue
        for rpos, rs, rtop in reads[id(f)]:
            same_stmt = rs is s
            if rpos < pos or same_stmt:
                what = "overwrites" if kind == "store" else "accumulates into"
                raise KernDiffError(
                    f"this kernel {what} a field it read before ('{rs.src.text.strip() if rs.src else '?'}'); "
                    "the reverse pass needs the value that was read",
                    s.src, "write the result to a new field (out[i] = f(x[i])), or split the kernel in two "
                           "and use kd.Tape, which keeps overwritten values")
            if kind == "atomic" and rtop == top:
                raise KernDiffError("this loop reads a field it accumulates into; the value read depends on "
                                    "the order of the parallel iterations", rs.src,
                                    "read it in a later loop or a later kernel")
