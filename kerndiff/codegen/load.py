"""Turn generated source into a Taichi kernel: register it in linecache (Taichi and tracebacks
read kernels' source through inspect), exec it with the fields as globals, decorate with ti.kernel."""
from __future__ import annotations

import hashlib
import importlib
import linecache

import taichi as ti

from ..ir import nodes as N
from ..ir.walk import expr_children_of_stmt, iter_stmts, loads_in
from .emit import emit_kernel

# the functions generated kernels may call, and the module of this package that defines each
HELPERS = {"claim_slot": ".slots", "sincos": ".cpu_math", "sincos4": ".cpu_math", "tanh_via_exp": ".cpu_math"}


def collect_fields(ir: N.KernelIR):
    seen = {}
    for s in iter_stmts(ir.body):
        refs = [s.ref] if isinstance(s, (N.Store, N.Atomic)) else []
        for e in expr_children_of_stmt(s):
            refs.extend(x.ref for x in loads_in(e))
        for r in refs:
            seen.setdefault(id(r.field), r)
    return list(seen.values())


def field_names(ir: N.KernelIR, taken: set, refs=None) -> dict:
    """id(field) -> a unique readable global name: what this kernel's source calls the field (or
    its primal), else the name kerndiff first saw it under. refs: collect_fields(ir), where the
    caller has it."""
    from ..runtime.registry import REGISTRY

    aliases = dict(ir.field_aliases)
    out = {}
    used = set(taken) | {"ti"} | set(HELPERS)
    for r in collect_fields(ir) if refs is None else refs:
        base = REGISTRY.display_name(r.field, aliases) or "field"
        name, k = base, 1
        while name in used:
            name = f"{base}_{k}"
            k += 1
        used.add(name)
        out[id(r.field)] = name
    return out


def generate(ir: N.KernelIR, fn_name: str):
    """(source text, globals dict) for the kernel."""
    from ..ir.walk import assigned_names, used_names

    locals_ = assigned_names(ir.body) | used_names(ir.body) | {p.name for p in ir.params} | {fn_name}
    refs = collect_fields(ir)
    names = field_names(ir, locals_, refs)
    src, components = emit_kernel(ir, names, fn_name, taken=locals_ | {"ti"} | set(HELPERS))
    g = {"ti": ti}
    for name, module in HELPERS.items():
        if f"{name}(" in src:
            g[name] = getattr(importlib.import_module(module, __package__), name)
    for r in refs:
        g[names[id(r.field)]] = r.field
    for name, (field, component) in components.items():
        g[name] = field.get_scalar_field(*component)
    return src, g


def compile_source(src: str, g: dict, fn_name: str):
    digest = hashlib.sha1(src.encode()).hexdigest()[:10]
    filename = f"<kerndiff {fn_name} {digest}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    code = compile(src, filename, "exec", dont_inherit=True)
    exec(code, g)
    return g[fn_name]
