"""Gradient checking, shipped for users: reverse vs forward vs central finite differences.

Along a few random directions v (seeded) and with a random output cotangent w:
    finite differences   (⟨w, f(x + εv)⟩ − ⟨w, f(x − εv)⟩) / 2ε        in float64
    forward mode         ⟨w, J·v⟩                    (k.forward)
    reverse mode         ⟨Jᵀ·w, v⟩                   (k.reverse)       — the dot-product test
and with order=2 also H·v from forward(reverse) against finite differences of the gradient.
Every run the check makes draws the same random numbers (ti.random, ti.randn: runtime/draws.py
fixes the launches' seeds while it checks), so kernels and programs that draw are checked too.
Where every number compared is zero the check proves nothing (`kd.check_grad(k.reverse, ...)` with
the output adjoint k.reverse reads left at zero): it passes, with a warning that says so.
Afterwards every field the check touched holds what it held before: the inputs, the fields the
kernel writes, and the existing adjoint and dual fields of all of them; the adjoint and dual
fields the check itself made are left zero-filled. A mismatch raises
AssertionError with a table of the worst rows.

The function checked may also be a program: a plain Python function that launches @kd.kernels (a
simulation's steps and its loss). Its gradient then comes from kd.Tape and its tangent from
kd.FwdMode, against central differences of the whole program, and with order=2 its H·v from
kd.Tape over its forward kernels against differences of its gradient (program_check.py).
"""
from __future__ import annotations

import warnings

import numpy as np

from .factories import BackwardFn, ForwardFn, HvpFn, field_shape, read
from .ir.types import from_taichi

TOLERANCES = {  # dtype -> (eps, rtol, atol)
    "f64": (1e-6, 1e-5, 1e-8),
    "f32": (1e-2, 3e-2, 1e-3),
    "f16": (1e-1, 1e-1, 1e-1),
}


def _defaults(inputs, output, eps, rtol, atol, returned=None):
    """returned: the dtype of the float a kernel returns, where that is the output (output None)."""
    dts = [from_taichi(f.dtype) for f in list(inputs) + ([output] if output is not None else [])]
    dts += [returned] if output is None else []
    worst = "f64" if all(d == "f64" for d in dts) else ("f16" if "f16" in dts else "f32")
    e, r, a = TOLERANCES[worst]
    return (e if eps is None else eps), (r if rtol is None else rtol), (a if atol is None else atol)


def _shape_like(f, rng):
    shape = field_shape(f)
    return rng.standard_normal(shape) if shape else float(rng.standard_normal())


def _dot(a, b):
    return float(np.sum(np.asarray(a, dtype=np.float64) * np.asarray(b, dtype=np.float64)))


def check_grad(kernel, inputs, output=None, *, eps=None, rtol=None, atol=None, args=(), directions=3, order=1,
               seed=0):
    """Compare reverse mode, forward mode and central finite differences; return the max error.
    output None: the float the kernel returns (as for kd.backward)."""
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    from .api import _check_field
    from .errors import KernDiffError
    from .runtime.draws import fixed_seeds
    from .runtime.kernel import Kernel
    for f in inputs + ([output] if output is not None else []):
        _check_field(f, "kd.check_grad")
    returned = None
    if output is None:
        if not (isinstance(kernel, Kernel) and kernel.returns_one_float()):
            raise KernDiffError("kd.check_grad needs an output field",
                                remedy="pass output=field (a @kd.kernel returning one float may leave it out: "
                                       "the returned value is the output)")
        returned = kernel.signature()[1]
    eps, rtol, atol = _defaults(inputs, output, eps, rtol, atol, returned)
    rng = np.random.default_rng(seed)
    # every run draws the same random numbers (runtime/draws.py): the differences' runs too
    with fixed_seeds(constant=isinstance(kernel, Kernel)):
        if not isinstance(kernel, Kernel):
            return _check_program(kernel, inputs, output, eps, rtol, atol, args, directions, order, rng)
        return _check_kernel(kernel, inputs, output, eps, rtol, atol, args, directions, order, rng)


def _check_kernel(kernel, inputs, output, eps, rtol, atol, args, directions, order, rng):
    kept = [(f, f.to_numpy()) for f in _touched_fields(kernel, inputs, output, args)]
    x0 = [read(f) for f in inputs]
    shape = field_shape(output) if output is not None else ()
    w = rng.standard_normal(shape) if shape else float(rng.standard_normal())
    bwd = BackwardFn(kernel, inputs, output, args)
    fwd = ForwardFn(kernel, inputs, output, args)
    rows = []
    try:
        grad = bwd(x0, cotangent=w if shape else None)
        wscale = w if shape else 1.0

        def objective(xs):
            returned = bwd._run_primal(xs)
            return _dot(wscale, read(output) if output is not None else returned)

        for d in range(directions):
            v = [_shape_like(f, rng) for f in inputs]
            plus = [x + eps * t for x, t in zip(x0, v)]
            minus = [x - eps * t for x, t in zip(x0, v)]
            fd = (objective(plus) - objective(minus)) / (2 * eps)
            fw = _dot(wscale, fwd(x0, tangents=v))
            rv = sum(_dot(g, t) for g, t in zip(grad, v))
            rows.append((f"direction {d}", fd, fw, rv))
        if order >= 2:
            hvp = HvpFn(kernel, inputs, output, args)
            for d in range(directions):
                v = [_shape_like(f, rng) for f in inputs]
                u = [_shape_like(f, rng) for f in inputs]
                hv = hvp(x0, v, cotangent=w if shape else None)
                plus = bwd([x + eps * t for x, t in zip(x0, v)], cotangent=w if shape else None)
                minus = bwd([x - eps * t for x, t in zip(x0, v)], cotangent=w if shape else None)
                fd = sum(_dot((p - m) / (2 * eps), uu) for p, m, uu in zip(plus, minus, u))
                an = sum(_dot(h, uu) for h, uu in zip(hv, u))
                rows.append((f"H·v direction {d}", fd, an, an))
    finally:
        for f, arr in kept:
            f.from_numpy(arr)
        had = {id(f) for f, _ in kept}
        for f in _touched_fields(kernel, inputs, output, args):
            if id(f) not in had:  # made by the check: left zero-filled, as kd.dual/kd.adjoint make them
                f.fill(0)
    _warn_if_all_zero(rows, kernel.dotted_name, "and is every adjoint or dual the kernel reads as a constant set "
                      "(a reverse kernel's output adjoint, a forward kernel's input duals)", stacklevel=4)
    return _report(rows, rtol, atol)


