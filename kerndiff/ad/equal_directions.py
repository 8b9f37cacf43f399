"""Second derivatives along one direction: k.forward.forward when both levels are seeded alike.

A Laplacian, a Hessian's diagonal or a curvature along a line seeds the two forward levels of
`k.forward.forward` with the same direction (`kd.dual(x)` and `kd.dual(x, 2)` hold the same
values). Then the level-2 tangent of every primal value equals its level-1 tangent, and the
kernel as generated computes each of them twice: four sums per neuron of an MLP where three
would do. The variant built here is the same level-2 forward transform of the same level-1
kernel, except that the tangent of a load of a primal field reads the field's level-1 dual
instead of its level-2 dual (`x_dual2[p]` becomes `x_dual[p]`); the two tangent computations
then become the same expressions, which the optimizer's CSE (and LLVM) merge. Only the mixed
tangent is computed on its own. The kernel launches the variant when the seeds are equal, else
the kernel as generated (runtime/kernel.py).

Why the variant computes what the generic kernel computes: at every substituted load of
`dual_b(g)[i]` the generic kernel would read the level-b tangent of g[i]'s current value, and
the variant reads `dual_a(g)[i]`, the level-a tangent of the same value (written in pairs with
g; see below). Both are derivatives of that value, as a function of the elements the kernel read
at launch, along the launch's level-a and level-b directions; those are the same direction when
every element read at launch has equal duals of both levels. So the conditions are:

- equal activity: a field read has a dual of one level exactly when it has one of the other;
- g's primal stores (and adds) and its level-a dual's come in pairs (same block, same index, no
  load of g and no jump between them), so that no load sees one written without the other; no
  atomic max/min;
- equal seeds on the elements read at launch: checked at launch (whole fields compared) for each
  field read, unless every load of it reads an element the kernel wrote before in the same
  thread: a loop over constant bounds writing `h1[p, j]` for every j, before a later statement
  reads `h1[p, k]` with k within those bounds (coverage, below). An MLP's hidden layers are
  written so; comparing their duals at launch would cost as much as the variant saves.
"""
from __future__ import annotations

import dataclasses

from ..ir import nodes as N
from ..ir.types import is_float
from ..ir.walk import assigned_names, blocks_of, expr_children_of_stmt, iter_stmts, loads_in, vars_in, without_prints
from ..runtime.registry import REGISTRY
from .activity import read_refs, written_fields
from .hazards import _range_of, header_ranges


@dataclasses.dataclass(frozen=True)
class Variant:
    """The equal-directions kernel and what must hold at launch to run it."""
    ir: N.KernelIR
    seed_pairs: tuple  # (level-a dual, level-b dual) fields to compare at launch


def equal_directions_variant(inner: N.KernelIR, level_a: int, level_b: int):
    """The Variant of forward(inner) at level_b, for inner the level-a forward kernel; None where
    the conditions above cannot be shown (the kernel as generated then always runs)."""
    from ..opt import optimize
    from .forward import forward_kernel

    inner = dataclasses.replace(inner, body=without_prints(inner.body))
    fields = _fields(inner.body)
    if any(REGISTRY.internal(f) for f in fields.values()) or not _same_activity(inner, fields, level_a, level_b):
        return None
    if any(isinstance(s, N.Atomic) and s.op in ("max", "min") for s in iter_stmts(inner.body)):
        return None  # their forward mode keeps winners' tangents by passes of its own (ad/minmax.py)
    substituted = {}  # id(g) -> g: primal fields whose tangent loads read level a

    def level_a_dual(field):
        return REGISTRY.get(field, "dual", level_a)

    def loaded_dual(dual_b):
        def read(ref):
            d = dual_b(ref)
            if d is None or _is_dual(ref.field, level_a):
                return d
            substituted[id(ref.field)] = ref.field
            return REGISTRY.ref(level_a_dual(ref.field), ref.component)
        return read

    raw = forward_kernel(inner, level_b, loaded_dual)
    seed_pairs = []
    for g in substituted.values():
        family = (id(g), id(level_a_dual(g)))
        if any(isinstance(s, N.Atomic) and s.op != "add" and id(s.ref.field) in family for s in iter_stmts(inner.body)):
            return None
        if not _stores_paired(inner.body, g, level_a_dual(g)):
            return None
        if not _every_load_covered(inner.body, g):
            seed_pairs.append((level_a_dual(g), REGISTRY.get(g, "dual", level_b)))
    return Variant(optimize(raw), tuple(seed_pairs))


def _same_activity(inner, fields, level_a, level_b):
    """Whether each field the level-a kernel names (other than level-a duals) has a dual at both
    levels or at neither: one at one level only makes the two directions differ. A field the
    kernel writes has both (the transforms make them)."""
    written = {id(f) for f in written_fields(inner.body)}
    for f in fields.values():
        if is_float(REGISTRY.ref(f).dtype) and not _is_dual(f, level_a) and id(f) not in written and \
                (REGISTRY.get(f, "dual", level_a) is None) != (REGISTRY.get(f, "dual", level_b) is None):
            return False
    return True


def _is_dual(field, level):
    parent = REGISTRY.parents.get(id(field))
    return parent is not None and parent[1] == "dual" and parent[2] == level


