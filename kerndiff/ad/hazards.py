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
from ..ir.walk import assigned_names, blocks_of, expr_children_of_stmt, iter_expr, iter_stmts, vars_in


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


def _racing_dimension(index_a, index_b, loop_vars):
    """A dimension where one access is at `v + a` and the other at `v + b`, a != b, for a
    parallel loop variable v: iteration v touches the element that iteration v + a - b touches
    at the other access. None if there is none."""
    for d, (a, b) in enumerate(zip(index_a, index_b)):
        for v in loop_vars:
            sa, sb = _shift(a, v), _shift(b, v)
            if sa is not None and sb is not None and sa != sb:
                return d
    return None


def _check_reads_of_other_iterations(loop, accesses, params, defs):
    """Refuse a store into an element that another iteration of the same parallel loop may also
    store into or add into (`z[i] = ...` beside `z[(i + 1) % n] += ...`), and a read, after a
    store into the same field, of an element another iteration may store: `z[i] = ...` then `z[perm[i]]`, `z[(i + 1) % n]`, `z[ti.min(i + 1,
    n - 1)]` or `z[0]`. Whether the read sees the stored value or the old one depends on the
    order Taichi runs the iterations in (the primal mixed both), and the reverse reads the
    stored one (before session 35 such kernels returned gradients matching no order). Allowed:
    the read of an element only its own iteration stores (every loop variable taking more than
    one value appears in one dimension of both indices as the same shift: `z[i]` and `z[i]`, or
    `z[i, j]` and `z[i, j]`) and accesses that never meet (`disjoint`). A read before the store
    is check_overwrites' case."""
    memo = {}
    for pos, kind, f, s, _, index, loops in accesses:
        if kind != "store":
            continue
        for other_pos, other_kind, g, other, _, other_index, other_loops in accesses:
            if g is not f or other is s or (other_kind == "read" and other_pos < pos) or \
                    _own_element(index, other_index, loop):
                continue
            if disjoint(index, other_index, params, defs, header_ranges((loop,) + loops, memo),
                        header_ranges((loop,) + other_loops, memo)):
                continue
            name = REGISTRY.name_of(f)
            if other_kind != "read":
                raise KernDiffError(
                    f"iterations of this parallel loop store into elements of {name} that other iterations "
                    f"may also {'add into' if other_kind == 'atomic' else 'store into'} "
                    f"('{other.src.text.strip() if other.src else name}'): which comes last depends on the "
                    "order Taichi runs them in, and so would the result and its derivative",
                    s.src, "store and add in separate top-level loops (Taichi finishes a loop before the next "
                           "starts), or write each element from its own iteration only")
            raise KernDiffError(
                f"this parallel loop reads elements of {name} that other iterations may store (after "
                f"'{s.src.text.strip() if s.src else name}'): whether a read sees the stored value or the old "
                "one depends on the order Taichi runs the iterations in, and so would its derivative",
                other.src, "store in one loop and read in a later top-level loop (Taichi finishes a loop "
                           "before the next starts), or read the element the iteration itself stores")


def _own_element(index_a, index_b, loop):
    """Whether every loop variable that takes more than one value is, in some dimension, the
    same shift in both indices: two different iterations then never reach one element."""
    for v, (lo, hi) in zip(loop.vars, loop.bounds):
        if isinstance(lo, N.Const) and isinstance(hi, N.Const) and hi.value - lo.value <= 1:
            continue
        if not any(_shift(a, v) is not None and _shift(a, v) == _shift(b, v) for a, b in zip(index_a, index_b)):
            return False
    return True


