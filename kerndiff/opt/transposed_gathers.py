"""Reverse kernels: a pair loop's adds into the inner index, gathered by a second loop.

W3's reverse takes each pair (i, j) once and adds both of its contributions: `pos_adj[i]` in a
local, `pos_adj[j]` by a scattered add, which opt.scatter turns into plain adds into a per-thread
private copy. Those stores cost more than the pair's arithmetic: the loop with them stays scalar
(the copies live in an SNode tree of their own, and LLVM's vectorizer gives up on the loop),
while the same loop without them is vectorized eight wide. So where a parallel loop over i runs
a serial loop over j and adds into a field at exactly `[j]`, the adds are taken out of it, and a
second loop, parallel over j with i serial, computes each pair again and keeps only those adds,
summed in a local and added once per j:

    # the adds into pos_adj[j] of: for j in range(n):, gathered for each j
    for j in range(4096):
        pos_adj_0_sum = 0.0
        ...
        for i in range(4096):
            if i != j:
                ...
                pos_adj_0_sum = pos_adj_0_sum - t1_adj
        pos_adj[j][0] += pos_adj_0_sum

Both loops gather and neither scatters. W3's reverse (f32, N = 4096): 14.9 ms against 24.1 with
the private copies (written by hand, session 55; the pass reproduces that kernel).

When: the loop over i is a parallel loop of constant bounds whose body is loop-free statements
around one serial loop over j of constant bounds, or a triangle (`range(i + 1, n)`, `range(0,
i)`: one bound `i + c`, whose trips over i the second loop bounds by j), with no jumps or loops
inside; or a square whose bounds are the kernel's arguments (`for i in range(m): for j in
range(m)`, session 56; not two counts, whose second loop might run over a few j in parallel);
every access to the field in the kernel is an add (adds commute: the order of the float additions
changes, as with atomics); what the adds add depends on no local carried from one trip over j to
the next and reads no field the loop writes, and the statements before the inner loop that it
reads are assignments. Both loops of constant bounds have at least MIN_TRIPS trips (short loops
are cheap either way, and the kernels of small programs keep the source as the user's loop
reads); a square of arguments is gathered whatever its size, which only the launch knows.

Cost: the second loop computes the pair's body again. Measured on W3, that pays for a reverse
kernel's adds into adjoints (1.6x) and for an HVP's adds into adjoints and their tangents
(session 56: 34 ms against 60 through private copies; 23 against 66 with opt.split_ranges'
loops either side of `i == j`), so adds into derivative fields are gathered (`gathered(field)`,
from the registry: not a forward kernel's adds into the user's fields, its primal outputs),
and only where every add at `[j]` in the loop is one. Nor where what the adds need
calls a transcendental function (TRANSCENDENTAL: exp, sin, log, pow of a non-whole power, ...):
the bench's Gaussians, `e += ti.exp(-0.1 * (q[i] - q[j]).norm_sqr())`, took 68.6 ms gathered
against 39.9 through private copies, where Lennard-Jones (`(1.0 / r) ** 6`, a root and
products) took 17.7 against 28.9 and W3's half the pairs 7.8 against 18.4.

On GPUs (every backend takes the pass) the adds it removes are atomics: all the threads of a
warp add into one element at once, and they serialize. On an H200 W3's reverse took 5.4 ms with
them, 1.10 as a hand-written gather and 0.47 with the j-side dropped (session 39, docs/design.md
"warp sums"): two gathering loops are the standard n-body kernel there. The tests run the pass
on Vulkan (lavapipe); no GPU was lent to time it.
"""
from __future__ import annotations

import dataclasses

from ..errors import SrcLoc
from ..ir import build as B
from ..ir import nodes as N
from ..ir.ops import RANDOM, TRANSCENDENTAL
from ..ir.walk import assigned_names, blocks_of, carried_names, expr_children_of_stmt, iter_expr, iter_stmts, \
    loads_in, vars_in
from .dce import dce

MIN_TRIPS = 256  # both loops: below this the private copies (or atomics) are left to do the adds


