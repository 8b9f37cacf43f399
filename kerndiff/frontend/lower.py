"""Lower a kernel's Python AST to kerndiff IR.

One visitor walks the kernel (and, recursively, every ti.func / kd.func it calls, inlined with a
scope of its own). Values during lowering are of four kinds:
  * IR expressions (scalars), `Vec` (static grids of scalars), Taichi fields, and
  * plain Python values (numbers, modules, functions, ti.static results), evaluated right here.
Statements are appended to the current block; blocks nest for if / for / while.

The visitor is one class, `Lowerer`, in three files: this one (names, values, control flow and
the kernel's entry), frontend.assign (assignments and stores) and frontend.exprs (expressions);
loops, calls and builtins are functions of their own modules taking the Lowerer.
"""
from __future__ import annotations

import ast
import dataclasses
import numbers

import taichi as ti

from ..errors import KernDiffError
from ..ir import build as B
from ..ir import nodes as N
from ..ir.ops import BITWISE
from ..ir.types import default_fp, from_taichi, is_float
from ..ad.old_values import refuse_float_uses
from ..ir.walk import vars_in
from ..ad.names import NameAllocator
from . import vec as V
from .assign import Assignments
from .exprs import Expressions, old_value_refused
from .loops import lower_for
from .operators import ATOMIC_OPS, BIT_AUG_OPS, PYOPS
from .source import Source, parse_function
from .values import FuncReturn, Local, StructValue, is_field
from .vec import Vec


def _kind(value):
    """'an i32', 'a 2-vector of f64' ...: how a local's type reads in a message."""
    if isinstance(value, Local):
        if value.shape is None:
            return f"a {value.dtypes[0]}" if value.dtypes[0].startswith("u") else f"an {value.dtypes[0]}"
        return f"a {'x'.join(map(str, value.shape))} of {', '.join(sorted(set(value.dtypes)))}"
    return "a Python value"


