"""Last rewrites before codegen, for speed and for the reader (never fed back into a transform).

In derived kernels, repeated divisions by one value in derivative code share its reciprocal
(opt.reciprocal) and like terms are collected (opt.algebra); zeroed accumulators start at their
first contribution (opt.zero_start) and copies are forwarded (opt.copies). On the CPU, derived
kernels then take f32 sines, cosines and tanh that only derivatives read from kerndiff's own
functions (opt.cpu_math), give scattered atomic adds per-thread private copies (opt.scatter) and
run elementwise loops that take sines and cosines four elements per pass (opt.element_groups).

Inside each parallel loop:
  * merge: several atomic adds into one element within a block become one add of their sum;
  * privatize: `F[i] += v` at the loop's own index i, repeated (or inside inner loops), becomes a
    local accumulator written once per iteration — turning N² atomics into N for pair loops;
  * demote: an atomic add on a field whose elements each belong to one iteration (every access at
    the loop's own index, or at x[.., i, ..] with i in the same position) becomes a plain
    read-modify-write;
  * hoist: reads of 0-d fields the kernel does not write (seed adjoints such as `loss_adj[None]`)
    are read once before the loop, and elements an inner loop reads at a fixed index (`pos[i][0]`
    in a pair loop) once before that loop (opt.invariant_loads; in primal kernels too, but for
    inner loops that add into fields, whose sums would round differently);
  * pack: in derived kernels on the CPU, big fields the loop gathers together at one index (a
    position and its tangent) are copied side by side before it and read from there
    (opt.packed_gathers).
"""
from __future__ import annotations

import dataclasses
from collections import Counter

from ..ir import build as B
from ..ir import nodes as N
from ..ir.walk import (assigned_names, blocks_of, expr_children_of_stmt, iter_expr, iter_stmts, jumps_out,
                       loads_in, map_expr, map_stmt_exprs, map_stmts, rebuild_stmt, vars_in)
from .invariant_loads import hoist_invariant_loads
from .packed_gathers import pack_gathers


def _own_index(index, loop):
    return len(index) == len(loop.vars) and all(isinstance(e, N.Var) and e.name == v
                                                 for e, v in zip(index, loop.vars))


def _accesses(body):
    """(kind, ref, index) of every field access in body."""
    out = []
    for s in iter_stmts(body):
        for e in expr_children_of_stmt(s):
            for x in iter_expr(e):
                if isinstance(x, N.Load):
                    out.append(("load", x.ref, x.index))
        if isinstance(s, (N.Store, N.Atomic)):
            out.append(("store" if isinstance(s, N.Store) else s.op, s.ref, s.index))
    return out


def _privatize(loop, names):
    acc = _accesses(loop.body)
    loaded = {id(r.field) for k, r, _ in acc if k == "load"}
    targets = {}
    for k, ref, index in acc:
        if k == "add" and _own_index(index, loop) and id(ref.field) not in loaded:
            targets.setdefault(ref, 0)
            targets[ref] += 1
    counts = {}
    for s in iter_stmts(loop.body):
        if isinstance(s, N.Atomic) and s.op == "add" and s.ref in targets and _own_index(s.index, loop):
            counts[s.ref] = counts.get(s.ref, 0) + (2 if _in_inner_loop(loop.body, s) else 1)
    # in order of appearance: the source must not vary by run
    chosen = [r for r, c in counts.items() if c > 1 and not _stored_after_adding(loop.body, r.field)]
    if not chosen or jumps_out(loop.body, (N.Continue,)):
        return loop
    local = {r: names.fresh(f"{r.name}{''.join(f'_{c}' for c in r.component)}_acc") for r in chosen}

    def accumulate(s):
        if isinstance(s, N.Atomic) and s.op == "add" and s.ref in chosen and _own_index(s.index, loop):
            v = B.var(local[s.ref], s.ref.dtype)
            return N.Assign(v.name, B.add(v, s.value), src=s.src, tag=s.tag)
        return s

    pre = [N.Assign(local[r], B.const(0, r.dtype)) for r in chosen]
    post = [N.Atomic("add", r, tuple(B.var(v, "i32") for v in loop.vars), B.var(local[r], r.dtype))
            for r in chosen]
    return dataclasses.replace(loop, body=tuple(pre) + map_stmts(loop.body, accumulate) + tuple(post))


