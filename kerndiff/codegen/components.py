"""Scalar component fields for loops that sum into a 0-D field.

Taichi keeps a parallel loop's `E[None] += ...` in thread-local storage (one atomic add per
thread, not one per iteration) only when it can prove no other global access in the loop touches
E. Its alias analysis cannot see through a component access of a vector or matrix field
(`pos[i][0]`), so one such read anywhere in the loop turns every iteration's add into an atomic
on one address: on an H100 the W2 energy took 7 ms instead of 0.2 ms, on the CPU 2-15x longer.
The same component read through the component's own scalar field (`pos.get_scalar_field(0)[i]`,
the same memory) leaves the analysis nothing to doubt, so in such loops the generated code reads
and writes components that way.

Two more cases read and write a field's components through scalar fields in the whole kernel
(fields_apart): the 0-D vector fields such a loop sums into, as Taichi 1.7 fails to compile a
kernel that also stores into one as `c[None][0]` (scalarize.cpp: "Assertion failure"); and, in a
kernel with ndarray parameters, every field with an atomic on a component: Taichi 1.7.4's LLVM
backend aborts the process compiling `v[idx[i]][1] += t` where idx is an ndarray ("Instruction
does not dominate all uses"), and `v_1[idx[i]] += t` compiles (whole-kernel, as the first case
shows a kernel mixing the two spellings of one field may not compile).
"""
from __future__ import annotations

from ..ir import nodes as N
from ..ir.walk import expr_children_of_stmt, iter_expr, iter_stmts


def scalar_sums(loop: N.For) -> list:
    """The 0-D fields that `loop` reduces into (add, min or max, the reductions Taichi can keep
    per thread); empty when it has none."""
    out = []
    for s in iter_stmts(loop.body):
        if isinstance(s, N.Atomic) and not s.index and s.op in ("add", "min", "max") and s.ref not in out:
            out.append(s.ref)
    return out


def component_refs(loop: N.For) -> list:
    """Field references with a component (vector and matrix fields) in `loop`, in order of first use.
    Not an ndarray's: it has no scalar fields of its components (nor does Taichi read one
    through a global to doubt)."""
    from ..runtime.registry import is_ndarray
    out = []
    for s in iter_stmts(loop.body):
        refs = [s.ref] if isinstance(s, (N.Store, N.Atomic)) else []
        for e in expr_children_of_stmt(s):
            refs.extend(x.ref for x in iter_expr(e) if isinstance(x, N.Load))
        out.extend(r for r in refs if r.component and r not in out and not is_ndarray(r.field))
    return out


def fields_apart(ir: N.KernelIR, with_arrays: bool):
    """(ids of the 0-D vector fields a top-level loop sums into while reading components, ids of
    the fields with atomics on components where the kernel has ndarray parameters): the fields
    whose components the generated kernel reads and writes through their scalar fields
    throughout (see above)."""
    from ..runtime.registry import is_ndarray
    summed = {id(r.field) for s in ir.body if isinstance(s, N.For) and component_refs(s)
              for r in scalar_sums(s) if r.component}
    added = {id(s.ref.field) for s in iter_stmts(ir.body) if isinstance(s, N.Atomic) and s.ref.component
             and not is_ndarray(s.ref.field)} if with_arrays else set()
    return summed, added - summed
