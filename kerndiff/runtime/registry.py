"""Derivative fields (duals and adjoints) by level, and interned FieldRefs.

Level 1 uses Taichi's own SNodes when the field was made with needs_dual / needs_grad, so
`kd.dual(x) is x.dual` and `kd.adjoint(x) is x.grad`. Everything else is allocated lazily,
zero-filled, with the primal's shape and dtype; several requests are placed in one SNode tree
(`allocate_many`) so big programs stay far below Taichi's limit of 512 trees.

`ti.init` / `ti.reset` start a new Taichi runtime whose fields and kernels are all new: the
registry notices (it remembers the runtime object) and forgets everything it held.
"""
from __future__ import annotations

import contextlib
import time

import taichi as ti
from taichi.lang import impl

from ..errors import KernDiffError
from ..ir.nodes import FieldRef
from ..ir.types import from_taichi, is_float

KINDS = ("dual", "adjoint")


class Registry:
    def __init__(self):
        self._runtime = None
        self.stale = {}        # id -> field seen under an earlier ti.init (kept alive: ids stay unique)
        self._reset()

    def _reset(self):
        self.stale.update(getattr(self, "keep", {}))
        # The SNode trees of the runtime that ended are kept too: freeing them once the new
        # runtime has compiled a kernel crashed its next launch (a Taichi 1.7.4 segfault, seen
        # after kernels over ndarrays: a kd.Tape as the first thing after ti.init)
        self.stale_trees = getattr(self, "stale_trees", []) + getattr(self, "trees", [])
        self.derived = {}      # (id(primal), kind, level) -> derivative field
        self.keep = {}         # id -> field, keeps ids stable while we hold them
        self.refs = {}         # (id(field), component) -> FieldRef
        self.names = {}        # id(field) -> name hint
        self.parents = {}      # id(derivative field) -> (primal field, kind, level)
        self.suffixed = {}     # id(helper field) -> (field it serves, name suffix): x_adj_private
        self.scratch_kinds = {}  # id(scratch field) -> the first part of its key ("minmax", ...)
        self.version = 0       # bumped whenever a derivative field appears
        self.staged = {}       # (kernel, parameter, shape, dtype) -> the ti.ndarray numpy arrays are copied to
        self.scalar_pool = {}  # Taichi dtype -> 0-d fields _pooled_scalar made and has not handed out yet
        self.taichi_seconds = 0.0  # spent in Taichi building and materializing the trees below
        self.trees = []

    def check_runtime(self):
        rt = impl.get_runtime()
        if rt is not self._runtime:
            self._runtime = rt
            self._reset()
            from .cache import CACHE
            CACHE.clear()

    # ------------------------------------------------------------------ fields
    def ref(self, field, component: tuple = (), name: str | None = None) -> FieldRef:
        self.check_runtime()
        key = (id(field), component)
        r = self.refs.get(key)
        if r is None:
            if name is not None:
                self.names.setdefault(id(field), name)
            self.keep[id(field)] = field
            r = FieldRef(field, component, self.name_of(field), field_dtype(field),
                         tuple(field.shape), index_offset(field))
            self.refs[key] = r
        return r

    def is_stale(self, field) -> bool:
        """Was this field made under an earlier ti.init? (Known for fields kerndiff has seen.)"""
        self.check_runtime()
        return self.stale.get(id(field)) is field

    def name_of(self, field):
        """The name generated code uses: the user's for primal fields, derived for derivative
        fields (x_dual, x_adj_dual2, ...), decided when first needed so a kd.dual(x) made before any
        kernel mentioned x is still called x_dual."""
        parent = self.parents.get(id(field))
        if parent is not None:
            primal, kind, level = parent
            return derived_name(self.name_of(primal), kind, level)
        return self.names.get(id(field), "field")

    def display_name(self, field, aliases: dict):
        """name_of, but with the names one kernel's source gives its primal fields (aliases:
        id(field) -> name), carried to their derivative fields and private copies."""
        parent = self.parents.get(id(field))
        if parent is not None:
            primal, kind, level = parent
            return derived_name(self.display_name(primal, aliases), kind, level)
        if id(field) in aliases:
            return aliases[id(field)]
        base = self.suffixed.get(id(field))
        if base is not None:
            return self.display_name(base[0], aliases) + base[1]
        return self.name_of(field)

    def is_derivative_field(self, field):
        """Whether field is a derivative field (an adjoint or a tangent, of any level), not one of
        the user's own: opt.transposed_gathers gathers adds into those alone (the user's fields
        that a derivative kernel adds into, its primal outputs, sum as the primal's loop does)."""
        return id(field) in self.parents

    def get(self, field, kind: str, level: int):
        """The existing derivative field, or None."""
        self.check_runtime()
        got = self.derived.get((id(field), kind, level))
        if got is not None:
            return got
        if level == 1:
            native = getattr(field, "grad" if kind == "adjoint" else "dual", None)  # (an ndarray has no dual)
            if native is not None and placed(native):
                self._remember(field, kind, level, native)
                return native
        return None

    def get_or_make(self, field, kind: str, level: int):
        got = self.get(field, kind, level)
        if got is None:
            self.allocate_many([(field, kind, level)])
            got = self.derived[(id(field), kind, level)]
        return got

    def allocate_many(self, requests):
        """Allocate the missing derivative fields of `requests` in one SNode tree (0-d scalar ones
        from the pool of 0-d fields, _pooled_scalar)."""
        self.check_runtime()
        todo = []
        for field, kind, level in requests:
            if self.get(field, kind, level) is None and (id(field), kind, level) not in \
                    {(id(f), k, l) for f, k, l in todo}:
                if not is_float(field_dtype(field)):
                    name = self.names.get(id(field))
                    raise KernDiffError(f"{'an' if kind == 'adjoint' else 'a'} {kind} field was requested for "
                                        f"{f'{name!r}, ' if name else ''}a field of dtype {field_dtype(field)}, "
                                        "which has no derivative", remedy="only float fields have derivatives")
                todo.append((field, kind, level))
        arrays = [r for r in todo if is_ndarray(r[0])]
        todo = [r for r in todo if not is_ndarray(r[0])]
        for field, kind, level in arrays:  # an ndarray's derivatives are ndarrays (no SNode tree)
            with self._in_taichi():
                new = _like_array(field)
            self._remember(field, kind, level, new)
            self.parents[id(new)] = (field, kind, level)
        scalars = [r for r in todo if not tuple(r[0].shape) and not element_shape(r[0])]
        todo = [r for r in todo if tuple(r[0].shape) or element_shape(r[0])]
        for field, kind, level in scalars:  # 0-d: from the pool (one tree per SCALARS_PER_TREE)
            new = self._pooled_scalar(field.dtype)
            self._remember(field, kind, level, new)
            self.parents[id(new)] = (field, kind, level)
        if arrays or scalars:
            self.version += 1
        if not todo:
            return
        check_tree_budget()
        with self._in_taichi():
            fb = ti.FieldsBuilder()
            for field, kind, level in todo:
                new = _like(field)
                shape = tuple(field.shape)
                if shape:
                    fb.dense(_axes(len(shape)), shape).place(new, offset=_nonzero(index_offset(field)))
                else:
                    fb.place(new)
                self._remember(field, kind, level, new)
                self.parents[id(new)] = (field, kind, level)
            self.trees.append(fb.finalize())
        self.version += 1

    def scratch(self, key, dtype: str, shape=(), offset=None):
        """A helper field owned by generated code (kept zero between launches), indexed from
        `offset` like the field it serves."""
        self.check_runtime()
        got = self.derived.get(key)
        if got is None:
            from ..ir.types import to_taichi
            if not shape:
                got = self._pooled_scalar(to_taichi(dtype))
            else:
                check_tree_budget()
                with self._in_taichi():
                    fb = ti.FieldsBuilder()
                    got = ti.field(to_taichi(dtype))
                    fb.dense(_axes(len(shape)), tuple(shape)).place(got, offset=_nonzero(offset))
                    self.trees.append(fb.finalize())
            self.derived[key] = got
            self.keep[id(got)] = got
            self.scratch_kinds[id(got)] = key[0]
        return got

    def staging(self, key, dtype, shape):
        """The ti.ndarray that numpy arrays passed for an ndarray parameter are copied into (key:
        the kernel, the parameter, the arrays' shape and dtype): one per key and runtime, so that
        the kernel, specialized on the array, compiles once (Kernel._staged)."""
        self.check_runtime()
        got = self.staged.get(key)
        if got is None:
            got = self.staged[key] = ti.ndarray(dtype, tuple(shape))
        return got

    def _pooled_scalar(self, dtype):
        """A fresh (zero) 0-d field of dtype, for `scratch` and for the derivatives of 0-d fields.
        Reductions and max/min winner counts need one per kernel (and their derivatives one more
        each), and Taichi allows a program 512 SNode trees: they are made SCALARS_PER_TREE to a
        tree, and handed out one by one."""
        pool = self.scalar_pool.setdefault(dtype, [])
        if not pool:
            check_tree_budget()
            with self._in_taichi():
                fb = ti.FieldsBuilder()
                pool.extend(ti.field(dtype) for _ in range(SCALARS_PER_TREE))
                fb.place(*pool)
                self.trees.append(fb.finalize())
        return pool.pop(0)

    def scratch_kind(self, field):
        """What a scratch field made by `scratch` is for (the first part of its key), or None for
        any other field: error messages explain kerndiff's own helper fields differently."""
        return self.scratch_kinds.get(id(field))

    def internal(self, field):
        """A helper field whose values live within one launch (a long loop's checkpoints, see
        ad.reverse.Reverse.checkpoint_rows): not an input or output of the kernel that uses it, so
        Kernel.fields, footprint and restorable_fields leave it out (kd.Tape neither snapshots it
        nor gives it an adjoint; the reverse of such a kernel is built without it). So are the
        derivative fields of one (the duals forward(reverse) keeps beside the checkpoints)."""
        while id(field) in self.parents:
            field = self.parents[id(field)][0]
        return self.scratch_kinds.get(id(field)) == "checkpoints"

    def private_copies(self, specs, threads: int):
        """T private copies of each (field, shape, offset) in specs (shape (T,) + that shape: the
        field's own, or the slice of it a loop adds into, indexed from 0 for the slot and from
        offset after it; interleaved per shape so one element's copies of related fields share
        cache lines) and T busy flags, for opt.scatter: ({id(field): its copies}, the flags).
        Kept zero between launches by the generated code, and used within a launch only, so loops
        adding into fields of the same element types and shapes share them, in any kernel
        (opt.scatter names them after the fields in each kernel's source): a program's memory and
        SNode trees for them grow with its distinct shapes, not with its kernels."""
        self.check_runtime()
        specs = [(f, (tuple(shape), tuple(offset))) for f, shape, offset in specs]
        key = ("private", tuple((field_dtype(f), element_shape(f), shape) for f, shape in specs), threads)
        got = self.derived.get(key)
        if got is None:
            check_tree_budget()
            with self._in_taichi():
                fb = ti.FieldsBuilder()
                copies, by_shape = {}, {}
                for f, shape in specs:
                    copies[id(f)] = _like(f)
                    self.names[id(copies[id(f)])] = f"{self.name_of(f)}_private"
                    self.suffixed[id(copies[id(f)])] = (f, "_private")
                    by_shape.setdefault(shape, []).append(copies[id(f)])
                for (shape, offset), news in by_shape.items():
                    fb.dense(_axes(len(shape) + 1), (threads,) + shape).place(*news, offset=_nonzero((0,) + offset))
                busy = ti.field(ti.i32)
                self.names[id(busy)] = f"{self.name_of(specs[0][0])}_busy"
                self.suffixed[id(busy)] = (specs[0][0], "_busy")
                fb.dense(ti.i, threads).place(busy)
                self.trees.append(fb.finalize())
            for new in list(copies.values()) + [busy]:
                self.keep[id(new)] = new
            got = ([copies[id(f)] for f, _ in specs], busy)
            self.derived[key] = got
        made, busy = got
        return {id(f): copy for (f, _), copy in zip(specs, made)}, busy

    def packed(self, fields, dtype: str, shape, offset):
        """The helper field that opt.packed_gathers copies `fields` into side by side before a
        loop gathers them (shape: theirs and the record's length), named after the first. Its
        values live from the copy to the end of the loop after it, within one launch, so every
        loop of every kernel packing records of one dtype, shape and offset shares one (each
        kernel's source names it after its own fields, KernelIR.field_aliases): a program's
        memory and SNode trees for records grow with its distinct shapes, not its kernels."""
        got = self.scratch(("packed", dtype, tuple(shape), tuple(offset)), dtype, shape, offset)
        self.names.setdefault(id(got), f"{self.name_of(fields[0])}_packed")
        self.suffixed.setdefault(id(got), (fields[0], "_packed"))
        return got

    @contextlib.contextmanager
    def _in_taichi(self):
        """Time spent in Taichi's API building fields and materializing their SNode tree: Taichi's
        time, kept apart from kerndiff's transform time (runtime.kernel.TIMINGS)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.taichi_seconds += time.perf_counter() - t0

    def _remember(self, field, kind, level, deriv):
        self.derived[(id(field), kind, level)] = deriv
        self.keep[id(field)] = field
        self.keep[id(deriv)] = deriv
        self.parents.setdefault(id(deriv), (field, kind, level))


MAX_TREES = 500  # Taichi 1.7 crashes past 512 SNode trees; keep a margin for the user's own fields.
SCALARS_PER_TREE = 16  # 0-d scalar fields made together, in one tree (Registry._pooled_scalar)


def check_tree_budget():
    used = impl.get_runtime().prog.get_snode_tree_size()
    if used >= MAX_TREES:
        raise KernDiffError(f"this Taichi program already has {used} SNode trees; Taichi allows 512",
                            remedy="create fields (and kd.dual/kd.adjoint fields) before the first kernel "
                                   "launch so they share one tree, or reuse fields instead of making new ones")


def derived_name(base: str, kind: str, level: int) -> str:
    from ..ad.names import derivative_name

    return derivative_name(base, kind, level)


def field_dtype(field) -> str:
    return from_taichi(field.dtype)


def placed(f) -> bool:
    """Whether a field has storage (is placed in an SNode tree); `ti.field(dtype)` alone is not.
    An ndarray always has."""
    if is_ndarray(f):
        return True
    try:
        return f.vars[0].ptr.snode() is not None
    except Exception:
        return False


def is_ndarray(f) -> bool:
    from taichi.lang._ndarray import Ndarray
    return isinstance(f, Ndarray)


def element_shape(f) -> tuple:
    """The shape of one element of a field or ndarray: () for scalars, (n,) for vectors, (n, m)
    for matrices."""
    from taichi.lang.matrix import MatrixField, MatrixNdarray, VectorNdarray
    if isinstance(f, VectorNdarray) or isinstance(f, MatrixField) and f.ndim == 1:
        return (f.n,)
    if isinstance(f, (MatrixNdarray, MatrixField)):
        return (f.n, f.m)
    return ()


def _like_array(f):
    """A zero-filled ndarray of f's shape and element type."""
    shape = element_shape(f)
    element = f.dtype if not shape else ti.types.vector(shape[0], f.dtype) if len(shape) == 1 else \
        ti.types.matrix(shape[0], shape[1], f.dtype)
    new = ti.ndarray(element, tuple(f.shape))
    new.fill(0)
    return new


def _axes(n):
    return [ti.i, ti.ij, ti.ijk, ti.ijkl][n - 1]


def _like(field):
    """An unplaced field of the element type of `field` (a field or an ndarray: private copies
    of an ndarray's adjoint are fields)."""
    shape = element_shape(field)
    if len(shape) == 1:
        return ti.Vector.field(shape[0], field.dtype)
    if shape:
        return ti.Matrix.field(shape[0], shape[1], field.dtype)
    return ti.field(field.dtype)


REGISTRY = Registry()


def index_offset(field):
    """The field's first index per dimension (ti.field(..., offset=...)); zeros for most fields."""
    off = getattr(field.snode.ptr, "offset", None) if hasattr(field, "snode") else None
    shape = tuple(getattr(field, "shape", ()))
    return tuple(off) if off and len(off) == len(shape) else (0,) * len(shape)


def _nonzero(offset):
    """Taichi's place() takes offset=None for fields indexed from 0."""
    return tuple(offset) if offset and any(offset) else None