def _stored_after_adding(body, field):
    """Whether a statement of body that adds into `field`, or one after it, also stores into it:
    the adds, summed in a local, go into the field at the end of the body, so a store after them
    would come before them instead (`y[i] += ...` in an inner loop, then `y[i] = 5.0`)."""
    adding = False
    for s in body:
        inside = iter_stmts((s,))
        adding = adding or any(isinstance(t, N.Atomic) and t.ref.field is field for t in inside)
        if adding and any(isinstance(t, N.Store) and t.ref.field is field for t in inside):
            return True
    return False


def _in_inner_loop(body, target):
    for s in body:
        if s is target:
            return False
        if isinstance(s, (N.For, N.While)):
            if any(x is target for x in iter_stmts(s.body)):
                return True
        elif isinstance(s, N.If):
            for b in (s.then, s.orelse):
                if any(x is target for x in iter_stmts(b)):
                    return _in_inner_loop(b, target)
    return False


def _partition_dims(index, loop, shadowed):
    """Index positions holding the loop's (single) index itself: an access at x[.., i, ..] touches
    only elements that no other iteration of the loop touches through that position.
    shadowed: whether the body assigns the index (then this proves nothing)."""
    if len(loop.vars) != 1 or shadowed:
        return None
    return {d for d, e in enumerate(index) if isinstance(e, N.Var) and e.name == loop.vars[0]}


def _demote(loop):
    """Atomic adds into a field that iterations share no element of become plain read-modify-write:
    every access is at the loop's own index, or (one-index loops) all have the index at the same
    position, like h_adj[p, k] in a loop over points p."""
    acc = _accesses(loop.body)
    own, dims = {}, {}
    shadowed = len(loop.vars) == 1 and loop.vars[0] in assigned_names(loop.body)
    for k, ref, index in acc:
        f = id(ref.field)
        own[f] = own.get(f, True) and _own_index(index, loop)
        d = _partition_dims(index, loop, shadowed)
        dims[f] = d if f not in dims else (None if d is None or dims[f] is None else dims[f] & d)
    demotable = {f for f, ok in own.items() if ok or dims.get(f)}

    def demote(s):
        if isinstance(s, N.Atomic) and s.op == "add" and id(s.ref.field) in demotable:
            return N.Store(s.ref, s.index, B.add(B.load(s.ref, s.index), s.value), src=s.src, tag=s.tag)
        return s

    return dataclasses.replace(loop, body=map_stmts(loop.body, demote))


def _merge_adds(stmts):
    """Atomic adds into one element within a block become one add of their sum: derivative code
    often adds several contributions to the same adjoint element (one per tangent stream, one per
    use of a value), and each add is a read-modify-write. Adds commute, so an add may move down
    past other adds; not past a nested block, a `continue`, `break` or `return`, a read or write
    of its field (other than an add), a write of a field its value reads, or a reassignment of a
    local it uses, and not into an add whose value reads the field (that add reads what the first
    one added)."""
    out = list(stmts)
    for i, s in enumerate(out):
        if not (isinstance(s, N.Atomic) and s.op == "add"):
            continue
        uses = {v.name for e in expr_children_of_stmt(s) for v in vars_in(e)}
        reads = {id(x.ref.field) for x in loads_in(s.value)}
        for j in range(i + 1, len(out)):
            t = out[j]
            if t is None:
                continue
            if blocks_of(t) or isinstance(t, (N.Continue, N.Break, N.Return)) or \
                    (isinstance(t, N.Assign) and t.name in uses):
                break
            written = id(t.ref.field) if isinstance(t, (N.Store, N.Atomic)) else None
            if written in reads or (written == id(s.ref.field) and not (isinstance(t, N.Atomic) and t.op == "add")):
                break
            # (before merging: `z[i] -= x[i]; z[i] -= z[i] * 0.5` reads the first add's result)
            if any(id(x.ref.field) == id(s.ref.field) for e in expr_children_of_stmt(t) for x in loads_in(e)):
                break
            if isinstance(t, N.Atomic) and t.op == "add" and t.ref is s.ref and t.index == s.index:
                out[j] = dataclasses.replace(t, value=B.add(s.value, t.value))
                out[i] = None
                break
    return tuple(_merge_nested(x) for x in out if x is not None)


