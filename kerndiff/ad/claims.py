"""A run-time check behind the reverse of stores that two iterations may share by the data.

`z[perm[i]] = f(x[i])` in a parallel loop: where perm repeats an element, several iterations
store into it, the one Taichi runs last wins, and the reverse (`t = z_adj[e]; z_adj[e] = 0; ...`)
credits whichever it meets first: a wrong gradient, returned without a word until session 36.
No static check tells a permutation from an index array with repeats (ad/races.py refuses what
it can decide), so a kernel whose reverse differentiates such stores gets a small check kernel,
which each launch of the reverse, and of the kernels made from it (k.reverse.forward, kd.Tape's
reverses), runs first:

  claim   the loop again with its effects removed (its values recomputed, as the reverse
          recomputes them), each watched store replaced by a plain store of the iteration's
          number k into an i32 helper field shaped like z: owner[e] = k + 1 (zero between
          launches; where several iterations store, one of them is left)
  verify  the same loop again: an iteration that stores, adds into or reads an element whose
          owner[e] holds another's number races with it (found[p] = max(found[p], e's number +
          1), other[e] = k + 1; p the (loop, field) watched). An iteration storing one element
          twice, in an inner loop, finds its own number: its order is serial, and the reverse
          follows it
  record  where p found one: the element's index (from its number) and its two claimants into
          record[p], in a serial statement
  clear   owner = other = 0 over z's elements; or, for a loop of at most a quarter as many
          iterations as z has elements, the loop recomputed clearing where it reached
and returns p + 1 for a p that found one (0: none). The launch then raises KernDiffError naming
the element and the two iterations, before the reverse has run. A loop is watched only where
what the check recomputes (indices, conditions, bounds) reads no field that the loop or a later
statement of the kernel writes: the check reads the fields as the kernel left them (kd.Tape
restores only fields one loop reads and writes), and those would not hold what the loop read.
The watched fields themselves are the exception: where no iteration takes another's element,
each reads what it stored itself, which the field holds at the end.
"""
from __future__ import annotations

import dataclasses
import math
import re

from ..errors import KernDiffError
from ..ir import build as B
from ..ir import nodes as N
from ..ir.walk import (assigned_names, blocks_of, expr_children_of_stmt, iter_expr, iter_stmts, rebuild_stmt,
                       vars_in, without_effects, without_prints)
from ..runtime.registry import REGISTRY
from .activity import read_refs, written_fields
from .minmax import element_pass
from .names import NameAllocator
from .races import OVERWRITTEN, one_to_one, own_element, stores_with_conditions


@dataclasses.dataclass
class Watched:
    """One field's watched stores in one loop: what an error message names."""

    field_name: str
    src: object  # the first watched store's SrcLoc
    loop_vars: tuple
    loop_bounds: tuple
    ndim: int


def watched_stores(loop, has_adjoint):
    """The stores of a top-level parallel loop that two iterations may share: into a float field
    whose adjoint the reverse reads, of a value read from float fields, at an index that
    ad.races.one_to_one cannot show reaches each element from one iteration at most (it reads a
    field, `z[perm[i]]`, or a local the loop assigns, a while loop's counter; an inner loop's
    variable of run-time bounds; more combinations than it evaluates), or whose field the loop
    also adds into or reads elsewhere (`z[i % 3] += ...` beside `if i % 2 == 0: z[i % 3] = ...`:
    ad.races lets the same index pass as one iteration's element, and here it is not). What
    ad.races decides shared it has refused already."""
    if not (isinstance(loop, N.For) and loop.parallel and not loop.serialize):
        return []
    if any(v in assigned_names(loop.body) for v in loop.vars):
        return []
    varying = _reading_float_fields(loop)
    touched = {}  # id(field) -> how many statements of the loop store, add into or read it
    for s in iter_stmts(loop.body):
        fields = {id(x.ref.field) for e in expr_children_of_stmt(s) for x in iter_expr(e) if isinstance(x, N.Load)}
        if isinstance(s, (N.Store, N.Atomic)):
            fields.add(id(s.ref.field))
        for f in fields:
            touched[f] = touched.get(f, 0) + 1
    out = []
    for s, conds, inner_loops in stores_with_conditions(loop.body, ()):
        if not s.ref.dtype.startswith("f") or not varying(s.value) or not has_adjoint(s.ref):
            continue
        if own_element(s.index, s.index, loop):
            continue
        if touched[id(s.ref.field)] > 1 or not one_to_one(s, loop, inner_loops, conds):
            out.append(s)
    return out