def _mirrored(index_a, index_b, loop, params, defs):
    """Whether two accesses certainly meet across iterations by reflection: in one dimension one
    is at `v + a` and the other at `c - v` (integer constants; `z[i]` written, `z[n - 1 - i]`
    read), every other dimension the same expression of no loop variable, and the loop's
    constant range holding two iterations v != v' with v + a == c - v'. Iteration v' then reads
    (or writes) what iteration v writes: the primal depends on their order."""
    loop_vars = set(loop.vars)
    for d, (a, b) in enumerate(zip(index_a, index_b)):
        others = [(x, y) for k, (x, y) in enumerate(zip(index_a, index_b)) if k != d]
        if any(x != y or {v.name for v in vars_in(x)} & loop_vars for x, y in others):
            continue
        for v, (lo, hi) in zip(loop.vars, loop.bounds):
            if not (isinstance(lo, N.Const) and isinstance(hi, N.Const)):
                continue
            fa, fb = _affine(a, params | {v}, defs), _affine(b, params | {v}, defs)
            if fa is None or fb is None or set(fa[0]) != {v} or set(fb[0]) != {v}:
                continue
            if not (isinstance(fa[1], int) and isinstance(fb[1], int)) or fa[0][v] != -fb[0][v] \
                    or abs(fa[0][v]) != 1:
                continue
            # alpha v + ca == -alpha v' + cb  <=>  v' == k - v
            k = (fb[1] - fa[1]) if fa[0][v] == 1 else (fa[1] - fb[1])
            first, last = max(lo.value, k - hi.value + 1), min(hi.value - 1, k - lo.value)
            if last > first or (last == first and 2 * first != k):
                return True
    return False


def check_iteration_races(ir: N.KernelIR):
    """Refuse a parallel loop whose iterations store into an element another iteration reads or
    writes (`z[i + 1] = ...` beside `z[i] += ...`): the primal's result depends on the order in
    which Taichi runs the iterations, so no derivative matches it, and the reverse pass would race
    the same way on the adjoints. Only the certain case is refused: both indices shifts of the
    loop's own variable by different constants. Two atomic adds commute and are not a race."""
    params, defs = {p.name for p in ir.params}, launch_constants(ir)
    for top, loop in enumerate(ir.body):
        if not (isinstance(loop, N.For) and loop.parallel and not loop.serialize):
            continue
        if any(v in assigned_names(loop.body) for v in loop.vars):
            continue
        accesses, memo = field_events(loop.body), {}
        for _, kind, f, s, _, index, loops in accesses:
            if kind != "store":
                continue
            for _, other_kind, g, other, _, other_index, other_loops in accesses:
                if g is not f or other_index is index or disjoint(
                        index, other_index, params, defs, header_ranges((loop,) + loops, memo),
                        header_ranges((loop,) + other_loops, memo)):
                    continue
                if _racing_dimension(index, other_index, loop.vars) is None and \
                        not _mirrored(index, other_index, loop, params, defs):
                    continue
                name = REGISTRY.name_of(f)
                other_text = f"'{other.src.text.strip()}'" if other.src else f"another access to {name}"
                raise KernDiffError(
                    f"iterations of this parallel loop store into elements of {name} that other "
                    f"iterations {'read' if other_kind == 'read' else 'write'} ({other_text}): the result "
                    "depends on the order Taichi runs them in, and so would its derivative",
                    s.src, "put ti.loop_config(serialize=True) before the loop if the order is meant, or "
                           "write the result to a new field (out[i + 1] = ...)")
        _check_reads_of_other_iterations(loop, accesses, params, defs)
        _check_shared_stores(loop)
        _check_stores_reached_by_several(loop)


def _check_shared_stores(loop):
    """Refuse a store that every iteration of a parallel loop makes into elements that do not
    depend on one of its variables (`z[i] = f(x[r])` in `for i, r in ti.ndrange(4, 3)`,
    `s[None] = x[i]`): which iteration's value is left depends on the order Taichi runs them in,
    and each iteration's reverse would read and clear the same adjoint. Only certain cases: a
    store that every iteration reaches (not under an `if`, nor after a statement that may skip
    the rest), whose index reads no local the loop assigns, in a loop whose variable takes more
    than one value (`for _ in range(1):` runs once)."""
    assigned = assigned_names(loop.body)
    for s in _stores_every_iteration(loop.body):
        names = {v.name for e in s.index for v in vars_in(e)}
        if names & assigned:
            continue
        missing = [v for v, (lo, hi) in zip(loop.vars, loop.bounds) if v not in names and not (
            isinstance(lo, N.Const) and isinstance(hi, N.Const) and hi.value - lo.value == 1)]
        if missing:
            name = REGISTRY.name_of(s.ref.field)
            raise KernDiffError(
                f"the iterations of this parallel loop store into the same element of '{name}' (its index does "
                f"not depend on {missing[0]}): the value left depends on the order Taichi runs them in, and so "
                "would its derivative",
                s.src, f"store from one iteration (`if {missing[0]} == 0:`), accumulate (+=) if the values should "
                       f"add up, or make the loop over {missing[0]} an inner loop")


