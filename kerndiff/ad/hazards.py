"""The global data access rule: reverse mode reads the primal values a kernel read from the fields.

A kernel that overwrites (or accumulates into) a field element after reading it has destroyed a
value its reverse pass needs. Rather than return a wrong gradient, kerndiff refuses, naming the
line, and says what to do instead.
"""
from __future__ import annotations

import re

from ..errors import KernDiffError
from ..ir import nodes as N
from ..runtime.registry import REGISTRY
from ..ir.walk import assigned_names, blocks_of, expr_children_of_stmt, iter_expr, iter_stmts


def field_events(stmts, top=None, out=None, loops=()):
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
            field_events(b, t, out, loops + ((s,) if isinstance(s, (N.For, N.While)) else ()))
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
    read is the one the field keeps, and the reverse pass reads it back. True when a serial loop
    around both has a dimension where the write is at k + a and the read at k + b with a > b.
    That loop need not be the innermost: in a time loop `for t in range(T)` (serialize=True) over
    `for i in range(n): x[t + 1, i] = f(x[t, i], x[t, i + 1])`, the loop over i relates the two
    accesses in no dimension, but the one over t does, whatever the inner loops do: the write
    reaches row t + a in trip t only, and a read of that row comes in trip t + a - b, later."""
    common = [lp for lp, other in zip(write_loops, read_loops) if lp is other]
    for loop in reversed(common):
        if not isinstance(loop, N.For) or (loop.parallel and not loop.serialize):
            continue
        if len(loop.vars) != 1 or loop.vars[0] in assigned_names(loop.body):
            continue
        for w, r in zip(write_index, read_index):
            a, b = _shift(w, loop.vars[0]), _shift(r, loop.vars[0])
            if a is not None and b is not None and a > b:
                return True
    return False


def _rewritten_in_a_later_trip(write_index, read_index, write_loops, read_loops):
    """A read after the write in the body of a serial loop around both (`b[i, t] = acc; acc +=
    b[i, (t + 1) % T]`): the write runs again in the later trips, after the read, and may
    overwrite the element it read, whose value the reverse pass then no longer finds. Not where,
    for every serial loop around both, some index dimension shows that no later trip of that
    loop writes what this trip read (_no_later_trip_reaches: the write at k + a and the read at
    k + b with a >= b reads this trip's element or an earlier one's). A while loop's trips have
    no variable: a read after the write there is always one."""
    common = [lp for lp, other in zip(write_loops, read_loops) if lp is other]
    for loop in common:
        if isinstance(loop, N.For) and loop.parallel and not loop.serialize:
            continue
        if not isinstance(loop, N.For) or len(loop.vars) != 1 or loop.vars[0] in assigned_names(loop.body):
            return True
        if not any(_no_later_trip_reaches(_linear(w, loop.vars[0]), _linear(r, loop.vars[0]))
                   for w, r in zip(write_index, read_index)):
            return True
    return False


def _no_later_trip_reaches(write, read):
    """For one index dimension, the write at m k + a and the read at m k + b ((m, a), (m, b) from
    _linear): whether no later trip k' > k writes the element trip k read, m (k' - k) = b - a
    having no solution k' - k >= 1 (`c[2 t]` beside `c[2 t + 1]`: never; `c[t + 1]` beside
    `c[t + 2]`: the next trip)."""
    if write is None or read is None or write[0] != read[0] or write[0] == 0:
        return False
    m, gap = write[0], read[1] - write[1]
    return gap % m != 0 or gap // m < 1


def _linear(e, var):
    """(m, c) when e is m * var + c for integers m and c (built of var, integer constants, +, -,
    * by a constant and casts), else None."""
    if isinstance(e, N.Var):
        return (1, 0) if e.name == var else None
    if isinstance(e, N.Const):
        return (0, e.value) if isinstance(e.value, int) else None
    if isinstance(e, N.Call) and e.op == "cast":
        return _linear(e.args[0], var)
    if isinstance(e, N.Call) and e.op in ("add", "sub", "mul"):
        a, b = (_linear(x, var) for x in e.args)
        if a is None or b is None:
            return None
        if e.op == "add":
            return a[0] + b[0], a[1] + b[1]
        if e.op == "sub":
            return a[0] - b[0], a[1] - b[1]
        if a[0] == 0 or b[0] == 0:
            return a[0] * b[1] + b[0] * a[1], a[1] * b[1]
    return None


def _each_trip_adds_its_own(s, write_index, read_index, write_loops, read_loops):
    """An add (`c[t] += f(c[t - 1])`) in a serial loop whose trips read what earlier trips added
    (written_in_an_earlier_trip) is the same case as a store: the value read is the one the field
    keeps, and an add's own derivative needs no value. Unless a parallel loop runs the
    recurrence in several iterations at once (`for i in range(n): for t in ...: c[t] += c[t - 1]`):
    then each iteration must own the elements it reaches (`c[i, t]`, `c[i, t - 1]`), or the value
    read depends on the order Taichi runs them in (the refusal that follows in check_overwrites)."""
    from .races import own_element

    if not (isinstance(s, N.Atomic) and s.op in ("add", "sub")):
        return False
    common = [lp for lp, other in zip(write_loops, read_loops) if lp is other]
    return all(own_element(write_index, read_index, lp) for lp in common
               if isinstance(lp, N.For) and lp.parallel and not lp.serialize)


def _in_serial_order(loops):
    """Whether the outermost of the loops around an access runs its trips in order (a serialized
    or otherwise serial top-level loop): no parallel iterations around it."""
    return bool(loops) and isinstance(loops[0], N.For) and (loops[0].serialize or not loops[0].parallel)


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


def disjoint(index_a, index_b, params, defs=None, ranges_a=None, ranges_b=None):
    """Can two accesses never touch the same element? True when, in some dimension, both indices
    are affine in the kernel's parameters only (fixed for the whole launch) and differ by a
    nonzero constant — e.g. x[t, i] read and x[t + 1, i] written — or, given the ranges of the
    loop variables around each access (header_ranges), both lie in constant ranges that do not
    meet: y[i] read for i in range(1, n) and y[0] written."""
    for a, b in zip(index_a, index_b):
        fa, fb = _affine(a, params, defs), _affine(b, params, defs)
        if fa is not None and fb is not None:
            keys = set(fa[0]) | set(fb[0])
            if all(fa[0].get(k, 0) == fb[0].get(k, 0) for k in keys) and fa[1] != fb[1]:
                return True
        ra, rb = _range_of(a, ranges_a or {}), _range_of(b, ranges_b or {})
        if ra is not None and rb is not None and (ra[1] < rb[0] or rb[1] < ra[0]):
            return True
    return False


def header_ranges(loops, memo):
    """{variable: (lowest, highest)} for the header variables of `loops` (the loops around an
    access) that have constant bounds and are not reassigned in their bodies. memo: per kernel,
    by the loops' identities (each access has its own tuple of the same loops)."""
    key = tuple(id(loop) for loop in loops)
    if key not in memo:
        ranges = {}
        for loop in loops:
            if isinstance(loop, N.For):
                reassigned = assigned_names(loop.body)
                for v, (lo, hi) in zip(loop.vars, loop.bounds):
                    if isinstance(lo, N.Const) and isinstance(hi, N.Const) and v not in reassigned:
                        ranges[v] = (lo.value, hi.value - 1)
        memo[key] = ranges
    return memo[key]


