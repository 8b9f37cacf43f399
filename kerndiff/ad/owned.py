"""Field elements that belong to one parallel iteration become locals before reverse mode.

Neural-network and simulation code in Taichi often builds a result in place:

    for i in y:
        y[i] = b[i]
        for j in range(n):
            y[i] += W[i, j] * x[j]
        y[i] = ti.tanh(y[i])

Read as field traffic this breaks the global data access rule twice (a field read after it was
accumulated into, then overwritten after being read), so the reverse pass would have lost the
values it needs. But every access is `y[i]` with `i` the parallel loop's own index: no other
iteration touches that element, so within the iteration it is just a variable. Rewriting it as
one (`y_i = b[i]; ... y_i = y_i + ...; y_i = ti.tanh(y_i); y[i] = y_i`) keeps the semantics and
leaves the reverse pass ordinary local code to differentiate. The hazard check then runs on the
rewritten kernel, so what still needs a value the kernel destroyed is still refused.

Kernels the rule already accepts are left exactly as written: the rewrite is a second chance for
refused ones, not a change to the code of the others. (It could even turn an accepted kernel
into a refused one: a store inside an `if` followed by a read would need the old value loaded at
the start, which the final store then overwrites.)
"""
from __future__ import annotations

import dataclasses

from ..errors import KernDiffError
from ..ir import build as B
from ..ir import nodes as N
from ..ir.walk import assigned_names, blocks_of, expr_children_of_stmt, iter_expr, iter_stmts, jumps_out, \
    map_expr, map_stmt_exprs, map_stmts, without_prints, writes_floats
from .hazards import ConsumedCotangent, check_overwrites
from .races import check_iteration_races
from .names import NameAllocator


def checked_for_reverse(ir: N.KernelIR, inputs_restored=False) -> N.KernelIR:
    """`ir` if reverse mode can read every value it needs from the fields; else `ir` with owned
    elements promoted to locals, if that version can. Otherwise the refusal names what is still
    wrong once owned elements are locals (`y[i] += x[i]; y[i] = y[i] ** 2` overwrites the old
    value of y[i], rather than racing other iterations as its field traffic suggests).

    inputs_restored: the caller (kd.Tape) puts the fields `restorable_fields` names back to their
    values from before the launch when it runs this reverse, so their old values are not lost.

    A kernel that writes no float (only integer fields, no float return) has nothing to reverse,
    so nothing it reads is needed: a serial count (`slot[i] = count[c]; count[c] += 1`), which
    kd.Tape runs among the other kernels of a step, is not refused for the value it overwrites."""
    if not writes_floats(ir):
        return ir
    check_iteration_races(ir)
    try:
        check_overwrites(ir)
        return ir
    except ConsumedCotangent:
        raise
    except KernDiffError:
        promoted = promote_owned_elements(ir)
        restorable = _restorable(promoted)  # the kernel is refused as written: no need to check again
        if promoted is ir and not restorable:
            raise
    if inputs_restored:
        check_overwrites(promoted, frozenset(id(f) for f in restorable))
        return promoted
    try:
        check_overwrites(promoted)
    except KernDiffError as e:
        if not restorable or _loses_more_than(promoted, restorable):
            raise
        raise KernDiffError(e.reason, e.loc, "launch it inside kd.Tape, which snapshots the fields it updates in "
                                             "place and restores them before its reverse pass") from None
    return promoted


def _loses_more_than(ir, restorable):
    """Whether the kernel destroys values other than the old values of the `restorable` fields."""
    try:
        check_overwrites(ir, frozenset(id(f) for f in restorable))
        return False
    except KernDiffError:
        return True


def restorable_fields(ir: N.KernelIR):
    """The fields whose values from before the launch would let a refused kernel be reversed: each
    one read and written only in one parallel loop, always at the same element that only the
    iteration touches (`x[i] += dt * v[i]` in `for i in x`), or only one trip of its serial loops
    (`b[i, t] = b[i, t] * s` in `for t in range(T)`: _owned_by_trips). A time step updating its state in
    place is the typical case; kd.Tape snapshots them before the launch and restores them before
    the reverse. [] when the kernel needs no such help."""
    ir = dataclasses.replace(ir, body=without_prints(ir.body))
    try:
        check_overwrites(ir)
        return []
    except KernDiffError:
        return _restorable(promote_owned_elements(ir))