def _check_stores_reached_by_several(loop):
    """Refuse a store into a float field whose index depends on none of a parallel loop's
    variable's values, where no enclosing `if` pins that variable to one value: under a condition
    on the data (`if x[i] > 2.0: z[0] = x[i] ** 2`), in an inner loop of run-time bounds (`for j
    in range(m[None]): z[j] = x[i] * x[j]`) or at a local index counted up in a while loop, every
    iteration that gets there stores into the same elements, the one Taichi runs last wins, and
    the reverse credited an iteration by its own order (wrong gradients before session 35).
    `_check_shared_stores` refuses the stores every iteration reaches; this the rest. Whether
    one iteration alone gets there (the data allowing it) no static check can tell, so the
    remedy is to say so: `if i == k:`. A local index counts as depending on the loop variables
    its definitions read, field loads' indices included (`k = perm[i]; z[k] = ...` is a
    permutation's store, which README.md documents)."""
    depends = _loop_var_dependence(loop)
    for store, conds, inner_loops in _stores_with_conditions(loop.body, ()):
        if not store.ref.dtype.startswith("f") or isinstance(store.value, N.Const):
            continue
        folded = _folded_loop_var(store, loop)
        if folded and not any(_names_outside_loads(c, folded[0]) for c in conds):
            name = REGISTRY.name_of(store.ref.field)
            v, op, c = folded
            raise KernDiffError(
                f"several iterations of this parallel loop store into one element of '{name}' ({v} {op} {c} "
                f"takes the same value for different {v}): the value left depends on the order Taichi runs "
                "them in, and the derivative would credit an iteration whose value was overwritten",
                store.src, "accumulate (+=) if the values should add up, store from one iteration of each "
                           f"group (`if {v} {'%' if op == '//' else '//'} {c} == 0:`-like), or make the loop "
                           "serial (ti.loop_config(serialize=True)) if the last one is meant")
        shared = _shared_by_iterations(store, loop, inner_loops)
        if shared and not any(_names_outside_loads(c, shared) for c in conds) and shared not in \
                set().union(*(_pinned_by(c) for c in conds)):
            name = REGISTRY.name_of(store.ref.field)
            raise KernDiffError(
                f"different iterations of this parallel loop store into the same elements of '{name}' "
                f"(different {shared} reach one element of this index): the value left depends on the order "
                "Taichi runs them in, and the derivative would credit an iteration whose value was overwritten",
                store.src, "accumulate (+=) if the values should add up, or store in a loop whose iterations "
                           "each own their elements, or make the loop serial (ti.loop_config(serialize=True)) "
                           "if the last one is meant")
        reached = set()
        for e in store.index:
            for x in vars_in(e):
                reached |= depends.get(x.name, {x.name})
        pinned = set().union(*(_pinned_by(c) for c in conds))
        missing = [v for v, (lo, hi) in zip(loop.vars, loop.bounds) if v not in reached and v not in pinned
                   and not (isinstance(lo, N.Const) and isinstance(hi, N.Const) and hi.value - lo.value <= 1)]
        if missing:
            name = REGISTRY.name_of(store.ref.field)
            v = missing[0]
            raise KernDiffError(
                f"the iterations of this parallel loop that reach this store write the same elements of "
                f"'{name}' (its index does not depend on {v}): if more than one gets there, the value left "
                "depends on the order Taichi runs them in, and the derivative would credit an iteration "
                "whose value was overwritten",
                store.src, f"store under `if {v} == ...:` where one iteration is meant, accumulate (+=) if the "
                           f"values should add up, ti.atomic_max/min for the largest or smallest, or make the "
                           f"loop over {v} serial (ti.loop_config(serialize=True)) if the last one is meant")


