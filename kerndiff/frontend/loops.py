"""`for` loops: range, ndrange, struct-for over fields, ti.grouped, and ti.static unrolling."""
from __future__ import annotations

import ast
from dataclasses import dataclass

from ..ir import build as B
from ..ir import nodes as N
from .values import Local, array_for_field, is_field
from .vec import Vec


@dataclass
class RangeSpec:
    """A runtime iteration space: a box of (start, stop) per dimension, maybe grouped."""

    bounds: list
    step: int = 1
    grouped: bool = False


def range_spec(lw, args, node):
    if len(args) == 1:
        start, stop, step = 0, args[0], 1
    elif len(args) == 2:
        (start, stop), step = args, 1
    else:
        start, stop, step = args
    if not isinstance(step, int) or step == 0:
        raise lw.error(node, "range step must be a nonzero compile-time integer", "use a constant step")
    return RangeSpec([(start, stop)], step)


def ndrange_spec(lw, args, node):
    bounds = []
    for a in args:
        if isinstance(a, (tuple, list)):
            bounds.append((a[0], a[1]))
        else:
            bounds.append((0, a))
    return RangeSpec(bounds)


# What a ti.static loop unrolls: Python's own sequences and iterators over compile-time values.
PYTHON_ITERABLES = (range, list, tuple, enumerate, zip, reversed, map, filter, dict,
                    type({}.keys()), type({}.values()), type({}.items()))


def field_spec(fieldv):
    from ..runtime.registry import index_offset
    return RangeSpec([(o, o + s) for o, s in zip(index_offset(fieldv), fieldv.shape)])


def _carries_outer_locals(lw, node):
    """Whether the loop's body assigns a local bound before it other than by += / -= (which
    a parallel loop reduces atomically): the value then carries from one trip to the next."""
    from .source import assigned_names
    body = ast.Module(body=node.body, type_ignores=[])
    return any(isinstance(lw.scope.get(n), Local) for n in assigned_names(body, sums=False))


def lower_for(lw, node):

    if node.orelse:
        raise lw.error(node, "for/else is not supported", "use a flag")
    it = lw.expr(node.iter)
    if isinstance(it, PYTHON_ITERABLES) or isinstance(it, Vec):
        return _unroll(lw, node, it)
    from taichi.lang.struct import StructField
    while isinstance(it, StructField):  # a struct-for over a struct field: its members share its shape
        it = it._members[0]
    if is_field(it):
        lw.check_dense(it, node.iter, getattr(node.iter, "id", "field"))
        it = field_spec(it)
    if not isinstance(it, RangeSpec):
        raise array_for_field(lw, node.iter, it, "loop over") or \
            lw.error(node.iter, f"cannot loop over {it!r}",
                     "loop over range(...), ti.ndrange(...), a field, ti.grouped(...) or ti.static(...)")
    dims = len(it.bounds)
    if it.grouped:
        if not isinstance(node.target, ast.Name):
            raise lw.error(node.target, "ti.grouped binds one name", "write `for I in ti.grouped(x)`")
        targets = [f"{node.target.id}_{k}" for k in range(dims)]
    elif isinstance(node.target, ast.Name):
        targets = [node.target.id]
    elif isinstance(node.target, ast.Tuple) and all(isinstance(t, ast.Name) for t in node.target.elts):
        targets = [t.id for t in node.target.elts]
    else:
        raise lw.error(node.target, "unsupported loop target", "use names")
    if len(targets) != dims:
        raise lw.error(node.target, f"{len(targets)} loop variables for a {dims}-d iteration space",
                       "use one variable per dimension, or ti.grouped")
    loop_vars = [lw.names.fresh(t) for t in targets]
    bounds = []
    for start, stop in it.bounds:
        s, e = lw.scalar(start, node.iter), lw.scalar(stop, node.iter)
        bounds.append((B.cast(s, "i32"), B.cast(e, "i32")))
    serialize, config = lw.serialize_next, lw.loop_config_next
    lw.serialize_next, lw.loop_config_next = False, ()
    # A serialized outermost loop that carries a local from one trip to the next runs as the
    # serial loop it is, like an inner loop (Taichi runs its trips in order); without one it
    # stays a parallel loop whose trips kerndiff reverses one by one.
    parallel = lw.depth == 0 and not (serialize and _carries_outer_locals(lw, node))
    lw.depth += 1
    lw.loop_depth += 0 if parallel and not serialize else 1
    lw.blocks.append([])
    if it.step != 1:
        (s, e), = bounds
        counter = lw.names.fresh(targets[0] + "_step")
        # ceil((e - s) / step), written with a positive divisor: (e - s + step - 1) // step, and
        # (s - e - step - 1) // -step for a negative step (range(i - 1, -1, -2): (i + 1) // 2)
        ahead, first, stride = (e, s, it.step) if it.step > 0 else (s, e, -it.step)
        trips = B.call("floordiv", B.add(B.sub(ahead, first), B.const(stride - 1, "i32")), B.const(stride, "i32"))
        bounds = [(B.const(0, "i32"), trips)]
        lw.emit(N.Assign(loop_vars[0], B.add(s, B.mul(B.var(counter, "i32"), B.const(it.step, "i32"))),
                         src=lw.loc(node)))
        header_vars = [counter]
    else:
        header_vars = loop_vars
    outer_scope = dict(lw.scope)
    if it.grouped:
        lw.scope[node.target.id] = Local(loop_vars, (dims,), ["i32"] * dims)
    else:
        for t, v in zip(targets, loop_vars):
            lw.scope[t] = Local([v], None, ["i32"])
    saved_frame = lw.reduction_frame
    if parallel:
        lw.parallel_loops += 1
        lw.reduction_frame = {"outer": {n: v for n, v in lw.scope.items() if isinstance(v, Local)}, "fields": {},
                              "ops": {}, "loop": lw.parallel_loops}
    lw.loop_indexes.append(header_vars)
    for s in node.body:
        lw.stmt(s)
    lw.loop_indexes.pop()
    body = tuple(lw.blocks.pop())
    # As in Taichi, names first bound inside a loop (its index too) end with it: a later loop may
    # bind them afresh, and nothing after the loop reads an iteration's value (or an unset one).
    if parallel:
        lw.end_names(outer_scope, f"the parallel loop at line {lw.loc(node).line}",
                     "each iteration has its own '{name}': store what you need in a field, or reduce it "
                     "into a local defined before the loop with +=")
    else:
        lw.end_names(outer_scope, f"the loop at line {lw.loc(node).line}",
                     "assign '{name}' before the loop (e.g. {name} = 0.0) to carry it out of the loop")
    for name in ([node.target.id] if it.grouped else targets):
        if name in outer_scope:
            lw.scope[name] = outer_scope[name]
    frame, lw.reduction_frame = lw.reduction_frame, saved_frame
    lw.depth -= 1
    lw.loop_depth -= 0 if parallel and not serialize else 1
    reductions = frame["fields"].items() if parallel else ()
    for (name, dtype), ref in reductions:  # a top-level local reduced in the loop lives in a 0-d field
        lw.emit(N.Store(ref, (), B.var(name, dtype), src=lw.loc(node)))
    lw.emit(N.For(tuple(header_vars), tuple(bounds), body, parallel=parallel, serialize=serialize,
                  config=config if lw.depth == 0 else (),
                  src=lw.loc(node)))
    for (name, dtype), ref in reductions:
        lw.emit(N.Assign(name, B.load(ref, ()), src=lw.loc(node)))


