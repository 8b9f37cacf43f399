"""Generic traversals of the IR: children, free variables, loads, rewriting."""
from __future__ import annotations

import dataclasses

from . import nodes as N
from .types import is_float


def expr_children(e):
    if isinstance(e, N.Load):
        return e.index
    if isinstance(e, N.Call):
        return e.args
    return ()


def iter_expr(e):
    """Every subexpression of e (pre-order, with repeats), as a list (see iter_stmts)."""
    out, stack = [], [e]
    while stack:
        x = stack.pop()
        out.append(x)
        kind = type(x)
        if kind is N.Call:
            stack.extend(x.args)
        elif kind is N.Load:
            stack.extend(x.index)
    return out


def nodes_in(e, kind):
    """The subexpressions of e of one node class, in pre-order with repeats (a hot path of every
    pass: no generator)."""
    out, stack = [], [e]
    while stack:
        x = stack.pop()
        t = type(x)
        if t is kind:
            out.append(x)
        if t is N.Call:
            stack.extend(x.args)
        elif t is N.Load:
            stack.extend(x.index)
    return out


def vars_in(e):
    """The locals e reads (in pre-order, with repeats). Nodes are immutable, so a call's or a
    load's tuple is kept on the node: the passes ask for the same subexpressions' locals many
    times (about 5% of a transform's time)."""
    if isinstance(e, N.Var):
        return (e,)
    if not isinstance(e, (N.Call, N.Load)):
        return ()
    got = e.__dict__.get("_vars")
    if got is None:
        got = tuple(nodes_in(e, N.Var))
        object.__setattr__(e, "_vars", got)
    return got


def loads_in(e):
    return nodes_in(e, N.Load)


def unsafe_to_speculate(e):
    """e reads a field or divides integers: evaluated where the select holding it does not choose
    it, it may read out of range (an illegal address on a GPU) or trap (SIGFPE), as Taichi's
    short-circuit `a if c else b` never does. Such branches are emitted as conditionals and kept
    whole by the optimizer (nothing is computed from them ahead of their select)."""
    for x in iter_expr(e):
        if isinstance(x, N.Load) or (isinstance(x, N.Call) and x.op in ("div", "floordiv", "mod")
                                     and not is_float(x.dtype)):
            return True
    return False


def guarded_select(e):
    """e is a select with a branch that is unsafe to speculate."""
    return isinstance(e, N.Call) and e.op == "select" and any(map(unsafe_to_speculate, e.args[1:]))


def expr_children_of_stmt(s):
    """The expressions a statement evaluates (not those of nested blocks)."""
    if isinstance(s, N.Assign):
        return (s.value,)
    if isinstance(s, (N.Store, N.Atomic)):
        return tuple(s.index) + (s.value,)
    if isinstance(s, (N.If, N.While)):
        return (s.cond,)
    if isinstance(s, N.For):
        return tuple(b for pair in s.bounds for b in pair)
    if isinstance(s, N.Return):
        return tuple(s.values)
    if isinstance(s, N.Print):
        return tuple(s.exprs())
    return ()


def blocks_of(s):
    kind = type(s)
    if kind is N.If:
        return (s.then, s.orelse)
    if kind is N.For or kind is N.While:
        return (s.body,)
    return ()


def iter_stmts(stmts):
    """Every statement, nested ones included (pre-order), as a list: the passes walk statements
    more than anything else, and a list built in one call costs a fraction of nested generators."""
    out = []
    _append_stmts(stmts, out)
    return out


def _append_stmts(stmts, out):
    for s in stmts:
        out.append(s)
        for b in blocks_of(s):
            _append_stmts(b, out)


def assigned_names(stmts):
    out = set()
    for s in iter_stmts(stmts):
        if isinstance(s, N.Assign):
            out.add(s.name)
        elif isinstance(s, N.For):
            out.update(s.vars)
        elif isinstance(s, N.Atomic) and s.result:
            out.add(s.result)
    return out


def carried_names(body):
    """Locals of the loop body read in a trip before the trip assigns them (an accumulator
    `s = s + ...`, a value handed to the next trip): what the body assigns, read where no
    assignment of it in the trip comes first (an assignment inside an `if` counts within it)."""
    assigned = assigned_names(body)
    carried = set()

    def walk(stmts, defined):
        defined = set(defined)
        for s in stmts:
            for e in expr_children_of_stmt(s):
                carried.update(v.name for v in vars_in(e) if v.name in assigned and v.name not in defined)
            for b in blocks_of(s):
                walk(b, defined)
            if isinstance(s, N.Assign):
                defined.add(s.name)

    walk(body, set())
    return carried


