"""Lowering of expressions: names, constants, attributes, subscripts of fields and vectors,
operators, comparisons, conditional expressions, comprehensions and calls."""
from __future__ import annotations

import ast
import numbers

from taichi.lang.struct import StructField

from ..errors import KernDiffError
from ..ir import build as B
from ..ir import nodes as N
from . import vec as V
from .loops import RangeSpec
from .operators import ATOMIC_OPS, BINOPS, CMPOPS, PYOPS
from .values import (Method, StructMethod, StructValue, array_for_field, is_field, known_int, struct_member_access,
                     swizzle_index)
from .vec import Vec


class Expressions:
    """The Lowerer's expression visitors (a mixin: state and helpers live on the Lowerer)."""

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
        idx = known_int(self.expr(node.slice))
        if isinstance(idx, N.Expr):
            raise array_for_field(self, node.value, base, "index") or \
                self.error(node, "this Python value cannot be indexed by a runtime value",
                           "index with a compile-time constant (ti.static)")
        if isinstance(base, N.Expr):
            raise self.error(node, "a scalar cannot be indexed", "index the vector or matrix it was computed from")
        try:
            return base[idx]
        except Exception as e:
            raise self.error(node, f"cannot index {base!r}: {e}", "check the index")

    def expr_Slice(self, node):
        """`v[1:3]`, `A[1, :]`: a slice of compile-time ints, as Taichi requires."""
        parts = [None if e is None else known_int(self.expr(e)) for e in (node.lower, node.upper, node.step)]
        if not all(p is None or isinstance(p, numbers.Integral) for p in parts):
            raise self.error(node, "slice bounds must be known at compile time", "use constants or ti.static values")
        return slice(*parts)

    def sliced(self, base, idx, node):
        """The components a slice picks: `v[1:3]` a vector, `A[1, :]` a row, `A[0:2, 1:3]` a matrix;
        `A[j, :]` with j known at run time selects among the rows (as Taichi indexes dynamically)."""
        if len(idx) != len(base.shape):
            raise self.error(node, f"slicing shape {base.shape} needs {len(base.shape)} indices",
                             "use one int or slice per dimension")
        picks = V.picks(idx, base.shape)
        if base.is_vector:
            return Vec((len(picks[0]),), [base.items[k] for k in picks[0]])
        items = [base.at(r, c) if isinstance(r, numbers.Integral) and isinstance(c, numbers.Integral)
                 else self.dynamic_read(base, (r, c), node) for r in picks[0] for c in picks[1]]
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
        length; arithmetic with a number is refused, as Python (and so Taichi) refuses it. Beside a
        vector or matrix it is one, as Taichi's Matrix operators read it (`x[i] * [0.5, 3.0]`)."""
        if type(node.op) in BINOPS and (isinstance(a, V.Vec) or isinstance(b, V.Vec)):
            a, b = (self.from_list(v, node) if isinstance(v, (list, tuple)) else v for v in (a, b))
            return self.binary(BINOPS[type(node.op)], a, b, node)
        a, b = known_int(a), known_int(b)
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
            return self.atomic_value(fn, node)
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


def old_value_refused(name, loc, where):
    """The refusal of an atomic's returned value (the element's old value) where kerndiff cannot
    keep it: `where` says what made it so."""
    return KernDiffError(
        f"the value {name} returns (the old value) depends on the order the threads ran in, which "
        f"derivative kernels cannot replay: kerndiff takes it of a field's element by an add, sub, max or min, "
        f"where no derivative needs it, not {where}",
        loc, f"take it in a kd.kernel that writes only integers (slot[i] = {name}(count[c], 1)) and read "
             "that field here, or call it as a statement")