def _range_of(e, ranges):
    """(lowest, highest) value of an index part affine (_affine) in the variables of `ranges`."""
    form = _affine(e, ranges)
    if form is None or not isinstance(form[1], int):
        return None
    low = high = form[1]
    for v, c in form[0].items():
        ends = (c * ranges[v][0], c * ranges[v][1])
        low, high = low + min(ends), high + max(ends)
    return low, high


def check_overwrites(ir: N.KernelIR, exempt=frozenset()):
    """Refuse a kernel whose reverse pass would need a value the kernel destroyed. `exempt`: ids of
    fields the caller restores to their values from before the launch (kd.Tape, ad/owned.py)."""
    params, defs = {p.name for p in ir.params}, launch_constants(ir)
    ev = [e for e in field_events(ir.body) if id(e[2]) not in exempt]
    memo, paths = {}, branch_paths(ir.body)
    reads = {}
    for pos, kind, f, s, top, index, loops in ev:
        # an atomic max/min reads its result back too: its reverse finds the winning
        # contributions by comparing them with the value it left in the field (ad/minmax.py)
        if kind == "read" or _is_minmax(s):
            reads.setdefault(id(f), []).append((pos, s, top, index, loops))
    for pos, kind, f, s, top, index, loops in ev:
        if kind == "read" or id(f) not in reads:
            continue
        for rpos, rs, rtop, rindex, rloops in reads[id(f)]:
            if disjoint(index, rindex, params, defs, header_ranges(loops, memo), header_ranges(rloops, memo)):
                continue
            if _is_minmax(rs) and _is_minmax(s):
                # later maxima (minima) into it: each reverse compares with the final result, and a
                # loop whose contributions did not reach it passes the adjoint on unchanged (max
                # and min mixed in one loop: minmax.check_placement)
                continue
            if written_in_an_earlier_trip(index, rindex, loops, rloops) and \
                    (kind == "store" or _each_trip_adds_its_own(s, index, rindex, loops, rloops)):
                continue
            if kind == "store" and in_exclusive_branches(s, rs, index, rindex, paths):
                continue
            same_stmt = rs is s
            if rpos < pos or same_stmt or kind == "store" and _rewritten_in_a_later_trip(index, rindex, loops, rloops):
                if counts_minmax_winners(ir):
                    raise _minmax_count_lost(ir)
                if kind == "store" and _clears_an_adjoint(s):
                    raise ConsumedCotangent(f, s)
                name = REGISTRY.name_of(f)
                what = f"overwrites '{name}'" if kind == "store" else f"adds into '{name}'" if s.op == "add" \
                    else f"updates '{name}' by ti.atomic_{s.op}"
                where = "" if not rs.src or same_stmt else \
                    f", at line {rs.src.line} ('{rs.src.text.strip()}')"
                needs = f"the reverse pass finds the winners of ti.atomic_{rs.op} by comparing them with " \
                    "the result it left" if _is_minmax(rs) else "the reverse pass needs the value that was read"
                remedy = "write the result to a new field (out[i] = f(x[i])), or split the kernel in two and use " \
                    "kd.Tape, which keeps overwritten values"
                if kind == "store" and any(isinstance(t, N.For) and not t.parallel for t in loops):
                    # (a serial loop's running value kept in the field: `b[i, t] = b[i, t - 1] * b[i, t]`)
                    remedy = "write the result to a new field, or carry the running value in a local so that " \
                             f"each trip reads and then stores its own element only (e.g. acc = acc * {name}[i, t]; " \
                             f"{name}[i, t] = acc) and launch the kernel inside kd.Tape, which restores the " \
                             "field for the reverse pass"
                if rpos > pos and not same_stmt:
                    where += ", in a later trip of the loop around both"
                raise KernDiffError(
                    f"this kernel {what} after {'taking ti.atomic_' + rs.op + ' into' if _is_minmax(rs) else 'reading'}"
                    f" it{where}; {needs}", s.src, remedy)
            if kind == "atomic" and rtop == top:
                why = "a trip may read an element that a later trip adds into, and the reverse pass reads the " \
                      "value the field keeps" if _in_serial_order(loops) else \
                      "the value read depends on the order of the parallel iterations"
                raise KernDiffError(f"this loop reads a field it accumulates into ('{REGISTRY.name_of(f)}'); {why}",
                                    rs.src, "read it in a later loop or a later kernel")


