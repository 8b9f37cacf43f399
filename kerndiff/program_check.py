"""kd.check_grad for a program: a plain Python function that launches @kd.kernels (a simulation's
steps and the loss after them), checked as a whole, the way it is differentiated.

Why a separate path: a program is no kernel, so there is no k.reverse or k.forward to call. Its
gradient is what kd.Tape gives, its tangent what kd.FwdMode gives, so those two are compared with
central finite differences of the program itself, along a few random directions (the same table
and tolerances as for a kernel). This also catches what no single kernel's check can: a value
that reaches a kernel through Python (`k(x.to_numpy().sum())`), which the Tape cannot see.

A program runs many times here, and every run must start from the state the first one found, as
a program's kernels add into fields (`loss[None] += ...`, `y[i] += ...`) and step state forward.
So the first run is a recording one: before each launch, the fields the kernel reads or writes
(and their adjoint and dual fields) are copied the first time they are seen, and so is a field
the program overwrites from Python (`fill`, `from_numpy`) before any kernel touched it. Every
later run starts by putting those copies back, and so does the end of the check: afterwards the
fields hold what they held before, and the derivative fields the check made are zero-filled.
A field written element by element from Python (`y[0] = 1.0`) before any kernel touched it is
the one thing not copied (Taichi reports such a write only after making it). A program that
sets one of the checked inputs from Python before a kernel reads it is refused: the values the
check passes in never reach the output, where kd.Tape takes the values set as the inputs.

An output with elements is checked through ⟨w, output⟩ for a random w, as a kernel's is (a
kernel added after the program sums it into a fresh 0-d field, the loss the Tape needs).

With order=2, H·v of the program (tape.ForwardTape: kd.Tape over its forward kernels, reverse
over forward) is compared with central differences of its gradient along a second direction.
"""
from __future__ import annotations

import numpy as np
import taichi as ti

from .errors import KernDiffError
from .factories import field_shape, read, write
from .frontend.values import is_field
from .ir.types import from_taichi, is_float
from .runtime.draws import restart_fixed
from .runtime.registry import REGISTRY
from . import tape as tape_module


class _Recorder:
    """Stands where a kd.Tape stands during the recording run (tape._ACTIVE): the kernels run as
    plain primals, and before each one the fields it touches are copied if not yet copied."""

    def __init__(self, inputs=()):
        self.kept = {}  # id(field) -> (field, its values before the program first touched it)
        self.touched = {}  # id(field) -> field: the float fields the program's kernels touched
        self.inputs = {id(f): f for f in inputs}
        self.inputs_set = []  # inputs the program writes from Python before a kernel reads them

    def keep(self, f):
        if id(f) not in self.kept:
            self.kept[id(f)] = (f, f.to_numpy())

    def launch(self, kernel, args, kwargs):
        def run():
            written, read_ = kernel.fields(*args, **kwargs)
            for f in written + read_:
                self.keep(f)
                if is_float(from_taichi(f.dtype)):
                    self.touched[id(f)] = f
                    for kind in ("adjoint", "dual"):
                        d = REGISTRY.get(f, kind, 1)
                        if d is not None:
                            self.keep(d)
            return kernel.launch(*args, **kwargs)
        return run

    def python_write(self, target, whole, key=None):
        if whole and is_field(target):  # reported before it runs: the old values can be kept
            self.keep(target)
        field, _ = tape_module.touched_field(self.inputs, target)
        if field is not None and id(field) not in self.touched and field not in self.inputs_set:
            self.inputs_set.append(field)


def _record(program, recorder):
    """Run the program once, plainly, under `recorder`, which keeps the state it found."""
    if tape_module._ACTIVE:
        raise KernDiffError("kd.check_grad of a program cannot run inside kd.Tape / kd.FwdMode",
                            remedy="call it outside the with-block")
    guard = tape_module._TaichiLaunchGuard.install("kd.check_grad's run of the program", recorder)
    tape_module._ACTIVE.append(recorder)
    try:
        program()
    finally:
        tape_module._ACTIVE.pop()
        tape_module._TaichiLaunchGuard.remove(guard)


def weighted_total(program, output, weights):
    """(program followed by a kernel that adds ⟨w, output⟩ into a 0-d field, zeroed here, that
    field) for an output with elements and w = `weights` (an array of the output's shape): the
    0-d loss kd.Tape needs, weighted by the cotangent (kd.backward of a program) or by a random
    one (a check differentiates ⟨w, f(x)⟩, as for a kernel). w and the field are made once per
    output shape (_weights_like)."""
    from .api import kernel
    from .runtime.registry import element_shape
    w, total = _weights_like(output)
    total[None] = 0
    w.from_numpy(np.asarray(weights, dtype=np.float64).reshape(field_shape(output)).astype(w.to_numpy().dtype))
    fn = _add_weighted_vectors if element_shape(output) else _add_weighted
    add = _ADDERS.setdefault(fn, kernel(fn))  # one kernel object per adder, not one per check

    def weighted():
        program()
        add(output, w, total)

    weighted.__name__ = getattr(program, "__name__", "program")
    return weighted, total


_ADDERS = {}  # adder function -> its @kd.kernel
_WEIGHTS = {"runtime": None, "fields": {}}  # the Taichi runtime they live in; (kind, shape, dtype) -> (w, total)


