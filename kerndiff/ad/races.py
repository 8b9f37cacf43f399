"""Races between the iterations of a parallel loop, refused in reverse mode.

Taichi runs a parallel loop's iterations in no fixed order. Where two iterations store into one
element, or one reads or adds into an element another stores, the primal's result depends on
that order, and no derivative matches every run: the reverse pass (`t = z_adj[e]; z_adj[e] =
0`) credits whichever iteration it meets first, and reads see stored values where the primal
may have read old ones. These checks refuse such loops, naming the line; each comment says which
cases it can decide. A store at an index read from a field (`z[perm[i]]`) is taken to be a
permutation's (README.md). ad/hazards.py holds the other half of the global data access rule:
values overwritten after they were read.
"""
from __future__ import annotations

from itertools import product

from ..errors import KernDiffError
from ..ir import nodes as N
from ..ir.ops import fold
from ..ir.walk import assigned_names, blocks_of, iter_expr, iter_stmts, vars_in
from ..runtime.registry import REGISTRY
from .hazards import _affine, _shift, disjoint, field_events, header_ranges, launch_constants


# Why a store that several iterations make is refused (the end of their refusals' reasons).
OVERWRITTEN = ("the value left depends on the order Taichi runs them in, and the derivative would credit an "
               "iteration whose value was overwritten")


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
    store into the same field, of an element another iteration may store: `z[i] = ...` then
    `z[perm[i]]`, `z[(i + 1) % n]`, `z[ti.min(i + 1, n - 1)]` or `z[0]`. Whether the read sees
    the stored value or the old one depends on the order Taichi runs the iterations in (the
    primal mixed both), and the reverse reads the stored one (before session 35 such kernels
    returned gradients matching no order). Allowed: an element only its own iteration reaches
    (every loop variable taking more than one value appears in one dimension of both indices as
    the same shift: `z[i]` and `z[i]`, or `z[i, j]` and `z[i, j]`), the same index twice where it
    reads every loop variable (`z[perm[i]]` stored and read back: a permutation's own element),
    and accesses that never meet (`disjoint`). A read before the
    store is check_overwrites' case."""
    memo = {}
    for pos, kind, f, s, _, index, loops in accesses:
        if kind != "store":
            continue
        for other_pos, other_kind, g, other, _, other_index, other_loops in accesses:
            if g is not f or other is s or (other_kind == "read" and other_pos < pos) or \
                    (index == other_index and _names_every_variable(index, loop)) or \
                    own_element(index, other_index, loop):
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


def _varying(loop):
    """The loop's variables that may take more than one value (constant bounds of at most one
    trip fix theirs)."""
    return [v for v, (lo, hi) in zip(loop.vars, loop.bounds)
            if not (isinstance(lo, N.Const) and isinstance(hi, N.Const) and hi.value - lo.value <= 1)]


def _names_every_variable(index, loop):
    """Whether index reads every loop variable that takes more than one value (in a load's index
    too: `z[perm[i]]`), so that the same index twice is one iteration's element where the index
    is one-to-one (`z[0]` twice is every iteration's)."""
    names = {x.name for e in index for x in vars_in(e)}
    return all(v in names for v in _varying(loop))


def own_element(index_a, index_b, loop):
    """Whether every loop variable that takes more than one value is, in some dimension, the
    same shift in both indices: two different iterations then never reach one element."""
    for v in _varying(loop):
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
    writes: the primal's result depends on the order in which Taichi runs the iterations, so no
    derivative matches it, and the reverse pass would race the same way on the adjoints. Here:
    both indices shifts of the loop's own variable by different constants (`z[i + 1] = ...`
    beside `z[i] += ...`) or mirrored (`z[i]` beside `z[c - i]`); then the checks below it.
    Two atomic adds commute and are not a race."""
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
    for store, conds, inner_loops in stores_with_conditions(loop.body, ()):
        if not store.ref.dtype.startswith("f") or isinstance(store.value, N.Const):
            continue
        folded = _folded_loop_var(store, loop)
        if folded and not any(_names_outside_loads(c, folded[0]) for c in conds):
            name = REGISTRY.name_of(store.ref.field)
            v, op, c = folded
            raise KernDiffError(
                f"several iterations of this parallel loop store into one element of '{name}' ({v} {op} {c} "
                f"takes the same value for different {v}): " + OVERWRITTEN,
                store.src, "accumulate (+=) if the values should add up, store from one iteration of each "
                           f"group (`if {v} {'%' if op == '//' else '//'} {c} == 0:`-like), or make the loop "
                           "serial (ti.loop_config(serialize=True)) if the last one is meant")
        shared = _shared_by_iterations(store, loop, inner_loops, conds)
        if shared:
            name = REGISTRY.name_of(store.ref.field)
            raise KernDiffError(
                f"different iterations of this parallel loop store into the same elements of '{name}' "
                f"(different {shared} reach one element of this index): " + OVERWRITTEN,
                store.src, "accumulate (+=) if the values should add up, or store in a loop whose iterations "
                           "each own their elements, or make the loop serial (ti.loop_config(serialize=True)) "
                           "if the last one is meant")
        reached = set()
        for e in store.index:
            for x in vars_in(e):
                reached |= depends.get(x.name, {x.name})
        pinned = set().union(*(_pinned_by(c) for c in conds))
        missing = [v for v in _varying(loop) if v not in reached and v not in pinned]
        if missing:
            name = REGISTRY.name_of(store.ref.field)
            v = missing[0]
            raise KernDiffError(
                f"the iterations of this parallel loop that reach this store write the same elements of "
                f"'{name}' (its index does not depend on {v}): if more than one gets there, " + OVERWRITTEN,
                store.src, f"store under `if {v} == ...:` where one iteration is meant, accumulate (+=) if the "
                           f"values should add up, ti.atomic_max/min for the largest or smallest, or make the "
                           f"loop over {v} serial (ti.loop_config(serialize=True)) if the last one is meant")


def stores_with_conditions(stmts, conds, loops=()):
    """(store, conditions of the `if`s around it, negated for `else`, the inner loops around it)
    for the stores in stmts; a statement after `if c: continue` (or break, return) holds `not c`."""
    for s in stmts:
        if isinstance(s, N.Store):
            yield s, conds, loops
        elif isinstance(s, N.If):
            negated = N.Call(dtype="i32", op="not", args=(s.cond,))
            yield from stores_with_conditions(s.then, conds + (s.cond,), loops)
            yield from stores_with_conditions(s.orelse, conds + (negated,), loops)
            leaves = (N.Continue, N.Break, N.Return)
            if any(isinstance(t, leaves) for t in s.then):
                conds = conds + (negated,)
            elif any(isinstance(t, leaves) for t in s.orelse):
                conds = conds + (s.cond,)
        else:
            for b in blocks_of(s):
                yield from stores_with_conditions(b, conds, loops + (s,))


def _shared_by_iterations(store, loop, inner_loops, conds=(), limit=4096):
    """A loop variable two different iterations of which certainly reach one element at
    `store`, or None (see _evaluated_sharing)."""
    return _evaluated_sharing(store, loop, inner_loops, conds, limit)[1]


def one_to_one(store, loop, inner_loops, conds=(), limit=4096):
    """Whether no two different iterations of the loop reach one element at `store`, as decided
    by its index alone: each loop variable its own shift, or the evaluation below finding no
    element twice. False where that is not decided (a field load, a local, too many
    combinations): ad/claims.py then checks at run time."""
    if any(not all(isinstance(e, N.Const) for b in lp.bounds for e in b) for lp in inner_loops
           if isinstance(lp, N.For)):
        return own_element(store.index, store.index, loop)  # (run-time bounds were taken as two trips)
    decided, shared = _evaluated_sharing(store, loop, inner_loops, conds, limit)
    return decided and shared is None


def _evaluated_sharing(store, loop, inner_loops, conds=(), limit=4096):
    """A loop variable v two different iterations of which certainly store into one element at
    `store` if both get there (`z[(i + j) % 6]` for j in range(2), `z[i // 2]`), found by
    evaluating the index over every combination of the loops' constant ranges (an inner loop of
    run-time bounds taken as two trips: `for j in range(m[None]): z[(i + j) % 6]` shares
    elements whenever it runs twice), skipping the combinations a condition around the store on
    those variables alone rules out (`if i % 2 == 0:`; a condition on data may hold); None when none
    do, or when the index reads anything but those loops' variables and constants (a field
    load, a local: not decided here), or has more than `limit` combinations to evaluate (a
    transform-time bound: about 10 ms). Returned as (decided, that variable or None): decided is