def branch_paths(stmts, path=(), loops=(), out=None):
    """{id(statement): ((if statement, branch taken, loops around the if), ...)}: the branches of
    the ifs a statement is nested in, outermost first, each with the loops around that if; None
    for a statement object that occurs in two places (a transform may reuse one), whose branches
    are not one thing."""
    out = {} if out is None else out
    for s in stmts:
        out[id(s)] = path if out.get(id(s), path) is path else None
        if isinstance(s, N.If):
            for side, block in enumerate((s.then, s.orelse)):
                branch_paths(block, path + ((s, side, loops),), loops, out)
        else:
            for block in blocks_of(s):
                branch_paths(block, path, loops + (s,), out)
    return out


def in_exclusive_branches(store, read, store_index, read_index, paths):
    """A store into the element a read took, the two in the two branches of one if: `if c:
    use(g[i]) else: g[i] = ...`. Each run of the if takes one branch, so when the if runs once per
    iteration of a parallel loop (no other loop around it: kernel scope, or the outermost loop
    alone) and the element is the iteration's own (the same index, every loop variable of that
    loop a whole dimension of it), no iteration reads the element after it was overwritten: the
    value the reverse pass reads back is the one read."""
    if paths[id(store)] is None or paths[id(read)] is None:
        return False
    for (if_a, side_a, loops), (if_b, side_b, _) in zip(paths[id(store)], paths[id(read)]):
        if if_a is not if_b:
            return False
        if side_a == side_b:
            continue
        if tuple(store_index) != tuple(read_index) or len(loops) > 1:
            return False
        if not loops:
            return True
        loop = loops[0]
        dims = {e.name for e in store_index if isinstance(e, N.Var)}
        return isinstance(loop, N.For) and set(loop.vars) <= dims and not (assigned_names(loop.body) & dims)
    return False