def reduction_field(lw, name, dtype, op="add", node=None, user_name=None):
    """The 0-d field standing in for top-level local `name` reduced (+=, or ti.atomic_max/min)
    inside a parallel loop.

    Taichi turns such a local into a global temporary and its += into an atomic add; kerndiff makes
    that explicit so that every transform sees an ordinary field. Each parallel loop of the kernel
    has its own field (`total_sum`, then `total_sum_2`): one field stored, summed into and read
    back by two loops would be overwritten after it was read, which reverse mode must refuse.
    A local is reduced one way within a loop (summed, or its maximum or minimum taken).
    """
    from ..runtime.registry import REGISTRY
    frame = lw.reduction_frame
    ref = frame["fields"].get((name, dtype))
    if ref is None:
        fn, loop = lw.src.fn, frame["loop"]
        key = ("reduce", fn.__module__, fn.__qualname__, name, dtype, loop) + ((op,) if op != "add" else ())
        suffix = {"add": "_sum", "max": "_max", "min": "_min"}[op]
        ref = REGISTRY.ref(REGISTRY.scratch(key, dtype), (), name + suffix + (f"_{loop}" if loop > 1 else ""))
        frame["fields"][(name, dtype)] = ref
        frame["ops"][(name, dtype)] = op
    elif frame["ops"][(name, dtype)] != op:
        shown = {"add": "summed (+=)", "max": "ti.atomic_max", "min": "ti.atomic_min"}
        raise lw.error(node, f"'{user_name or name}' is reduced two ways in one parallel loop "
                             f"({shown[frame['ops'][(name, dtype)]]} and {shown[op]}); the order of the "
                             "iterations would decide the result", "reduce into two locals")
    return ref


def _unroll(lw, node, it):
    items = list(it.items) if isinstance(it, Vec) else list(it)
    for item in items:
        if isinstance(node.target, ast.Name):
            lw.scope[node.target.id] = item
        elif isinstance(node.target, ast.Tuple):
            for t, v in zip(node.target.elts, item):
                lw.scope[t.id] = v
        for s in node.body:
            if isinstance(s, (ast.Break, ast.Continue)):
                raise lw.error(s, "break/continue in a ti.static loop is not supported",
                               "use a runtime loop or restructure with if")
            lw.stmt(s)