class Lowerer(Assignments, Expressions):
    """The visitor of one kernel or inlined function: its scope of names, the blocks being built,
    and what the loops and reductions around the current statement are (frontend.assign and
    frontend.exprs hold its assignment and expression methods)."""

    def __init__(self, src: Source, scope: dict, names: NameAllocator, parent=None):
        self.src = src
        self.scope = scope
        self.names = names
        self.parent = parent
        # id(field) -> the name this kernel's source gives it; functions it calls fill in only
        # fields the kernel itself never names
        self.field_aliases = {} if parent is None else parent.field_aliases
        self.blocks = [[]]
        self.depth = 0 if parent is None else parent.depth
        self.loop_depth = 0 if parent is None else parent.loop_depth
        # per enclosing loop, its index variables, or for a while loop {"name": its trip counter's,
        # once a draw needs it}: what keys a random draw to its iteration (calls.random_draw)
        self.loop_indexes = [] if parent is None else list(parent.loop_indexes)
        self.serialize_next = False
        self.loop_config_next = ()  # ti.loop_config's other options, for the next outermost loop
        self.reduction_frame = None
        self.parallel_loops = 0  # the kernel's parallel loops lowered so far (each reduces into its own fields)
        self.pending = []  # per if being lowered: names its then-branch bound, which the else may bind too
        self.ended = {}    # name -> the block it was bound in, for names that ended with that block
        # id(call) -> the local `local = call(...)` assigns: the name of what the call binds
        # (an atomic's old value, a number ti.random draws)
        self.assigned_to = {}
        fn = src.fn
        self.globals = dict(getattr(fn, "__globals__", {}))
        if getattr(fn, "__closure__", None):
            for name, cell in zip(fn.__code__.co_freevars, fn.__closure__):
                try:
                    self.globals[name] = cell.cell_contents
                except ValueError:
                    pass

    # ------------------------------------------------------------- plumbing
    @property
    def out(self):
        return self.blocks[-1]

    def emit(self, stmt):
        self.out.append(stmt)

    def block(self, stmts, new_scope_vars=None):
        self.blocks.append([])
        for s in stmts:
            self.stmt(s)
        return tuple(self.blocks.pop())

    def error(self, node, reason, remedy=None):
        return self.src.error(node, reason, remedy)

    def loc(self, node):
        return self.src.loc(node)

    # ------------------------------------------------------------- values
    def scalar(self, v, node) -> N.Expr:
        if isinstance(v, N.Expr):
            return v
        if isinstance(v, bool):
            return B.const(int(v), "i32")
        if isinstance(v, numbers.Integral):
            return B.const(int(v), "i32")
        if isinstance(v, numbers.Real):
            return B.const(float(v), default_fp())
        if isinstance(v, Vec):
            raise self.error(node, "a vector or matrix is used where a scalar is needed",
                             "index it, or reduce it with .sum() / .norm()")
        raise self.error(node, f"the value {v!r} cannot be used inside a kernel",
                         "use numbers, Taichi fields, vectors and ti.func/kd.func functions")

    def value_or_vec(self, v, node):
        return v if isinstance(v, Vec) else self.scalar(v, node)

    def vec(self, v, node) -> Vec:
        if isinstance(v, Vec):
            return v
        if isinstance(v, (list, tuple)):
            return Vec((len(v),), [self.scalar(e, node) for e in v])
        raise self.error(node, "a vector is needed here", "pass a ti.Vector")

    def from_list(self, rows, node) -> Vec:
        """A Python list (or tuple) read as Taichi reads one where a vector or matrix goes
        (ti.Matrix(rows), a store into a vector or matrix field element, `x[i] = [0, 0]`):
        numbers make a vector; lists, or vectors, of one length the rows of a matrix; of one type
        (V.uniform)."""
        if rows and all(isinstance(r, (list, tuple)) or (isinstance(r, Vec) and r.is_vector) for r in rows):
            items = [list(r.items) if isinstance(r, Vec) else [self.scalar(e, node) for e in r] for r in rows]
            if any(len(r) != len(items[0]) for r in items):
                raise self.error(node, f"the rows of this matrix have lengths {[len(r) for r in items]}",
                                 "give every row the same number of entries")
            return V.uniform(Vec((len(items), len(items[0])), [e for r in items for e in r]))
        return V.uniform(Vec((len(rows),), [self.scalar(e, node) for e in rows]))

    def elementwise(self, fn, x, node):
        if isinstance(x, Vec):
            return x.map(fn)
        if isinstance(x, (int, float)):
            x = self.scalar(x, node)
        return fn(self.scalar(x, node))

    def integer_op(self, op, args, node):
        """A bitwise op: integers only, as in Taichi (floats have no bits to operate on here)."""
        if any(is_float(a.dtype) for a in args):
            raise self.error(node, "bitwise operator on a floating-point value", "cast to an integer type first")
        return B.call(op, *args)

    def binary(self, op, a, b, node):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) | isinstance(b, bool):
            if op in PYOPS:
                return PYOPS[op](a, b)
            return {"min": min, "max": max}[op](a, b) if op in ("min", "max") else \
                self.scalar(B.call(op, self.scalar(a, node), self.scalar(b, node)), node)
        if isinstance(a, (list, tuple)):
            a = self.vec(a, node)
        if isinstance(b, (list, tuple)):
            b = self.vec(b, node)
        if isinstance(a, Vec) or isinstance(b, Vec):
            try:
                return V.broadcast(op, a if isinstance(a, Vec) else self.scalar(a, node),
                                   b if isinstance(b, Vec) else self.scalar(b, node),
                                   lambda x, y: self.call_op(op, x, y, node))
            except ValueError as e:
                raise self.error(node, str(e), "make the shapes agree")
        return self.call_op(op, self.scalar(a, node), self.scalar(b, node), node)

    def call_op(self, op, a, b, node):
        return self.integer_op(op, (a, b), node) if op in BITWISE else B.call(op, a, b)

    def select(self, c, a, b, node):
        if isinstance(c, (int, float, bool)):
            return a if c else b
        if isinstance(c, Vec):  # elementwise, as in Taichi: ti.select(v > 0, v, 0.1 * v)
            parts = [x if isinstance(x, Vec) else Vec(c.shape, [self.scalar(x, node)] * len(c.items)) for x in (a, b)]
            if any(p.shape != c.shape for p in parts):
                raise self.error(node, f"ti.select of shapes {c.shape}, {parts[0].shape}, {parts[1].shape}",
                                 "make the condition and both values the same shape (or scalars)")
            return Vec(c.shape, [B.select(self.truth(ci, node), ai, bi)
                                 for ci, ai, bi in zip(c.items, parts[0].items, parts[1].items)])
        c = self.scalar(c, node)
        if isinstance(a, Vec) or isinstance(b, Vec):
            return V.broadcast("select", a if isinstance(a, Vec) else self.scalar(a, node),
                               b if isinstance(b, Vec) else self.scalar(b, node),
                               lambda x, y: B.select(c, x, y))
        return B.select(c, self.scalar(a, node), self.scalar(b, node))

    def cast(self, x, dt, node):
        try:
            d = dt if isinstance(dt, str) else from_taichi(dt)
        except (KeyError, TypeError):
            raise self.error(node, f"unsupported dtype {dt!r}", "use ti.f32, ti.f64, ti.i32 or ti.i64")
        return self.elementwise(lambda e: B.cast(e, d), x, node)

    def truth(self, v, node) -> N.Expr:
        e = self.scalar(v, node)
        if is_float(e.dtype):
            return B.call("ne", e, B.const(0, e.dtype))
        return e

    # ------------------------------------------------------------- names
    def lookup(self, name, node):
        if name in self.scope:
            v = self.scope[name]
            return v.value() if isinstance(v, Local) else self.check_field(v, node)
        if name in self.ended:
            where, remedy = self.ended[name]
            raise self.error(node, f"'{name}' is bound only inside {where}, and ends with it (as in Taichi)",
                             remedy.format(name=name))
        if name in self.globals:
            return self.constant_matrix(self.check_field(self.globals[name], node), node)
        import builtins
        if hasattr(builtins, name):
            return getattr(builtins, name)
        raise self.error(node, f"name '{name}' is not defined", "define it before the kernel")

    def end_names(self, before: dict, where: str, remedy: str, keep=()):
        """Names bound since `before` end here (Taichi scopes locals by block), except `keep`."""
        for name in list(self.scope):
            if name not in before and name not in keep:
                del self.scope[name]
                self.ended[name] = (where, remedy)

    def bind_local(self, name, value, node):
        """Assign a Python local: creates IR locals on first assignment, casts on later ones."""
        self.ended.pop(name, None)
        if isinstance(value, (list, tuple)) and value and all(isinstance(e, (N.Expr, int, float)) for e in value) \
                and any(isinstance(e, N.Expr) for e in value):
            value = self.vec(value, node)
        if name not in self.scope and self.pending and name in self.pending[-1] \
                and self.same_kind(self.pending[-1][name], value, node):
            self.scope[name] = self.pending[-1][name]  # the else-branch binds what the then-branch did
        if isinstance(value, StructValue):
            self.scope[name] = self.struct_copy(value, name, node)
            return
        if not isinstance(value, (N.Expr, Vec)) and not (isinstance(value, numbers.Number) and name in self.scope
                                                        and isinstance(self.scope[name], Local)):
            if isinstance(value, numbers.Number):
                value = self.scalar(value, node)
            else:
                self.scope[name] = value  # a compile-time Python value (field, function, tuple...)
                return
        old = self.scope.get(name)
        items = value.items if isinstance(value, Vec) else [self.scalar(value, node)]
        shape = value.shape if isinstance(value, Vec) else None
        if isinstance(old, Local) and old.shape == shape:
            self.assign_at_once([(n, B.cast(e, d)) for n, d, e in zip(old.names, old.dtypes, items)], node)
            return
        if isinstance(old, Local) and old.shape != shape:
            raise self.error(node, f"'{name}' changes shape from {old.shape} to {shape}",
                             "use a new variable name")
        if shape is None:
            names = [self.names.fresh(name)]
        else:
            names = [self.names.fresh(f"{name}_{'_'.join(map(str, idx))}") for idx in value.indices()]
        dtypes = [e.dtype for e in items]
        for n, e in zip(names, items):
            self.emit(N.Assign(n, e, src=self.loc(node)))
        self.scope[name] = Local(names, shape, dtypes)

    def same_kind(self, bound, value, node):
        """Can the else-branch's `name = value` bind the local the then-branch bound? In Taichi
        the two are separate locals, each with the type of its own first value (`t = 1` and
        `t = 0.25` are an i32 and an f64); kerndiff lets one bound in both branches live on after
        the if, which is only one local where both have the same shape and types. Otherwise
        they stay two, as in Taichi, and the name ends with the if."""
        if not isinstance(bound, Local):
            return True
        if isinstance(value, Vec):
            return bound.shape == value.shape and list(bound.dtypes) == [e.dtype for e in value.items]
        if isinstance(value, (N.Expr, numbers.Number)):
            return bound.shape is None and bound.dtypes[0] == self.scalar(value, node).dtype
        return False

    def assign_at_once(self, pairs, node):
        """Assign the components of one value together: `v = M @ v`, `v = v.normalized()` and
        `p.vel = ti.Vector([p.vel.y, -p.vel.x])` mean every right side is evaluated before any
        component changes. A right side that reads a component assigned before it in the group
        is computed into a temporary first; the others are assigned directly."""
        assigned, early = set(), []
        for name, e in pairs:
            if any(v.name in assigned for v in vars_in(e)):
                early.append(name)
            assigned.add(name)
        if early:
            pairs = [(name, self.materialize(e, f"{name}_new", node, copy=True) if name in early else e)
                     for name, e in pairs]
        for name, e in pairs:
            self.emit(N.Assign(name, e, src=self.loc(node)))

    def struct_copy(self, value, name, node):
        """A struct bound to a name: every member, nested structs' too, copied into locals of its
        own (Taichi's value semantics: a later store into P[i] does not change p)."""
        return StructValue({k: self.struct_copy(v, f"{name}_{k}", node) if isinstance(v, StructValue)
                            else self.materialize(v, f"{name}_{k}", node, copy=True)
                            for k, v in value.members.items()}, value.methods)

    def materialize(self, value, hint, node, copy=False):
        """Bind a value to fresh locals (function arguments are passed by value); copy: also a
        constant or a local (a struct's members, which may be assigned to later)."""
        if isinstance(value, N.Expr) and isinstance(value, (N.Const, N.Var)) and not copy:
            return value
        if isinstance(value, (N.Expr, Vec)):
            tmp = {}
            saved, self.scope = self.scope, tmp
            try:
                self.bind_local(hint, value, node)
            finally:
                self.scope = saved
            return tmp[hint].value()
        return value

    # ------------------------------------------------------------- statements
    def stmt(self, node):
        method = getattr(self, "stmt_" + type(node).__name__, None)
        if method is None:
            raise self.error(node, f"'{type(node).__name__}' statements are not supported in kerndiff kernels",
                             "rewrite it with assignments, if, for and while")
        try:
            method(node)
        except V.ShapeError as e:
            raise self.error(node, str(e), "make the shapes agree (as Taichi requires)") from None
        except (TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
            # A construct the frontend does not model failed in Python: say where, not a traceback.
            raise self.error(node, f"kerndiff cannot lower this statement ({type(e).__name__}: {e})",
                             "rewrite it with simpler Taichi constructs; if it is valid Taichi, report it") from e

    def stmt_Pass(self, node):
        pass

    def print_call(self, call):
        """print(...) in the primal kernel; derivative kernels leave it out (see N.Print)."""
        if call.keywords:
            raise self.error(call, "print's keyword arguments are not supported", "print the values only")
        args = []
        for a in call.args:
            if isinstance(a, ast.JoinedStr):
                args.append(self.fstring(a))
                continue
            v = self.expr(a)
            if isinstance(v, str):
                args.append(v)
            elif isinstance(v, Vec):
                args.append(tuple(self.scalar(e, call) for e in v.items))
            elif isinstance(v, (N.Expr, numbers.Number)):
                args.append(self.scalar(v, call))
            else:
                raise self.error(a, f"cannot print {v!r}", "print strings, numbers, vectors and matrices")
        self.emit(N.Print(tuple(args), src=self.loc(call)))

    def fstring(self, node):
        """print(f"x = {x[i]:.3f}"): compile-time parts (strings, numbers) are formatted now, as
        Python would; values of the kernel stay values, a vector's components one by one."""
        texts, values, specs = [""], [], []

        def text(t):
            if "{" in t or "}" in t:
                raise self.error(node, "Taichi's print cannot show braces in an f-string",
                                 "print them as a separate string argument")
            texts[-1] += t

        for part in node.values:
            if isinstance(part, ast.Constant):
                text(part.value)
                continue
            spec = part.format_spec
            if part.conversion != -1 or (spec and not all(isinstance(p, ast.Constant) for p in spec.values)):
                raise self.error(part, "f-string conversions (!r) and computed format specs cannot be printed "
                                       "by a kernel", "use a constant format spec such as {x:.3f}")
            spec = "".join(p.value for p in spec.values) if spec else ""
            v = self.expr(part.value)
            if isinstance(v, (str, numbers.Number)):
                text(format(v, spec))
                continue
            items = [self.scalar(e, node) for e in v.items] if isinstance(v, Vec) else [self.scalar(v, node)]
            for k, e in enumerate(items):
                text(("[" if k == 0 else ", ") if isinstance(v, Vec) else "")
                values.append(e)
                specs.append(spec)
                texts.append("")
            if isinstance(v, Vec):
                text("]")
        return N.FString(tuple(texts), tuple(values), tuple(specs))

    def stmt_Assert(self, node):
        """A compile-time assert is checked now; a runtime one is dropped, as Taichi does outside
        debug mode (it changes no value, so no derivative either)."""
        cond = self.expr(node.test)
        if not isinstance(cond, (N.Expr, Vec)) and not cond:
            msg = f": {self.expr(node.msg)}" if node.msg is not None else ""
            raise self.error(node, f"this assertion fails at compile time{msg}", "fix the condition or the values")

    def stmt_Expr(self, node):
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return  # docstring
        if isinstance(node.value, ast.Call):
            fn = self.expr(node.value.func)
            if fn is ti.loop_config:
                kw = {k.arg: self.expr(k.value) for k in node.value.keywords}
                self.serialize_next = bool(kw.pop("serialize", False))
                for name, value in kw.items():
                    if value is not None and not isinstance(value, (bool, int)):
                        raise self.error(node, f"ti.loop_config({name}=...) needs a compile-time value",
                                         "pass a Python int or bool (or ti.static(...) of one)")
                self.loop_config_next = tuple(sorted((k, v) for k, v in kw.items() if v is not None))
                return
            if fn in ATOMIC_OPS:
                self.atomic_call(fn, node.value)
                return
            if fn is print:
                self.print_call(node.value)
                return
            if self.fill_call(node.value):
                return
        self.expr(node.value)

    def fill_call(self, call):
        """`v.fill(0.0)`, `x[i, j].fill(0.0)`: Taichi fills the vector or matrix in place (a local,
        a field element, a struct member) with the value cast to its type (one for all components,
        as a Taichi vector has); lowered as the assignment of the filled value to that target.
        False where `call` is no such call."""
        func = call.func
        if not (isinstance(func, ast.Attribute) and func.attr == "fill"):
            return False
        target = self.expr(func.value)
        if not isinstance(target, Vec):
            return False
        if len(call.args) != 1 or call.keywords:
            raise self.error(call, "fill takes one value", "call v.fill(value)")
        value = self.scalar(self.expr(call.args[0]), call)
        self.assign(func.value, Vec(target.shape, [B.cast(value, target.dtype)] * len(target.items)), call)
        return True

    def local_extremum(self, op, target, value, call):
        """ti.atomic_max(m, v) / ti.atomic_min on a local: in a parallel loop over a local bound
        before it, a reduction into a 0-d field (as Taichi makes the local a global there, and as
        `+=` is), differentiated like any atomic max; elsewhere `m = ti.max(m, v)`."""
        val = self.expr(value)
        if self.outer_local(target.id) is None:
            self.assign(target, self.binary(op, self.expr(target), val, call), call)
        else:
            self.reduce_outer_local(target.id, op, val, call)

    def atomic_call(self, fn, call):
        op = ATOMIC_OPS[fn]
        target, value = call.args
        if op in BIT_AUG_OPS:  # ti.atomic_or(t, v) is t |= v, on a field or a local
            aug = ast.AugAssign(target=target, op=BIT_AUG_OPS[op](), value=value)
            self.stmt_AugAssign(ast.copy_location(aug, call))
            return
        if isinstance(target, ast.Name) and op in ("max", "min"):
            self.local_extremum(op, target, value, call)
            return
        if isinstance(target, ast.Name):  # ti.atomic_add(s, v) on a local is s += v (a reduction where Taichi's is)
            aug = ast.AugAssign(target=ast.Name(id=target.id, ctx=ast.Store()),
                                op=ast.Add() if op == "add" else ast.Sub(), value=value)
            self.stmt_AugAssign(ast.copy_location(aug, call))
            return
        val = self.expr(value)
        if op == "sub":
            op, val = "add", self.elementwise(B.neg, val, call)
        self.store(target, val, call, atomic=op)

    def atomic_value(self, fn, call):
        """`slot = ti.atomic_add(count[c], 1)`: the atomic on a field element, with its old value
        bound to a local (N.Atomic.result), named as the local it is assigned to where it is. That
        value depends on the order the threads ran in, which derivative kernels cannot replay: it
        may reach integer work only (ad/old_values.py, which lower_kernel runs)."""
        op = ATOMIC_OPS[fn]
        if op not in ("add", "sub", "max", "min") or not isinstance(call.args[0], ast.Subscript):
            raise old_value_refused(f"ti.{fn.__name__}", self.loc(call), "of a local or by a bitwise operation")
        start = len(self.out)
        self.atomic_call(fn, call)
        made = self.out[start:]
        if not made or not isinstance(made[-1], N.Atomic) or any(isinstance(s, (N.Atomic, N.Store, N.If))
                                                                 for s in made[:-1]):
            raise self.error(call, f"ti.{fn.__name__} returns the old value of one scalar element, "
                                   "not of a vector's", "apply it to one component (v[i][0])")
        name = self.names.fresh(self.assigned_to.get(id(call)) or f"{made[-1].ref.name}_old")
        self.out[-1] = dataclasses.replace(made[-1], result=name)
        return N.Var(made[-1].ref.dtype, name)

    def stmt_If(self, node):
        cond = self.expr(node.test)
        if not isinstance(cond, (N.Expr, Vec)):
            for s in (node.body if cond else node.orelse):
                self.stmt(s)
            return
        c = self.truth(cond, node.test)
        self.depth += 1
        before = dict(self.scope)
        then = self.block(node.body)
        bound_in_then = {n: v for n, v in self.scope.items() if n not in before}
        where = f"a branch of the if at line {self.loc(node.test).line}"
        remedy = "assign '{name}' before the if (e.g. {name} = 0.0), or in both of its branches"
        self.end_names(before, where, remedy)  # the else-branch does not see them...
        self.pending.append(bound_in_then)  # ...but may bind them too
        orelse = self.block(node.orelse)
        self.pending.pop()
        # bound in both branches: defined after the if; in one only: ends with it
        split = {n: self.scope[n] for n in bound_in_then if n in self.scope and n not in before
                 and self.scope[n] is not bound_in_then[n]}  # both, with different types: two locals
        for n, other in split.items():
            kinds = " and ".join(_kind(v) for v in (bound_in_then[n], other))
            self.end_names({k: v for k, v in self.scope.items() if k != n},
                           f"the if at line {self.loc(node.test).line}, whose branches bind it as {kinds}",
                           "assign '{name}' before the if, with the type it should have (e.g. {name} = 0.0)")
        self.end_names(before, where, remedy, keep={n for n in bound_in_then if self.scope.get(n) is bound_in_then[n]})
        self.depth -= 1
        self.emit(N.If(c, then, orelse, src=self.loc(node.test)))

    def stmt_While(self, node):
        if node.orelse:
            raise self.error(node, "while/else is not supported", "use a flag")
        self.blocks.append([])
        cond = self.truth(self.expr(node.test), node.test)
        pre = self.blocks.pop()
        if pre:
            raise self.error(node.test, "this while condition needs statements to evaluate",
                             "compute the condition in a local before the loop and at the end of the body")
        self.depth += 1
        self.loop_depth += 1
        trips = {"name": ""}  # a counter of the trips, made if a draw inside needs it as its key
        self.loop_indexes.append(trips)
        before = dict(self.scope)
        body = self.block(node.body)
        self.loop_indexes.pop()
        if trips["name"]:
            count = B.var(trips["name"], "i32")
            self.emit(N.Assign(trips["name"], B.const(0, "i32"), src=self.loc(node)))
            body = (N.Assign(trips["name"], B.add(count, B.const(1, "i32")), src=self.loc(node)),) + body
        self.end_names(before, f"the while loop at line {self.loc(node).line}",
                       "assign '{name}' before the loop (e.g. {name} = 0.0) to carry it out of the loop")
        self.depth -= 1
        self.loop_depth -= 1
        self.emit(N.While(cond, body, src=self.loc(node)))

    def stmt_Break(self, node):
        if self.loop_depth == 0:
            raise self.error(node, "break outside a serial loop", "break only in inner loops")
        self.emit(N.Break(src=self.loc(node)))

    def stmt_Continue(self, node):
        if self.loop_depth == 0 and self.depth == 0:
            raise self.error(node, "continue outside a loop", "use continue inside loops")
        self.emit(N.Continue(src=self.loc(node)))

    def stmt_Return(self, node):
        raise FuncReturn(node)

    def stmt_For(self, node):
        lower_for(self, node)


def lower_kernel(fn, bound_args: dict, param_dtypes: dict, return_dtype):
    """Lower a kernel function with template arguments bound, returning KernelIR."""
    src = parse_function(fn)
    names = NameAllocator()
    scope = {}
    params = []
    for name, value in bound_args.items():
        scope[name] = value
        names.taken.add(name)
    for name, dtype in param_dtypes.items():
        names.taken.add(name)
        if hasattr(dtype, "names"):  # a vector parameter: its components are scalar parameters
            parts = dtype.names(name)
            names.taken.update(parts)
            scope[name] = Local(parts, dtype.shape, [dtype.dtype] * len(parts))
            params += [N.Param(p, dtype.dtype) for p in parts]
            continue
        scope[name] = Local([name], None, [dtype])
        params.append(N.Param(name, dtype))
    lw = Lowerer(src, scope, names)
    # The fields the kernel names keep those names in the generated source: an inlined function's
    # local takes another (`x_1 = x[i] * 3.0` for ti.math.fract's parameter, not the field renamed)
    code = getattr(fn, "__code__", None)
    for name in (code.co_names + code.co_freevars) if code is not None else ():
        if is_field(lw.globals.get(name)):
            names.taken.add(name)
    returns = ()
    body = src.tree.body
    for i, s in enumerate(body):
        try:
            lw.stmt(s)
        except FuncReturn as r:
            if i != len(body) - 1:
                raise lw.error(r.args[0], "return must be the last statement of a kernel",
                               "store intermediate results in fields")
            if return_dtype is None:
                raise lw.error(r.args[0], "the kernel returns a value but has no return annotation",
                               "annotate it, e.g. `-> ti.f64`")
            val = lw.expr(r.args[0].value) if r.args[0].value is not None else None
            vals = val if isinstance(val, tuple) else tuple(val.items) if isinstance(val, Vec) else (val,)
            dts = return_dtype if isinstance(return_dtype, tuple) else (return_dtype,)
            if len(vals) != len(dts):
                raise lw.error(r.args[0], f"the kernel returns {len(vals)} value(s) where its annotation "
                                          f"declares {len(dts)}",
                               "return what the annotation says, or change the annotation")
            exprs = tuple(B.cast(lw.scalar(v, r.args[0]), d) for v, d in zip(vals, dts))
            lw.emit(N.Return(exprs, src=lw.loc(r.args[0])))
            returns = dts
    if return_dtype is not None and not returns:
        raise KernDiffError(f"kernel {fn.__name__} is annotated to return a value but has no return",
                            remedy="add a return statement or drop the annotation")
    if names.seed:  # the launch's draw seed (runtime/draws.py), after the user's parameters
        params.append(N.Param(names.seed, "u32"))
    aliases = tuple((fid, name) for fid, (_, name) in lw.field_aliases.items())
    ir = N.KernelIR(fn.__name__, tuple(params), tuple(lw.blocks[0]), tuple(returns), tuple(src.lines), aliases,
                    seed=names.seed)
    refuse_float_uses(ir)  # atomics' old values reach integer work only
    return ir
