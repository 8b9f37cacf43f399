"""Lower a kernel's Python AST to kerndiff IR.

One visitor walks the kernel (and, recursively, every ti.func / kd.func it calls, inlined with a
scope of its own). Values during lowering are of four kinds:
  * IR expressions (scalars), `Vec` (static grids of scalars), Taichi fields, and
  * plain Python values (numbers, modules, functions, ti.static results), evaluated right here.
Statements are appended to the current block; blocks nest for if / for / while.
"""
from __future__ import annotations

import ast
import numbers

import taichi as ti
from taichi.lang.field import ScalarField
from taichi.lang.matrix import Matrix, MatrixField
from taichi.lang.struct import StructField

from ..errors import KernDiffError
from ..ir import build as B
from ..ir import nodes as N
from ..ir.conditions import all_of
from ..ir.ops import BITWISE
from ..ir.types import default_fp, from_taichi, is_float, is_int
from ..ir.walk import loads_in, vars_in
from ..runtime.registry import REGISTRY
from ..ad.names import NameAllocator
from . import vec as V
from .source import Source, parse_function
from .vec import Vec

BINOPS = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "div", ast.FloorDiv: "floordiv",
          ast.Mod: "mod", ast.Pow: "pow", ast.BitAnd: "bit_and", ast.BitOr: "bit_or", ast.BitXor: "bit_xor",
          ast.LShift: "shl", ast.RShift: "shr"}
CMPOPS = {ast.Lt: "lt", ast.LtE: "le", ast.Gt: "gt", ast.GtE: "ge", ast.Eq: "eq", ast.NotEq: "ne"}
SYMBOLS = {"bit_and": "&", "bit_or": "|", "bit_xor": "^"}
PYOPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
         "div": lambda a, b: a / b, "floordiv": lambda a, b: a // b, "mod": lambda a, b: a % b,
         "pow": lambda a, b: a ** b, "lt": lambda a, b: a < b, "le": lambda a, b: a <= b,
         "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b, "eq": lambda a, b: a == b,
         "ne": lambda a, b: a != b, "bit_and": lambda a, b: a & b, "bit_or": lambda a, b: a | b,
         "bit_xor": lambda a, b: a ^ b, "shl": lambda a, b: a << b, "shr": lambda a, b: a >> b}


# ti.atomic_* called as a statement: the IR's atomic operation (sub is add of the negation)
ATOMIC_OPS = {ti.atomic_add: "add", ti.atomic_sub: "sub", ti.atomic_max: "max", ti.atomic_min: "min",
              ti.atomic_and: "and", ti.atomic_or: "or", ti.atomic_xor: "xor"}
BIT_AUG_OPS = {"and": ast.BitAnd, "or": ast.BitOr, "xor": ast.BitXor}


def is_field(v) -> bool:
    return isinstance(v, (ScalarField, MatrixField))


SPARSE = ("pointer", "bitmasked", "dynamic", "hash")


def is_sparse(field) -> bool:
    sn = field.snode
    while sn is not None and sn.ptr is not None:
        if str(sn.ptr.type).rsplit(".", 1)[-1] in SPARSE:
            return True
        parent = sn.parent()
        if parent is None or parent.ptr is None or parent.ptr.id == sn.ptr.id:
            return False
        sn = parent
    return False


SWIZZLE_SETS = ("xyzw", "rgba", "stpq")


def swizzle_index(attr):
    """The components `.xy`, `.zyx`, `.rg`, `.stp` name (Taichi's three letter sets, never mixed),
    or None when attr is not a swizzle."""
    for letters in SWIZZLE_SETS:
        if 1 <= len(attr) <= 4 and all(c in letters for c in attr):
            return [letters.index(c) for c in attr]
    return None


class StructValue:
    """One element of a struct field (ti.Struct.field, ti.dataclass), read whole: `p = P[i]`.
    Its members are IR values; bound to a name, they are copied into locals (Taichi's value
    semantics: a later store into P[i] does not change p)."""

    __slots__ = ("members", "methods")

    def __init__(self, members: dict, methods: dict):
        self.members, self.methods = members, methods


class StructMethod:
    """`p.area` for a ti.dataclass method: called, it is inlined with `self` bound to p."""

    __slots__ = ("fn", "target")

    def __init__(self, fn, target: StructValue):
        self.fn, self.target = fn, target


def struct_member_access(target, evaluate):
    """`P[i].pos` as `P.pos[i]`, recursively (`P[i].pos.x`, nested structs), for a struct field P:
    member fields are ordinary fields, so loads, stores and derivative fields follow from them.
    evaluate: the lowerer's expression evaluator, to tell struct fields apart. Returns the
    rewritten ast node, or the node itself."""
    if isinstance(target, ast.Attribute):
        inner = struct_member_access(target.value, evaluate)
        base = evaluate(inner.value) if isinstance(inner, ast.Subscript) else None
        if isinstance(base, StructField) and target.attr in base.keys:
            member = ast.copy_location(ast.Attribute(value=inner.value, attr=target.attr, ctx=ast.Load()), target)
            return ast.copy_location(ast.Subscript(value=member, slice=inner.slice, ctx=target.ctx), target)
        return target if inner is target.value else ast.copy_location(
            ast.Attribute(value=inner, attr=target.attr, ctx=target.ctx), target)
    if isinstance(target, ast.Subscript):
        inner = struct_member_access(target.value, evaluate)
        return target if inner is target.value else ast.copy_location(
            ast.Subscript(value=inner, slice=target.slice, ctx=target.ctx), target)
    return target


class Local:
    """A Python local name bound to IR locals: one scalar, or a Vec of component locals."""

    __slots__ = ("names", "shape", "dtypes")

    def __init__(self, names, shape, dtypes):
        self.names, self.shape, self.dtypes = names, shape, dtypes

    def value(self):
        items = [B.var(n, d) for n, d in zip(self.names, self.dtypes)]
        return items[0] if self.shape is None else Vec(self.shape, items)