def gather_pair_adds(ir: N.KernelIR, names, gathered, hoist) -> N.KernelIR:
    """ir with each top-level loop that qualifies (see the module docstring) split in two.
    gathered(field) -> whether adds into the field may be gathered; hoist(loop) -> the loop with
    the loads its inner loop repeats read before it (opt.invariant_loads)."""
    out, changed = [], False
    for s in ir.body:
        split = _split(s, ir, names, gathered, hoist) if isinstance(s, N.For) else None
        out.extend(split or (s,))
        changed = changed or split is not None
    return dataclasses.replace(ir, body=tuple(out)) if changed else ir


def _constant(bounds):
    return len(bounds) == 1 and all(isinstance(b, N.Const) and isinstance(b.value, int) for b in bounds[0])


def _known_at_launch(bounds, params):
    """Bounds of one variable made of constants and the kernel's scalar arguments (`range(m)`):
    the second loop can run over them too."""
    return len(bounds) == 1 and all(not loads_in(b) and {v.name for v in vars_in(b)} <= params for b in bounds[0])


def _offset(e, var):
    """c where e is `var + c` (`var`, `var + 1`, `var - 2`, `1 + var`), else None."""
    if isinstance(e, N.Var) and e.name == var:
        return 0
    if isinstance(e, N.Call) and e.op in ("add", "sub") and len(e.args) == 2:
        a, b = e.args
        if e.op == "add" and isinstance(a, N.Const):
            a, b = b, a
        if isinstance(a, N.Var) and a.name == var and isinstance(b, N.Const) and isinstance(b.value, int):
            return b.value if e.op == "add" else -b.value
    return None


def _transposed(outer, inner, i, jvar):
    """((start, end) of the second loop's j, as ints; (start, end) of its trips over i, expressions
    in j) for the pairs `for i in range(*outer): for j in range(*inner)`, where inner's bounds
    are constants or one of them is `i + c` (a triangle: `range(i + 1, n)`, `range(0, i)`);
    None for other bounds or fewer than MIN_TRIPS trips either way."""
    (lo_i, hi_i), (lo_j, hi_j) = (b.value for b in outer), inner
    dtype = jvar.dtype

    def const(v):
        return B.const(v, dtype)

    if isinstance(lo_j, N.Const) and isinstance(hi_j, N.Const):
        j_range, trips = (lo_j.value, hi_j.value), (const(lo_i), const(hi_i))
    elif isinstance(hi_j, N.Const) and _offset(lo_j, i) is not None:  # i + c <= j < H: i <= j - c
        c, top = _offset(lo_j, i), hi_j.value
        end = B.add(jvar, const(1 - c)) if hi_i >= top - c else B.call("min", const(hi_i), B.add(jvar, const(1 - c)))
        j_range, trips = (lo_i + c, top), (const(lo_i), end)
    elif isinstance(lo_j, N.Const) and _offset(hi_j, i) is not None:  # L <= j < i + c: i >= j - c + 1
        c, bottom = _offset(hi_j, i), lo_j.value
        start = B.add(jvar, const(1 - c)) if bottom - c + 1 >= lo_i else \
            B.call("max", const(lo_i), B.add(jvar, const(1 - c)))
        j_range, trips = (bottom, hi_i - 1 + c), (start, const(hi_i))
    else:
        return None
    if min(hi_i - lo_i, j_range[1] - j_range[0]) < MIN_TRIPS:
        return None
    return j_range, trips


def _transposed_box(outer, inner):
    """_transposed's answer for bounds known at launch alone: the square `for i in range(m): for
    j in range(m)` only (its trips are not known before the launch; a small square costs little
    either way), not a box of two counts, whose second loop would run in parallel over what may
    be a few j (`for j in range(n_species)`) with all of i serial in each."""
    return (inner[0], outer) if len(inner) == 1 and inner[0] == outer else None