def _restorable(ir: N.KernelIR):
    """restorable_fields of a kernel already known to be refused as written."""
    params = {p.name for p in ir.params}
    where = {}  # id(field) -> (field, {top-level groups}, {(kind, index tuple)})
    groups = _top_level_groups(ir.body)
    for pos, group in enumerate(groups):
        for ref, uses in _accesses(group).items():
            f, tops, kinded = where.setdefault(id(ref.field), (ref.field, set(), set()))
            tops.add(pos)
            kinded.update((kind, index) for kind, index, _ in uses)
    out = []
    for f, tops, kinded in where.values():
        indices = {index for _, index in kinded}
        if len(tops) != 1 or not _read_and_written({kind for kind, _ in kinded}):
            continue
        group, index = groups[next(iter(tops))], next(iter(indices))
        if len(indices) != 1:  # a scan in place, its first trip reading the element before the range
            carried_in = isinstance(group[0], N.For) and _carried_in(group[0], f, indices, kinded)
            if not carried_in:
                continue
            index = carried_in[0]
        if isinstance(group[0], N.For):
            if _promotable_loop(group[0], params) and (_owned(index, group[0].vars, params)
                                                       or _owned_by_trips(group[0], f, index, params)):
                out.append(f)
        elif _promotable_run(group, params) and _owned(index, (), params):
            out.append(f)
    return out


def _owned_by_trips(loop, field, index, params):
    """Whether index names one element per trip of the serial loops around every access of field
    in the parallel `loop` (`acc = acc * b[i, t]; b[i, t] = acc` in `for t in range(T)`): each
    loop variable, the parallel loop's and the serial loops', a whole index dimension. No other
    trip touches the element, so a trip reads it before the launch changed it, and the reverse,
    given the field as it was before the launch (kd.Tape restores it), recomputes each trip from
    the values that trip read. Accesses inside a while loop, or under loops of different nests,
    are not: a later trip would read what an earlier one wrote. Nor is a read after the trip
    wrote the element (`b[i, t] = 2.0 * b[i, t]; c[i, t] = b[i, t] ** 2`): the reverse, given the
    field as it was, would read the old value there where the trip read the new one."""
    from .hazards import field_events
    written = False
    for _, kind, f, _, _, _, _ in field_events(loop.body):
        if f is field:
            if kind == "read" and written:
                return False
            written = written or kind != "read"
    around = {}
    for s, loops in _loops_around(loop.body):
        if _touches(s, field):
            around[tuple(map(id, loops))] = loops
    if len(around) != 1:
        return False
    serial = next(iter(around.values()))
    if not serial or not all(isinstance(t, N.For) and not assigned_names(t.body) & set(t.vars) for t in serial):
        return False
    return _owned(index, tuple(loop.vars) + tuple(v for t in serial for v in t.vars), params)


def _loops_around(stmts, loops=()):
    """(statement, the loops around it within stmts) for every statement, nested blocks included."""
    for s in stmts:
        yield s, loops
        inner = loops + (s,) if isinstance(s, (N.For, N.While)) else loops
        for block in blocks_of(s):
            yield from _loops_around(block, inner)


def _touches(s, field):
    """Whether statement s itself (not a block inside it) reads, stores or adds into field."""
    if isinstance(s, (N.Store, N.Atomic)) and s.ref.field is field:
        return True
    return any(isinstance(x, N.Load) and x.ref.field is field for e in expr_children_of_stmt(s) for x in iter_expr(e))


def _top_level_groups(body):
    """The kernel's top level as groups: each loop alone, each run of other statements together."""
    groups = []
    for s in body:
        if isinstance(s, N.For) or not groups or isinstance(groups[-1][0], N.For):
            groups.append((s,))
        else:
            groups[-1] += (s,)
    return groups


def _promotable_run(stmts, params):
    """Statements outside loops that always run to their end and keep the parameters."""
    return not _leaves_iteration(stmts) and not assigned_names(stmts) & params


def promote_owned_elements(ir: N.KernelIR) -> N.KernelIR:
    """`ir` with each element a parallel iteration both reads and writes, and that no other
    iteration can touch, held in a local for the iteration (read once at the start where its old
    value may be needed, stored once at the end)."""
    names = NameAllocator.for_kernel(ir)
    params = {p.name for p in ir.params}
    body = []
    for group in _top_level_groups(ir.body):
        if isinstance(group[0], N.For):
            body.append(_promote_loop(group[0], params, names))
        else:
            body.extend(_promote_run(group, params, names))
    body = tuple(body)
    return ir if body == ir.body else dataclasses.replace(ir, body=body)


