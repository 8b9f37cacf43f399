"""Host-side function factories over kernels (API.md §4): backward, forward (JVP) and HVP.

Each call validates everything before any kernel runs, sets the inputs, clears what the kernels
accumulate into (outputs, and the duals/adjoints involved), runs, and returns fresh numbers:
Python floats for 0-d fields, numpy arrays otherwise.

Levels (API.md §2): the kernel given may itself be a derivative kernel (`k.forward`, `k.reverse`).
Its forward transform then reads and writes the duals of the level after the forward transforms
already in its path, and its reverse transform the adjoints after its reverse ones
(`kd.forward(k.forward, ...)` seeds `kd.dual(x, 2)`; `kd.backward(k.reverse, ...)` seeds and reads
level-2 adjoints). Seeding level 1 there would leave the transform's own fields at zero and
return zeros.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .errors import KernDiffError
from .frontend.values import is_field
from .ir.types import from_taichi, is_float
from .runtime.registry import REGISTRY


def field_shape(f):
    """The shape of f's values as numpy holds them: its own, then its elements'."""
    from .runtime.registry import element_shape
    return tuple(f.shape) + element_shape(f)


def read(f):
    if not field_shape(f):
        return float(f[None])
    return f.to_numpy().astype(np.float64)


def write(f, value, what):
    shape = field_shape(f)
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != shape and not (arr.size == 1 and not shape):
        raise KernDiffError(f"{what} has shape {arr.shape}, but its field has shape {shape}",
                            remedy="pass a float for 0-d fields and an array of the field's shape otherwise")
    if not shape:
        f[None] = float(arr.reshape(()))
    else:
        f.from_numpy(arr.astype(f.to_numpy().dtype))


def zero(f):
    f.fill(0)


def derivative_levels(kernel):
    """(dual level, adjoint level) of kernel.forward's and kernel.reverse's own transforms: 1 for a
    kernel as written, 2 for the matching kind over k.forward / k.reverse, and so on (API.md §2)."""
    return kernel.forward.level(), kernel.reverse.level()


class _Fields:
    """What every host function checks and sets: its input fields and its output field, the
    values and tangents passed for the inputs, and the output's cotangent."""

    def __init__(self, inputs, output, returns=False):
        """returns: the kernel returns one float, which is the output where no field is given
        (self.output None: `kd.backward(loss_kernel, inputs=[x])` for `def loss_kernel() -> float`)."""
        if inputs is None or output is None and not returns:
            raise KernDiffError("inputs and output are both needed",
                                remedy="pass inputs=[fields...] and output=field (a kernel returning one float "
                                       "may leave output out: the returned value is the output)")
        inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        for f in inputs + ([output] if output is not None else []):
            if not is_field(f):
                from .api import not_a_field
                raise not_a_field(f, "inputs and output must be Taichi fields")
        for f in inputs:
            if not is_float(from_taichi(f.dtype)):
                raise KernDiffError(f"input field of dtype {f.dtype} is not a float field; it has no derivative",
                                    remedy="differentiate with respect to float fields only")
        if output is not None and not is_float(from_taichi(output.dtype)):
            raise KernDiffError(f"output field of dtype {output.dtype} is not a float field",
                                remedy="use a float output field")
        self.inputs, self.output = inputs, output

    def _set_inputs(self, values):
        for i, (f, v) in enumerate(zip(self.inputs, values)):
            write(f, v, f"value {i}")

    def _check_values(self, values, name):
        if len(self.inputs) == 1 and not isinstance(values, (list, tuple)):
            values = [values]
        if not isinstance(values, (list, tuple)) or len(values) != len(self.inputs):
            n = len(values) if isinstance(values, (list, tuple)) else 1
            raise KernDiffError(f"{len(self.inputs)} input field(s) but {n} {name} were given",
                                remedy=f"pass one entry of {name} per input field, in order")
        for i, (f, v) in enumerate(zip(self.inputs, values)):
            shape = field_shape(f)
            arr = np.asarray(v, dtype=np.float64)
            if arr.shape != shape and not (arr.size == 1 and not shape):
                raise KernDiffError(f"{name} {i} has shape {arr.shape}, but its field has shape {shape}",
                                    remedy="pass a float for 0-d fields and an array of the field's shape otherwise")
        return list(values)

    def _cotangent(self, cotangent):
        shape = field_shape(self.output) if self.output is not None else ()
        if cotangent is None:
            if shape:
                raise KernDiffError(f"the output has shape {shape}, so a cotangent is needed",
                                    remedy="call with cotangent=<array of the output's shape>")
            return 1.0
        arr = np.asarray(cotangent, dtype=np.float64)
        if arr.shape != shape and not (arr.size == 1 and not shape):
            raise KernDiffError(f"cotangent has shape {arr.shape}, but the output has shape {shape}",
                                remedy="pass a cotangent of the output's shape")
        return cotangent