def _split(loop, ir, names, gathered, hoist):
    params = {p.name for p in ir.params} - assigned_names(ir.body)  # (as they were at launch)
    if not (loop.parallel and not loop.serialize and len(loop.vars) == 1 and _known_at_launch(loop.bounds, params)):
        return None
    inner = [k for k, s in enumerate(loop.body) if blocks_of(s)]
    if len(inner) != 1 or not isinstance(loop.body[inner[0]], N.For):
        return None
    k = inner[0]
    pre, pairs, post = loop.body[:k], loop.body[k], loop.body[k + 1:]
    if any(blocks_of(s) for s in post) or pairs.parallel or len(pairs.vars) != 1:
        return None
    i, j = loop.vars[0], pairs.vars[0]
    if i in assigned_names(loop.body) or j in assigned_names(pairs.body):  # (a loop variable reassigned)
        return None
    body_stmts = iter_stmts(pairs.body)
    nested = [s for s in iter_stmts(loop.body) if s is not pairs]
    if any(isinstance(s, (N.For, N.While, N.Break, N.Continue, N.Return)) or
           isinstance(s, N.Atomic) and s.result for s in nested):
        return None
    adds = [s for s in body_stmts if isinstance(s, N.Atomic) and s.op == "add" and len(s.index) == 1
            and isinstance(s.index[0], N.Var) and s.index[0].name == j]
    if not adds or not all(gathered(s.ref.field) for s in adds):
        return None  # (where some stay, the first loop keeps its private copies, and the second costs more)
    ranges = _transposed(loop.bounds[0], pairs.bounds[0], i, adds[0].index[0]) if _constant(loop.bounds) else \
        _transposed_box(loop.bounds[0], pairs.bounds)
    if ranges is None:
        return None
    fields = {id(s.ref.field) for s in adds}
    for s in iter_stmts(ir.body):  # every access to those fields an add
        if isinstance(s, N.Store) and id(s.ref.field) in fields or \
                isinstance(s, N.Atomic) and id(s.ref.field) in fields and s.op != "add":
            return None
        if any(id(x.ref.field) in fields for e in expr_children_of_stmt(s) for x in loads_in(e)):
            return None
    needed = _needed(pairs.body, pre, adds)
    if needed is None:
        return None
    written_here = {id(s.ref.field) for s in iter_stmts(loop.body) if isinstance(s, (N.Store, N.Atomic))}
    parts = [x for s in needed for e in expr_children_of_stmt(s) for x in iter_expr(e)]
    if any(isinstance(x, N.Load) and id(x.ref.field) in written_here or isinstance(x, N.Call) and x.op in RANDOM
           for x in parts):
        return None  # (a draw's key may count trips: computed again, it would draw other numbers)
    if any(isinstance(x, N.Call) and x.op in TRANSCENDENTAL and not _whole_power(x) for x in parts):
        return None  # (computed again, an exp costs more than the scattered add it saves)
    return list(_without(loop, k, adds)) + [_gathering(loop, k, adds, ranges, names, hoist)]


def _whole_power(e):
    """`x ** 6`: products, not a call to pow."""
    return e.op == "pow" and isinstance(e.args[1], N.Const) and float(e.args[1].value).is_integer()


def _needed(body, pre, adds):
    """The statements of body and pre that the adds' values (and the conditions around them)
    depend on, or None where one of those reads a local carried from an earlier trip over j."""
    carried = carried_names(body)
    by_name = {}
    for s in list(pre) + iter_stmts(body):
        if isinstance(s, N.Assign):
            by_name.setdefault(s.name, []).append(s)
    conditions = [s.cond for s in iter_stmts(body) if isinstance(s, N.If) and _holds_any(s, adds)]
    todo = [v.name for e in [a.value for a in adds] + conditions for v in vars_in(e)]
    seen, out = set(), list(adds)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in carried:
            return None
        for s in by_name.get(name, ()):
            out.append(s)
            todo.extend(v.name for v in vars_in(s.value))
    return out


def _holds_any(s, adds):
    nested = {id(t) for b in blocks_of(s) for t in iter_stmts(b)}
    return any(id(a) in nested for a in adds)


def _drop(stmts, keep):
    """stmts without the adds `keep` says no to (nested blocks too)."""
    out = []
    for s in stmts:
        if isinstance(s, N.Atomic) and not keep(s):
            continue
        if blocks_of(s):
            s = dataclasses.replace(s, then=_drop(s.then, keep), orelse=_drop(s.orelse, keep)) \
                if isinstance(s, N.If) else dataclasses.replace(s, body=_drop(s.body, keep))
        out.append(s)
    return tuple(out)