def _promote_run(stmts, params, names):
    """Statements outside the kernel's loops run once, in order: an element they read and write
    at one index made of parameters and constants (`loss[None] = ti.sqrt(loss[None])`) is theirs
    alone while they run, a local like an iteration's own element."""
    if not _promotable_run(stmts, params):
        return stmts
    body = stmts
    for ref, uses in _accesses(stmts).items():
        index = uses[0][1]
        if _read_and_written({k for k, _, _ in uses}) and all(u[1] == index for u in uses) \
                and _owned(index, (), params):
            body = _promote(body, ref, index, _accesses(body)[ref], names)
    return body


def _accesses(stmts):
    """{ref: [(kind, index, stmt)]} for every field access in stmts, nested blocks included."""
    out = {}
    for s in iter_stmts(stmts):
        for e in expr_children_of_stmt(s):
            for x in iter_expr(e):
                if isinstance(x, N.Load):
                    out.setdefault(x.ref, []).append(("read", x.index, s))
        if isinstance(s, N.Store):
            out.setdefault(s.ref, []).append(("store", s.index, s))
        elif isinstance(s, N.Atomic):
            out.setdefault(s.ref, []).append((s.op, s.index, s))
    return out


def _owned(index, loop_vars, fixed):
    """Whether index names one element per iteration: every loop variable is a whole index
    dimension, and the other dimensions are built from kernel parameters and constants only."""
    bare = {e.name for e in index if isinstance(e, N.Var) and e.name in loop_vars}
    if bare != set(loop_vars):
        return False
    for e in index:
        if isinstance(e, N.Var) and e.name in loop_vars:
            continue
        if any(isinstance(x, N.Load) or isinstance(x, N.Var) and x.name not in fixed for x in iter_expr(e)):
            return False
    return True


def _leaves_iteration(stmts, continues=True):
    """Whether a statement may end the iteration early (continue or return outside nested loops,
    return anywhere; `continues=False` counts returns only): the store at the end of the body
    would then be skipped."""
    ends = (N.Continue, N.Return) if continues else (N.Return,)
    for s in stmts:
        if isinstance(s, ends):
            return True
        if isinstance(s, N.If) and (_leaves_iteration(s.then, continues) or _leaves_iteration(s.orelse, continues)):
            return True
        if isinstance(s, (N.For, N.While)) and any(isinstance(t, N.Return) for t in iter_stmts(s.body)):
            return True
    return False


def _promotable_loop(s, params):
    """A parallel loop whose iteration ends at its end or at a `continue` (where the element's
    local is stored too: _store_before_continues), and keeps its index variables."""
    return (isinstance(s, N.For) and s.parallel and not _leaves_iteration(s.body, continues=False)
            and not assigned_names(s.body) & (set(s.vars) | params))


def _read_and_written(kinds):
    """Access kinds of an element worth promoting: read, and stored or added to (nothing else)."""
    return "read" in kinds and bool(kinds & {"store", "add"}) and kinds <= {"read", "store", "add"}


def _promote_loop(loop: N.Stmt, params, names):
    if not _promotable_loop(loop, params):
        return loop
    candidates = []
    for ref, uses in _accesses(loop.body).items():
        index = uses[0][1]
        if _read_and_written({k for k, _, _ in uses}) and all(u[1] == index for u in uses) \
                and _owned(index, loop.vars, params):
            candidates.append((ref, index))
    body = loop.body
    for ref, index in candidates:  # each rewrite rebuilds statements: find the uses again
        body = _promote(body, ref, index, _accesses(body)[ref], names)
    body = _promote_trips(body, tuple(loop.vars), _accesses(body), params, names)
    return loop if body == loop.body else dataclasses.replace(loop, body=body)


def _promote_trips(stmts, outer_vars, uses_in_iteration, params, names):
    """stmts with each element that one trip of a serial loop in them reads and writes, and no
    other trip touches (every access in that loop's body itself, at one index of which each loop
    variable around is a whole dimension: _owned_by_trips), held in a local for the trip. A trip
    that breaks out is left as it is (its store would be skipped)."""
    out = []
    for s in stmts:
        if isinstance(s, N.For) and not s.parallel and not assigned_names(s.body) & set(s.vars):
            trip_vars = outer_vars + tuple(s.vars)
            body = s.body
            if not jumps_out(body, (N.Break,)):
                direct = _direct_accesses(body)
                for ref, uses in _accesses(body).items():
                    if len(uses) != len(uses_in_iteration.get(ref, ())) or len(direct.get(ref, ())) != len(uses):
                        continue
                    index = uses[0][1]
                    if _read_and_written({k for k, _, _ in uses}) and all(u[1] == index for u in uses) \
                            and _owned(index, trip_vars, params):
                        body = _promote(body, ref, index, _accesses(body)[ref], names)
                    else:
                        forwarded = _forward_previous_trip(s, body, ref, uses, trip_vars, params, names)
                        if forwarded is not None:
                            before, body = forwarded
                            out.extend(before)
            body = _promote_trips(body, trip_vars, uses_in_iteration, params, names)
            s = s if body == s.body else dataclasses.replace(s, body=body)
        elif isinstance(s, N.If):
            then = _promote_trips(s.then, outer_vars, uses_in_iteration, params, names)
            orelse = _promote_trips(s.orelse, outer_vars, uses_in_iteration, params, names)
            if then != s.then or orelse != s.orelse:
                s = dataclasses.replace(s, then=then, orelse=orelse)
        out.append(s)
    return tuple(out)