def _merge_nested(s):
    blocks = blocks_of(s)
    return rebuild_stmt(s, [_merge_adds(b) for b in blocks]) if blocks else s


def _hoist(loop, written, names):
    """Read 0-d fields that nothing in the kernel writes once, before the loop: (statements for
    before it, the loop).

    One that an inner loop reads is read at the top of the loop's body instead, once per
    iteration: Taichi keeps a kernel-scope local that a parallel loop reads in memory (a global
    temporary) and loads it wherever the loop reads it, and in an inner loop that load keeps
    LLVM from vectorizing it. A pair loop's reverse reading `E_adj_v` in its inner loop took
    15.1 ms against 7.5 with the read at the top of the body (session 55).

    Not out of a loop over several dimensions that adds into a component of a vector field:
    Taichi 1.7.4 aborts the process compiling `for i, r in ti.ndrange(4, 3): v_adj[i][0] += t`
    with `t` read before the loop ("IR broken: stmt SNodeLookupStmt cannot have operand
    BinaryOpStmt"), and compiles it with the load left in the loop."""
    if len(loop.vars) > 1 and any(isinstance(s, N.Atomic) and s.ref.component for s in iter_stmts(loop.body)):
        return [], loop
    hoisted = {}

    def visit(e):
        if isinstance(e, N.Load) and not e.index and id(e.ref.field) not in written:
            key = e.ref
            if key not in hoisted:
                comp = "".join(f"_{c}" for c in e.ref.component)
                hoisted[key] = (names.fresh(f"{e.ref.name}{comp}_v"), e)
            return B.var(hoisted[key][0], e.dtype)
        return e

    def hoist(s):
        if isinstance(s, (N.For, N.While)):  # loop bounds and while conditions stay as they are
            return s
        return map_stmt_exprs(s, lambda e: map_expr(e, visit))

    body = map_stmts(loop.body, hoist)
    first, in_inner = {}, set()  # name -> the first statement of the body that reads it; read in an inner loop
    for s in body:
        for t in iter_stmts((s,)):
            for e in expr_children_of_stmt(t):
                for v in vars_in(e):
                    first.setdefault(v.name, s)
                    if isinstance(s, (N.For, N.While)):
                        in_inner.add(v.name)
    pre = [N.Assign(name, load, src=loop.src, tag="hoist") for name, load in hoisted.values() if name not in in_inner]
    out = []
    for s in body:  # (each read just before the first statement that reads it)
        out.extend(N.Assign(name, load, src=s.src, tag="hoist") for name, load in hoisted.values()
                   if name in in_inner and first.get(name) is s)
        out.append(s)
    return pre, dataclasses.replace(loop, body=tuple(out))


def _count_ifs(body):
    return sum(isinstance(s, N.If) for s in iter_stmts(body))


def _assigned_more_than_once(body) -> set:
    """The locals body assigns in more than one statement."""
    count = Counter(s.name for s in iter_stmts(body) if isinstance(s, N.Assign))
    return {name for name, n in count.items() if n > 1}


def _sums_read_once(body, names) -> bool:
    """Some local of `names` is assigned a sum, or a product with a sum in it, and read by one
    statement: what opt.algebra may read through (its second pass in finalize)."""
    if not names:
        return False
    readers = Counter(v.name for s in iter_stmts(body) for e in expr_children_of_stmt(s) for v in vars_in(e))

    def summed(e):
        return isinstance(e, N.Call) and (e.op in ("add", "sub") or e.op == "mul" and any(map(summed, e.args)))
    return any(isinstance(s, N.Assign) and s.name in names and readers[s.name] == 1 and summed(s.value)
               for s in iter_stmts(body))


