"""The public surface of API.md: decorators, derivative fields and the transform dispatchers.

`kd.forward` and `kd.reverse`/`kd.backward` dispatch on what they are given: a kernel gives its
derivative kernel, a kernel with inputs/output gives a host function (factories.py), a device
function gives a device function (funcs.py).
"""
from __future__ import annotations

import inspect

from .errors import KernDiffError
from .frontend.values import is_field
from .funcs import DeviceFunction, as_device_function, func
from .program_factories import is_program
from .runtime.kernel import Kernel, kernel
from .runtime.registry import REGISTRY

__all__ = ["kernel", "func", "dual", "adjoint", "forward", "reverse", "backward", "grad", "jvp", "vjp", "hvp"]


def _check_field(f, what):
    if not is_field(f):
        raise not_a_field(f, f"{what} takes a Taichi field")


def not_a_field(f, reason):
    """The error for a value where a field is needed; a struct field's members are the fields."""
    members = getattr(f, "keys", None) if type(f).__name__ == "StructField" else None
    remedy = (f"pass its members, which are fields: {', '.join('.' + k for k in members)}" if members
              else "pass a field made with ti.field / ti.Vector.field / ti.Matrix.field")
    return KernDiffError(f"{reason}, got {type(f).__name__}", remedy=remedy)


def dual(f, level: int = 1):
    """The dual (tangent) field of f at `level` (Taichi's own `f.dual` at level 1 when present)."""
    _check_field(f, "kd.dual")
    return REGISTRY.get_or_make(f, "dual", int(level))


def adjoint(f, level: int = 1):
    """The adjoint (cotangent) field of f at `level` (Taichi's own `f.grad` at level 1 when present)."""
    _check_field(f, "kd.adjoint")
    return REGISTRY.get_or_make(f, "adjoint", int(level))


def _device(fn, what):
    if inspect.ismethod(fn) and (isinstance(fn.__func__, DeviceFunction)
                                 or getattr(fn, "_is_taichi_function", False)):
        raise KernDiffError(f"{what} of a method reached through an instance ({fn.__func__.__name__} of "
                            f"{type(fn.__self__).__name__}): its derivative would be taken with respect to the "
                            "parameters after `self`, which kerndiff does not bind",
                            remedy="define the function at module level (or as a @staticmethod) and pass it "
                                   "what it reads from self as arguments")
    d = as_device_function(fn)
    if d is None:
        raise KernDiffError(f"{what} takes a @kd.kernel, a @kd.func or a @ti.func, got {fn!r}",
                            remedy="decorate the function with @kd.func (device) or @kd.kernel")
    return d


def _check_argnum(d, argnum, what):
    if argnum is None:
        return
    n = d.arity()
    if not isinstance(argnum, int) or not -n <= argnum < n:
        raise KernDiffError(f"{what}: argnum={argnum!r} is out of range for a function of {n} argument(s)",
                            remedy=f"use an argnum between 0 and {n - 1}")


def forward(fn, argnum: int = 0, *, inputs=None, output=None, args=()):
    """Forward mode: k.forward for a kernel, a JVP host function with inputs/output, or the
    derivative device function of `fn` with respect to argument `argnum`."""
    if isinstance(fn, Kernel):
        if inputs is None and output is None:
            return fn.forward
        from .factories import ForwardFn
        return ForwardFn(fn, inputs, output, args)
    if inputs is not None or output is not None:
        if is_program(fn):
            from .program_factories import ProgramForwardFn
            return ProgramForwardFn(fn, inputs, output, args)
        raise _not_a_kernel(fn, "kd.forward")
    d = _device(fn, "kd.forward")
    _check_argnum(d, argnum, "kd.forward")
    if argnum < 0:
        argnum += d.arity()
    return DeviceFunction(kind="forward", inner=d, argnum=argnum)


def reverse(fn, inputs=None, output=None, *, argnum=None, args=()):
    """Reverse mode: k.reverse for a kernel, a gradient host function with inputs/output, or
    kd.grad(fn) for a device function."""
    if isinstance(fn, Kernel):
        if inputs is None and output is None:
            return fn.reverse
        from .factories import BackwardFn
        return BackwardFn(fn, inputs, output, args)
    if inputs is not None or output is not None:
        if is_program(fn):
            from .program_factories import ProgramBackwardFn
            return ProgramBackwardFn(fn, inputs, output, args)
        raise _not_a_kernel(fn, "kd.backward")
    return grad(fn, argnum)


def _not_a_kernel(fn, what):
    """The error for a host-function factory (inputs/output given) over something neither a kernel
    nor a program (a Python function launching kernels: program_factories)."""
    return KernDiffError(f"{what}(fn, inputs, output) takes a @kd.kernel or a Python function that launches "
                         f"them, got {fn!r}",
                         remedy="decorate the kernel with @kd.kernel (a plain ti.kernel has no kerndiff derivatives)")


backward = reverse


def grad(fn, argnum=None):
    """Reverse-mode gradient of a scalar-valued device function: a tuple with one entry per
    argument (vector arguments get vector gradients), or one entry when argnum is given."""
    if isinstance(fn, Kernel):
        return fn.reverse
    d = _device(fn, "kd.grad")
    _check_argnum(d, argnum, "kd.grad")
    if argnum is not None and argnum < 0:
        argnum += d.arity()
    return DeviceFunction(kind="grad", inner=d, argnum=argnum)


def jvp(fn):
    """`kd.jvp(fn)(*primals, *tangents) -> (out, out_tangent)` as a device function."""
    return DeviceFunction(kind="jvp", inner=_device(fn, "kd.jvp"))


def vjp(fn):
    """`kd.vjp(fn)(*primals, cotangent) -> tuple of argument cotangents` as a device function."""
    return DeviceFunction(kind="vjp", inner=_device(fn, "kd.vjp"))


def hvp(fn, inputs, output=None, *, args=()):
    """Host function computing Hessian-vector products H·v of output w.r.t. inputs via
    forward(reverse(fn))."""
    if not isinstance(fn, Kernel):
        if is_program(fn):
            from .program_factories import ProgramHvpFn
            return ProgramHvpFn(fn, inputs, output, args)
        raise _not_a_kernel(fn, "kd.hvp")
    from .factories import HvpFn
    return HvpFn(fn, inputs, output, args)