def _stores_with_conditions(stmts, conds, loops=()):
    """(store, conditions of the `if`s around it, negated for `else`, the inner loops around it)
    for the stores in stmts; a statement after `if c: continue` (or break, return) holds `not c`."""
    for s in stmts:
        if isinstance(s, N.Store):
            yield s, conds, loops
        elif isinstance(s, N.If):
            negated = N.Call(dtype="i32", op="not", args=(s.cond,))
            yield from _stores_with_conditions(s.then, conds + (s.cond,), loops)
            yield from _stores_with_conditions(s.orelse, conds + (negated,), loops)
            leaves = (N.Continue, N.Break, N.Return)
            if any(isinstance(t, leaves) for t in s.then):
                conds = conds + (negated,)
            elif any(isinstance(t, leaves) for t in s.orelse):
                conds = conds + (s.cond,)
        else:
            for b in blocks_of(s):
                yield from _stores_with_conditions(b, conds, loops + (s,))


def _shared_by_iterations(store, loop, inner_loops, limit=4096):
    """A loop variable v two different iterations of which certainly store into one element at
    `store` if both get there (`z[(i + j) % 6]` for j in range(2), `z[i // 2]`), found by
    evaluating the index over every combination of the loops' constant ranges (an inner loop of
    run-time bounds taken as two trips: `for j in range(m[None]): z[(i + j) % 6]` shares
    elements whenever it runs twice); None when none
    do, or when the index reads anything but those loops' variables and constants (a field
    load, a local: not decided here), or has more than `limit` combinations to evaluate (a
    transform-time bound: about 10 ms)."""
    if _own_element(store.index, store.index, loop):
        return None  # (each variable a shift in a dimension of its own: nothing to evaluate)
    loops = (loop,) + tuple(inner_loops)
    ranges = {}
    for lp in loops:
        if not isinstance(lp, N.For):
            return None
        reassigned = assigned_names(lp.body)
        for v, (lo, hi) in zip(lp.vars, lp.bounds):
            if not isinstance(lo, N.Const) or v in reassigned or (lp is loop and not isinstance(hi, N.Const)):
                return None
            # an inner loop of run-time bounds: two trips (should it run them, iterations share)
            ranges[v] = range(lo.value, hi.value if isinstance(hi, N.Const) else lo.value + 2)
    names = {x.name for e in store.index for x in vars_in(e)}
    if not names <= set(ranges) or any(isinstance(x, N.Load) for e in store.index for x in iter_expr(e)):
        return None
    order = sorted(names)
    if not names & set(loop.vars):
        return None  # (_check_stores_reached_by_several's case)
    total = 1
    for v in order:
        total *= len(ranges[v])
    if total > limit:
        return None
    from itertools import product
    from ..ir.ops import fold

    def value(e, env):
        if isinstance(e, N.Const):
            return e.value
        if isinstance(e, N.Var):
            return env[e.name]
        if isinstance(e, N.Call):
            args = [value(a, env) for a in e.args]
            if any(a is None for a in args):
                return None
            return fold(e.op, args, e.dtype)
        return None

    first = {}
    for combo in product(*(ranges[v] for v in order)):
        env = dict(zip(order, combo))
        element = tuple(value(e, env) for e in store.index)
        if any(x is None for x in element):
            return None
        iteration = tuple(env.get(v) for v in loop.vars)
        seen = first.setdefault(element, iteration)
        if seen != iteration:
            return next(v for v, a, b in zip(loop.vars, seen, iteration) if a != b)
    return None


def _names_outside_loads(e, v):
    """Whether e reads the local v other than in a field load's index (`i % 2 == 0`, not `x[i] >
    0.5`): a condition on the variable itself may make a folded index one-to-one again."""
    if isinstance(e, N.Var):
        return e.name == v
    if isinstance(e, N.Call):
        return any(_names_outside_loads(a, v) for a in e.args)
    return False