def _is_minmax(s):
    return isinstance(s, N.Atomic) and s.op in ("max", "min")


def refuse_reading_results(ir: N.KernelIR, primal: N.KernelIR, path: str):
    """Refuse to reverse a derivative kernel that reads the primal kernel's results.

    k.reverse reads what the primal wrote (`out[i] = x[i] ** 2` in one loop, read by the next;
    the sum of a kernel-scope `s +=`), as Taichi's grad does; k.reverse.forward reads their
    tangents, which k.forward wrote. A reverse pass over k.reverse would treat those values as
    inputs of their own and return the partial derivative with them held fixed, missing every
    path through them: a wrong H·v with no sign of it. Nothing at this level could add the
    missing paths (that would be the primal's own reverse pass at the next level), so this
    refuses instead. Fields the derivative kernel writes itself, and adjoints (its seeds), are
    inputs in their own right."""
    written = {id(s.ref.field) for s in iter_stmts(primal.body) if isinstance(s, (N.Store, N.Atomic))}
    own = {id(s.ref.field) for s in iter_stmts(ir.body) if isinstance(s, (N.Store, N.Atomic))}
    for s in iter_stmts(ir.body):
        for e in expr_children_of_stmt(s):
            for x in iter_expr(e):
                if isinstance(x, N.Load) and id(x.ref.field) not in own and id(_dual_base(x.ref.field)) in written:
                    base = _dual_base(x.ref.field)
                    name = f"'{REGISTRY.name_of(base)}'"
                    if REGISTRY.scratch_kind(base) == "reduce":  # frontend/loops.py: `s += ...` in a loop
                        name = f"the sum {re.sub(r'_sum(_[0-9]+)?$', '', name[1:-1])}"
                    raise KernDiffError(
                        f"{path} would reverse a derivative kernel that reads {name}, which the kernel itself "
                        f"writes: it would hold {name} fixed and miss how it depends on the inputs",
                        s.src, "take second derivatives in forward mode over reverse: k.reverse.forward (H·v, "
                               "what kd.hvp runs) or k.forward.reverse")


def refuse_old_values(reverse: N.KernelIR, ir: N.KernelIR, path: str):
    """Refuse a reverse kernel that needs an atomic's old value after dead-code elimination. The
    frontend (ad/old_values.py) refuses old values that reach a float through locals and the
    control they decide; this net catches what goes through a field and comes back into a local
    in the reverse: where the kernel overwrites an integer field after reading it, the reverse
    recomputes the value read from the expression stored (`cell[t] = s % 4` read back as `s % 4`),
    which reads the old value `s`. The reverse drops the atomic (it writes no float) and would
    read `s` undefined, a zero: a silently wrong derivative. Running the atomic again instead
    would hand out other values, in another order, and count twice."""
    from ..frontend.exprs import old_value_refused
    from ..ir.walk import assigned_names, old_value_atomics, used_names
    kept = old_value_atomics(reverse.body)
    if kept:
        needed = kept[0]
    else:
        fetched = {s.result: s for s in old_value_atomics(ir.body)}
        missing = (used_names(reverse.body) - assigned_names(reverse.body)) & set(fetched)
        if not missing:
            return
        needed = fetched[sorted(missing)[0]]
    called = needed.src.text[needed.src.col:].split("(")[0].strip() if needed.src is not None else ""
    name = called or f"ti.atomic_{needed.op}"  # as the source spells it (atomic_sub is an add here)
    raise old_value_refused(name, needed.src, f"where {path} needs it (through a field the kernel overwrites after "
                                              "reading it, whose value read the reverse computes again)")