def _reading_float_fields(loop):
    """A test of whether an expression of the loop's body reads a float field, itself or through
    the locals it reads (to a fixed point): a store of anything else (constants, kernel
    arguments, integers) has no derivative to credit, so iterations storing the same such value
    may share an element."""
    sources = [(s.name, s.value) for s in iter_stmts(loop.body) if isinstance(s, N.Assign)]
    active = set()

    def reads(e):
        return any(isinstance(x, N.Load) and x.ref.dtype.startswith("f") for x in iter_expr(e)) or \
            any(x.name in active for x in vars_in(e))
    changed = True
    while changed:
        changed = False
        for name, value in sources:
            if name not in active and reads(value):
                active.add(name)
                changed = True
    return reads


def check_kernel(ir: N.KernelIR, level: int):
    """(the check kernel's IR, [Watched] by p, its record field) for the stores ir's reverse at
    `level` must have checked, or None where it has none."""
    from ..opt import optimize
    body = tuple(without_prints(ir.body))

    def has_adjoint(ref):
        return REGISTRY.get(ref.field, "adjoint", level) is not None
    candidates = {t: watched_stores(s, has_adjoint) for t, s in enumerate(body)}
    candidates = {t: stores for t, stores in candidates.items() if stores}
    if not candidates:
        return None
    kept = {}
    for t, stores in candidates.items():
        alone = _build(ir, body, {t: stores})[0]
        # (the watched fields themselves the loop reads at the elements its iterations claim)
        watched_fields = {id(st.ref.field) for st in stores}
        written = {id(f) for f in written_fields(body[t + 1:])} | \
            {id(f) for f in written_fields(body[t:t + 1]) if id(f) not in watched_fields}
        if not any(id(r.field) in written for r in read_refs(optimize(alone).body)):
            kept[t] = stores
    return _build(ir, body, kept) if kept else None


def _build(ir, body, watched):
    names = NameAllocator.for_kernel(ir)
    groups = []  # (top-level position, field, its stores)
    for t, stores in watched.items():
        by_field = {}
        for s in stores:
            by_field.setdefault(id(s.ref.field), []).append(s)
        groups.extend((t, group[0].ref.field, group) for group in by_field.values())
    ndim = max(len(g[2][0].ref.shape) for g in groups)
    found = _helper(("claims_found", ir.name, len(groups)), (len(groups),), None, f"{ir.name}_found")
    record = _helper(("claims_record", ir.name, len(groups), ndim), (len(groups), ndim + 2), None,
                     f"{ir.name}_record")
    out, described = [], []
    for t, s in enumerate(body):
        mine = [(p, g[2]) for p, g in enumerate(groups) if g[0] == t]
        if mine:
            out.append(_claims_loop(s, mine, names))
            out.append(_verify_loop(s, mine, names, found))
            out.extend(_record(stores[0].ref, found, record, p, ndim) for p, stores in mine)
            refs = [stores[0].ref for _, stores in mine]
            if _few_iterations(s, refs):
                out.append(_clear_loop(s, mine))
            else:
                out.extend(e for ref in refs for e in _clear_pass(ref, names))
            for p, stores in mine:
                ref = stores[0].ref
                described.append(Watched(REGISTRY.name_of(ref.field), stores[0].src, _names_written(s), s.bounds,
                                         len(ref.shape)))
        else:  # what it computes that the watched loops read (opt.dce drops the rest)
            out.extend(without_effects([s], lambda _: False, None))
    result = B.const(0, "i32")
    for p in range(len(groups)):
        result = B.select(B.call("gt", B.load(found, (B.const(p, "i32"),)), B.const(0, "i32")),
                          B.const(p + 1, "i32"), result)
    which = names.fresh("found_in")
    out.append(N.Assign(which, result))
    out.extend(N.Store(found, (B.const(p, "i32"),), B.const(0, "i32")) for p in range(len(groups)))
    out.append(N.Return((B.var(which, "i32"),)))
    check = N.KernelIR(f"{ir.name}_check_stores", ir.params, tuple(out), ("i32",), ir.source_lines,
                       ir.field_aliases)
    return check, described, record.field


def _names_written(loop):
    """The loop's variables as its source line names them (`i` where the IR renamed a second
    loop's `i` to `i_1`), else as the IR does."""
    text = loop.src.text.strip() if loop.src else ""
    match = re.match(r"for\s+(.+?)\s+in\s", text)
    names = [n.strip() for n in match.group(1).strip("()").split(",")] if match else []
    return tuple(names) if len(names) == len(loop.vars) and all(n.isidentifier() for n in names) else loop.vars