class _Jacobian:
    """kd.forward's host function without tangents: the output's derivative with respect to each
    input, as jax.jacfwd gives it, from one forward pass (self._pass) per element of the input."""

    def _jacobian(self, values, k):
        """The output's derivative w.r.t. input k: a pass along each unit direction of that input,
        the others' tangents zero."""
        shape = field_shape(self.inputs[k])
        if not shape:
            return self._pass(values, self._unit_tangents(k, None))
        columns = [self._pass(values, self._unit_tangents(k, index)) for index in np.ndindex(*shape)]
        return np.stack([np.asarray(c, dtype=np.float64) for c in columns], axis=-1).reshape(
            np.shape(columns[0]) + shape)

    def _unit_tangents(self, k, index):
        tangents = [np.zeros(field_shape(g)) if field_shape(g) else 0.0 for g in self.inputs]
        if index is None:
            tangents[k] = 1.0
        else:
            tangents[k][index] = 1.0
        return tangents

    def __call__(self, values, tangents=None):
        values = self._check_values(values, "values")
        if tangents is not None:
            tangents = self._check_values(tangents, "tangents")
            return self._pass(values, tangents)
        return [self._jacobian(values, k) for k in range(len(self.inputs))]


class _Factory(_Fields):
    def __init__(self, kernel, inputs, output, args):
        super().__init__(inputs, output, returns=output is None and kernel.returns_one_float())
        self.kernel, self.args = kernel, tuple(args)
        self._check_args()
        # the levels of the derivative fields this kernel's forward and reverse transforms use
        self.dual_level, self.adjoint_level = derivative_levels(kernel)

    def _check_args(self):
        """A kernel with parameters gets its arguments through args=(...): say so at construction,
        not at the first call with a message about the kernel alone."""
        params, _ = self.kernel.signature()
        names = [n for n, _ in params][1 if self.kernel.bound is not None else 0:]
        if len(self.args) != len(names):
            factory = {"BackwardFn": "kd.backward", "ForwardFn": "kd.forward", "HvpFn": "kd.hvp"}[type(self).__name__]
            raise KernDiffError(f"{self.kernel.__name__} takes {len(names)} argument(s) {names}, but {factory} was "
                                f"given {len(self.args)}",
                                remedy=f"pass the kernel's arguments as args=(...): "
                                       f"{factory}({self.kernel.__name__}, inputs, output, args=({', '.join(names)},))")

    def _written(self):
        written, _ = self.kernel.fields(*self.args)
        return written

    def _referenced(self):
        written, read_ = self.kernel.fields(*self.args)
        return [f for f in written + read_ if is_float(from_taichi(f.dtype))]

    def _run_primal(self, values):
        """Set inputs, clear outputs, run the kernel; returns what it returns."""
        values = self._check_values(values, "values")
        written = self._written()
        for f in written:
            if not any(f is i for i in self.inputs):
                zero(f)
        self._set_inputs(values)
        return self.kernel(*self.args)

    def _run_forward(self, values, tangents):
        """Set inputs and their duals, clear outputs and their duals, run the forward kernel;
        returns what it returns ((value, tangent) for a returned float)."""
        duals = [REGISTRY.get_or_make(f, "dual", self.dual_level) for f in self.inputs]
        for f in self._written():
            if not any(f is i for i in self.inputs):
                zero(f)
            d = REGISTRY.get(f, "dual", self.dual_level)
            if d is not None:
                zero(d)
        self._set_inputs(values)
        for d, t in zip(duals, tangents):
            write(d, t, "tangent")
        return self.kernel.forward(*self.args)

    def _seed_of_returned(self, cotangent):
        """The cotangent kwarg of the reverse kernels: where the output is a field, a value the
        kernel also returns is not part of it, so its cotangent is 0 (a reverse kernel launched
        alone seeds it with 1); where the returned value is the output, the output's cotangent."""
        if self.output is None:
            return {"cotangent": cotangent}
        return {"cotangent": 0.0} if self.kernel.returned_values() else {}

    @contextlib.contextmanager
    def _constants_held(self):
        """Fields the kernel only reads and that are not inputs are constants of this derivative, so
        their tangents read as zero during the call: a tangent left there by the user or by an
        earlier call would otherwise join J·v silently. They get their contents back afterwards,
        and so do the inputs' duals, which the call fills with its direction (zeros where the call
        made them): a later forward kernel must not find it there, as ti.ad.FwdMode clears its
        seed on exit."""
        varying = {id(f) for f in self.inputs + self._written()}
        duals = {id(f): REGISTRY.get(f, "dual", self.dual_level) for f in self._referenced() if id(f) not in varying}
        held = [(d, d.to_numpy()) for d in duals.values() if d is not None]
        for d, _ in held:
            zero(d)
        seeds = [(f, REGISTRY.get(f, "dual", self.dual_level)) for f in self.inputs]
        seeds = [(f, d.to_numpy() if d is not None else None) for f, d in seeds]
        try:
            yield
        finally:
            for d, contents in held:
                d.from_numpy(contents)
            for f, contents in seeds:
                d = REGISTRY.get(f, "dual", self.dual_level)
                if contents is None:
                    zero(d)
                else:
                    d.from_numpy(contents)

    def _clear_adjoints(self, with_duals):
        """Zero the adjoints the reverse kernel accumulates into (and their duals for H·v); returns
        (input adjoints, output adjoint), allocated if missing."""
        adjs = [REGISTRY.get_or_make(f, "adjoint", self.adjoint_level) for f in self.inputs]
        out_adj = REGISTRY.get_or_make(self.output, "adjoint", self.adjoint_level) if self.output is not None else None
        for f in self._referenced() + list(self.inputs):
            a = REGISTRY.get(f, "adjoint", self.adjoint_level)
            if a is not None:
                zero(a)
                da = REGISTRY.get(a, "dual", self.dual_level) if with_duals else None
                if da is not None:
                    zero(da)
        return adjs, out_adj


