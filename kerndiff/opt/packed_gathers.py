"""CPU, derived kernels: fields gathered at one index read from one record.

W2's k.reverse.forward reads `pos[ends[s][0]]` and `pos_dual[ends[s][0]]` (and both again at
`ends[s][1]`): gathers at indices read from data, each a cache miss into its own array once the
arrays outgrow the cache. Where a parallel loop gathers several float fields of one shape that
the kernel does not write at one such index, a loop before it copies their components side by
side into a helper field (`pos_packed[p, k]`, one record per element) and the loop reads them
from there: one cache line per gathered element instead of one per field. The copy is one pass
over the fields per launch, so it is made only for fields too big for the cache to hold anyway
(MIN_BYTES) and loops of at least as many iterations as the fields have elements. One record
holds fields of one shape; where the loop gathers groups of several shapes, the first group that
meets both conditions is packed (until session 41 only the first group was considered, and a
2-D field's row gathered at three of its six elements kept a 3-element pair from being packed).
W2's HVP, 1e6 particles: 60.2-60.8 ms against 70.3 without (bench, session 38; HVP / reverse
1.63-1.75 against 1.98). With 24-byte records (3-D positions) it gained nothing measurable.
"""
from __future__ import annotations

import dataclasses
import math

from ..errors import SrcLoc
from ..ir import build as B
from ..ir import nodes as N
from ..ir.types import bits, is_float
from ..ir.walk import expr_children_of_stmt, iter_expr, iter_stmts, map_expr, map_stmt_exprs, map_stmts
from .trip_counts import trip_count

MIN_BYTES = 4 << 20  # the gathered fields together: below this they mostly stay in the cache


def _is_gather(index):
    """An index that reads a field (`ends[s][0]`): where it points, the data decide."""
    return any(type(y) is N.Load for i in index for y in iter_expr(i))


def _loads(loop):
    """Every field load in the loop's body, in order."""
    return [x for s in iter_stmts(loop.body) for e in expr_children_of_stmt(s) for x in iter_expr(e)
            if type(x) is N.Load]


def _groups(loads, written):
    """The candidate field groups to pack for a loop whose field loads are `loads` (in order of
    first appearance): float fields the kernel does not write, gathered at one index together
    with another of them, grouped by shape, offset and dtype (one record holds one group), in
    order of first appearance."""
    at = {}  # gathered index -> a ref of each field read there
    for x in loads:
        f = x.ref.field
        if id(f) not in written and is_float(x.dtype) and _is_gather(x.index):
            refs = at.setdefault(x.index, [])
            if not any(r.field is f for r in refs):
                refs.append(x.ref)
    groups = {}  # (shape, offset, dtype) -> refs of distinct fields
    for refs in at.values():
        if len({id(r.field) for r in refs}) < 2:
            continue
        for r in refs:
            group = groups.setdefault((r.shape, r.offset, r.dtype), [])
            if not any(c.field is r.field for c in group):
                group.append(r)
    return [group for group in groups.values() if len(group) >= 2]


def pack_gathers(loop: N.For, written: set, names, packed_for, ref_of, display, aliases):
    """(statements to run before the loop, the loop, the record's field_aliases entries): see the
    module docstring. written: ids of the fields the kernel writes; packed_for(fields, dtype,
    shape, offset) -> the helper field (the registry's `packed`, which loops of one record shape
    share in every kernel); ref_of(field, component) -> its FieldRef; display(field, aliases) ->
    the name this kernel's source gives a field (aliases: its field_aliases as a dict), which
    names the record after the first field it holds (`pos_packed`)."""
    loads = _loads(loop)
    trips = trip_count(loop)
    if trips is None:
        return [], loop, ()
    # the first group worth a copy: the loop runs at least as many iterations as its fields have
    # elements, and they are too big to stay in the cache (a small or rarely read group before it,
    # such as a row of a 2-D field read at three of its six elements, does not hide it)
    for chosen in _groups(loads, written):
        first = chosen[0]
        elements = math.prod(first.shape)
        slots = []  # (id(field), component) of each record entry
        refs = {}  # such a key -> a ref of it
        for x in loads:
            key = (id(x.ref.field), x.ref.component)
            if any(x.ref.field is c.field for c in chosen) and key not in refs:
                refs[key] = x.ref
                slots.append(key)
        order = [id(c.field) for c in chosen]  # each field's components together, fields as first met
        slots.sort(key=lambda key: (order.index(key[0]), key[1]))
        if trips >= elements and elements * len(slots) * bits(first.dtype) // 8 >= MIN_BYTES:
            break
    else:
        return [], loop, ()
    fields = [c.field for c in chosen]
    record = packed_for(fields, first.dtype, first.shape + (len(slots),), first.offset + (0,))
    packed = ref_of(record, ())
    slot_of = {key: k for k, key in enumerate(slots)}

    def read_packed(e):
        k = slot_of.get((id(e.ref.field), e.ref.component)) if type(e) is N.Load else None
        return e if k is None else B.load(packed, e.index + (B.const(k, "i32"),))

    body = map_stmts(loop.body, lambda s: map_stmt_exprs(s, lambda e: map_expr(e, read_packed)))
    what = " and ".join(dict.fromkeys(refs[key].name for key in slots))
    note = SrcLoc(loop.src.file if loop.src else "<kerndiff>", loop.src.line if loop.src else 0,
                  text=f"{what} side by side, one record per element: the loop below gathers them together")
    index = tuple(B.var(names.fresh("p"), "i32") for _ in first.shape)
    copy = tuple(N.Store(packed, index + (B.const(k, "i32"),), B.load(refs[key], index), src=note)
                 for k, key in enumerate(slots))
    bounds = tuple((B.const(lo, "i32"), B.const(hi, "i32")) for lo, hi in first.bounds())
    pack = N.For(tuple(v.name for v in index), bounds, copy, parallel=True, src=note)
    return [pack], dataclasses.replace(loop, body=body), ((id(record), display(fields[0], aliases) + "_packed"),)