def _helper(key, shape, offset, name):
    return REGISTRY.ref(REGISTRY.scratch(key, "i32", shape, offset), (), name)


def _claim_fields(ref):
    """(owner, other): an element's claimant left by the claims, and one more found by the
    verifying pass (one pair for all components of ref's field)."""
    name = REGISTRY.name_of(ref.field)
    return tuple(_helper(("claims_" + which, id(ref.field)), ref.shape, ref.offset, f"{name}_{which}")
                 for which in ("owner", "other"))


def _iteration_number(loop):
    """The iteration's number, counted from 0 in the loop's row-major order."""
    number = None
    for v, (lo, hi) in zip(loop.vars, loop.bounds):
        offset = B.sub(B.var(v, "i32"), lo)
        number = offset if number is None else B.add(B.mul(number, B.sub(hi, lo)), offset)
    return number


def _numbered(loop, body, number):
    return dataclasses.replace(loop, body=(N.Assign(number, _iteration_number(loop)),) + tuple(body), tag="")


def _claims_loop(loop, watched, names):
    """The loop recomputed, each watched store replaced by its claim: owner[e] = k + 1."""
    number = names.fresh("iteration")
    mine = B.add(B.var(number, "i32"), B.const(1, "i32"))
    stores = {id(s) for _, group in watched for s in group}
    body = without_effects(loop.body, lambda s: id(s) in stores,
                           lambda s: [N.Store(_claim_fields(s.ref)[0], s.index, mine, src=s.src)])
    return _numbered(loop, body, number)


def _verify_loop(loop, watched, names, found):
    """The loop recomputed, each access of a watched field (its stores, and the adds and reads
    beside them: `z[rep[i]] += ...` into an element another iteration stores races as a second
    store does) preceded by the test that no other iteration claimed the element."""
    number = names.fresh("iteration")
    mine = B.add(B.var(number, "i32"), B.const(1, "i32"))
    p_of = {id(group[0].ref.field): p for p, group in watched}

    def check(ref, index, src):
        owner, other = _claim_fields(ref)
        claimed = B.load(owner, index)
        taken = B.call("and", B.call("ne", claimed, B.const(0, "i32")), B.call("ne", claimed, mine))
        one = B.add(_element_number(ref, index), B.const(1, "i32"))
        return [N.If(taken, (N.Atomic("max", found, (B.const(p_of[id(ref.field)], "i32"),), one),
                             N.Store(other, index, mine)), src=src)]
    return _numbered(loop, _at_accesses(loop.body, set(p_of), check), number)


def _clear_loop(loop, watched):
    """The loop recomputed, the helper fields cleared at each element a watched field's access
    reaches: for a loop of far fewer iterations than the field has elements."""
    def clear(ref, index, src):
        return [N.Store(f, index, B.const(0, "i32"), src=src) for f in _claim_fields(ref)]
    fields = {id(group[0].ref.field) for _, group in watched}
    return dataclasses.replace(loop, body=tuple(_at_accesses(loop.body, fields, clear)), tag="")


def _at_accesses(stmts, fields, on_access):
    """stmts with their effects removed and on_access(ref, index, src) (statements) at each
    access of one of the fields (by id): in place of a store or atomic into one, and before a
    statement whose own expressions read one (a store into another field that reads a watched
    one goes, its reads stay)."""
    def reads(s):
        return [on_access(x.ref, x.index, s.src) for e in expr_children_of_stmt(s) for x in iter_expr(e)
                if isinstance(x, N.Load) and id(x.ref.field) in fields]

    def accesses(s):
        here = reads(s) + ([on_access(s.ref, s.index, s.src)] if id(s.ref.field) in fields else [])
        return [c for checks in here for c in checks]
    return _reads_checked(without_effects(stmts, lambda s: bool(accesses(s)), accesses), reads)


def _reads_checked(stmts, reads):
    """stmts with reads(s) (the checks of the watched fields s's own expressions read: the
    condition of an `if`, the value of an assignment) before each statement s."""
    out = []
    for s in stmts:
        for checks in reads(s):
            out.extend(checks)
        blocks = blocks_of(s)
        out.append(rebuild_stmt(s, [tuple(_reads_checked(b, reads)) for b in blocks]) if blocks else s)
    return out


