"""What lowering passes around besides IR expressions and `Vec`s: fields, struct elements and
their methods, locals bound to IR variables, methods before their call, and a ti.func's return."""
from __future__ import annotations

import ast
import numbers

from taichi.lang._ndarray import Ndarray
from taichi.lang.field import ScalarField
from taichi.lang.matrix import MatrixField
from taichi.lang.struct import StructField

from ..ir import build as B
from ..ir import nodes as N
from .vec import Vec


def is_field(v) -> bool:
    """A field, or an ndarray passed for a ti.types.ndarray() parameter: kernels index and loop
    over both alike (generated kernels take the ndarrays as parameters, codegen.load)."""
    return isinstance(v, (ScalarField, MatrixField, Ndarray))


def array_for_field(lw, node, value, what):
    """The error for a numpy array used where a field belongs (passed for a ti.template()
    parameter, or a global): `what` it was used for ("loop over", "index"), named where the
    expression is a plain name; None for anything else."""
    if type(value).__module__ != "numpy" or getattr(value, "ndim", 0) == 0:
        return None
    name = f"'{node.id}', " if isinstance(node, ast.Name) else ""
    return lw.error(node, f"cannot {what} {name}a numpy array of shape {value.shape}: kerndiff kernels read and "
                    "differentiate fields, not arrays", "pass a field (copy the array in with f.from_numpy(array))")


SPARSE = ("pointer", "bitmasked", "dynamic", "hash")


def is_sparse(field) -> bool:
    if isinstance(field, Ndarray):
        return False
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


class Method:
    """`v.norm` before it is called."""

    def __init__(self, name, target):
        self.name, self.target = name, target


class FuncReturn(Exception):
    pass


def known_int(v):
    """An integer constant of the IR as the Python int it is (the components of
    ti.static(ti.grouped(...)) index Python lists and vectors, as in Taichi); anything else as is."""
    if isinstance(v, N.Const) and isinstance(v.value, numbers.Integral):
        return int(v.value)
    return v
