"""Scattered accumulation into per-thread private copies, on the CPU (for speed only).

Why: the reverse of a gather `pos[ends[s][0]]` is a scatter `pos_adj[ends[s][0]] += g`, and the
forward of a scatter is another one. Inside a parallel loop those are atomic float adds; on a CPU
each is a locked compare-and-swap loop that also stops the core from overlapping the next cache
misses, so a scatter-bound reverse kernel runs at a fraction of the speed of the same code with
plain adds. Taichi's own `kernel.grad()` pays this in full.

What: the parallel loop is cut into chunks of consecutive iterations. A chunk claims one of T
private copies of the scattered fields (T = Taichi's CPU worker threads; a claim is one atomic on
a flag, released at the chunk's end), adds into it with plain loads and stores, and after the
loop a second loop adds the copies into the real fields and zeroes them again:

    for chunk in range(1024):
        slot = claim_slot(pos_adj_busy)
        for s in range(chunk * 3907, ti.min(chunk * 3907 + 3907, 4000000)):
            ...
            pos_adj_private[slot, a][0] = pos_adj_private[slot, a][0] + g
        ti.atomic_and(pos_adj_busy[slot], 0)
    for i in range(1000000):
        pos_adj[i][0] = pos_adj[i][0] + (pos_adj_private[0, i][0] + pos_adj_private[1, i][0])
        ...

Correct under any schedule: a copy belongs to one chunk at a time (the claim is atomic), each
chunk runs on one thread, and the sum happens after the loop. Only the order of the float
additions changes, as it does between runs with atomics.

Slices: where every add into a field in the loop has the same loop-invariant index in some
dimensions (a time-stepped simulation's `x_adj[t, a] += g`, t a kernel argument), only the slice
those fix is copied: the copies are `x_adj_private[slot, a]`, and the sum adds them into
`x_adj[t, i]`. The copies then cost what one step's slice costs, not the whole history.

Inside the chunks, adds into a single element (a shared parameter's adjoint, `k_adj[None] += g`)
accumulate in a local per chunk and are added once at its end: Taichi reduces such adds per
thread in a plain parallel loop, but not inside a chunk's serial loop.

When: a field is privatized in a loop if every access to it there is an atomic add, the loop runs
at least 1024 iterations counting those of its inner loops (a pair loop over 256 particles
qualifies: Taichi spreads even short loops over its threads, in blocks of n / (32 T) iterations,
and an atomic add costs several plain ones even where no other thread contends for its element; the
few short loops of a small kernel keep their atomics, and their source stays short), and the loop
adds into it at least T/2 times as often as its slice has elements (so the extra pass over the T
copies costs less than the atomics it saves), within a memory cap; otherwise the atomics stay. An
inner loop whose bounds are not constants counts the difference of their midpoints over the outer
loops' ranges (`range(i + 1, n)`: half the pairs), or once where they read other values (the
estimates: opt.trip_counts). A loop over several indices, `ti.ndrange(B, H)`, is cut into chunks of
its first index, each running its rows whole, or where the first index has fewer than 1024 values,
into chunks of one value of it and a run of the second index. Adds into a single element (0-d
fields, or every index fixed) are left to Taichi, which already reduces those per thread.

Bounds known at launch: where the loop's bounds are kernel arguments (or a field's value), so is
its work. The kernel then holds both versions, chunks over private copies and the loop as written
with its atomic adds, and a condition computed before them, on the same estimates with the
arguments' values, empties the ranges of the one that does not run:

    iterations = ti.cast(n, ti.f32)
    use_copies = iterations >= 2.0 and iterations * ti.cast(n, ti.f32) >= 1024.0 and ...
    per_chunk = ti.max((n - 1) // 1024 + 1, 1)
    for chunk in range(ti.select(use_copies, 1024, 0)):
        ...
    for i0 in range(ti.select(use_copies, 2048, 0)):
        ...  # the copies' sum
    for i_1 in range(ti.select(use_copies, n, 0), n):
        ...  # the loop as it was, its locals renamed

(An `if` around each would stop Taichi running the loops in parallel: only a kernel's outermost
loops are.) Such a kernel has its loop body twice, and Taichi compiles both.
"""
from __future__ import annotations

import dataclasses
import math

from ..errors import SrcLoc
from ..ir import build as B
from ..ir import nodes as N
from ..ir.types import bits, default_fp, is_float
from ..ir.walk import (assigned_names, expr_children_of_stmt, iter_expr, iter_stmts, loads_in,
                       map_stmts, renamed_block, vars_in)
from .algebra import collected
from .trip_counts import (apply_op, as_expr, atomic_weights, estimated_trips, fold, trip_count, with_ranges,
                          work)