def finalize(ir: N.KernelIR, scatter=None, is_derivative=None, cpu_math=False, packs=None,
             gathers=None) -> N.KernelIR:
    """scatter: None, or (threads, copies_for, ref_of) to give scattered atomic adds per-thread
    private copies (CPU only; see opt.scatter). cpu_math: kerndiff's own f32 sin/cos pairs and
    tanh where derivatives alone read them (derived kernels on the CPU; see opt.cpu_math).
    packs: None, or (packed_for, ref_of, display) to read fields a loop gathers together from one
    record (derived kernels on the CPU; see opt.packed_gathers).
    gathers: None, or a test for fields whose adds at a pair loop's inner index a second loop
    gathers (derived kernels; see opt.transposed_gathers).
    is_derivative: None for primal kernels (their arithmetic is the user's), else a test for
    derivative fields: derivative code then has the ifs of a reversed body fused and CSE run
    across them (opt.fuse_ifs, opt.cse), shares reciprocals (opt.reciprocal), has its like terms
    collected (opt.algebra; the repeats left, opt.repeated_terms), its zeroed accumulators
    started at their first contribution (opt.zero_start) and like terms collected again where
    that left sums to read through, copies forwarded (opt.copies,
    opt.propagate) and the dead ones removed, values that locals already hold read from them
    (opt.reuse), reversed loops whose iterations share nothing but sums run forward
    (opt.loop_order), what the rewrites left computed twice in a block shared once more
    (opt.cse), and locals' values put before their tangents (opt.tangent_order). Every kernel has
    the field elements an inner loop repeats read before it (opt.invariant_loads), a primal's
    inner loops that add into fields excepted.

    A kernel taking atomics' old values (N.Atomic.result: a primal, or the forward kernel of a
    kernel that bins and then computes floats) is left as written: its atomics are its results,
    which no rewrite here may merge, privatize or demote."""
    from ..ad.names import NameAllocator
    from ..ir.walk import old_value_atomics

    if old_value_atomics(ir.body):
        return ir
    from ..codegen.load import field_names

    fields = set(field_names(ir, set()).values())  # what generated source will call them

    def allocator():
        return NameAllocator.for_kernel(ir, reserved=fields)

    if is_derivative is not None:
        from .algebra import collect_terms
        from .dce import dce
        from .propagate import propagate
        from .reciprocal import exact_names, share_reciprocals
        from .fuse_ifs import fuse_ifs
        from .liveness import remove_dead_stores
        from .zero_start import fold_zero_starts
        from .copies import coalesce_copies, forward_copies
        from .reuse import reuse_held_values
        from .scales import rescale_locals
        from .cse import cse
        from .loop_order import run_forward
        from .tangent_order import values_first
        from .repeated_terms import merge_repeated_terms
        # a reversed loop body is its recomputation and then its adjoint, each with its own copy
        # of the body's branches: one `if` per condition first, then what both halves compute
        # (`x[i] - x[j]`) once, which CSE, working per block, could not see before
        fused = fuse_ifs(ir.body)
        if _count_ifs(fused) < _count_ifs(ir.body):  # (nothing new to share where no ifs met)
            ir = cse(dataclasses.replace(ir, body=fused))
        exact = exact_names(ir.body, is_derivative)  # the reciprocals it adds feed derivatives only
        body = share_reciprocals(ir.body, allocator(), is_derivative, exact)
        body = collect_terms(body, is_derivative, exact)
        accumulated = _assigned_more_than_once(body)
        # zero starts make copies (d_adj = 0.0; d_adj = d_adj + g -> d_adj = g); forwarding
        # copies leaves values overwritten before any read (t8_adj = t3_adj; t8_adj = t3_adj + ...)
        # the zero starts that branches and loops overwrite before any read go before copies are
        # forwarded (e_1_adj = 0.0 would end the copy e_3_adj = e_1_adj)
        body = remove_dead_stores(dataclasses.replace(ir, body=fold_zero_starts(body))).body
        body = fold_zero_starts(forward_copies(body))
        # like terms once more where accumulators are assigned once now: a sum of products that one
        # statement reads (r_adj_dual, which was `r_adj_dual = 0.0` and `r_adj_dual = r_adj_dual +
        # ...` above) can be read through, and its terms meet the reader's (opt.algebra; only
        # where there is such a sum: the pass is a good part of a kernel's transform time)
        if _sums_read_once(body, accumulated - _assigned_more_than_once(body)):
            body = collect_terms(body, is_derivative, exact_names(body, is_derivative))
        # now that accumulators are assigned once: powers of two between definitions and uses
        # (then zero starts once more: the rewrites can leave an accumulation in the `x = x + e`
        # form only now, as the norm-spelled pair potential's HVP does with r_adj_dual)
        body = fold_zero_starts(rescale_locals(body, is_derivative))
        # copies left by the rewrites (t6 = r_inv) and temporaries that were looked through
        ir = propagate(dataclasses.replace(ir, body=body))
        # reading held values can leave copies of its own (r2_inv = t7, where t7 = t5_inv * t5_inv)
        ir = propagate(dataclasses.replace(ir, body=reuse_held_values(ir.body, is_derivative)))
        # what copies remain are loop-carried: s_2 = s_1 + w * h; s_1 = s_2 -> s_1 = s_1 + w * h
        ir = dataclasses.replace(ir, body=coalesce_copies(dce(ir.body)))
        # zero starts that only paths which overwrite them reached (t1_adj = 0.0 before an if)
        ir = remove_dead_stores(ir)
        # reversed loops whose iterations share nothing but sums run forward, as written
        ir = dataclasses.replace(ir, body=run_forward(ir.body))
        # a term a sum takes twice, once with its count (`-e - e` -> `e * -2.0`): what the passes
        # above made alike, and sums longer than opt.algebra collects
        ir = dataclasses.replace(ir, body=merge_repeated_terms(ir.body, is_derivative))
        # what is still computed twice in a block, once, into a temporary: the passes above make
        # expressions alike (a tanh layer's k.forward.forward had `1.0 - t4 * t4` and
        # `1.0 - t1 * t1` behind a copy `t1 = t4` until copies were forwarded)
        ir = cse(ir, late=True)
        # locals' values before their tangents where nothing above needs the tangent first
        ir = dataclasses.replace(ir, body=values_first(ir.body))
    names = allocator()
    written = {id(s.ref.field) for s in iter_stmts(ir.body) if isinstance(s, (N.Store, N.Atomic))}
    out, records = [], ()  # records: field_aliases of opt.packed_gathers' records
    for s in ir.body:
        if isinstance(s, N.For) and s.parallel:
            s = dataclasses.replace(s, body=_merge_adds(s.body))
            s = _demote(_privatize(s, names))
            s = hoist_invariant_loads(s, written, names, keep_field_sums=is_derivative is None)
            pre, s = _hoist(s, written, names)
            out.extend(pre)
            if packs is not None and is_derivative is not None:
                pre, s, named = pack_gathers(s, written, names, *packs, dict(ir.field_aliases))
                out.extend(pre)
                records += tuple(entry for entry in named if entry[0] not in dict(records))  # the first names it
        out.append(s)
    ir = dataclasses.replace(ir, body=tuple(out), field_aliases=ir.field_aliases + records)
    if is_derivative is not None:
        # loads read once before an inner loop leave copies of their locals where the load was a
        # whole value (a scan's first trip: `b_prev_2 = b_i_0; b_prev_3 = b_prev_2`)
        from .copies import forward_copies
        from .dce import dce
        ir = dataclasses.replace(ir, body=dce(forward_copies(ir.body)))
    if cpu_math and is_derivative is not None:
        from .cpu_math import use_cpu_math
        ir = use_cpu_math(ir, names, is_derivative)
    if gathers is not None and is_derivative is not None:
        from .transposed_gathers import gather_pair_adds
        gathered = gather_pair_adds(ir, names, gathers, lambda loop: hoist_invariant_loads(loop, written, names))
        if gathered is not ir:  # each loop now adds only at its own index: plain adds, no private copies
            ir = dataclasses.replace(gathered, body=tuple(_demote(s) if isinstance(s, N.For) and s.parallel else s
                                                          for s in gathered.body))
    if scatter is not None:
        from .scatter import privatize_scatters
        ir = privatize_scatters(ir, names, *scatter)
    if cpu_math and is_derivative is not None:
        from .element_groups import group_elements
        ir = group_elements(ir, names, is_derivative)
    # inner loops that test their index against a value they do not change (`if i != j`) run over
    # the trips the test lets through (last: the passes above look for the loops as written)
    from .split_ranges import split_ranges
    arguments = {p.name for p in ir.params} - assigned_names(ir.body)  # (as they were at launch)
    return dataclasses.replace(ir, body=split_ranges(ir.body, arguments))
