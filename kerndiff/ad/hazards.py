"""The global data access rule: reverse mode reads the primal values a kernel read from the fields.

A kernel that overwrites (or accumulates into) a field element after reading it has destroyed a
value its reverse pass needs. Rather than return a wrong gradient, kerndiff refuses, naming the
line, and says what to do instead.
"""
from __future__ import annotations

from ..errors import KernDiffError
from ..ir import nodes as N
from ..ir.walk import assigned_names, blocks_of, expr_children_of_stmt, iter_expr, iter_stmts


def _events(stmts, top=None, out=None, loops=()):
    """(position, kind, field, stmt, top-level loop index, index, enclosing loops) in program order."""
    out = [] if out is None else out
    for i, s in enumerate(stmts):
        t = i if top is None else top
        for e in expr_children_of_stmt(s):
            for x in iter_expr(e):
                if isinstance(x, N.Load):
                    out.append((len(out), "read", x.ref.field, s, t, x.index, loops))
        if isinstance(s, N.Store):
            out.append((len(out), "store", s.ref.field, s, t, s.index, loops))
        elif isinstance(s, N.Atomic):
            out.append((len(out), "atomic", s.ref.field, s, t, s.index, loops))
        for b in blocks_of(s):
            _events(b, t, out, loops + ((s,) if isinstance(s, (N.For, N.While)) else ()))
    return out


def _shift(e, var):
    """c when e is `var + c` for an integer constant c, else None."""
    if isinstance(e, N.Var):
        return 0 if e.name == var else None
    if isinstance(e, N.Call) and e.op == "cast":
        return _shift(e.args[0], var)
    if isinstance(e, N.Call) and e.op in ("add", "sub"):
        a, b = e.args
        sign = 1 if e.op == "add" else -1
        if isinstance(b, N.Const) and isinstance(b.value, int):
            inner = _shift(a, var)
            return None if inner is None else inner + sign * b.value
        if e.op == "add" and isinstance(a, N.Const) and isinstance(a.value, int):
            inner = _shift(b, var)
            return None if inner is None else inner + a.value
    return None


def written_in_an_earlier_trip(write_index, read_index, write_loops, read_loops):
    """In a serial loop (an inner loop, or an outermost one with serialize=True), a read of
    y[k - 1] after the write y[k] = ...: every element the read reaches was written in an earlier
    trip, and by this write never again (it writes each element in one trip only), so the value
    read is the one the field keeps, and the reverse pass reads it back. True when the innermost
    serial loop around both has a dimension where the write is at k + a and the read at k + b
    with a > b."""
    common = [lp for lp, other in zip(write_loops, read_loops) if lp is other]
    for loop in reversed(common):
        if not isinstance(loop, N.For) or (loop.parallel and not loop.serialize):
            continue
        if len(loop.vars) != 1 or loop.vars[0] in assigned_names(loop.body):
            return False
        for w, r in zip(write_index, read_index):
            a, b = _shift(w, loop.vars[0]), _shift(r, loop.vars[0])
            if a is not None and b is not None and a > b:
                return True
        return False
    return False


def launch_constants(ir: N.KernelIR):
    """{local: value} for the locals assigned exactly once in the kernel: as index parts they
    stand for their value (a ti.func argument `t - 1` becomes a local of the inlined body)."""
    count, value = {}, {}
    for s in iter_stmts(ir.body):
        if isinstance(s, N.Assign):
            count[s.name] = count.get(s.name, 0) + 1
            value[s.name] = s.value
    return {name: value[name] for name, c in count.items() if c == 1}


def _affine(e, params, defs=None, depth=0):
    """e as ({param: coeff}, const) if it is an integer affine form of kernel parameters (directly,
    or through locals in `defs` assigned once from such forms), else None."""
    if isinstance(e, N.Const):
        return {}, e.value
    if isinstance(e, N.Var):
        if e.name in params:
            return {e.name: 1}, 0
        if defs and e.name in defs and depth < 16:
            return _affine(defs[e.name], params, defs, depth + 1)
        return None
    if isinstance(e, N.Call) and e.op in ("add", "sub"):
        a, b = _affine(e.args[0], params, defs, depth), _affine(e.args[1], params, defs, depth)
        if a is None or b is None:
            return None
        sign = 1 if e.op == "add" else -1
        coeffs = dict(a[0])
        for k, v in b[0].items():
            coeffs[k] = coeffs.get(k, 0) + sign * v
        return coeffs, a[1] + sign * b[1]
    if isinstance(e, N.Call) and e.op == "mul" and isinstance(e.args[1], N.Const):
        a = _affine(e.args[0], params, defs, depth)
        return None if a is None else ({k: v * e.args[1].value for k, v in a[0].items()}, a[1] * e.args[1].value)
    if isinstance(e, N.Call) and e.op == "cast":
        return _affine(e.args[0], params, defs, depth)
    return None


def disjoint(index_a, index_b, params, defs=None):
    """Can two accesses never touch the same element? True when, in some dimension, both indices
    are affine in the kernel's parameters only (fixed for the whole launch) and differ by a
    nonzero constant — e.g. x[t, i] read and x[t + 1, i] written."""
    for a, b in zip(index_a, index_b):
        fa, fb = _affine(a, params, defs), _affine(b, params, defs)
        if fa is None or fb is None:
            continue
        keys = set(fa[0]) | set(fb[0])
        if all(fa[0].get(k, 0) == fb[0].get(k, 0) for k in keys) and fa[1] != fb[1]:
            return True
    return False


def check_overwrites(ir: N.KernelIR, exempt=frozenset()):
    """Refuse a kernel whose reverse pass would need a value the kernel destroyed. `exempt`: ids of
    fields the caller restores to their values from before the launch (kd.Tape, ad/owned.py)."""
    params, defs = {p.name for p in ir.params}, launch_constants(ir)
    ev = [e for e in _events(ir.body) if id(e[2]) not in exempt]
    reads = {}
    for pos, kind, f, s, top, index, loops in ev:
        if kind == "read":
            reads.setdefault(id(f), []).append((pos, s, top, index, loops))
    for pos, kind, f, s, top, index, loops in ev:
        if kind == "read" or id(f) not in reads:
            continue
        for rpos, rs, rtop, rindex, rloops in reads[id(f)]:
            if disjoint(index, rindex, params, defs):
                continue
            if kind == "store" and written_in_an_earlier_trip(index, rindex, loops, rloops):
                continue
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


def footprints(ir: N.KernelIR):
    """Per field access: (field, 'read'|'write', index pattern) where each index dimension is an
    affine form of the kernel's parameters (evaluated per launch by `concrete`) or None (any)."""
    params, defs = {p.name for p in ir.params}, launch_constants(ir)
    out = []
    for pos, kind, f, s, top, index, _ in _events(ir.body):
        out.append((f, "read" if kind == "read" else "write", tuple(_affine(e, params, defs) for e in index)))
    return out


def concrete(pattern, values: dict):
    """Evaluate an index pattern with the launch's scalar arguments (None stays 'any element')."""
    out = []
    for form in pattern:
        if form is None:
            out.append(None)
        else:
            coeffs, const = form
            out.append(const + sum(c * values[k] for k, c in coeffs.items()))
    return tuple(out)


def overlap(a, b):
    return all(x is None or y is None or x == y for x, y in zip(a, b))
