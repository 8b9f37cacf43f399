"""What the generated code may use on the current Taichi backend.

Taichi's SPIR-V backends (Vulkan, Metal, OpenGL) have no f64 transcendental functions; Taichi
would fail deep inside its code generator. kerndiff says so up front, naming the line, before
anything is compiled. (Float atomics are emulated by Taichi where a device lacks them, so they
need nothing here.)
"""
from __future__ import annotations

from ..errors import KernDiffError
from ..ir import nodes as N
from ..ir.ops import TRANSCENDENTAL
from ..ir.walk import expr_children_of_stmt, iter_expr, iter_stmts


def spirv_backend():
    import taichi as ti
    from taichi.lang import impl
    arch = impl.current_cfg().arch
    return arch in (ti.vulkan, ti.metal, ti.opengl, ti.gles)


def check_backend(ir: N.KernelIR):
    if not spirv_backend():
        return
    for s in iter_stmts(ir.body):
        for e in expr_children_of_stmt(s):
            for x in iter_expr(e):
                if isinstance(x, N.Call) and x.op in TRANSCENDENTAL and x.dtype == "f64" and \
                        not (x.op == "pow" and x.args[1].dtype.startswith("i")):
                    raise KernDiffError(f"'{x.op}' in f64 is not available on Taichi's SPIR-V backends "
                                        "(Vulkan / Metal / OpenGL)", s.src,
                                        "use f32 fields (ti.init(default_fp=ti.f32)) on these backends, "
                                        "or run on the CPU or CUDA")
