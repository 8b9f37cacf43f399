"""Turn generated source into a Taichi kernel: register it in linecache (Taichi and tracebacks
read kernels' source through inspect), exec it with the fields as globals, decorate with ti.kernel,
and compile it again without Taichi's cfg_optimization pass where Taichi's IR verifier refuses it
(with_verifier_fallback)."""
from __future__ import annotations

import functools
import hashlib
import importlib
import linecache
import os
import sys
import warnings

import taichi as ti
from taichi.lang import impl

from ..ir import nodes as N
from ..ir.walk import expr_children_of_stmt, iter_stmts, loads_in
from .emit import emit_kernel

# the functions generated kernels may call, and the module of this package that defines each
HELPERS = {"claim_slot": ".slots", "sincos": ".cpu_math", "sincos4": ".cpu_math", "exp4": ".cpu_math", "tanh_via_exp": ".cpu_math",
           "polar_rotation": ".decompositions", "polar_rotation_entry": ".decompositions",
           "mul_or_zero": ".products", "keyed_random": ".draws"}


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


def generate_bound(ir: N.KernelIR, fn_name: str):
    """(source text, {global name: field}, {global name: (field, component)}): the source and
    what its global names stand for, apart, so that runtime.offline_cache can keep the names'
    meanings on disk and bind them to another process's fields."""
    from ..ir.walk import assigned_names, used_names

    locals_ = assigned_names(ir.body) | used_names(ir.body) | {p.name for p in ir.params} | {fn_name}
    refs = collect_fields(ir)
    names = field_names(ir, locals_, refs)
    bound = {names[id(r.field)]: r.field for r in refs}
    src, components = emit_kernel(ir, names, fn_name, taken=locals_ | {"ti"} | set(HELPERS),
                                  arrays=array_params(bound))
    return src, bound, components


def array_params(bound: dict):
    """[(name, ndarray)] of the ndarrays among a generated kernel's names, in the order its
    signature takes them (after its scalar parameters): Taichi reads an ndarray only through a
    kernel parameter, so they are passed at each launch (with_arrays) rather than bound as
    globals like fields."""
    from ..runtime.registry import is_ndarray

    return [(name, bound[name]) for name in sorted(bound) if is_ndarray(bound[name])]


def with_arrays(run, arrays):
    """The compiled kernel `run`, launched with the ndarrays its signature ends with."""
    if not arrays:
        return run
    tail = tuple(a for _, a in arrays)

    @functools.wraps(run)
    def launch(*args):
        return run(*args, *tail)

    return launch


def bind_globals(src: str, fields: dict, components: dict) -> dict:
    """The globals a generated kernel's source runs with: ti, the helpers it calls, its fields
    and the scalar fields of the components it reads apart (codegen.components)."""
    g = {"ti": ti}
    for name, module in HELPERS.items():
        if f"{name}(" in src:
            g[name] = getattr(importlib.import_module(module, __package__), name)
    g.update(fields)
    for name, (field, component) in components.items():
        g[name] = field.get_scalar_field(*component)
    return g


def compile_source(src: str, g: dict, fn_name: str):
    digest = hashlib.sha1(src.encode()).hexdigest()[:10]
    filename = f"<kerndiff {fn_name} {digest}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    code = compile(src, filename, "exec", dont_inherit=True)
    exec(code, g)
    return with_verifier_fallback(g[fn_name])


def _frames_in_package() -> int:
    """The stacklevel of the innermost caller outside kerndiff (so a warning names user code)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


# How Taichi's IR verifier (verify.cpp) words a refusal: an internal check between its passes.
VERIFIER = "[verify.cpp:"


def with_verifier_fallback(run):
    """The Taichi kernel `run`, compiled once more without Taichi's cfg_optimization pass where
    Taichi's IR verifier refuses it. Taichi 1.7.4's store-to-load forwarding across two `if`s on
    one condition can leave a block whose parent is not the statement holding it (`w = 0.0; if
    c: pass / else: w = 1.0; y = w; if c: y = 0.0; x = y` with x read nowhere): the verifier
    then raises before anything ran, and about one order-three device-function kernel in 300
    has that shape. Compiled without the pass the kernel is the same program, a little less
    optimized; the flag is Taichi's global config, set for that one compilation, and later
    launches reuse what it compiled (so do Taichi's caches). Taichi has logged its error line by
    then; a warning says what became of it."""

    @functools.wraps(run)
    def launch(*args):
        try:
            return run(*args)
        except RuntimeError as e:
            if VERIFIER not in str(e):
                raise
        cfg = impl.current_cfg()
        saved = cfg.cfg_optimization
        cfg.cfg_optimization = False
        try:
            out = run(*args)
        finally:
            cfg.cfg_optimization = saved
        warnings.warn(f"Taichi's IR verifier refused kerndiff's kernel {run.__name__} (the [verify.cpp] "
                      "line Taichi logged, a Taichi 1.7.4 bug); it was compiled without Taichi's "
                      "cfg_optimization pass instead and ran", RuntimeWarning, stacklevel=_frames_in_package())
        return out

    return launch