def _weights_like(output):
    """(w, a 0-d total) for outputs shaped like `output`, made once per runtime and reused: each
    field made after a kernel ran is an SNode tree of its own, and Taichi 1.7 crashes past 512
    of them (a check per call would meet that in a few hundred checks of one process)."""
    import taichi as ti
    from taichi.lang import impl
    from .runtime.registry import element_shape
    if _WEIGHTS["runtime"] is not impl.get_runtime():
        _WEIGHTS.update(runtime=impl.get_runtime(), fields={})
    kind = element_shape(output)  # (a field's or an ndarray's: the weights are a field alike)
    key = (kind, tuple(output.shape), output.dtype)
    got = _WEIGHTS["fields"].get(key)
    if got is None:
        shape = tuple(output.shape)
        if kind:
            w = ti.Matrix.field(kind[0], kind[1], output.dtype, shape=shape) if len(kind) == 2 else \
                ti.Vector.field(kind[0], output.dtype, shape=shape)
        else:
            w = ti.field(output.dtype, shape=shape)
        got = _WEIGHTS["fields"][key] = (w, ti.field(output.dtype, shape=()))
    return got


def _add_weighted(out: ti.template(), w: ti.template(), total: ti.template()):
    for I in ti.grouped(out):
        total[None] += out[I] * w[I]


def _add_weighted_vectors(out: ti.template(), w: ti.template(), total: ti.template()):
    for I in ti.grouped(out):
        total[None] += (out[I] * w[I]).sum()


class ProgramCheck:
    """The three derivatives of a program's 0-d output along directions of its input fields."""

    def __init__(self, program, inputs, output):
        self.program, self.inputs, self.output = program, inputs, output
        self.recorder = _Recorder(inputs)
        for f in inputs + [output]:  # kept before the program runs, which may write them from Python,
            self.recorder.keep(f)     # with the derivative fields they have (the ones made below are not)
            for kind in ("adjoint", "dual"):
                if REGISTRY.get(f, kind, 1) is not None:
                    self.recorder.keep(REGISTRY.get(f, kind, 1))
        for f in inputs + [output]:  # made active before anything runs
            REGISTRY.get_or_make(f, "adjoint", 1)
            REGISTRY.get_or_make(f, "dual", 1)
        _record(program, self.recorder)
        if self.recorder.inputs_set:
            self.restore()
            name = REGISTRY.name_of(self.recorder.inputs_set[0])
            raise KernDiffError(
                f"the program sets its input '{name}' from Python before a kernel reads it, so the values "
                "kd.check_grad passes in never reach the output: its finite differences are zero, while "
                "kd.Tape takes the values the program sets as the inputs",
                remedy=f"set '{name}' before calling the program (or check with respect to what the program "
                       "sets it from)")
        for f in inputs + [output]:
            self.recorder.touched[id(f)] = f

    def restore(self):
        for f, arr in self.recorder.kept.values():
            f.from_numpy(arr)

    def finish(self):
        """Put every field back; the derivative fields the check made are left zero-filled."""
        self.restore()
        kept = self.recorder.kept
        for f in self.recorder.touched.values():
            for kind in ("adjoint", "dual"):
                d = REGISTRY.get(f, kind, 1)
                if d is not None and id(d) not in kept:
                    d.fill(0)

    def _start(self, values, kind):
        restart_fixed()  # (kd.check_grad runs the program inside draws.fixed_seeds)
        self.restore()
        for f, v in zip(self.inputs, values):
            write(f, v, "an input value")
        if kind is not None:
            for f in self.recorder.touched.values():
                d = REGISTRY.get(f, kind, 1)
                if d is not None:
                    d.fill(0)

    def value(self, values):
        self._start(values, None)
        self.program()
        return read(self.output)

    def gradient(self, values):
        self._start(values, "adjoint")
        with tape_module.Tape(self.output, clear_gradients=False):
            self.program()
        return [read(REGISTRY.get(f, "adjoint", 1)) for f in self.inputs]

    def hvp(self, values, tangents):
        """H·v of the output w.r.t. the inputs, v = tangents (tape.ForwardTape)."""
        self._start(values, "adjoint")
        for f in list(self.recorder.touched.values()):
            dual = REGISTRY.get(f, "dual", 1)
            adjoint_of_dual = None if dual is None else REGISTRY.get(dual, "adjoint", 1)
            for d in (dual, adjoint_of_dual):
                if d is not None:
                    d.fill(0)
                    self.recorder.touched[id(d)] = d  # (finish zero-fills the ones the check made)
        with tape_module.ForwardTape(self.output, list(zip(self.inputs, tangents)), clear_gradients=False):
            self.program()
        return [read(REGISTRY.get(f, "adjoint", 1)) for f in self.inputs]

    def tangent(self, values, tangents):
        self._start(values, "dual")
        for f, t in zip(self.inputs, tangents):
            write(REGISTRY.get(f, "dual", 1), t, "a tangent")
        seed = np.asarray(tangents[0], dtype=np.float64).ravel()
        with tape_module.FwdMode(loss=self.output, param=self.inputs[0], seed=seed, clear_gradients=False):
            self.program()
        return read(REGISTRY.get(self.output, "dual", 1))