False where the evaluation stood aside."""
    if own_element(store.index, store.index, loop):
        return True, None  # (each variable a shift in a dimension of its own: nothing to evaluate)
    loops = (loop,) + tuple(inner_loops)
    ranges = {}
    for lp in loops:
        if not isinstance(lp, N.For):
            return False, None
        reassigned = assigned_names(lp.body)
        for v, (lo, hi) in zip(lp.vars, lp.bounds):
            if not isinstance(lo, N.Const) or v in reassigned or (lp is loop and not isinstance(hi, N.Const)):
                return False, None
            # an inner loop of run-time bounds: two trips (should it run them, iterations share)
            ranges[v] = range(lo.value, hi.value if isinstance(hi, N.Const) else lo.value + 2)
    names = {x.name for e in store.index for x in vars_in(e)}
    if not names <= set(ranges) or any(isinstance(x, N.Load) for e in store.index for x in iter_expr(e)):
        return False, None
    order = sorted(names)
    if not names & set(loop.vars):
        return False, None  # (_check_stores_reached_by_several's case)

    def value(e, env):
        if isinstance(e, N.Const):
            return e.value
        if isinstance(e, N.Var):
            return env.get(e.name)
        if isinstance(e, N.Call):
            args = [value(a, env) for a in e.args]
            if any(a is None for a in args):
                return None
            return fold(e.op, args, e.dtype)
        return None

    first = {}
    cond_names = {x.name for c in conds for x in vars_in(c)}
    order += sorted(v for v in cond_names & set(ranges) if v not in names)
    total = 1
    for v in order:
        total *= len(ranges[v])
    if total > limit:
        return False, None
    for combo in product(*(ranges[v] for v in order)):
        env = dict(zip(order, combo))
        # a condition on the loop variables alone is decided; one on data may hold
        if any(value(c, env) == 0 for c in conds):
            continue
        element = tuple(value(e, env) for e in store.index)
        if any(x is None for x in element):
            return False, None
        iteration = tuple(env.get(v) for v in loop.vars)
        seen = first.setdefault(element, iteration)
        if seen != iteration:
            return True, next(v for v, a, b in zip(loop.vars, seen, iteration) if a != b)
    return True, None


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