def _warn_if_all_zero(rows, name, question, stacklevel=3):
    if rows and all(v == 0.0 for row in rows for v in row[1:]):
        warnings.warn(f"kd.check_grad({name}): every derivative it compared is zero (finite differences, forward "
                      f"and reverse alike), so the check shows nothing; does the output depend on these inputs, "
                      f"{question}?", stacklevel=stacklevel)


def _check_program(program, inputs, output, eps, rtol, atol, args, directions, order, rng):
    """check_grad of a plain Python function launching @kd.kernels (program_check.py): kd.Tape's
    gradient and kd.FwdMode's tangent against central differences of the whole program."""
    from .errors import KernDiffError
    from .program_check import ProgramCheck
    name = getattr(program, "__name__", repr(program))
    if getattr(program, "_is_wrapped_kernel", False) or not callable(program):
        raise KernDiffError(f"kd.check_grad takes a @kd.kernel, or a Python function that launches them, got "
                            f"{program!r}", remedy="decorate the kernel with @kd.kernel")
    if args:
        raise KernDiffError(f"args= passes a kernel's parameters; '{name}' is a program, which kd.check_grad "
                            "calls without arguments", remedy=f"pass a function of none: lambda: {name}(...)")
    x0 = [read(f) for f in inputs]
    if field_shape(output):
        from .program_check import weighted_total
        program, output = weighted_total(program, output, rng.standard_normal(field_shape(output)))
    check = ProgramCheck(program, inputs, output)
    rows = []
    try:
        grad = check.gradient(x0)
        for d in range(directions):
            v = [_shape_like(f, rng) for f in inputs]
            fd = (check.value([x + eps * t for x, t in zip(x0, v)])
                  - check.value([x - eps * t for x, t in zip(x0, v)])) / (2 * eps)
            fw = check.tangent(x0, v)
            rv = sum(_dot(g, t) for g, t in zip(grad, v))
            rows.append((f"direction {d}", fd, fw, rv))
        if order >= 2:
            for d in range(directions):
                v = [_shape_like(f, rng) for f in inputs]
                u = [_shape_like(f, rng) for f in inputs]
                hv = check.hvp(x0, v)
                plus = check.gradient([x + eps * t for x, t in zip(x0, v)])
                minus = check.gradient([x - eps * t for x, t in zip(x0, v)])
                fd = sum(_dot((p - m) / (2 * eps), uu) for p, m, uu in zip(plus, minus, u))
                an = sum(_dot(h, uu) for h, uu in zip(hv, u))
                rows.append((f"H·v direction {d}", fd, an, an))
    finally:
        check.finish()
    _warn_if_all_zero(rows, name, "and do they reach it only through kernels (not through Python)", stacklevel=4)
    return _report(rows, rtol, atol)


def _touched_fields(kernel, inputs, output, args):
    """The fields a check changes: inputs, output, what the kernel writes, and the adjoint and dual
    fields those already have at the levels the kernel's transforms use (the factories clear and
    fill them), with the adjoints' duals (H·v)."""
    from .factories import derivative_levels
    from .runtime.registry import REGISTRY

    dual_level, adjoint_level = derivative_levels(kernel)
    written, _ = kernel.fields(*args)
    out = {}
    for f in list(inputs) + ([output] if output is not None else []) + list(written):
        out[id(f)] = f
        adjoint = REGISTRY.get(f, "adjoint", adjoint_level)
        for d in (adjoint, REGISTRY.get(f, "dual", dual_level),
                  None if adjoint is None else REGISTRY.get(adjoint, "dual", dual_level)):
            if d is not None:
                out[id(d)] = d
    return list(out.values())


def _report(rows, rtol, atol):
    """The largest relative error among rows, or an AssertionError with the worst ones."""
    errs = []
    for name, fd, fw, rv in rows:
        scale = max(abs(fd), abs(fw), abs(rv), 1.0)
        err = max(abs(fw - fd), abs(rv - fd), abs(fw - rv)) / scale
        bad = not (np.isclose(fw, fd, rtol=rtol, atol=atol) and np.isclose(rv, fd, rtol=rtol, atol=atol)
                   and np.isclose(fw, rv, rtol=rtol, atol=atol))
        if not all(np.isfinite([fd, fw, rv])):
            bad, err = True, float("inf")
        errs.append((err, bad, name, fd, fw, rv))
    worst = max(e[0] for e in errs) if errs else 0.0
    if any(e[1] for e in errs):
        lines = [f"kd.check_grad: derivatives disagree (rtol={rtol}, atol={atol})",
                 f"{'check':<18} {'finite diff':>16} {'forward':>16} {'reverse':>16} {'rel err':>10}"]
        for err, bad, name, fd, fw, rv in sorted(errs, key=lambda e: -e[0])[:10]:
            lines.append(f"{name:<18} {fd:16.8g} {fw:16.8g} {rv:16.8g} {err:10.2e}{'  <-' if bad else ''}")
        raise AssertionError("\n".join(lines))
    return worst