def jumps_out(stmts, kinds=(N.Break, N.Continue)) -> bool:
    """Whether stmts hold a jump of `kinds` (N.Break, N.Continue) that leaves the loop whose body
    they are: in them or in their ifs, not in a loop nested in them."""
    for s in stmts:
        if isinstance(s, kinds):
            return True
        if isinstance(s, N.If) and (jumps_out(s.then, kinds) or jumps_out(s.orelse, kinds)):
            return True
    return False


def old_value_atomics(stmts):
    """The atomics that bind the element's old value to a local (N.Atomic.result)."""
    return [s for s in iter_stmts(stmts) if isinstance(s, N.Atomic) and s.result]


def writes_floats(ir) -> bool:
    """Whether the kernel stores, adds or returns a float value: else its reverse has no work."""
    from .types import is_float
    return any(is_float(d) for d in ir.returns) or any(
        isinstance(s, (N.Store, N.Atomic)) and is_float(s.ref.dtype) for s in iter_stmts(ir.body))


def writes_of(s):
    """(locals, ids of fields) that s, or a statement nested in it, assigns or stores into."""
    fields = {id(t.ref.field) for t in iter_stmts((s,)) if isinstance(t, (N.Store, N.Atomic))}
    return assigned_names((s,)), fields


def accesses(s):
    """(what an Assign, Store or Atomic writes, what it reads): local names and field components
    (FieldRefs, interned per component, so two components of a vector field are apart)."""
    exprs = expr_children_of_stmt(s)
    reads = {v.name for e in exprs for v in vars_in(e)} | {x.ref for e in exprs for x in loads_in(e)}
    if isinstance(s, N.Assign):
        return {s.name}, reads
    return {s.ref, s.result} - {""} if isinstance(s, N.Atomic) else {s.ref}, reads


def independent(a, b):
    """Whether two Assign/Store/Atomic statements run in either order alike: neither writes
    anything the other reads or writes."""
    (wa, ra), (wb, rb) = accesses(a), accesses(b)
    return not (wa & (wb | rb) or wb & ra)


def mentioned_names(s):
    """The locals s, or a statement nested in it, reads or assigns."""
    out = set()
    for t in iter_stmts((s,)):
        if isinstance(t, N.Assign):
            out.add(t.name)
        elif isinstance(t, N.For):
            out.update(t.vars)
        elif isinstance(t, N.Atomic) and t.result:
            out.add(t.result)
        for e in expr_children_of_stmt(t):
            out.update(v.name for v in vars_in(e))
    return out


def mentions(s, name):
    """Whether s, or a statement nested in it, reads or assigns the local `name`."""
    for t in iter_stmts((s,)):
        if isinstance(t, N.Assign) and t.name == name or isinstance(t, N.For) and name in t.vars \
                or isinstance(t, N.Atomic) and t.result == name:
            return True
        if any(v.name == name for e in expr_children_of_stmt(t) for v in vars_in(e)):
            return True
    return False


def read_counts(stmts):
    """Counter: local name -> how many times stmts (nested ones included) read it."""
    from collections import Counter

    counts = Counter()
    for s in iter_stmts(stmts):
        for e in expr_children_of_stmt(s):
            counts.update(v.name for v in vars_in(e))
    return counts


def used_names(stmts):
    return set(read_counts(stmts))


def map_expr(e, fn, indices=True):
    """Rebuild e bottom-up, replacing each node x by fn(x) (fn sees already-rebuilt children);
    indices=False leaves the index expressions of loads as they are."""
    from . import build as B

    if isinstance(e, N.Load):
        if indices:
            e = N.Load(e.dtype, e.ref, tuple(map_expr(i, fn) for i in e.index))
    elif isinstance(e, N.Call):
        args = tuple(map_expr(a, fn, indices) for a in e.args)
        if args != e.args:
            e = B.cast(args[0], e.dtype) if e.op == "cast" else B.call(e.op, *args)
    return fn(e)


def substitute(e, mapping: dict):
    """Replace Vars by expressions (mapping: name -> Expr). Only the Vars e has are replaced: a
    node that the rebuild simplifies into a Var (`-(-x)` after x -> -x) is not replaced again,
    which map_expr's fn, seeing every rebuilt node, would do (opt.scales maps x to x * -1.0)."""
    if not mapping:
        return e
    from . import build as B

    def walk(x):
        if isinstance(x, N.Var):
            return mapping.get(x.name, x)
        if isinstance(x, N.Load):
            index = tuple(walk(i) for i in x.index)
            return x if index == x.index else N.Load(x.dtype, x.ref, index)
        if isinstance(x, N.Call):
            args = tuple(walk(a) for a in x.args)
            if args != x.args:
                return B.cast(args[0], x.dtype) if x.op == "cast" else B.call(x.op, *args)
        return x

    return walk(e)