MAX_TRIPS_BACK = 8  # scans in place read at most this many trips back (one local each)


def _forward_previous_trip(loop, body, ref, uses, trip_vars, params, names):
    """(statements before `loop`, its body) with each trip's reads of the elements earlier trips
    stored (`b[i, t] = b[i, t - 1] * b[i, t]`, a scan in place; `b[i, t] = b[i, t] * b[i, t - 2]`)
    taken from locals that hold the last trips' values, handed on one place at each trip's end,
    and the trip's own element promoted (_promote): each trip then reads only its own element as
    the launch found it, and, in its first trip, the elements before the range (`b[i, 0]`), which
    no trip writes, so kd.Tape can restore the field for the reverse (_restorable: _carried_in).
    None where the accesses are not of that form: the trip's own element (every loop variable
    around a whole index dimension) written, and read besides only up to MAX_TRIPS_BACK steps
    back along this loop's variable; no continue or break (which would skip handing the values
    on)."""
    if len(loop.vars) != 1 or jumps_out(body) or not _fixed_start(loop):
        return None
    t = loop.vars[0]
    (lo, _), = loop.bounds
    writes = {index for kind, index, _ in uses if kind != "read"}
    if len(writes) != 1 or not all(kind in ("read", "store", "add") for kind, _, _ in uses):
        return None
    index, = writes
    if not _owned(index, trip_vars, params):
        return None
    back = {}  # an index read -> how many trips back it is
    for kind, at, _ in uses:
        if at != index:
            back[at] = _trips_back(index, at, t)
            if back[at] is None:
                return None
    if not back:
        return None
    stem = f"{ref.name}{''.join(f'_{c}' for c in ref.component)}_prev"
    carried = [B.var(names.fresh(stem + (str(d) if d > 1 else "")), ref.dtype)  # b_prev, b_prev2, ...
               for d in range(1, max(back.values()) + 1)]

    def as_carried(e):
        return carried[back[e.index] - 1] if isinstance(e, N.Load) and e.ref is ref and e.index in back else e

    body = map_stmts(body, lambda st: map_stmt_exprs(st, lambda e: map_expr(e, as_carried)))
    body = _promote(body, ref, index, _accesses(body)[ref], names)
    carry_in = tuple(N.Assign(c.name, B.load(ref, _index_at(index, t, lambda v, d=d: _before(lo, v, d))),
                              src=loop.src) for d, c in enumerate(carried, 1))
    first = N.If(B.call("eq", B.var(t, lo.dtype), lo), carry_in, (), src=loop.src)
    handed_on = tuple(N.Assign(c.name, earlier, src=body[-1].src)
                      for c, earlier in zip(carried[::-1], carried[-2::-1] + [body[-1].value]))
    return [N.Assign(c.name, B.const(0, ref.dtype), src=loop.src) for c in carried], (first,) + body + handed_on


def _trips_back(index, at, var):
    """d where `at` is `index` with its dimension `var` replaced by `var - d`, 1 <= d <=
    MAX_TRIPS_BACK (None otherwise)."""
    for d in range(1, MAX_TRIPS_BACK + 1):
        if at == _index_at(index, var, lambda v: B.sub(v, B.const(d, v.dtype))):
            return d
    return None


def _index_at(index, var, value):
    """index with the dimension that is the bare loop variable `var` replaced by value(that Var)
    (None if no dimension is)."""
    if not any(isinstance(e, N.Var) and e.name == var for e in index):
        return None
    return tuple(value(e) if isinstance(e, N.Var) and e.name == var else e for e in index)


def _before(lo, v, d=1):
    """The index d before a loop's start `lo`, in the type of the index `v` it stands for."""
    return B.sub(B.cast(lo, v.dtype), B.const(d, v.dtype))