def _offset_form(e):
    """An index expression as (base, constant offset): t + 1 -> (t, 1), t -> (t, 0)."""
    if isinstance(e, N.Call) and e.op in ("add", "sub") and isinstance(e.args[1], N.Const) \
            and isinstance(e.args[1].value, numbers.Integral):
        return e.args[0], e.args[1].value if e.op == "add" else -e.args[1].value
    if isinstance(e, N.Const) and isinstance(e.value, numbers.Integral):
        return None, e.value
    return e, 0


def _disjoint(a, b):
    """Whether two indices of one field surely name different elements: some axis holds the same
    base at different constant offsets (x[t, i] and x[t + 1, i]), or different constants."""
    for ea, eb in zip(a, b):
        (ba, ca), (bb, cb) = _offset_form(ea), _offset_form(eb)
        if ba == bb and ca != cb:
            return True
    return False


def _exprs_of(value):
    """The IR expressions of a value: itself, the items of a Vec, the entries of a list/tuple."""
    if isinstance(value, N.Expr):
        return [value]
    if isinstance(value, Vec):
        return list(value.items)
    if isinstance(value, (list, tuple)):
        return [e for v in value for e in _exprs_of(v)]
    return []


class Method:
    """`v.norm` before it is called."""

    def __init__(self, name, target):
        self.name, self.target = name, target


class FuncReturn(Exception):
    pass


def _kind(value):
    """'an i32', 'a 2-vector of f64' ...: how a local's type reads in a message."""
    if isinstance(value, Local):
        if value.shape is None:
            return f"a {value.dtypes[0]}" if value.dtypes[0].startswith("u") else f"an {value.dtypes[0]}"
        return f"a {'x'.join(map(str, value.shape))} of {', '.join(sorted(set(value.dtypes)))}"
    return "a Python value"


