"""Lowering of assignments: to locals, vector and matrix components, struct members and field
elements (plain stores and atomic updates, `+=` included), with the field indexing that reads share."""
from __future__ import annotations

import ast
import itertools
import numbers

from taichi.lang.matrix import Matrix
from taichi.lang.struct import StructField

from ..errors import KernDiffError
from ..ir import build as B
from ..ir import nodes as N
from ..ir.conditions import all_of
from ..ir.types import is_int
from ..ir.walk import loads_in, vars_in
from ..runtime.registry import REGISTRY, element_shape
from .loops import reduction_field
from .operators import BINOPS
from .values import Local, StructValue, is_field, is_sparse, known_int, struct_member_access, swizzle_index
from . import vec as V
from .vec import Vec


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


class Assignments:
    """The Lowerer's statements that assign (a mixin: state and helpers live on the Lowerer)."""

    def stmt_Assign(self, node):
        if len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Call):
            self.assigned_to[id(node.value)] = node.targets[0].id  # (for what the call binds, if it does)
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

    def reduce_outer_local(self, name, op, value, node):
        """`s += v`, `ti.atomic_max(s, v)` on a local bound before the enclosing parallel loop: an
        atomic add (max, min) into the 0-d field standing in for each of its components."""
        local = self.outer_local(name)
        if isinstance(value, Vec) and len(value.items) != len(local.names):
            raise self.error(node, f"reducing a value of shape {value.shape} into '{name}' of shape "
                                   f"{local.shape or ()}", "make the shapes agree")
        items = value.items if isinstance(value, Vec) else [self.scalar(value, node)] * len(local.names)
        for n, d, e in zip(local.names, local.dtypes, items):
            self.emit(N.Atomic(op, reduction_field(self, n, d, op, node, name), (), B.cast(e, d), src=self.loc(node)))

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
        if len(local.shape) == 2 and len(idx) == 1 or any(isinstance(i, slice) for i in idx):
            self.assign_components(target, local, idx, value, node)
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

    def assign_components(self, target, local, idx, value, node):
        """`A[1] = row`, `A[2, :] = v`, `v[0:2] = w`: component by component, each part of the
        value read before any component changes (`A[1] = ti.Vector([A[1, 1], A[1, 0], 0.0])`
        swaps, as `v.xy = v.yx` does)."""
        if len(local.shape) == 2 and len(idx) == 1:
            idx = (idx[0], slice(None))
        positions, items = self.sliced_targets(idx, local.shape, value, node)
        names = set(local.names)
        items = [self.materialize(e, "tmp", node, copy=True) if any(v.name in names for v in vars_in(e)) else e
                 for e in items]
        for pos, e in zip(positions, items):
            self.assign_component(target, pos, e, node)

    def sliced_targets(self, idx, shape, value, node):
        """The component positions a subscript with slices names in a vector or matrix of
        `shape` (`A[2, :]`, `v[0:2]`), in row-major order, each paired with its part of value (a
        scalar value goes to all of them)."""
        if len(idx) != len(shape):
            raise self.error(node, f"{len(idx)} indices for shape {shape}", "use one index or slice per dimension")
        positions = list(itertools.product(*V.picks(idx, shape)))
        items = self.vec(value, node).items if isinstance(value, (Vec, list, tuple)) else \
            [self.scalar(value, node)] * len(positions)
        if len(items) != len(positions):
            raise self.error(node, f"assigning {len(items)} values to {len(positions)} components",
                             "make the value's shape match the slice's")
        return positions, items

    def index_parts(self, sl, node):
        """A vector/matrix subscript as a tuple of Python ints and, where only known at run time,
        integer IR expressions."""
        idx = self.expr(sl)
        if isinstance(idx, Vec) and idx.is_vector:  # M[I] with I from ti.grouped: M[I[0], I[1]]
            idx = tuple(idx.items)
        idx = tuple(known_int(i) for i in idx) if isinstance(idx, tuple) else (known_int(idx),)
        for i in idx:
            if not isinstance(i, (numbers.Integral, slice)) and not (isinstance(i, N.Expr) and is_int(i.dtype)):
                raise self.error(node, "vector and matrix indices must be integers", "index with ints")
        return idx

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
        if isinstance(value, (list, tuple)):  # v += [1.0, 2.0], x[i] -= [a, b]: a vector, as in Taichi
            value = self.from_list(value, node)
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
            self.reduce_outer_local(t.id, "add", self.elementwise(B.neg, value, node) if op == "sub" else value, node)
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

    def check_array_elements(self, fieldv, node, name):
        """Refuse an ndarray of vectors or matrices: Taichi 1.7.4 miscompiles accesses to their
        components where two indexes may meet (after `a[i][0] = 1.0; a[j][0] = 10.0`, a read
        of `a[i][0]` gives 1.0 when j == i; of three adds `a[i][0] += ...`, `a[j][0] += ...`,
        `a[i][0] += ...` the second is lost), which derivative kernels make of any gather (the
        adjoint of `u[idx[i]]` beside `u[i]`): the derivative would be silently wrong. Scalar
        ndarrays, of any dimension, and vector fields are compiled right
        (tests/test_ndarrays.py keeps the case and checks that Taichi still gets it wrong)."""
        from ..runtime.registry import is_ndarray
        shape = element_shape(fieldv) if is_ndarray(fieldv) else ()
        if shape:
            kind = "vectors" if len(shape) == 1 else "matrices"
            raise self.error(node, f"'{name}' is an ndarray of {kind}, whose components Taichi 1.7.4 reads and adds "
                                   "into wrongly where two indexes may meet (a component stored at a[i] and then "
                                   "at a[idx[i]] reads back the first value), which every derivative of a gather "
                                   "makes",
                             f"pass a scalar ndarray with the components as a last dimension (ti.ndarray(ti.f32, "
                             f"(n, {', '.join(map(str, shape))})), read as a[i, 0]), or a "
                             f"{'vector' if len(shape) == 1 else 'matrix'} field")

    def refs_of(self, fieldv, node, name):
        self.check_dense(fieldv, node, name)
        self.check_array_elements(fieldv, node, name)
        seen, in_function = self.field_aliases.get(id(fieldv)), self.parent is not None
        if name and name != "field" and (seen is None or (seen[0] and not in_function)):
            self.field_aliases[id(fieldv)] = (in_function, name)
        shape = element_shape(fieldv)
        if shape:
            comps = [(c,) for c in range(shape[0])] if len(shape) == 1 else \
                [(r, c) for r in range(shape[0]) for c in range(shape[1])]
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
        if shape is not None and comp is not None and len(shape) == 2 and len(comp) == 1:
            comp = (comp[0], slice(None))  # m[i][r] = row
        if shape is not None and comp is not None and any(isinstance(c, slice) for c in comp):
            # m[i][2, :] = v, x[i][0:2] += w: each component the slice names, as its own store
            for pos, e in zip(*self.sliced_targets(comp, shape, value, node)):
                if all(isinstance(c, numbers.Integral) for c in pos):
                    self.emit_stores([refs[pos[0] if len(pos) == 1 else pos[0] * shape[1] + pos[1]]], index, [e],
                                     target, node, atomic)
                else:
                    self.store_component(refs, index, pos, shape, e, node, atomic)
            return
        if shape is not None and comp is not None and not all(isinstance(c, numbers.Integral) for c in comp):
            # x[i][d] = e, x[i][d] += e: the store (or atomic add) into the component d names
            self.store_component(refs, index, comp, shape, self.scalar(value, node), node, atomic)
            return
        if shape is not None and comp is not None:
            flat = comp[0] if len(comp) == 1 and len(shape) == 1 else comp[0] * shape[1] + comp[1]
            refs, shape = [refs[flat]], None
        if shape is None:
            items = [self.scalar(value, node)]
        else:
            if isinstance(value, (list, tuple)):  # x[i] = [0, 0], F[i] = [[1, 0], [0, 1]]
                value = self.from_list(value, node)
            if not isinstance(value, Vec):
                value = Vec(shape, [self.scalar(value, node)] * len(refs))
            if value.shape != shape and len(value.items) != len(refs):
                raise self.error(node, f"storing shape {value.shape} into a field of shape {shape}",
                                 "make the shapes agree")
            items = value.items
        self.emit_stores(refs, index, items, target, node, atomic)

    def emit_stores(self, refs, index, items, target, node, atomic):
        """Store (or atomically update) each item into its component field at index."""
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