def _fixed_start(loop):
    """Whether the loop's start is the same wherever its body reads it again: no field reads,
    no local the body assigns."""
    (lo, _), = loop.bounds
    written = assigned_names(loop.body)
    return not any(isinstance(x, N.Load) or isinstance(x, N.Var) and x.name in written for x in iter_expr(lo))


def _carried_in(loop, field, indices, uses):
    """(the index of field's writes, the indices a first trip reads before them) where field's
    accesses in `loop` are those _forward_previous_trip leaves: writes at one index, inside a
    serial loop over t, and reads besides at that index with t set to the loop's start minus 1,
    2, ... up to the farthest back a trip reads: no trip writes those elements (t runs from the
    start). None otherwise."""
    writes = {index for kind, index in uses if kind != "read"}
    if len(writes) != 1 or not 2 <= len(indices) <= MAX_TRIPS_BACK + 1:
        return None
    index, = writes
    others = indices - writes
    starts = None  # the serial loops around every write of field
    for s, loops in _loops_around(loop.body):
        if isinstance(s, (N.Store, N.Atomic)) and s.ref.field is field:
            starts = set(map(id, loops)) if starts is None else starts & set(map(id, loops))
    for s, _ in _loops_around(loop.body):
        if id(s) in (starts or ()) and isinstance(s, N.For) and not s.parallel and len(s.vars) == 1 \
                and _fixed_start(s) and others == _before_range(s, index, len(others)):
            return index, others
    return None


def _before_range(loop, index, count):
    """index at each of the `count` steps before the serial loop's start, along its variable."""
    (lo, _), = loop.bounds
    return {_index_at(index, loop.vars[0], lambda v, d=d: _before(lo, v, d)) for d in range(1, count + 1)}


def _direct_accesses(stmts):
    """_accesses of stmts outside the loops nested in them."""
    out = {}
    for s, loops in _loops_around(stmts):
        if not loops:
            for ref, uses in _accesses((s,) if not blocks_of(s) else ()).items():
                out.setdefault(ref, []).extend(uses)
            for e in expr_children_of_stmt(s) if blocks_of(s) else ():
                for x in iter_expr(e):
                    if isinstance(x, N.Load):
                        out.setdefault(x.ref, []).append(("read", x.index, s))
    return out


def _local_name(ref, index, names):
    comp = "".join(f"_{c}" for c in ref.component)
    dims = "_".join(e.name for e in index if isinstance(e, N.Var))
    return names.fresh(f"{ref.name}{comp}_{dims}" if dims else f"{ref.name}{comp}_v")


def _promote(body, ref, index, uses, names):
    local = B.var(_local_name(ref, index, names), ref.dtype)

    def as_local(e):
        return local if isinstance(e, N.Load) and e.ref is ref else e

    def rewrite(s):
        s = map_stmt_exprs(s, lambda e: map_expr(e, as_local))
        if isinstance(s, N.Store) and s.ref is ref:
            return N.Assign(local.name, s.value, src=s.src, tag=s.tag)
        if isinstance(s, N.Atomic) and s.ref is ref:
            return N.Assign(local.name, B.add(local, s.value), src=s.src, tag=s.tag)
        return s

    first = next(s for s in body if any(u[2] is s for u in uses) or _contains_use(s, uses))
    starts_with_store = (isinstance(first, N.Store) and first.ref is ref
                         and not any(isinstance(x, N.Load) and x.ref is ref for x in iter_expr(first.value)))
    out = [] if starts_with_store else [N.Assign(local.name, B.load(ref, index), src=uses[0][2].src)]
    last_write = [s for kind, _, s in uses if kind != "read"][-1]
    store = N.Store(ref, index, local, src=last_write.src, tag=last_write.tag)
    mapped = map_stmts(body, rewrite)
    # a continue before the first use leaves the element as it was; one from there on stores it
    start = next(k for k, s in enumerate(body) if s is first)
    out += mapped[:start] + _store_before_continues(mapped[start:], store)
    out.append(store)
    return tuple(out)


def _store_before_continues(stmts, store):
    """stmts with `store` before each continue that ends the iteration (those of nested loops end
    a trip of their own loop, and stay as they are)."""
    out = []
    for s in stmts:
        if isinstance(s, N.Continue):
            out.append(store)
        elif isinstance(s, N.If):
            s = dataclasses.replace(s, then=_store_before_continues(s.then, store),
                                    orelse=_store_before_continues(s.orelse, store))
        out.append(s)
    return tuple(out)


def _contains_use(s, uses):
    nested = {id(t) for b in blocks_of(s) for t in iter_stmts(b)}
    return any(id(u[2]) in nested for u in uses)