def _fields(stmts):
    """{id: field} of the fields stmts read or write."""
    fields = [r.field for r in read_refs(stmts)] + written_fields(stmts)
    return {id(f): f for f in fields}


def _loads(stmt, field):
    """Whether stmt, or a statement nested in it, loads an element of `field`."""
    return any(r.field is field for r in read_refs((stmt,)))


def _jumps(stmts):
    """Whether a break, continue or return among stmts (not inside a nested loop) can leave the
    block they are in part-way."""
    for s in stmts:
        if isinstance(s, (N.Break, N.Continue, N.Return)):
            return True
        if isinstance(s, N.If) and (_jumps(s.then) or _jumps(s.orelse)):
            return True
    return False


# ------------------------------------------------------------------------------ pairs
def _writes(s, fields):
    """Whether s stores or adds into one of `fields`."""
    return isinstance(s, (N.Store, N.Atomic)) and s.ref.field in fields


def _stores_paired(block, g, g_dual):
    """Every store or add into g or g_dual (g's level-a dual) has its partner later in the same
    block (the same kind of write, component and index), with nothing between them (nor in them)
    loading g, and no jump. Adds then keep the two levels equal as stores do (an add racing
    another thread's load of the element is a race in the kernel as written, too)."""
    matched = set()
    for i, s in enumerate(block):
        if _writes(s, (g, g_dual)) and i not in matched:
            other = g_dual if s.ref.field is g else g
            j = next((j for j in range(i + 1, len(block)) if j not in matched and _partner(block[j], s, other)), None)
            if j is None:
                return False
            between = block[i:j + 1]
            if any(_loads(t, g) for t in between) or _jumps(block[i + 1:j]):
                return False
            if set().union(*(_names_in(e) for e in s.index)) & assigned_names(block[i + 1:j]):
                return False
            matched.update((i, j))
        for b in blocks_of(s):
            if not _stores_paired(b, g, g_dual):
                return False
    return True


def _partner(t, s, other):
    return type(t) is type(s) and t.ref.field is other and t.ref.component == s.ref.component \
        and t.index == s.index and getattr(t, "op", None) == getattr(s, "op", None)


def _names_in(e):
    return {x.name for x in vars_in(e)}


# ------------------------------------------------------------------------------ coverage
def _every_load_covered(stmts, g):
    """Whether every load of g reads an element that an earlier statement of the same thread
    wrote whole: a store, or a nest of loops over constant bounds around one (no branch or jump
    on the way), whose index covers the load's."""
    memo = {}
    return all(_covered(load, path, memo) for load, path in _loads_with_paths(stmts, g, ()))


def _loads_with_paths(stmts, g, path):
    """(load, path) for each load of g; path: ((block, position), ...) from the kernel's body down
    to the statement that evaluates the load."""
    for i, s in enumerate(stmts):
        here = path + ((stmts, i),)
        for e in expr_children_of_stmt(s):
            for x in loads_in(e):
                if x.ref.field is g:
                    yield x, here
        for b in blocks_of(s):
            yield from _loads_with_paths(b, g, here)


def _covered(load, path, memo):
    for depth, (block, pos) in enumerate(path):
        # the loops between this block and the load (the load's own statement evaluates it outside
        # any loop of its own: a loop's bounds)
        ranges = header_ranges(tuple(blk[p] for blk, p in path[depth:-1] if isinstance(blk[p], N.For)), memo)
        for w in range(pos):
            for index, loop_ranges in _whole_writes(block[w], load.ref):
                if _contains(index, loop_ranges, load.index, ranges, block[w:pos + 1]):
                    return True
    return False


def _whole_writes(s, ref):
    """(index, {loop variable: (lowest, highest)}) for each store into ref that s makes at every
    element of that index over those ranges."""
    if isinstance(s, N.Store) and s.ref is ref:
        yield s.index, {}
    elif isinstance(s, N.For) and not _jumps_anywhere(s.body):
        if not all(isinstance(lo, N.Const) and isinstance(hi, N.Const) for lo, hi in s.bounds):
            return
        if set(s.vars) & assigned_names(s.body):
            return
        own = {v: (lo.value, hi.value - 1) for v, (lo, hi) in zip(s.vars, s.bounds)}
        if any(lo > hi for lo, hi in own.values()):
            return
        for t in s.body:
            for index, ranges in _whole_writes(t, ref):
                yield index, {**ranges, **own}


def _jumps_anywhere(stmts):
    return any(isinstance(s, (N.Break, N.Continue, N.Return)) for s in iter_stmts(stmts))


def _contains(write_index, write_ranges, read_index, read_ranges, span):
    """Whether the elements a whole write covers include every element the read can touch;
    `span`: the statements from the write to the read's, which must not reassign what the
    write's fixed index parts read."""
    used = set()
    reassigned = None
    for w, r in zip(write_index, read_index):
        if isinstance(w, N.Var) and w.name in write_ranges:
            if w.name in used:
                return False
            used.add(w.name)
            got = _range_of(r, read_ranges)
            low, high = write_ranges[w.name]
            if got is None or got[0] < low or got[1] > high:
                return False
        else:
            names = _names_in(w)
            if names & set(write_ranges) or w != r or loads_in(w):
                return False
            reassigned = assigned_names(span) if reassigned is None else reassigned
            if names & reassigned:
                return False
    return True