def rebuild_stmt(s, blocks):
    """A copy of s with its nested blocks replaced."""

    if isinstance(s, N.If):
        return dataclasses.replace(s, then=blocks[0], orelse=blocks[1])
    if isinstance(s, (N.For, N.While)):
        return dataclasses.replace(s, body=blocks[0])
    return s


def map_stmts(stmts, fn):
    """A copy of stmts with fn(s) in place of each statement s, nested ones included (fn sees a
    statement before its nested blocks are mapped)."""
    out = []
    for s in stmts:
        s = fn(s)
        blocks = blocks_of(s)
        if blocks:
            s = rebuild_stmt(s, [map_stmts(b, fn) for b in blocks])
        out.append(s)
    return tuple(out)


def map_stmt_exprs(s, fn):
    """A copy of s with each expression it evaluates (not its nested blocks) replaced by fn(e)."""

    if isinstance(s, N.Assign):
        return dataclasses.replace(s, value=fn(s.value))
    if isinstance(s, (N.Store, N.Atomic)):
        return dataclasses.replace(s, index=tuple(fn(i) for i in s.index), value=fn(s.value))
    if isinstance(s, (N.If, N.While)):
        return dataclasses.replace(s, cond=fn(s.cond))
    if isinstance(s, N.For):
        return dataclasses.replace(s, bounds=tuple((fn(a), fn(b)) for a, b in s.bounds))
    if isinstance(s, N.Return):
        return dataclasses.replace(s, values=tuple(fn(v) for v in s.values))
    if isinstance(s, N.Print):
        return dataclasses.replace(s, args=tuple(_map_print_arg(a, fn) for a in s.args))
    return s


def _map_print_arg(a, fn):
    if isinstance(a, N.Expr):
        return fn(a)
    if isinstance(a, tuple):
        return tuple(fn(e) for e in a)
    if isinstance(a, N.FString):
        return dataclasses.replace(a, values=tuple(fn(e) for e in a.values))
    return a


def substitute_block(stmts, mapping):
    """Replace Vars by expressions in every statement of a block, nested blocks included."""
    out = []
    for s in stmts:
        s = map_stmt_exprs(s, lambda e: substitute(e, mapping))
        blocks = blocks_of(s)
        if blocks:
            s = rebuild_stmt(s, [substitute_block(b, mapping) for b in blocks])
        out.append(s)
    return tuple(out)


def renamed(e, names):
    """e with Vars renamed (names: old -> new), nodes rebuilt as they are (substitute's smart
    constructors know only Taichi's ops, not codegen.cpu_math's sincos or tanh_via_exp)."""
    if isinstance(e, N.Var):
        return dataclasses.replace(e, name=names[e.name]) if e.name in names else e
    if isinstance(e, N.Load):
        return dataclasses.replace(e, index=tuple(renamed(i, names) for i in e.index))
    if isinstance(e, N.Call):
        return dataclasses.replace(e, args=tuple(renamed(a, names) for a in e.args))
    return e


def renamed_block(stmts, names):
    """stmts with the locals in names (old -> new) renamed wherever they are read or assigned,
    loop variables included."""
    def rename(s):
        s = map_stmt_exprs(s, lambda e: renamed(e, names))
        if isinstance(s, N.Assign):
            return dataclasses.replace(s, name=names.get(s.name, s.name))
        if isinstance(s, N.For):
            return dataclasses.replace(s, vars=tuple(names.get(v, v) for v in s.vars))
        return s
    return map_stmts(stmts, rename)


def without_prints(stmts):
    """stmts with every Print removed, nested blocks included (what the transforms see)."""
    out = []
    for s in stmts:
        if isinstance(s, N.Print):
            continue
        blocks = blocks_of(s)
        out.append(rebuild_stmt(s, [without_prints(b) for b in blocks]) if blocks else s)
    return tuple(out)


def without_effects(stmts, keep, on_keep):
    """stmts with their effects removed (stores, atomics, returns, prints: what recomputes a
    loop's values without running it again), except the stores and atomics keep(s) picks, each
    replaced by the statements on_keep(s). Jumps stay: they decide what runs."""
    out = []
    for s in stmts:
        if isinstance(s, (N.Store, N.Atomic)) and keep(s):
            out.extend(on_keep(s))
        elif isinstance(s, (N.Store, N.Atomic, N.Return, N.Print)):
            continue
        else:
            blocks = blocks_of(s)
            out.append(rebuild_stmt(s, [tuple(without_effects(b, keep, on_keep)) for b in blocks]) if blocks else s)
    return out