def _element_number(ref, index):
    number = None
    for e, (lo, hi) in zip(index, ref.bounds()):
        offset = B.sub(e, B.const(lo, "i32"))
        number = offset if number is None else B.add(B.mul(number, B.const(hi - lo, "i32")), offset)
    return number


def _record(ref, found, record, p, ndim):
    """Where p found an element: its index (from its number, row-major) and its two claimants
    into record[p] (a serial statement between the loops)."""
    row = B.const(p, "i32")
    number = B.sub(B.load(found, (row,)), B.const(1, "i32"))
    index, stride = [], 1
    for d in range(len(ref.shape) - 1, -1, -1):
        lo, hi = ref.bounds()[d]
        e = B.call("floordiv", number, B.const(stride, "i32")) if stride > 1 else number
        e = B.call("mod", e, B.const(hi - lo, "i32")) if d else e
        index.insert(0, B.add(e, B.const(lo, "i32")))
        stride *= hi - lo
    index = tuple(index)
    keep = [N.Store(record, (row, B.const(d, "i32")), e) for d, e in enumerate(index)]
    keep += [N.Store(record, (row, B.const(ndim + d, "i32")), B.sub(B.load(f, index), B.const(1, "i32")))
             for d, f in enumerate(_claim_fields(ref))]
    return N.If(B.call("gt", B.load(found, (row,)), B.const(0, "i32")), tuple(keep))


def _few_iterations(loop, refs):
    """Whether the loop runs at most a quarter as many iterations as each of the fields has
    elements (constant bounds): its helper fields are then cleared where it reached them, not
    over every element."""
    trips = 1
    for lo, hi in loop.bounds:
        if not (isinstance(lo, N.Const) and isinstance(hi, N.Const)):
            return False
        trips *= max(0, hi.value - lo.value)
    return all(4 * trips <= math.prod(ref.shape) for ref in refs)


def _clear_pass(ref, names):
    """The helper fields cleared over every element of ref's field."""
    def body(index):
        return [N.Store(f, index, B.const(0, "i32")) for f in _claim_fields(ref)]
    return element_pass(ref, body, names, None)


class StoreCheck:
    """A compiled check kernel and what its messages need; `run` raises where it found a shared
    element."""

    def __init__(self, compiled, ir, described, record, source):
        self.compiled, self.params, self.described, self.source = compiled, ir.params, described, source
        self.record = record

    def run(self, values):
        """values: {parameter name: value} of the launch (parameters it lacks run as zero)."""
        args = [values.get(p.name, 0.0 if p.dtype.startswith("f") else 0) for p in self.params]
        which = self.compiled(*args)
        if which:
            raise self.error(which - 1, self.record.to_numpy()[which - 1])

    def error(self, p, row):
        w = self.described[p]
        element = ", ".join(str(int(x)) for x in row[: w.ndim])
        first, last = sorted((int(row[-2]), int(row[-1])))
        return KernDiffError(
            f"iterations {_iterations(w, first, last)} of this parallel loop both reach "
            f"{w.field_name}[{element}], which one of them stores here (found at run time, before the reverse ran: which elements this index "
            f"reaches depends on data no static check sees): " + OVERWRITTEN,
            w.src, "make the index one-to-one where each element is meant to be stored once (a permutation), "
                   "accumulate (+=) if the values should add up, or make the loop serial "
                   "(ti.loop_config(serialize=True)) if the last one is meant")


def _iterations(w, first, last):
    """'i = 0 and i = 1', '(i, j) = (0, 1) and (1, 1)'; the iterations' numbers where the loop's
    bounds do not tell its variables (a lower bound, or a later dimension's extent, known at run
    time only)."""
    bounds = [(lo.value if isinstance(lo, N.Const) else None,
               hi.value - lo.value if isinstance(lo, N.Const) and isinstance(hi, N.Const) else None)
              for lo, hi in w.loop_bounds]
    if any(lo is None for lo, _ in bounds) or any(extent is None for _, extent in bounds[1:]):
        return f"number {first} and number {last} (counted from 0)"

    def values(k):
        out = []
        for d in range(len(bounds) - 1, -1, -1):
            lo, extent = bounds[d]
            k, r = divmod(k, extent) if d else (0, k)
            out.append(lo + r)
        return out[::-1]
    if len(w.loop_vars) == 1:
        return f"{w.loop_vars[0]} = {values(first)[0]} and {w.loop_vars[0]} = {values(last)[0]}"
    names = ", ".join(w.loop_vars)
    return f"({names}) = ({', '.join(map(str, values(first)))}) and ({', '.join(map(str, values(last)))})"