def _pinned_by(cond):
    """The variables cond holds to one value: `v == e` with e free of v, or either side of an `and`."""
    if isinstance(cond, N.Call) and cond.op == "and":
        return _pinned_by(cond.args[0]) | _pinned_by(cond.args[1])
    if isinstance(cond, N.Call) and cond.op == "not" and isinstance(cond.args[0], N.Call) and cond.args[0].op == "ne":
        return _pinned_by(N.Call(dtype=cond.dtype, op="eq", args=cond.args[0].args))
    if isinstance(cond, N.Call) and cond.op == "eq":
        a, b = cond.args
        out = set()
        for x, other in ((a, b), (b, a)):
            if isinstance(x, N.Var) and x.name not in {y.name for y in vars_in(other)}:
                out.add(x.name)
        return out
    return set()


def _loop_var_dependence(loop):
    """{local: the loop's variables its values derive from} for the locals and inner loop
    variables of loop's body (through any assignment, a field load's index included, and an
    inner loop's bounds), to a fixed point."""
    own = set(loop.vars)
    defs = []
    for s in iter_stmts(loop.body):
        if isinstance(s, N.Assign):
            defs.append((s.name, [x.name for x in vars_in(s.value)]))
        elif isinstance(s, N.For):
            reads = [x.name for lo, hi in s.bounds for e in (lo, hi) for x in vars_in(e)]
            defs.extend((v, reads) for v in s.vars)
    depends = {v: {v} for v in own}
    changed = True
    while changed:
        changed = False
        for name, reads in defs:
            got = depends.setdefault(name, set())
            for r in reads:
                extra = depends.get(r, set()) - got
                if extra:
                    got |= extra
                    changed = True
    return depends


def _folded_loop_var(store, loop):
    """(v, '//' or '%', c) when the store's index reaches the loop variable v only through one
    dimension `(v + k) // c` or `(v + k) % c` with c a constant and more than c trips of v (so two
    trips certainly store into one element: `z[i // 2] = x[i]`), where the store writes a float
    field a value that is not a constant; else None. Certain cases only: v in another dimension
    too (`z[i // 2, i % 2]`) may make the index one-to-one again."""
    if not store.ref.dtype.startswith("f") or isinstance(store.value, N.Const):
        return None
    for v, (lo, hi) in zip(loop.vars, loop.bounds):
        dims = [e for e in store.index if v in {x.name for x in vars_in(e)}]
        if len(dims) != 1 or not (isinstance(lo, N.Const) and isinstance(hi, N.Const)):
            continue
        e = dims[0]
        if not (isinstance(e, N.Call) and e.op in ("floordiv", "mod") and isinstance(e.args[1], N.Const)):
            continue
        c = e.args[1].value
        if isinstance(c, int) and c >= (2 if e.op == "floordiv" else 1) and _shift(e.args[0], v) is not None \
                and hi.value - lo.value > c:
            return v, "//" if e.op == "floordiv" else "%", c
    return None


def _stores_every_iteration(body):
    """The stores every run of body reaches: in body itself or in inner loops of constant bounds
    with at least one trip, up to the first statement that may skip the rest."""
    out = []
    for s in body:
        if isinstance(s, N.Store):
            out.append(s)
        elif isinstance(s, N.For) and all(isinstance(lo, N.Const) and isinstance(hi, N.Const) and hi.value > lo.value
                                          for lo, hi in s.bounds):
            out.extend(_stores_every_iteration(s.body))
        if any(isinstance(t, (N.Break, N.Continue, N.Return)) for t in iter_stmts((s,))):
            break
    return out


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
            if kind == "store" and written_in_an_earlier_trip(index, rindex, loops, rloops):
                continue
            if kind == "store" and in_exclusive_branches(s, rs, index, rindex, paths):
                continue
            same_stmt = rs is s
            if rpos < pos or same_stmt:
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
                raise KernDiffError(
                    f"this kernel {what} after {'taking ti.atomic_' + rs.op + ' into' if _is_minmax(rs) else 'reading'}"
                    f" it{where}; {needs}",
                    s.src, "write the result to a new field (out[i] = f(x[i])), or split the kernel in two "
                           "and use kd.Tape, which keeps overwritten values")
            if kind == "atomic" and rtop == top:
                raise KernDiffError(f"this loop reads a field it accumulates into ('{REGISTRY.name_of(f)}'); "
                                    "the value read depends on the order of the parallel iterations", rs.src,
                                    "read it in a later loop or a later kernel")


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