class BackwardFn(_Factory):
    """values -> gradient of the output (seeded with `cotangent`) w.r.t. each input."""

    def __call__(self, values, cotangent=None):
        ct = self._cotangent(cotangent)
        self._run_primal(values)
        adjs, out_adj = self._clear_adjoints(with_duals=False)
        if out_adj is not None:
            write(out_adj, ct, "cotangent")
        self.kernel.reverse(*self.args, **self._seed_of_returned(ct))
        return [read(a) for a in adjs]


class ForwardFn(_Jacobian, _Factory):
    """values[, tangents] -> directional derivative of the output; without tangents, the output's
    derivative with respect to each input, as jax.jacfwd gives it: one forward pass per element
    of the input, stacked as the output's shape followed by the input's (a float for 0-d fields
    both; for a 0-d output the array has the input's shape, as kd.backward's gradient)."""

    def _pass(self, values, tangents):
        if self.output is None:  # the returned value's tangent
            with self._constants_held():
                return float(self._run_forward(values, tangents)[1])
        out_dual = REGISTRY.get_or_make(self.output, "dual", self.dual_level)
        with self._constants_held():
            self._run_forward(values, tangents)
            return read(out_dual)


class HvpFn(_Factory):
    """values, tangents -> H·v of the (scalar, or cotangent-weighted) output w.r.t. the inputs,
    by forward(reverse(kernel))."""

    def __call__(self, values, tangents, cotangent=None):
        values = self._check_values(values, "values")
        tangents = self._check_values(tangents, "tangents")
        ct = self._cotangent(cotangent)
        with self._constants_held():
            self._run_forward(values, tangents)  # primal and tangents of every result: H·v reads both
            adjs, out_adj = self._clear_adjoints(with_duals=True)
            hv = [REGISTRY.get_or_make(a, "dual", self.dual_level) for a in adjs]
            for h in hv:
                zero(h)
            if out_adj is not None:
                write(out_adj, ct, "cotangent")
            self.kernel.reverse.forward(*self.args, **self._seed_of_returned(ct))
            return [read(h) for h in hv]

