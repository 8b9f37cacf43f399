"""kd.backward / kd.forward / kd.hvp of a program: a plain Python function that launches
@kd.kernels (a simulation's steps and its loss), as host functions (API.md §4 gives them for one
kernel; these follow the same calling conventions).

A program is no kernel, so there is no k.reverse or k.forward to call: each call sets the inputs
and runs the program the way its derivatives are taken by hand, under kd.Tape (the gradient),
kd.FwdMode (the tangent) or tape.ForwardTape (H·v: kd.Tape over the forward kernels). Like those
contexts, and unlike the factories over one kernel (which know what their kernel writes and
clear it), a call does not reset the program's other state: the program must start from it
itself each time it runs, as under kd.Tape (its first kernels set what it then steps forward, and
it clears what it accumulates into; the Tape zeroes the output). An output with elements is
weighted with the cotangent into a 0-d total (program_check.weighted_total), as the Tape needs a
0-d loss. The inputs' duals the call seeded are zero again afterwards, as kd.FwdMode leaves them.
"""
from __future__ import annotations

import numpy as np

from .errors import KernDiffError
from .factories import _Fields, _Jacobian, field_shape, read, write
from .runtime.registry import REGISTRY
from . import tape as tape_module


def is_program(fn):
    """A plain Python callable: not a kernel (kerndiff's or Taichi's) and not a device function."""
    from .funcs import DeviceFunction
    from .runtime.kernel import Kernel
    return callable(fn) and not isinstance(fn, (Kernel, DeviceFunction)) and not any(
        getattr(fn, flag, False) for flag in ("_is_taichi_function", "_is_wrapped_kernel", "_is_classkernel"))


class _ProgramFn(_Fields):
    def __init__(self, program, inputs, output, args, factory):
        name = getattr(program, "__name__", repr(program))
        if args:
            raise KernDiffError(f"args= passes a kernel's parameters; '{name}' is a program, which {factory} calls "
                                "without arguments", remedy=f"pass a function of none: lambda: {name}(...)")
        super().__init__(inputs, output)
        self.program, self.factory = program, factory
        for f in self.inputs + [self.output]:  # active before any kernel of the program compiles
            REGISTRY.get_or_make(f, "adjoint", 1)
            REGISTRY.get_or_make(f, "dual", 1)

    def _loss(self, cotangent):
        """(what runs after the program, its 0-d loss): nothing and the output itself, or a kernel
        adding ⟨cotangent, output⟩ into a 0-d total and that total."""
        if not field_shape(self.output):
            return None, self.output
        from .program_check import weighted_total
        return weighted_total(lambda: None, self.output, cotangent)

    def _run(self, context, before=None, after=None):
        """Run the program under context (with `before` and `after` run there too), refusing a
        Python write into an input before a kernel read it (the values this call was given would
        be thrown away: tape.refuse_setting_given_inputs) and a program that launched no kerndiff
        kernel (an output computed in Python, from `x.to_numpy()`, has derivatives no context
        sees: the result would be zeros)."""
        context.given_inputs = (self.factory, {id(f): f for f in self.inputs})
        with context:
            if before is not None:
                before()
            self.program()
            touched = context.touched.fields if isinstance(context, tape_module.Tape) else context.touched
            if not touched:
                name = getattr(self.program, "__name__", repr(self.program))
                raise KernDiffError(f"'{name}' launched no @kd.kernel reading or writing a field, so {self.factory} "
                                    "has no derivative to take: what it computes in Python is invisible to it",
                                    remedy="compute the output in @kd.kernels (a plain ti.kernel is refused inside)")
            if after is not None:
                after()

    def _start(self, values):
        """Zero the output (as kd.Tape zeroes its loss: a program adding into an output with
        elements would otherwise add each call's values to the last's), then set the inputs."""
        self.output.fill(0)
        self._set_inputs(values)

    def _gradient_of_inputs(self):
        return [read(REGISTRY.get(f, "adjoint", 1)) for f in self.inputs]

    def _clear_seeds(self):
        for f in self.inputs:
            REGISTRY.get(f, "dual", 1).fill(0)


class ProgramBackwardFn(_ProgramFn):
    """values -> the gradient of the output (seeded with `cotangent`) w.r.t. each input, by kd.Tape."""

    def __init__(self, program, inputs, output, args=()):
        super().__init__(program, inputs, output, args, "kd.backward")

    def __call__(self, values, cotangent=None):
        values = self._check_values(values, "values")
        weighting, loss = self._loss(self._cotangent(cotangent))
        self._start(values)
        self._run(tape_module.Tape(loss), after=weighting)
        return self._gradient_of_inputs()


class ProgramForwardFn(_Jacobian, _ProgramFn):
    """values[, tangents] -> the output's tangent, by kd.FwdMode; without tangents, its derivative
    with respect to each input, one pass per input element (as kd.forward over a kernel)."""

    def __init__(self, program, inputs, output, args=()):
        super().__init__(program, inputs, output, args, "kd.forward")

    def _pass(self, values, tangents):
        self._start(values)
        seed = np.asarray(tangents[0], dtype=np.float64).ravel()
        try:
            def seed_the_others():  # (FwdMode seeds one param)
                for f, t in zip(self.inputs[1:], tangents[1:]):
                    write(REGISTRY.get(f, "dual", 1), t, "a tangent")
            self._run(tape_module.FwdMode(loss=self.output, param=self.inputs[0], seed=seed), before=seed_the_others)
        finally:
            self._clear_seeds()
        return read(REGISTRY.get(self.output, "dual", 1))


class ProgramHvpFn(_ProgramFn):
    """values, tangents -> H·v of the (scalar, or cotangent-weighted) output w.r.t. the inputs,
    by kd.Tape over the program's forward kernels (tape.ForwardTape)."""

    def __init__(self, program, inputs, output, args=()):
        super().__init__(program, inputs, output, args, "kd.hvp")

    def __call__(self, values, tangents, cotangent=None):
        values = self._check_values(values, "values")
        tangents = self._check_values(tangents, "tangents")
        weighting, loss = self._loss(self._cotangent(cotangent))
        self._start(values)
        try:
            self._run(tape_module.ForwardTape(loss, list(zip(self.inputs, tangents))), after=weighting)
        finally:
            self._clear_seeds()
        return self._gradient_of_inputs()
