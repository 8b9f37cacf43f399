"""IR nodes: frozen dataclasses, so that expressions hash (CSE) and passes cannot edit in place.

The IR is what the AD passes see, deliberately small: scalar expressions (constants, locals,
field loads, primitive calls) and structured statements (assign, store, atomic update, if, for,
while, break, continue, return). Vectors and matrices are gone (the frontend scalarizes them),
functions are inlined and `ti.static` is evaluated.
"""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import Any, Optional, Tuple

from ..errors import SrcLoc


class FieldRef:
    """One scalar component of a Taichi field, as the IR sees it.

    Identity is (the Taichi field object, component); `name` is what generated code calls it.
    Instances are interned by the runtime registry, so `is` and `==` agree.
    """

    __slots__ = ("field", "component", "name", "dtype", "shape", "offset", "__weakref__")

    def __init__(self, field, component: tuple, name: str, dtype: str, shape: tuple, offset: tuple = None):
        self.field = field
        self.component = component
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.offset = offset or (0,) * len(shape)  # the field's first index (ti.field(..., offset=))

    def bounds(self):
        """(first, end) per dimension: the index space a loop over the whole field runs through."""
        return tuple((o, o + n) for o, n in zip(self.offset, self.shape))

    def __repr__(self):
        comp = "".join(f"[{c}]" for c in self.component)
        return f"{self.name}{comp}"


# ---------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Expr:
    dtype: str


@dataclass(frozen=True)
class Const(Expr):
    value: Any = 0


@dataclass(frozen=True)
class Var(Expr):
    name: str = ""


@dataclass(frozen=True)
class Load(Expr):
    ref: FieldRef = None
    index: Tuple[Expr, ...] = ()


@dataclass(frozen=True)
class Call(Expr):
    """A primitive op (see ops.OPS): arithmetic, math function, comparison, cast, select."""

    op: str = ""
    args: Tuple[Expr, ...] = ()


# ---------------------------------------------------------------- statements
@dataclass(frozen=True)
class Stmt:
    src: Optional[SrcLoc] = dc_field(default=None, compare=False, kw_only=True)
    # What generated this statement ('', 'tangent', 'adjoint', 'recompute'); codegen comments on it.
    tag: str = dc_field(default="", compare=False, kw_only=True)


@dataclass(frozen=True)
class Assign(Stmt):
    name: str
    value: Expr


@dataclass(frozen=True)
class Store(Stmt):
    ref: FieldRef
    index: Tuple[Expr, ...]
    value: Expr


@dataclass(frozen=True)
class Atomic(Stmt):
    """`ref[index] op= value` performed atomically; op is 'add', 'max' or 'min' ('and' only in
    codegen-only IR: opt.scatter releases a private copy with it).

    result: the local that receives the element's old value (`slot = ti.atomic_add(count[c], 1)`),
    '' for none. That value depends on the order the threads ran in, which a derivative kernel
    cannot replay, so the frontend takes it only where it reaches integer work (ad/old_values.py):
    a kernel that writes no float has no derivative work (its forward kernel is the primal, its
    reverse empty); in one that does, the reverse drops that integer work and the forward kernel
    runs it again. opt.finalize leaves a kernel taking old values as written."""

    op: str
    ref: FieldRef
    index: Tuple[Expr, ...]
    value: Expr
    result: str = ""


@dataclass(frozen=True)
class If(Stmt):
    cond: Expr
    then: Tuple[Stmt, ...]
    orelse: Tuple[Stmt, ...] = ()


@dataclass(frozen=True)
class For(Stmt):
    """A counted loop over a box: vars[k] runs over range(bounds[k][0], bounds[k][1]).

    `parallel` marks the kernel's outermost loops (Taichi runs them in parallel); inner loops
    are serial; `serialize` is ti.loop_config(serialize=True) on an outermost loop, and `config`
    its other options as (name, value) pairs (block_dim=128, parallelize=4), which tune how Taichi
    runs the loop and so are kept for the derivative kernels' loops made from it.
    """

    vars: Tuple[str, ...]
    bounds: Tuple[Tuple[Expr, Expr], ...]
    body: Tuple[Stmt, ...]
    parallel: bool = False
    serialize: bool = False
    config: Tuple[Tuple[str, object], ...] = ()


@dataclass(frozen=True)
class While(Stmt):
    cond: Expr
    body: Tuple[Stmt, ...]


@dataclass(frozen=True)
class Break(Stmt):
    pass


@dataclass(frozen=True)
class Continue(Stmt):
    pass


@dataclass(frozen=True)
class Return(Stmt):
    values: Tuple[Expr, ...]


@dataclass(frozen=True)
class FString:
    """An f-string argument of print: texts[0], values[0] formatted by specs[0], texts[1], ...
    (a vector's components are values of their own, with the brackets in the texts)."""

    texts: Tuple[str, ...]
    values: Tuple[Expr, ...]
    specs: Tuple[str, ...]


@dataclass(frozen=True)
class Print(Stmt):
    """Taichi's print, in primal kernels only (the transforms drop it: a derivative kernel would
    print the same values again, or values of another computation). Each argument is a string,
    an expression, a tuple of expressions (a vector or matrix, printed as a list) or an FString."""

    args: Tuple[Any, ...]

    def exprs(self):
        for a in self.args:
            if isinstance(a, Expr):
                yield a
            elif isinstance(a, tuple):
                yield from a
            elif isinstance(a, FString):
                yield from a.values


@dataclass(frozen=True)
class Param:
    name: str
    dtype: str


@dataclass(frozen=True)
class KernelIR:
    """A whole kernel: scalar parameters, a body, and the dtypes of its return values."""

    name: str
    params: Tuple[Param, ...]
    body: Tuple[Stmt, ...]
    returns: Tuple[str, ...] = ()
    source_lines: Tuple[str, ...] = dc_field(default=(), compare=False)
    # (id(field), name) for the fields this kernel's own source names (a field passed to a
    # template parameter `out` elsewhere is still `uxx` here): what generated code calls them
    field_aliases: Tuple[Tuple[int, str], ...] = dc_field(default=(), compare=False)
    # a comment codegen puts at the top of the kernel's body: how it was made, where that is not
    # the path's transforms one after the other (ad/forward_reverse.py)
    note: str = dc_field(default="", compare=False)
    # the name of the u32 parameter that carries a launch's draw seed, where the kernel draws
    # random numbers (codegen/draws.py; runtime/draws.py chooses the seed); it follows the
    # user's parameters, and a reverse kernel's cotangent parameters follow it
    seed: str = ""