def _without(loop, k, adds):
    """The loop with the gathered adds taken out (and what only they used): () where nothing
    else is left of it."""
    ids = {id(a) for a in adds}
    pairs = loop.body[k]
    pairs = dataclasses.replace(pairs, body=_drop(pairs.body, lambda s: id(s) not in ids))
    return dce((dataclasses.replace(loop, body=loop.body[:k] + (pairs,) + loop.body[k + 1:]),))


def _gathering(loop, k, adds, ranges, names, hoist):
    """The second loop: parallel over j, the pairs' trips over i serial inside, the adds summed in
    locals (one per field element the adds name) and added once per j. ranges: _transposed's."""
    pairs = loop.body[k]
    i, j, jvar = loop.vars[0], pairs.vars[0], adds[0].index[0]
    sums = {}  # (field ref) -> the local its adds go to
    for a in adds:
        if a.ref not in sums:
            comp = "".join(f"_{c}" for c in a.ref.component)
            sums[a.ref] = B.var(names.fresh(f"{a.ref.name}{comp}_sum"), a.value.dtype)

    def summed(stmts):
        out = []
        for s in stmts:
            if isinstance(s, N.Atomic):
                if any(s is a for a in adds):
                    out.append(N.Assign(sums[s.ref].name, B.add(sums[s.ref], s.value), src=s.src, tag=s.tag))
                continue  # (every other effect is the first loop's)
            if isinstance(s, (N.Store, N.Print)):
                continue
            if isinstance(s, N.If):
                s = dataclasses.replace(s, then=summed(s.then), orelse=summed(s.orelse))
            out.append(s)
        return tuple(out)

    # (loads the first loop reads once before its pairs loop are read for each pair here: they
    # take the trips' own line)
    head = tuple(dataclasses.replace(s, src=loop.src, tag="") if s.tag == "hoist" else s for s in summed(loop.body[:k]))
    (j_start, j_end), trip_bounds = ranges
    trips = N.For((i,), (trip_bounds,), head + summed(pairs.body), src=loop.src)
    what = ", ".join(dict.fromkeys(f"{ref.name}[{j}]" for ref in sums))
    where = (pairs.src.file, pairs.src.line) if pairs.src else ("<kerndiff>", 0)
    note = SrcLoc(*where, text=f"the adds into {what} of each pair, gathered for each {j}")
    zeros = tuple(N.Assign(v.name, B.const(0.0, v.dtype), src=note) for v in sums.values())
    added = tuple(N.Atomic("add", ref, (jvar,), v, src=SrcLoc(*where, text=f"add those sums into {what}"))
                  for ref, v in sums.items())
    if isinstance(j_start, int):
        j_start, j_end = B.const(j_start, jvar.dtype), B.const(max(j_start, j_end), jvar.dtype)
    bounds = ((j_start, j_end),)
    gathering = N.For((j,), bounds, zeros + (trips,) + added, parallel=True, config=loop.config, src=note)
    gathering = dce((gathering,))[0]
    return hoist(_outside_trips(gathering, i))


def _outside_trips(loop, i):
    """The second loop with the assignments at the head of its trips over i that depend neither
    on i nor on what the trips assign (`e_1_adj = E_adj_v * 0.5`, `E_adj_v = E_adj[None]`: a 0-d
    field the kernel does not write, finalize._hoist) made once, before them."""
    trips_at = next(k for k, s in enumerate(loop.body) if isinstance(s, N.For))
    trips = loop.body[trips_at]
    inside = assigned_names(trips.body) | {i}
    before, kept = [], []
    for n, s in enumerate(trips.body):
        rest = assigned_names(trips.body[n + 1:])
        if not kept and isinstance(s, N.Assign) and not {v.name for v in vars_in(s.value)} & (inside - {s.name}) \
                and s.name not in rest and all(not x.index for x in loads_in(s.value)):
            before.append(s)
            continue
        kept.append(s)
    if not before:
        return loop
    trips = dataclasses.replace(trips, body=tuple(kept))
    return dataclasses.replace(loop, body=loop.body[:trips_at] + tuple(before) + (trips,) + loop.body[trips_at + 1:])