class Lowerer:
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
        self.serialize_next = False
        self.loop_config_next = ()  # ti.loop_config's other options, for the next outermost loop
        self.reduction_frame = None
        self.parallel_loops = 0  # the kernel's parallel loops lowered so far (each reduces into its own fields)
        self.pending = []  # per if being lowered: names its then-branch bound, which the else may bind too
        self.ended = {}    # name -> the block it was bound in, for names that ended with that block
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
        self.expr(node.value)

    def atomic_call(self, fn, call):
        op = ATOMIC_OPS[fn]
        target, value = call.args
        if op in BIT_AUG_OPS:  # ti.atomic_or(t, v) is t |= v, on a field or a local
            aug = ast.AugAssign(target=target, op=BIT_AUG_OPS[op](), value=value)
            self.stmt_AugAssign(ast.copy_location(aug, call))
            return
        if isinstance(target, ast.Name):  # ti.atomic_add(s, v) on a local is s += v (a reduction where Taichi's is)
            if op not in ("add", "sub"):
                raise self.error(call, f"ti.atomic_{op} of a local variable is not supported",
                                 f"write `{target.id} = ti.{op}({target.id}, ...)` in a serial loop, or reduce "
                                 "into a 0-d field")
            aug = ast.AugAssign(target=ast.Name(id=target.id, ctx=ast.Store()),
                                op=ast.Add() if op == "add" else ast.Sub(), value=value)
            self.stmt_AugAssign(ast.copy_location(aug, call))
            return
        val = self.expr(value)
        if op == "sub":
            op, val = "add", self.elementwise(B.neg, val, call)
        self.store(target, val, call, atomic=op)

    def stmt_Assign(self, node):
        value = self.expr(node.value)
        if len(node.targets) > 1 and any(vars_in(e) or loads_in(e) for e in _exprs_of(value)):
            # v = w = v * 2.0: the value is computed once, before the first target changes
            value = self.materialize(value, "value", node, copy=True)
        for target in node.targets:
            self.assign(target, value, node)

    def stmt_AnnAssign(self, node):
        value = self.expr(node.value)
        if node.annotation is not None and isinstance(node.target, ast.Name):
            ann = self.expr(node.annotation)
            try:
                value = self.cast(value, ann, node)
            except KernDiffError:
                pass
        self.assign(node.target, value, node)

    def outer_local(self, name):
        """The Local bound outside the enclosing parallel loop, if `name` is one."""
        frame = self.reduction_frame
        if frame is None:
            return None
        local = frame["outer"].get(name)
        return local if local is not None and self.scope.get(name) is local else None

    def assign(self, target, value, node):
        if (parts := self.swizzle_targets(target, value, node)) is not None:
            for part, item in parts:
                self.assign(part, item, node)
            return
        if isinstance(target, ast.Name) and self.outer_local(target.id) is not None:
            raise self.error(node, f"'{target.id}' is defined outside this parallel loop and cannot be "
                                   "assigned inside it (iterations run in parallel)",
                             "reduce into it with +=, or use a local defined inside the loop")
        if isinstance(target, ast.Name):
            self.bind_local(target.id, value, node)
        elif isinstance(target, (ast.Tuple, ast.List)):
            if isinstance(value, Vec):
                parts = [value.items[i] for i in range(value.shape[0])] if value.is_vector else \
                    [value.row(i) for i in range(value.shape[0])]
            elif isinstance(value, (tuple, list)):
                parts = list(value)
            else:
                raise self.error(node, "cannot unpack a scalar", "assign to one name")
            if len(parts) != len(target.elts):
                raise self.error(node, f"unpacking {len(parts)} values into {len(target.elts)} names",
                                 "make the counts match")
            # Evaluate all right-hand sides before assigning (p, q = q, p + q): into temporaries
            # where a right-hand side reads a name assigned before it, else straight into the names.
            early = self.unpacking_reads_targets(target.elts, parts)
            parts = [self.materialize(p, "tmp", node, copy=True) if first and isinstance(p, (N.Expr, Vec)) else p
                     for p, first in zip(parts, early)]
            for t, p in zip(target.elts, parts):
                self.assign(t, p, node)
        elif (element := self.struct_target(target)) is not None:
            self.store_struct(element, value, node)
        elif (element := self.field_target(target)) is not None:
            self.store(element, value, node)
        elif isinstance(target, ast.Subscript):
            base = self.expr(target.value)
            if is_field(base):
                self.store(target, value, node)
            elif isinstance(base, Vec) and self.local_vector(target.value) is not None:
                self.assign_component(target.value, self.index_parts(target.slice, node), value, node)
            else:
                raise self.error(node, "this subscript cannot be assigned to",
                                 "assign to a field element or to an element of a local vector")
        elif isinstance(target, ast.Attribute) and (struct := self.local_struct(target.value)) is not None:
            self.assign_member(struct, target.attr, value, node)
        elif isinstance(target, ast.Attribute) and (isinstance(target.value, ast.Name)
                                                    or self.local_vector(target.value) is not None):
            k = swizzle_index(target.attr)
            if k is None or len(k) != 1:
                raise self.error(node, f"cannot assign to .{target.attr}", "assign to .x/.y/.z/.w or an index")
            self.assign_component(target.value, (k[0],), value, node)
        else:
            raise self.error(node, "unsupported assignment target", "assign to a name or a field element")

    def struct_target(self, target):
        """A store target naming a whole element of a struct field, as `P.member[i]` for a struct
        member: P[i], P[i].inner; else None."""
        target = struct_member_access(target, self.expr)
        if isinstance(target, ast.Subscript) and isinstance(self.expr(target.value), StructField):
            return target
        return None

    def store_struct(self, target, value, node):
        """`P[i] = p` for a struct field P: one store per member (`P.pos[i] = p.pos`, nested
        structs member by member), every member of p read before any is stored, as Taichi
        evaluates the right side first (`P[i] = P[j]` where i may equal j)."""
        stores = []

        def flatten(target, value, struct):
            if not isinstance(value, StructValue) or set(value.members) != set(struct.keys):
                raise self.error(node, f"a struct element takes a struct with members {list(struct.keys)}",
                                 "assign an element of the same struct type, or assign the members one by one")
            for key in struct.keys:
                member = ast.copy_location(ast.Subscript(
                    value=ast.copy_location(ast.Attribute(value=target.value, attr=key, ctx=ast.Load()), target),
                    slice=target.slice, ctx=ast.Store()), target)
                item = value.members[key]
                if isinstance(getattr(struct, key), StructField):
                    flatten(member, item, getattr(struct, key))
                elif isinstance(item, Vec):
                    stores.append((member, Vec(item.shape, [self.materialize(e, f"{key}_new", node) for e in item.items])))
                else:
                    stores.append((member, self.materialize(item, f"{key}_new", node)))

        flatten(target, value, self.expr(target.value))
        for member, item in stores:
            self.assign(member, item, node)

    def swizzle_targets(self, target, value, node):
        """`v.xy = w` / `x[i].zx += w`: one single-component target per letter, paired with the
        components of w, all read before any is assigned (`v.xy = v.yx` swaps, as in Taichi).
        None when target is not a multi-letter swizzle."""
        if not (isinstance(target, ast.Attribute) and len(target.attr) > 1 and swizzle_index(target.attr)):
            return None
        items = self.vec(value, node).items if isinstance(value, (Vec, list, tuple)) else None
        if items is None or len(items) != len(target.attr):
            raise self.error(node, f".{target.attr} takes a {len(target.attr)}-vector", "assign a vector of that size")
        parts = [ast.copy_location(ast.Attribute(value=target.value, attr=c, ctx=ast.Store()), target)
                 for c in target.attr]
        return list(zip(parts, (self.materialize(e, "tmp", node, copy=True) for e in items)))

    def field_target(self, target):
        """A store target naming a field element or one of its components, as a Subscript store()
        takes: x[i], x[i][k], m[i][r, c], and x[i].y (as x[i][1]); else None."""
        target = struct_member_access(target, self.expr)
        if isinstance(target, ast.Attribute) and len(target.attr) == 1 and swizzle_index(target.attr) \
                and isinstance(target.value, ast.Subscript) and is_field(self.expr(target.value.value)):
            component = ast.Constant(swizzle_index(target.attr)[0])
            return ast.copy_location(ast.Subscript(value=target.value, slice=component, ctx=ast.Store()), target)
        if isinstance(target, ast.Subscript) and (
                is_field(self.expr(target.value)) or isinstance(target.value, ast.Subscript)
                and is_field(self.expr(target.value.value))):
            return target
        return None

    def unpacking_reads_targets(self, targets, parts):
        """Which right sides of `a, b = ...` must be evaluated into temporaries before the
        assignments: those reading a name assigned before them (`q` in `p, q = q, p`); all of
        them where a target is not a plain name (`v[0], v[1] = v[1], v[0]`)."""
        if not all(isinstance(t, ast.Name) for t in targets):
            return [True] * len(parts)
        early, bound = [], set()
        for t, p in zip(targets, parts):
            early.append(any(v.name in bound for e in _exprs_of(p) for v in vars_in(e)))
            local = self.scope.get(t.id)
            if isinstance(local, Local):
                bound.update(local.names)
        return early

    def assign_member(self, struct, attr, value, node):
        """`p.r = v` for a struct bound to a local: its members are locals of their own."""
        def pairs(struct, attr, value):
            old = struct.members.get(attr)
            if old is None:
                raise self.error(node, f"the struct has no member '{attr}'", f"use one of {list(struct.members)}")
            if isinstance(old, StructValue):  # p.inner = Inner(...): member by member
                if not (isinstance(value, StructValue) and set(value.members) == set(old.members)):
                    raise self.error(node, f"member '{attr}' is a struct with members {list(old.members)}",
                                     "assign a struct value of that type")
                return [p for k in old.members for p in pairs(old, k, value.members[k])]
            if isinstance(old, Vec):
                new = self.vec(value, node) if isinstance(value, (Vec, list, tuple)) else Vec(old.shape, [value] * len(old.items))
                if new.shape != old.shape:
                    raise self.error(node, f"member '{attr}' has shape {old.shape}, not {new.shape}", "match the shapes")
                return list(zip(old.items, new.items))
            return [(old, self.scalar(value, node))]

        self.assign_at_once([(var.name, B.cast(self.scalar(e, node), var.dtype))
                             for var, e in pairs(struct, attr, value)], node)

    def local_struct(self, target):
        """The struct bound to a local that target names: `p`, or a nested member `p.inner`;
        else None."""
        if isinstance(target, ast.Name):
            struct = self.scope.get(target.id)
        elif isinstance(target, ast.Attribute) and (outer := self.local_struct(target.value)) is not None:
            struct = outer.members.get(target.attr)
        else:
            return None
        return struct if isinstance(struct, StructValue) else None

    def local_vector(self, target):
        """The Local a store target names when it is a local vector or matrix: a name (`v`) or a
        vector member of a struct bound to a local (`p.vel`); else None."""
        if isinstance(target, ast.Name):
            local = self.scope.get(target.id)
            return local if isinstance(local, Local) and local.shape is not None else None
        if isinstance(target, ast.Attribute) and (struct := self.local_struct(target.value)) is not None:
            member = struct.members.get(target.attr)
            if isinstance(member, Vec) and all(isinstance(e, N.Var) for e in member.items):
                return Local([e.name for e in member.items], member.shape, [e.dtype for e in member.items])
        return None

    def assign_component(self, target, idx, value, node):
        """target[idx] = value for a local vector or matrix (see local_vector)."""
        local = self.local_vector(target)
        name = getattr(target, "id", getattr(target, "attr", "v"))
        if local is None:
            raise self.error(node, f"'{name}' is not a local vector", "index vectors and matrices only")
        if len(local.shape) == 2 and len(idx) == 1:
            for j in range(local.shape[1]):
                self.assign_component(target, (idx[0], j), self.vec(value, node).items[j], node)
            return
        e = self.scalar(value, node)
        if not all(isinstance(i, numbers.Integral) for i in idx):  # v[d] = e: each component keeps or takes e
            # evaluated once, before any component changes (v[int(v[0])] = 1.0 must not move twice)
            idx = self.fixed_index(idx, node)
            e = self.materialize(e, f"{name}_new", node)
            for flat, cond in self.component_choices(idx, local.shape, node):
                old = B.var(local.names[flat], local.dtypes[flat])
                self.emit(N.Assign(local.names[flat], B.select(cond, B.cast(e, local.dtypes[flat]), old),
                                   src=self.loc(node)))
            return
        flat = idx[0] if len(idx) == 1 else idx[0] * local.shape[1] + idx[1]
        if not 0 <= flat < len(local.names):
            raise self.error(node, f"index {idx} is out of range for shape {local.shape}", "check the index")
        self.emit(N.Assign(local.names[flat], B.cast(e, local.dtypes[flat]), src=self.loc(node)))

    def index_parts(self, sl, node):
        """A vector/matrix subscript as a tuple of Python ints and, where only known at run time,
        integer IR expressions."""
        idx = self.expr(sl)
        if isinstance(idx, Vec) and idx.is_vector:  # M[I] with I from ti.grouped: M[I[0], I[1]]
            idx = tuple(idx.items)
        idx = tuple(_known_int(i) for i in idx) if isinstance(idx, tuple) else (_known_int(idx),)
        for i in idx:
            if not isinstance(i, (numbers.Integral, slice)) and not (isinstance(i, N.Expr) and is_int(i.dtype)):
                raise self.error(node, "vector and matrix indices must be integers", "index with ints")
        return idx

    def expr_Slice(self, node):
        """`v[1:3]`, `A[1, :]`: a slice of compile-time ints, as Taichi requires."""
        parts = [None if e is None else _known_int(self.expr(e)) for e in (node.lower, node.upper, node.step)]
        if not all(p is None or isinstance(p, numbers.Integral) for p in parts):
            raise self.error(node, "slice bounds must be known at compile time", "use constants or ti.static values")
        return slice(*parts)

    def component_choices(self, idx, shape, node):
        """[(flat position, condition)] for an index with runtime parts into a vector or matrix of
        `shape`: Taichi indexes local vectors and field components dynamically (`for d in
        range(3): v[d]`); kerndiff's IR is scalar, so a read selects among the components and a
        write updates the one whose condition holds. An index out of range names no component."""
        if len(idx) != len(shape):
            raise self.error(node, f"{len(idx)} indices for shape {shape}", "use one index per dimension")
        choices = []
        for pos in (range(shape[0]) if len(shape) == 1 else
                    [(r, c) for r in range(shape[0]) for c in range(shape[1])]):
            pos = pos if isinstance(pos, tuple) else (pos,)
            if any(isinstance(got, numbers.Integral) and got != want for want, got in zip(pos, idx)):
                continue
            # `A[j, (j + 1) % 3]`: (0, 1) where j == 0; (0, 0) is not possible (ir.conditions)
            cond = all_of(B.call("eq", got, B.const(want, got.dtype))
                          for want, got in zip(pos, idx) if not isinstance(got, numbers.Integral))
            if not isinstance(cond, N.Const):
                choices.append((pos[0] if len(pos) == 1 else pos[0] * shape[1] + pos[1], cond))
        return choices

    def dynamic_read(self, base, idx, node):
        if len(base.shape) == 2 and len(idx) == 1:  # a row: each column selects among the rows
            return Vec((base.shape[1],), [self.dynamic_read(base, (idx[0], j), node) for j in range(base.shape[1])])
        choices = self.component_choices(idx, base.shape, node)
        out = base.items[choices[-1][0]]
        for flat, cond in reversed(choices[:-1]):
            out = B.select(cond, base.items[flat], out)
        return out

    def static_index(self, sl, node):
        idx = self.index_parts(sl, node)
        if not all(isinstance(i, numbers.Integral) for i in idx):
            raise self.error(node, "vectors and matrices can only be indexed by compile-time constants here",
                             "use ti.static(range(n)) for the loop that indexes it, or a field")
        return tuple(int(i) for i in idx)

    def stmt_AugAssign(self, node):
        op = BINOPS.get(type(node.op))
        if op is None:
            raise self.error(node, f"augmented assignment '{type(node.op).__name__}' is not supported",
                             "write it out: a = a op b")
        value = self.expr(node.value)
        if isinstance(node.target, ast.Attribute) and len(node.target.attr) > 1 and swizzle_index(node.target.attr):
            value = self.binary(op, self.expr(node.target), value, node) if op not in ("add", "sub") else value
            parts = self.swizzle_targets(node.target, value, node)
            for part, item in parts:  # field components add atomically, one by one, as in Taichi
                self.aug_assign(part, op if op in ("add", "sub") else None, item, node)
            return
        self.aug_assign(node.target, op, value, node)

    def aug_assign(self, t, op, value, node):
        """t op= value (op None: t = value, the operation already applied)."""
        if op is None:
            self.assign(t, value, node)
            return
        if isinstance(t, ast.Name) and self.outer_local(t.id) is not None:
            if op not in ("add", "sub"):
                raise self.error(node, f"'{t.id}' is defined outside this parallel loop; only += and -= "
                                       "(atomic reductions) may update it here",
                                 "accumulate with += / -=, or use a field")
            from .loops import reduction_field
            local = self.outer_local(t.id)
            items = value.items if isinstance(value, Vec) else [self.scalar(value, node)] * len(local.names)
            for n, d, e in zip(local.names, local.dtypes, items):
                e = B.neg(e) if op == "sub" else e
                self.emit(N.Atomic("add", reduction_field(self, n, d), (), B.cast(e, d), src=self.loc(node)))
            return
        if (element := self.field_target(t)) is not None:
            t = element
            if op in ("bit_and", "bit_or", "bit_xor"):  # an atomic and / or / xor in Taichi, as here
                self.store(t, value, node, atomic=op[4:])
                return
            if op in ("add", "sub"):
                if op == "sub":
                    value = self.elementwise(B.neg, value, node)
                self.store(t, value, node, atomic="add")
            else:
                self.store(t, self.binary(op, self.expr(t), value, node), node)
            return
        current = self.expr(t)
        if op in ("add", "sub", "bit_and", "bit_or", "bit_xor"):
            value = self.in_type_of(current, value, node)
        self.assign(t, self.binary(op, current, value, node), node)

    def in_type_of(self, current, value, node):
        """value cast to the type of the local it updates. Taichi runs `t += v` (and -=, &=, |=,
        ^=) on a local as an atomic operation, which casts v to t's type first: with t an i32,
        `t += 0.5 * x` adds int(0.5 * x), and with t an f32, the sum is rounded once, in f32."""
        if isinstance(current, Vec):
            items = value.items if isinstance(value, Vec) else [value] * len(current.items)
            if len(items) != len(current.items):
                return value  # a shape mismatch: binary() says so
            return Vec(current.shape, [B.cast(self.scalar(v, node), c.dtype) for v, c in zip(items, current.items)])
        if isinstance(value, Vec):
            return value
        return B.cast(self.scalar(value, node), current.dtype)

    def field_index(self, fieldv, sl, node):
        idx = self.expr(sl) if sl is not None else None
        if idx is None:
            idx = ()
        elif isinstance(idx, Vec):
            idx = tuple(idx.items)
        elif not isinstance(idx, tuple):
            idx = (idx,)
        flat = []
        for i in idx:
            if isinstance(i, Vec):
                flat.extend(i.items)
            else:
                flat.append(i)
        out = tuple(self.scalar(i, node) for i in flat)
        if len(out) != len(fieldv.shape):
            raise self.error(node, f"a {len(fieldv.shape)}-d field is indexed with {len(out)} indices",
                             "use x[None] for 0-d fields and one index per dimension otherwise")
        for i in out:
            if not is_int(i.dtype):
                raise self.error(node, "field indices must be integers", "cast with int(...) or ti.cast")
        return out

    def constant_matrix(self, value, node):
        """A ti.Vector / ti.Matrix made in Python scope and captured by the kernel is a constant,
        as in Taichi (its entries are read when the kernel compiles)."""
        if not isinstance(value, Matrix):
            return value
        entries = value.to_numpy()
        items = [self.scalar(int(e) if entries.dtype.kind in "iu" else float(e), node) for e in entries.ravel()]
        return Vec(tuple(entries.shape), items)

    def check_field(self, value, node):
        """Refuse a field of an earlier ti.init before anything touches it (its memory is gone)."""
        if is_field(value) and REGISTRY.is_stale(value):
            name = getattr(node, "id", None) or getattr(node, "attr", "field")
            raise self.error(node, f"'{name}' is a field of an earlier ti.init; ti.init/ti.reset made a new "
                                   "Taichi runtime in which it no longer exists",
                             "create the fields again after ti.init (and the kernels that use them)")
        return value

    def check_dense(self, fieldv, node, name):
        """kerndiff lowers fields to dense index spaces (from their offset); a sparse field would
        silently change meaning (struct-fors visiting inactive cells, writes activating them)."""
        from ..runtime.registry import placed
        if not placed(fieldv):
            raise self.error(node, f"'{name}' is not placed: it has no shape and no SNode yet",
                             "give it a shape (ti.field(dtype, shape=...)) or place it, e.g. "
                             "ti.root.dense(ti.i, n).place(f), before the kernel runs")
        if is_sparse(fieldv):
            raise self.error(node, f"'{name}' lives in a sparse SNode (pointer / bitmasked / dynamic / hash); "
                                   "kerndiff differentiates dense fields only",
                             "place the field (and its derivative fields) in dense SNodes, "
                             "e.g. ti.field(dtype, shape=...)")

    def refs_of(self, fieldv, node, name):
        self.check_dense(fieldv, node, name)
        seen, in_function = self.field_aliases.get(id(fieldv)), self.parent is not None
        if name and name != "field" and (seen is None or (seen[0] and not in_function)):
            self.field_aliases[id(fieldv)] = (in_function, name)
        if isinstance(fieldv, MatrixField):
            if fieldv.ndim == 1:
                comps = [(c,) for c in range(fieldv.n)]
                shape = (fieldv.n,)
            else:
                comps = [(r, c) for r in range(fieldv.n) for c in range(fieldv.m)]
                shape = (fieldv.n, fieldv.m)
            return [REGISTRY.ref(fieldv, c, name) for c in comps], shape
        return [REGISTRY.ref(fieldv, (), name)], None

    def field_name(self, node):
        """The name generated code gives a field: its Python name, a struct member's prefixed by
        its struct's, so that R.v and O.s.v do not both read `v` in `k.reverse.source`."""
        while isinstance(node, ast.Subscript):
            node = node.value
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            if isinstance(self.expr(node.value), StructField):  # P.pos -> P_pos, O.s.v -> O_s_v
                return f"{self.field_name(node.value)}_{node.attr}"
            return node.attr
        return "field"

    def store(self, target, value, node, atomic=None):
        """Store into a field element (target is an ast.Subscript, maybe with a component index)."""
        base_node, comp = target.value, None
        fieldv = self.expr(base_node)
        if not is_field(fieldv):  # x[i][0] = ... : a component of a vector field element
            inner = base_node
            if isinstance(inner, ast.Subscript) and is_field(self.expr(inner.value)):
                comp = self.index_parts(target.slice, node)
                fieldv = self.expr(inner.value)
                target = inner
            else:
                raise self.error(node, "unsupported store target", "store into field[index]")
        refs, shape = self.refs_of(fieldv, node, self.field_name(target))
        index = self.field_index(fieldv, target.slice, node)
        if shape is not None:
            value, index = self.read_before_storing(refs, value, index, self.field_name(target), node)
        if shape is not None and comp is not None and not all(isinstance(c, numbers.Integral) for c in comp):
            # x[i][d] = e, x[i][d] += e: the store (or atomic add) into the component d names
            e = self.scalar(value, node) if not (len(shape) == 2 and len(comp) == 1) else value
            if len(shape) == 2 and len(comp) == 1:  # m[i][r] = row
                row = self.vec(value, node) if isinstance(value, (Vec, list, tuple)) else None
                for j in range(shape[1]):
                    item = row.items[j] if row is not None else value
                    self.store_component(refs, index, (comp[0], j), shape, item, node, atomic)
                return
            self.store_component(refs, index, comp, shape, e, node, atomic)
            return
        if shape is not None and comp is not None:
            flat = comp[0] if len(comp) == 1 and len(shape) == 1 else comp[0] * shape[1] + comp[1]
            refs, shape = [refs[flat]], None
        if shape is None:
            items = [self.scalar(value, node)]
        else:
            if not isinstance(value, Vec):
                value = Vec(shape, [self.scalar(value, node)] * len(refs))
            if value.shape != shape and len(value.items) != len(refs):
                raise self.error(node, f"storing shape {value.shape} into a field of shape {shape}",
                                 "make the shapes agree")
            items = value.items
        for ref, e in zip(refs, items):
            if atomic in ("and", "or", "xor") and not is_int(ref.dtype):
                raise self.error(node, f"an atomic {atomic} needs an integer field; "
                                       f"'{self.field_name(target)}' holds {ref.dtype}", "use an integer field")
            e = B.cast(e, ref.dtype)
            if atomic:
                self.emit(N.Atomic(atomic, ref, index, e, src=self.loc(node)))
            else:
                self.emit(N.Store(ref, index, e, src=self.loc(node)))

    def read_before_storing(self, refs, value, index, name, node):
        """`x[i] = M @ x[i]`, `x[i] = x[i].normalized()`, `x[i] += ti.Vector([x[i].y, x[i].x])`:
        a vector is stored one component at a time, so a value (or the index) reading the field's
        components is evaluated into locals first, as Taichi evaluates the right side before storing."""
        stored = {ref.field for ref in refs}

        def reads_target(v):
            return any(load.ref.field in stored and not _disjoint(load.index, index)
                       for e in _exprs_of(v) for load in loads_in(e))

        if reads_target(value):
            value = self.materialize(value, f"{name}_new", node, copy=True)
        if any(reads_target(i) for i in index):
            index = tuple(self.materialize(i, f"{name}_at", node) for i in index)
        return value, index

    def fixed_index(self, idx, node):
        """Runtime index parts bound to locals: the choices they make must not change while the
        components they choose among are written."""
        return tuple(i if isinstance(i, numbers.Integral) else self.materialize(i, "component", node) for i in idx)

    def store_component(self, refs, index, comp, shape, value, node, atomic):
        comp = self.fixed_index(comp, node)
        e = self.materialize(self.scalar(value, node), "stored", node)
        for flat, cond in self.component_choices(comp, shape, node):
            ref = refs[flat]
            stmt = (N.Atomic(atomic, ref, index, B.cast(e, ref.dtype), src=self.loc(node)) if atomic
                    else N.Store(ref, index, B.cast(e, ref.dtype), src=self.loc(node)))
            self.emit(N.If(cond, (stmt,), src=self.loc(node)) if cond is not None else stmt)

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
        before = dict(self.scope)
        body = self.block(node.body)
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
        from .loops import lower_for
        lower_for(self, node)

    # ------------------------------------------------------------- expressions
    def expr(self, node):
        method = getattr(self, "expr_" + type(node).__name__, None)
        if method is None:
            raise self.error(node, f"'{type(node).__name__}' expressions are not supported in kerndiff kernels",
                             "use arithmetic, calls of Taichi functions, fields and vectors")
        return method(node)

    def expr_Constant(self, node):
        return node.value

    def expr_Name(self, node):
        return self.lookup(node.id, node)

    def expr_Tuple(self, node):
        return tuple(self.expr(e) for e in node.elts)

    expr_List = expr_Tuple

    def expr_Attribute(self, node):
        member = struct_member_access(node, self.expr)
        if member is not node:
            return self.expr(member)
        base = self.expr(node.value)
        if isinstance(base, StructValue):
            if node.attr in base.methods:
                return StructMethod(base.methods[node.attr], base)
            if node.attr not in base.members:
                raise self.error(node, f"the struct has no member '{node.attr}'", f"use one of {list(base.members)}")
            return base.members[node.attr]
        if isinstance(base, Vec):
            attr = node.attr
            idx = swizzle_index(attr) if base.is_vector else None
            if idx is not None:
                if max(idx) >= base.shape[0]:
                    raise self.error(node, f".{attr} is out of range for a {base.shape[0]}-vector", "check the size")
                return base.items[idx[0]] if len(idx) == 1 else Vec((len(idx),), [base.items[i] for i in idx])
            if attr == "n":
                return base.shape[0]
            if attr == "m":
                return 1 if base.is_vector else base.shape[1]
            return Method(attr, base)
        if isinstance(base, N.Expr):
            return Method(node.attr, base)
        try:
            return self.constant_matrix(self.check_field(getattr(base, node.attr), node), node)
        except AttributeError:
            raise self.error(node, f"{base!r} has no attribute '{node.attr}'", "check the name")

    def expr_Subscript(self, node):
        base = self.expr(node.value)
        if isinstance(base, StructField):
            def member(key):
                attr = ast.copy_location(ast.Attribute(value=node.value, attr=key, ctx=ast.Load()), node)
                return self.expr(ast.copy_location(ast.Subscript(value=attr, slice=node.slice, ctx=ast.Load()), node))
            return StructValue({k: member(k) for k in base.keys}, base.struct_methods or {})
        if is_field(base):
            refs, shape = self.refs_of(base, node, self.field_name(node))
            index = self.field_index(base, node.slice, node)
            loads = [B.load(r, index) for r in refs]
            return loads[0] if shape is None else Vec(shape, loads)
        if isinstance(base, Vec):
            idx = self.index_parts(node.slice, node)
            if any(isinstance(i, slice) for i in idx):
                return self.sliced(base, idx, node)
            if not all(isinstance(i, numbers.Integral) for i in idx):
                return self.dynamic_read(base, idx, node)
            if base.is_vector:
                return base.items[idx[0]]
            if len(idx) == 1:
                return base.row(idx[0])
            return base.at(*idx)
        idx = _known_int(self.expr(node.slice))
        if isinstance(idx, N.Expr):
            raise self.error(node, "this Python value cannot be indexed by a runtime value",
                             "index with a compile-time constant (ti.static)")
        try:
            return base[idx]
        except Exception as e:
            raise self.error(node, f"cannot index {base!r}: {e}", "check the index")

    def sliced(self, base, idx, node):
        """The components a slice picks: `v[1:3]` a vector, `A[1, :]` a row, `A[0:2, 1:3]` a matrix."""
        if len(idx) != len(base.shape) or not all(isinstance(i, (numbers.Integral, slice)) for i in idx):
            raise self.error(node, f"slicing shape {base.shape} needs {len(base.shape)} compile-time indices",
                             "use one int or slice per dimension")
        picks = [list(range(n))[i] if isinstance(i, slice) else [i] for i, n in zip(idx, base.shape)]
        if base.is_vector:
            return Vec((len(picks[0]),), [base.items[k] for k in picks[0]])
        items = [base.at(r, c) for r in picks[0] for c in picks[1]]
        kept = [len(p) for p, i in zip(picks, idx) if isinstance(i, slice)]
        return Vec(tuple(kept), items)

    def expr_ListComp(self, node):
        """[e for k in ti.static(range(n)) if c]: unrolled at compile time, as Taichi does."""
        out = []

        def walk(generators):
            if not generators:
                out.append(self.expr(node.elt))
                return
            gen = generators[0]
            it = self.expr(gen.iter)
            from .loops import RangeSpec
            if isinstance(it, RangeSpec) and len(it.bounds) == 1 and all(isinstance(b, int) for b in it.bounds[0]):
                it = range(it.bounds[0][0], it.bounds[0][1], it.step)
            if isinstance(it, Vec):
                it = list(it.items) if it.is_vector else [it.row(i) for i in range(it.shape[0])]
            if not isinstance(it, (range, list, tuple)):
                raise self.error(gen.iter, "a comprehension must iterate over compile-time values",
                                 "use ti.static(range(n)) or a Python list")
            for value in it:
                saved = dict(self.scope)
                self.assign_static(gen.target, value, node)
                conds = [self.expr(c) for c in gen.ifs]
                if any(isinstance(c, N.Expr) for c in conds):
                    raise self.error(gen, "a comprehension's condition must be a compile-time value",
                                     "use ti.select or an if statement instead")
                if all(conds):
                    walk(generators[1:])
                self.scope = saved

        walk(node.generators)
        return out

    def assign_static(self, target, value, node):
        if isinstance(target, ast.Name):
            self.scope[target.id] = value
        elif isinstance(target, ast.Tuple):
            for t, v in zip(target.elts, value):
                self.assign_static(t, v, node)
        else:
            raise self.error(node, "unsupported comprehension target", "use names")

    def expr_BinOp(self, node):
        a, b = self.expr(node.left), self.expr(node.right)
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            return self.sequence_op(a, b, node)
        if isinstance(node.op, ast.MatMult):
            return V.matmul(self.vec(a, node), self.vec(b, node))
        op = BINOPS.get(type(node.op))
        if op is None:
            raise self.error(node, f"operator {type(node.op).__name__} is not supported",
                             "use + - * / // % ** and @")
        return self.binary(op, a, b, node)

    def sequence_op(self, a, b, node):
        """A list or tuple literal in a kernel is a Python sequence, as in Taichi: `[0.0] * 4`
        repeats it and `[a] + [b]` joins, so treating them as vectors would silently change the
        length; arithmetic with a number is refused, as Python (and so Taichi) refuses it."""
        a, b = _known_int(a), _known_int(b)
        if isinstance(node.op, ast.Add) and type(a) is type(b):
            return a + b
        if isinstance(node.op, ast.Mult):
            seq, times = (a, b) if isinstance(a, (list, tuple)) else (b, a)
            if isinstance(times, numbers.Integral) and not isinstance(times, bool):
                return seq * times
        raise self.error(node, "arithmetic on a Python list or tuple: in a Taichi kernel it is a Python "
                         "sequence, not a vector; only `seq * n` (n a compile-time int) repeats it and "
                         "`seq + seq` joins two",
                         "wrap it in ti.Vector([...]) for elementwise arithmetic")

    def expr_UnaryOp(self, node):
        v = self.expr(node.operand)
        if isinstance(v, (int, float)):
            return {ast.USub: lambda x: -x, ast.UAdd: lambda x: x, ast.Not: lambda x: not x,
                    ast.Invert: lambda x: ~x}[type(node.op)](v)
        if isinstance(node.op, ast.USub):
            return self.elementwise(B.neg, v, node)
        if isinstance(node.op, ast.UAdd):
            return v
        if isinstance(node.op, ast.Not):
            return B.call("not", self.truth(v, node))
        return self.elementwise(lambda e: self.integer_op("bit_not", (e,), node), v, node)

    def expr_Compare(self, node):
        left = self.expr(node.left)
        result = None
        for op, right_node in zip(node.ops, node.comparators):
            right = self.expr(right_node)
            name = CMPOPS.get(type(op))
            if name is None:
                if isinstance(op, (ast.Is, ast.IsNot, ast.In, ast.NotIn)) and not isinstance(left, N.Expr) \
                        and not isinstance(right, N.Expr):
                    r = {ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b,
                         ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}[type(op)](left, right)
                else:
                    raise self.error(node, f"comparison {type(op).__name__} is not supported", "use < <= > >= == !=")
            elif not isinstance(left, (N.Expr, Vec)) and not isinstance(right, (N.Expr, Vec)) \
                    and not (isinstance(left, numbers.Number) and isinstance(right, numbers.Number)):
                r = PYOPS[name](left, right)  # compile-time Python: MODE == None, dtype == ti.f32, name == "a"
            else:
                r = self.binary(name, left, right, node)
            result = r if result is None else self.logic("and", result, r, node)
            left = right
        return result

    def logic(self, op, a, b, node):
        if not isinstance(a, N.Expr) and not isinstance(b, N.Expr):
            return (a and b) if op == "and" else (a or b)
        return B.call(op, self.truth(a, node), self.truth(b, node))

    def expr_BoolOp(self, node):
        op = "and" if isinstance(node.op, ast.And) else "or"
        out = self.expr(node.values[0])
        for v in node.values[1:]:
            out = self.logic(op, out, self.expr(v), node)
        return out

    def expr_IfExp(self, node):
        c = self.expr(node.test)
        if not isinstance(c, N.Expr):
            return self.expr(node.body if c else node.orelse)
        return self.select(c, self.expr(node.body), self.expr(node.orelse), node)

    def expr_Call(self, node):
        fn = self.expr(node.func)
        if fn in ATOMIC_OPS:
            raise self.error(node, f"the value ti.{fn.__name__} returns (the old value) depends on the order the "
                                   "threads ran in, which the derivative kernels cannot replay",
                             f"compute it in a plain ti.kernel first (e.g. slot[i] = ti.{fn.__name__}(count[None], 1)) "
                             "and read that field here, or call it as a statement")
        args = []
        for a in node.args:
            if isinstance(a, ast.Starred):  # f(*v): a vector's components or a Python sequence
                v = self.expr(a.value)
                args.extend(v.items if isinstance(v, Vec) and v.is_vector else v)
            else:
                args.append(self.expr(a))
        kwargs = {}
        for k in node.keywords:
            v = self.expr(k.value)
            if k.arg is not None:
                kwargs[k.arg] = v
            elif isinstance(v, dict):  # f(**options) with a dict of Python values
                kwargs.update(v)
            else:
                raise self.error(k.value, "** needs a dict of compile-time values", "pass the keywords one by one")
        return self.call(fn, args, kwargs, node)

    def call(self, fn, args, kwargs, node):
        from . import calls
        return calls.lower_call(self, fn, args, kwargs, node)


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
            vals = val if isinstance(val, tuple) else (val,)
            dts = return_dtype if isinstance(return_dtype, tuple) else (return_dtype,)
            exprs = tuple(B.cast(lw.scalar(v, r.args[0]), d) for v, d in zip(vals, dts))
            lw.emit(N.Return(exprs, src=lw.loc(r.args[0])))
            returns = dts
    if return_dtype is not None and not returns:
        raise KernDiffError(f"kernel {fn.__name__} is annotated to return a value but has no return",
                            remedy="add a return statement or drop the annotation")
    aliases = tuple((fid, name) for fid, (_, name) in lw.field_aliases.items())
    return N.KernelIR(fn.__name__, tuple(params), tuple(lw.blocks[0]), tuple(returns),
                      tuple(src.lines), aliases)


def _known_int(v):
    """An integer constant of the IR as the Python int it is (the components of
    ti.static(ti.grouped(...)) index Python lists and vectors, as in Taichi); anything else as is."""
    if isinstance(v, N.Const) and isinstance(v.value, numbers.Integral):
        return int(v.value)
    return v