def _dual_base(field):
    """The field whose (possibly nested) dual `field` is; field itself if it is none."""
    parent = REGISTRY.parents.get(id(field))
    while parent is not None and parent[1] == "dual":
        field = parent[0]
        parent = REGISTRY.parents.get(id(field))
    return field


class ConsumedCotangent(KernDiffError):
    """The refusal for reversing a reverse kernel (k.reverse.reverse) of a kernel that overwrites
    an output (`b[i] = f(a[i])`). As the API specifies, that reverse kernel reads b's adjoint and
    then clears it (the overwritten value influenced nothing), so the cotangent it consumed is gone
    when its own reverse pass would need it. Nothing can restore it: kd.Tape's snapshots are for
    fields a user's kernel updates in place, and owned.checked_for_reverse passes this on as is."""

    def __init__(self, adjoint_field, store):
        parent = REGISTRY.parents.get(id(adjoint_field))
        output = REGISTRY.name_of(parent[0]) if parent else REGISTRY.name_of(adjoint_field)
        super().__init__(
            f"this kernel overwrites '{output}', so its reverse kernel reads {output}'s adjoint and then "
            f"clears it (the overwritten value influenced nothing); a reverse pass over that reverse kernel "
            f"(k.reverse.reverse) would need the adjoint it cleared",
            store.src,
            f"take second derivatives in forward mode over reverse: k.reverse.forward (H·v, what kd.hvp "
            f"runs) or k.forward.reverse; or accumulate into a cleared field ({output}[...] += ...), whose "
            f"reverse kernel leaves {output}'s adjoint as it found it")


def _clears_an_adjoint(store):
    """Is this the `y_adj[e] = 0` a reverse kernel writes after reading the adjoint of an
    overwritten y (ad/reverse.py)?"""
    parent = REGISTRY.parents.get(id(store.ref.field))
    return parent is not None and parent[1] == "adjoint" and isinstance(store.value, N.Const) \
        and store.value.value == 0


def counts_minmax_winners(ir: N.KernelIR):
    """Is this a derivative kernel of an atomic max/min? They count the winners in a helper field
    (ad/minmax.py); the user's kernel passed this check before they were made, so what they
    destroy is their own bookkeeping: the count, and the result the winners are compared with."""
    return any(isinstance(s, (N.Atomic, N.Store)) and REGISTRY.scratch_kind(s.ref.field) == "minmax"
               for s in iter_stmts(ir.body))


def _minmax_count_lost(ir: N.KernelIR):
    """The refusal for reversing a derivative kernel of an atomic max/min (k.forward.reverse,
    k.reverse.reverse): it counts the winners in a helper field and clears the count before it
    returns (ad/minmax.py), so its own reverse pass would divide by a count that is gone."""
    def is_count_pass(s):  # where a reverse kernel recomputes which contributions won
        return isinstance(s, N.If) and any(isinstance(t, N.Atomic) and REGISTRY.scratch_kind(t.ref.field) == "minmax"
                                           for t in s.then)
    atomic = next((s for s in iter_stmts(ir.body) if s.src is not None and (
        isinstance(s, N.Atomic) and s.op in ("max", "min") or is_count_pass(s))), None)
    return KernDiffError(
        "the derivative kernels of an atomic max/min count the winning contributions in a helper field "
        "and clear it before they return, so they cannot be differentiated again in reverse mode "
        "(k.forward.reverse, k.reverse.reverse)",
        atomic.src if atomic is not None else None,
        "take second derivatives of this kernel in forward mode: k.reverse.forward (H·v, what kd.hvp runs) "
        "or k.forward.forward")


def footprints(ir: N.KernelIR):
    """Per field access: (field, 'read'|'write', index pattern) where each index dimension is an
    affine form of the kernel's parameters (evaluated per launch by `concrete`) or None (any)."""
    params, defs = {p.name for p in ir.params}, launch_constants(ir)
    out = []
    for pos, kind, f, s, top, index, _ in field_events(ir.body):
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
