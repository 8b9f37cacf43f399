"""Where the old value an atomic returns may go in a kernel that also computes floats.

`slot = ti.atomic_add(count[c], 1)` hands out values in the order the threads ran, which no
derivative kernel can replay: running the atomic again would hand out others and count twice.
A derivative needs such a value only where it reaches the float computation: as a float, as an
index of a float field, or as a condition (or loop bound, or break) around float work. Where it
reaches only integer work (the indices and values of integer fields: a grid's member lists, a
compacted index list), the derivative kernels need none: the reverse drops that work (it writes
no float) and reads the integer fields as the kernel left them, and the forward kernel runs it
again, as a launch does. So a kernel may bin a grid and then sum over it (the fused form);
`refuse_float_uses` refuses the rest, at the line where an old value meets a float.

The analysis follows the old values forward through locals (data), and through the conditions,
loop bounds and breaks they decide (control), to a fixed point over the loops. Values that go
through a field are not followed: the reverse reads an integer field as the kernel left it,
except where the kernel overwrites the field after reading it, and the reverse computes the
value read again from the expression stored; ad.hazards.refuse_old_values refuses that case
after the transform (the reverse then reads an old value's local it no longer defines).
"""
from __future__ import annotations

from ..errors import KernDiffError
from ..ir import nodes as N
from ..ir.types import is_float
from ..ir.walk import assigned_names, iter_expr, jumps_out, old_value_atomics, vars_in, writes_floats


def refuse_float_uses(ir: N.KernelIR):
    """Raise where an atomic's old value reaches a float (module docstring); None otherwise. A
    kernel that writes no float has no derivative work, and takes its old values anywhere."""
    fetched = old_value_atomics(ir.body)
    if not fetched or not writes_floats(ir):
        return
    tainted = {s.result: s for s in fetched}  # local -> the atomic whose old value reaches it
    while True:
        size = len(tainted)
        _walk(ir.body, tainted)
        if len(tainted) == size:
            return


def _walk(stmts, tainted, decided=None):
    """One pass over stmts: what the old values reach joins `tainted`; decided: the atomic whose
    old value decides an enclosing condition (or loop), if any."""
    for s in stmts:
        if isinstance(s, N.Assign):
            _refuse_floats(s, (s.value,), tainted)
            origin = decided or _origin((s.value,), tainted)
            if origin is not None:
                tainted.setdefault(s.name, origin)
        elif isinstance(s, (N.Store, N.Atomic)):
            exprs = tuple(s.index) + (s.value,)
            _refuse_floats(s, exprs, tainted)
            if is_float(s.ref.dtype):
                if decided is not None:
                    _refused(s, decided, "decides whether this float store runs")
                if _origin(exprs, tainted) is not None:
                    _refused(s, _origin(exprs, tainted), "is an index of this float field's element")
            origin = decided or _origin(exprs, tainted)
            if isinstance(s, N.Atomic) and s.result and origin is not None:
                tainted.setdefault(s.result, origin)
        elif isinstance(s, N.If):
            _refuse_floats(s, (s.cond,), tainted)
            inner = decided or _origin((s.cond,), tainted)
            _walk(s.then, tainted, inner)
            _walk(s.orelse, tainted, inner)
            if inner is not None and jumps_out(s.then + s.orelse):
                tainted.setdefault(_BREAKS, inner)
        elif isinstance(s, N.For):
            bounds = tuple(e for pair in s.bounds for e in pair)
            _refuse_floats(s, bounds, tainted)
            _walk_loop(s.body, tainted, decided or _origin(bounds, tainted))
        elif isinstance(s, N.While):
            _refuse_floats(s, (s.cond,), tainted)
            _walk_loop(s.body, tainted, decided or _origin((s.cond,), tainted))
        elif isinstance(s, N.Return):
            _refuse_floats(s, s.values, tainted)


_BREAKS = object()  # in `tainted` while a loop's break or continue is decided by an old value


def _walk_loop(body, tainted, decided):
    """A loop whose trips an old value decides (its bounds, its condition, a break under a
    condition on one) decides everything its body assigns."""
    outer = tainted.pop(_BREAKS, None)
    _walk(body, tainted, decided)
    breaks = tainted.pop(_BREAKS, None)
    if breaks is not None and decided is None:
        decided = breaks
        _walk(body, tainted, decided)
        tainted.pop(_BREAKS, None)
    if decided is not None:
        for name in assigned_names(body):
            tainted.setdefault(name, decided)
    if outer is not None:
        tainted[_BREAKS] = outer


def _origin(exprs, tainted):
    """The atomic whose old value one of exprs reads, or None."""
    for e in exprs:
        for v in vars_in(e):
            if v.name in tainted:
                return tainted[v.name]
    return None


def _refuse_floats(s, exprs, tainted):
    """Refuse an old value read by a float-typed (sub)expression: a cast to float, a select
    between floats, a float field's element at it."""
    for e in exprs:
        for x in iter_expr(e):
            if is_float(x.dtype) and isinstance(x, (N.Call, N.Load, N.Var)):
                origin = _origin((x,), tainted)
                if origin is not None:
                    _refused(s, origin, "reaches a float computation here")


def _refused(s, atomic, how):
    called = atomic.src.text[atomic.src.col:].split("(")[0].strip() if atomic.src is not None else ""
    name = called or f"ti.atomic_{atomic.op}"  # as the source spells it (atomic_sub is an add here)
    line = f" (line {atomic.src.line})" if atomic.src is not None else ""
    raise KernDiffError(
        f"the old value {name} returns{line} {how}: it depends on the order the threads ran in, which the "
        "derivative kernels cannot replay (running the atomic again hands out other values and counts twice)",
        s.src, f"let the old value reach integer work only (the indices and values of integer fields: "
               f"members[c, {name}(count[c], 1)] = i) and read those fields where the floats are computed, in "
               "this kernel's later loops or in another kernel")