CHUNKS_PER_THREAD = 512   # enough chunks per worker for Taichi to balance the threads' loads
MIN_TRIPS = 2 * CHUNKS_PER_THREAD  # the first index's values that make chunks of runs of it
MIN_WORK = MIN_TRIPS      # iterations, inner loops' included: fewer keep their atomics
MIN_ADDS_PER_ELEMENT = 1  # below this the pass over the copies costs more than the atomics
MEMORY_CAP = 256 << 20    # bytes of private copies per loop


def _first_trips(loop):
    """How many values the loop's first index takes."""
    lo, hi = loop.bounds[0]
    return int(hi.value) - int(lo.value)


def _chunkable(loop):
    """Enough work to be worth chunks (MIN_WORK iterations, inner loops' included) in at least
    two iterations of the loop itself, which must have constant bounds."""
    n = trip_count(loop)
    return n is not None and n >= 2 and work(loop) >= MIN_WORK


def _chunks(loop, chunk, body, threads):
    """(number of chunks, the statements that run chunk `chunk`'s iterations of `body`, a note on
    what a chunk is). A chunk is a run of the first index's values, each with its rows whole; when
    the first index has too few values to give every thread many chunks, a chunk is one value of
    it (assigned, not looped over) and a run of the second index's values instead."""
    (lo, hi), *rest = loop.bounds
    n, target = _first_trips(loop), CHUNKS_PER_THREAD * threads
    if n >= MIN_TRIPS or not rest:
        per = -(-n // min(n, target))
        start = B.add(lo, B.mul(chunk, B.const(per, "i32")))
        end = B.add(start, B.const(per, "i32"))  # the last chunk is cut at hi where per does not divide n
        run = N.For(loop.vars, ((start, end if n % per == 0 else B.call("min", end, hi)), *rest), body)
        what = ("iteration" if not rest else "row") + ("s" if per > 1 else "")
        return -(-n // per), [run], f"chunks of {'one' if per == 1 else per} {what}"
    (lo2, hi2), *more = rest
    n2 = int(hi2.value) - int(lo2.value)
    per = -(-n2 // min(n2, -(-target // n)))
    blocks = -(-n2 // per)
    row = N.Assign(loop.vars[0], B.add(lo, B.call("floordiv", chunk, B.const(blocks, "i32"))))
    start = B.add(lo2, B.mul(B.call("mod", chunk, B.const(blocks, "i32")), B.const(per, "i32")))
    run = N.For(loop.vars[1:], ((start, B.call("min", B.add(start, B.const(per, "i32")), hi2)), *more), body)
    values = "one value" if per == 1 else f"{per} values"
    return n * blocks, [row, run], f"chunks of {values} of {loop.vars[1]} for one {loop.vars[0]}"


def _not_only_added(loop):
    """ids of the fields the loop reads, stores or combines other than by atomic add."""
    out = set()
    for s in iter_stmts(loop.body):
        for e in expr_children_of_stmt(s):
            out.update(id(x.ref.field) for x in iter_expr(e) if isinstance(x, N.Load))
        if isinstance(s, N.Store) or (isinstance(s, N.Atomic) and s.op != "add"):
            out.add(id(s.ref.field))
    return out


def _candidates(loop, threads, launch=frozenset(), trips=None):
    """Fields this loop only atomically adds into, each with the condition (a constant where the
    loop's bounds are) that it adds into them often enough for private copies to pay. trips: as
    for work."""
    if any(isinstance(s, (N.Return, N.Break)) for s in iter_stmts(loop.body)):
        return []
    other = _not_only_added(loop)
    n = estimated_trips(loop, {}, launch) if trips is None else trips
    adds, fields, indices = {}, {}, {}
    for s, w in atomic_weights(loop.body, with_ranges(loop, {}, launch), launch):
        f = s.ref.field
        if s.op == "add" and id(f) not in other and 1 <= len(s.ref.shape) <= 3 and is_float(s.ref.dtype):
            adds[id(f)] = apply_op("add", adds.get(id(f), 0), apply_op("mul", n, w))
            fields[id(f)] = s.ref
            indices.setdefault(id(f), []).append(s.index)
    varying = _varying(loop)
    chosen, memory = [], 0
    for fid, ref in fields.items():
        fixed = _fixed_dims(indices[fid], varying)
        kept = tuple(d for k, d in enumerate(ref.shape) if k not in fixed)
        kept_offset = tuple(o for k, o in enumerate(ref.offset) if k not in fixed)
        if not kept:
            continue
        numel = math.prod(kept) * _components(ref.field)
        size = threads * numel * bits(ref.dtype) // 8
        # the pass over the copies reads threads * numel values; the atomics it replaces run on
        # all threads too: worth it from about one add per element per pair of threads
        needed = MIN_ADDS_PER_ELEMENT * numel * max(1, threads // 2)
        pays = adds[fid] >= needed if isinstance(adds[fid], (int, float)) \
            else B.call("ge", adds[fid], as_expr(float(needed)))
        if pays is not False and memory + size <= MEMORY_CAP:
            chosen.append((Privatized(ref.field, fixed, kept, kept_offset), pays))
            memory += size
    return chosen


@dataclasses.dataclass(frozen=True)
class Privatized:
    """A field the loop adds into through private copies: `fixed` maps the dimensions every add
    indexes with one loop-invariant expression to that expression; the copies have the shape of
    the other dimensions (`kept`, indexed from `kept_offset` like the field), after the slot."""
    field: object
    fixed: dict
    kept: tuple
    kept_offset: tuple

    def private_index(self, slot, index):
        return (slot,) + tuple(e for k, e in enumerate(index) if k not in self.fixed)

    def real_index(self, kept_index):
        rest = iter(kept_index)
        ndim = len(self.fixed) + len(self.kept)
        return tuple(self.fixed[k] if k in self.fixed else next(rest) for k in range(ndim))


def _varying(loop):
    """Names whose value can differ between the loop's iterations: its variables and what it assigns."""
    return assigned_names(loop.body) | set(loop.vars)


def _fixed_dims(indices, varying):
    """Dimensions in which every index is the same expression, one that reads no field and no name
    the loop assigns (so it has the same value in every iteration, and after the loop)."""
    fixed = {}
    for k, e in enumerate(indices[0]):
        if all(ix[k] == e for ix in indices) and not loads_in(e) \
                and not {v.name for v in vars_in(e)} & varying:
            fixed[k] = e
    return fixed


def _components(field):
    n = getattr(field, "n", 1) or 1
    m = getattr(field, "m", 1) or 1
    return n * m


def privatize_scatters(ir: N.KernelIR, names, threads: int, copies_for, ref_of, display=None) -> N.KernelIR:
    """Rewrite each outermost parallel loop that qualifies (see the module docstring).

    copies_for([(field, shape of its copies, their offset)], threads) -> ({id(field): private field},
    busy flags);
    ref_of(field, component) -> the interned FieldRef;
    display(field, aliases) -> the name this kernel's source gives a field: the copies, which
    loops over fields of the same types and shapes share in every kernel, are named after this
    kernel's fields (`x_adj_private`, `x_adj_busy`) through ir.field_aliases.
    """
    made = []  # (copy, the field it serves, suffix)

    def named_copies(specs, count):
        private, busy = copies_for(specs, count)
        made.extend((private[id(f)], f, "_private") for f, _, _ in specs)
        made.append((busy, specs[0][0], "_busy"))
        return private, busy

    out = []
    known = {p.name for p in ir.params}  # names whose values the kernel has before the next loop
    for s in ir.body:
        if isinstance(s, N.For) and s.parallel and not s.serialize:
            if trip_count(s) is None:
                rewritten = _rewrite_at_launch(s, known, names, threads, named_copies, ref_of)
            else:
                fields = [p for p, _ in _candidates(s, threads)] if _chunkable(s) else []
                rewritten = fields and _rewrite(s, fields, names, threads, named_copies, ref_of)
            if rewritten:
                out.extend(rewritten)
                continue
        out.append(s)
        if isinstance(s, N.Assign):
            known.add(s.name)
    aliases, own = dict(ir.field_aliases), {}
    for copy, f, suffix in made if display else ():  # (two loops sharing copies: the first names them)
        own.setdefault(id(copy), display(f, aliases) + suffix)
    return dataclasses.replace(ir, body=tuple(out), field_aliases=ir.field_aliases + tuple(own.items()))


def _rewrite_at_launch(loop, known, names, threads, copies_for, ref_of):
    """A loop whose bounds are known only at launch (kernel arguments, a field's value): the
    chunks over private copies and the loop as it was, both, each with ranges that a condition on
    the loop's work, computed before them, leaves empty when the other is the one to run. None
    where no field could pay for copies."""
    pre, bounds = [], []
    for pair in loop.bounds:
        fixed = []
        for e, what in zip(pair, ("start", "end")):
            if not isinstance(e, (N.Const, N.Var)):  # read once, before the loops that use it
                v = B.var(names.fresh(what), e.dtype)
                pre.append(N.Assign(v.name, e))
                e = v
            fixed.append(e)
        bounds.append(tuple(fixed))
    loop = dataclasses.replace(loop, bounds=tuple(bounds))
    bound_names = {e.name for pair in loop.bounds for e in pair if isinstance(e, N.Var)}
    launch = (known | bound_names) - assigned_names(loop.body) - set(loop.vars)
    trips = B.var(names.fresh("iterations"), default_fp())
    loop_work = work(loop, launch, trips)
    fields = _candidates(loop, threads, launch, trips)
    if not fields:
        return None
    tests = [B.call("ge", loop_work, as_expr(float(MIN_WORK)))]
    if loop_work != trips:  # (a loop without inner loops: its work is its iterations, >= 2 already)
        tests.insert(0, B.call("ge", trips, as_expr(2.0)))
    tests += [pays for _, pays in fields if pays is not True]
    tests = list(dict.fromkeys(_tidied(t) for t in tests))  # once each: fields added into alike pay alike
    use = B.var(names.fresh("use_copies"), "i32")
    lo, hi = loop.bounds[0]
    target = CHUNKS_PER_THREAD * threads
    per = B.var(names.fresh("per_chunk"), "i32")
    n = B.sub(hi, lo)
    note = _note(loop, "at launch: private copies where the loop's work pays for them, else its atomic adds")
    pre += [N.Assign(trips.name, B.cast(as_expr(estimated_trips(loop, {}, launch)), default_fp()), src=note),
            N.Assign(use.name, fold("and", tests), src=note),
            N.Assign(per.name, B.call("max", B.add(B.call("floordiv", B.sub(n, B.const(1, n.dtype)),  # no overflow
                                                           B.const(target, n.dtype)), B.const(1, n.dtype)),
                                      B.const(1, n.dtype)))]
    chunked = _rewrite(loop, [p for p, _ in fields], names, threads, copies_for, ref_of, at_launch=(use, per))
    # its locals under names of their own: locals both loops share would be declared before them,
    # one variable for every thread
    own = {v: names.fresh(v) for v in sorted(assigned_names(loop.body) | set(loop.vars))}
    atomics, = renamed_block((loop,), own)
    atomics = dataclasses.replace(atomics, bounds=((B.select(use, hi, lo), hi),) + atomics.bounds[1:],
                                  src=_note(loop, "where copies would not pay: the loop with atomic adds"), tag="note")
    return pre + chunked + [atomics]


def _tidied(test):
    """A test `estimate >= bound` of the launch condition with the estimate's like terms collected
    (`n * m * 2.0 + n + n`); a test the constructors folded to a constant as it is."""
    if isinstance(test, N.Call) and test.op == "ge":
        return B.call("ge", collected(test.args[0]), test.args[1])
    return test


def _rewrite(loop, fields, names, threads, copies_for, ref_of, at_launch=None):
    """at_launch: None, or (the flag that copies are used, iterations per chunk) for a loop whose
    bounds are known only at launch; the chunks and sums then run only where the flag is set."""
    private, busy = copies_for([(p.field, p.kept, p.kept_offset) for p in fields], threads)
    plan = {id(p.field): p for p in fields}
    busy_ref = ref_of(busy, ())
    slot = B.var(names.fresh("slot"), "i32")
    chunk = B.var(names.fresh("chunk"), "i32")
    comps = {}  # id(field) -> components added into

    def to_private(s):
        if isinstance(s, N.Atomic) and id(s.ref.field) in private:
            p = ref_of(private[id(s.ref.field)], s.ref.component)
            comps.setdefault(id(s.ref.field), {})[s.ref.component] = s.ref
            index = plan[id(s.ref.field)].private_index(slot, s.index)
            return N.Store(p, index, B.add(B.load(p, index), s.value), src=s.src, tag=s.tag)
        return s

    body = map_stmts(loop.body, to_private)
    body, sums_before, sums_after = _chunk_sums(body, _single_element_adds(loop), names)
    if at_launch is None:
        chunks, inner, kind = _chunks(loop, chunk, body, threads)
        chunks = B.const(chunks, "i32")
    else:
        use, per = at_launch
        inner, kind = _chunks_at_launch(loop, chunk, body, per)
        chunks = B.select(use, B.const(CHUNKS_PER_THREAD * threads, "i32"), B.const(0, "i32"))
    what = ", ".join(sorted({r.name for c in comps.values() for r in c.values()}))
    claim = N.Assign(slot.name, N.Call("i32", "claim_slot", (B.load(busy_ref, (B.const(0, "i32"),)),)),
                     src=_note(loop, f"{kind}, each adding into one thread's private copy of {what}"))
    release = N.Atomic("and", busy_ref, (slot,), B.const(0, "i32"))
    k = B.var(names.fresh("k"), "i32")
    reset = N.For((k.name,), ((B.const(0, "i32"), B.const(threads, "i32")),),
                  (N.Store(busy_ref, (k,), B.const(0, "i32")),), parallel=True)
    chunked = N.For((chunk.name,), ((B.const(0, "i32"), chunks),),
                    (claim, *sums_before, *inner, *sums_after, release), parallel=True, src=loop.src, tag=loop.tag)
    return [reset, chunked] + _sums(comps, private, plan, names, threads, ref_of, loop,
                                    None if at_launch is None else at_launch[0])


def _chunks_at_launch(loop, chunk, body, per):
    """(the statements that run chunk `chunk`'s iterations of body, a note): runs of `per` values
    of the first index (a local set at launch), each with its rows whole; chunks past the end
    are empty."""
    (lo, hi), *rest = loop.bounds
    start = B.add(lo, B.mul(chunk, per))
    run = N.For(loop.vars, ((start, B.call("min", B.add(start, per), hi)), *rest), body)
    return [run], f"chunks of {per.name} {'iterations' if not rest else 'rows'}"


def _single_element_adds(loop):
    """Keys (field, component, index) of the loop's atomic adds into one element (a 0-d field such
    as a shared parameter's adjoint, or an index every iteration shares) of a float field it
    neither reads nor stores: Taichi reduces those per thread in a plain parallel loop, but not
    inside the chunks, where each would stay an atomic on one contended address."""
    varying = _varying(loop)
    other = _not_only_added(loop)
    keys = set()
    for s in iter_stmts(loop.body):
        if isinstance(s, N.Atomic) and s.op == "add" and is_float(s.ref.dtype) and id(s.ref.field) not in other \
                and _fixed_dims([s.index], varying).keys() == set(range(len(s.index))):
            keys.add((id(s.ref.field), s.ref.component, s.index))
    return keys


def _chunk_sums(body, keys, names):
    """Adds into one element (keys) accumulate in a local per chunk, added once at its end:
    (body, statements before the chunk's iterations, statements after)."""
    sums = {}  # key -> (local, ref)

    def to_local(s):
        key = (id(s.ref.field), s.ref.component, s.index) if isinstance(s, N.Atomic) else None
        if key in keys:
            if key not in sums:
                sums[key] = (B.var(names.fresh(f"{s.ref.name}_chunk"), s.ref.dtype), s.ref)
            local = sums[key][0]
            return N.Assign(local.name, B.add(local, s.value), src=s.src, tag=s.tag)
        return s

    body = map_stmts(body, to_local)
    before = [N.Assign(v.name, B.const(0, v.dtype)) for v, _ in sums.values()]
    after = [N.Atomic("add", ref, key[2], v) for key, (v, ref) in sums.items()]
    return body, before, after


def _sums(comps, private, plan, names, threads, ref_of, loop, use=None):
    """One parallel loop per shape of copies: real[i] += sum of the copies; copies[k, i] = 0.
    use: None, or the flag without which the copies were not used (the loops are then empty)."""
    by_shape = {}
    for fid, refs in comps.items():
        for ref in refs.values():
            by_shape.setdefault(tuple(zip(plan[fid].kept_offset, plan[fid].kept)), []).append(ref)
    loops = []
    for shape, refs in by_shape.items():
        idx = [B.var(names.fresh(f"i{d}"), "i32") for d in range(len(shape))]
        body = []
        for ref in refs:
            p = ref_of(private[id(ref.field)], ref.component)
            total = B.sum_of([B.load(p, (B.const(t, "i32"),) + tuple(idx)) for t in range(threads)], ref.dtype)
            real = plan[id(ref.field)].real_index(idx)
            body.append(N.Store(ref, real, B.add(B.load(ref, real), total)))
            body.extend(N.Store(p, (B.const(t, "i32"),) + tuple(idx), B.const(0, ref.dtype))
                        for t in range(threads))
        what = ", ".join(sorted({r.name for r in refs}))
        ranges = [(B.const(o, "i32"), B.const(o + d, "i32")) for o, d in shape]
        if use is not None:
            ranges[0] = (ranges[0][0], B.select(use, ranges[0][1], ranges[0][0]))
        loops.append(N.For(tuple(v.name for v in idx), tuple(ranges), tuple(body),
                           parallel=True, src=_note(loop, f"add the private copies into {what}, "
                                                           "and zero them"), tag="note"))
    return loops


def _note(loop, text):
    where = loop.src
    return SrcLoc(where.file if where else "<kerndiff>", where.line if where else 0, text=text)
