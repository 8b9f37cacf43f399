"""Multi-kernel programs: kd.Tape (reverse over a recorded sequence) and kd.FwdMode.

The Tape records the kerndiff kernels launched inside it. Reverse kernels read primal values from
fields, so a later kernel that overwrites a field an earlier one read would corrupt the earlier
reverse pass; the Tape therefore snapshots, before each launch, each field the kernel may
overwrite where an earlier recorded launch read or wrote it, and restores it while it walks back.
Index patterns evaluated with each launch's scalar arguments tell `x[t + 1, i]` (fresh, no copy)
from `x[i]` (copied). A kernel that updates its state in place (`x[i] += dt * v[i]`: each element
read and then overwritten by its own iteration) destroys values its own reverse needs; the Tape
snapshots those fields before the launch too and puts them back before running that kernel's
reverse (its `reverse_from_inputs` variant). Memory cost: one copy of such a field per launch.
After the reverse pass, the fields hold the forward results again, as after a plain run.
"""
from __future__ import annotations

import functools

import numpy as np

from .errors import KernDiffError
from .ir.types import from_taichi, is_float
from .runtime.registry import REGISTRY

_ACTIVE = []


def intercept(kernel, args, kwargs):
    """Called by every kernel launch: a Tape records it, a FwdMode turns it into its forward."""
    if not _ACTIVE:
        return in_taichi_context(kernel, args, kwargs)
    ctx = _ACTIVE[-1]
    return ctx.launch(kernel, args, kwargs)


def active_context():
    """The derivative context a launch now happens in, as the user spells it ('kd.Tape',
    'kd.FwdMode', 'ti.ad.Tape', 'ti.ad.FwdMode'), or None."""
    if _ACTIVE:
        return "kd.FwdMode" if isinstance(_ACTIVE[-1], FwdMode) else "kd.Tape"
    import taichi as ti
    from taichi.lang import impl
    runtime = impl.get_runtime()
    if isinstance(runtime.target_tape, ti.ad.Tape):
        return "ti.ad.Tape"
    return "ti.ad.FwdMode" if isinstance(runtime.fwd_mode_manager, ti.ad.FwdMode) else None


def in_taichi_context(kernel, args, kwargs):
    """A kerndiff kernel launched inside Taichi's own ti.ad.Tape or ti.ad.FwdMode: without this,
    Taichi would record (or switch to forward mode) the generated primal ti.kernel and
    differentiate it with its own AD, whose answers differ from kerndiff's where Taichi's rules do
    (a field without needs_grad written and read in one kernel is a constant to Taichi; 3x3 polar
    decompositions it cannot differentiate at all). Instead ti.ad.Tape records the kerndiff kernel
    and calls its reverse on the way back, and ti.ad.FwdMode runs its forward kernel, as kd.Tape and
    kd.FwdMode do (Taichi's contexts keep their own semantics otherwise: no snapshots of
    overwritten fields). Derivative kernels are refused there: their derivatives are of another
    level than the .grad / .dual fields Taichi's contexts use."""
    import taichi as ti
    from taichi.lang import impl
    runtime = impl.get_runtime()
    if runtime.grad_replaced:
        return None  # inside a @ti.ad.grad_replaced function: its gradient function stands for it
    tape, fwd = runtime.target_tape, runtime.fwd_mode_manager
    if not isinstance(tape, ti.ad.Tape) and not isinstance(fwd, ti.ad.FwdMode):
        return None
    context = "ti.ad.Tape" if isinstance(tape, ti.ad.Tape) else "ti.ad.FwdMode"
    if kernel.path:
        raise KernDiffError(f"{kernel.dotted_name} is a derivative kernel, launched inside {context}, whose "
                            "derivatives are taken with level-1 adjoints and duals (x.grad, x.dual); its own "
                            "derivatives need those of the next level",
                            remedy="use kd.Tape / kd.FwdMode, which take derivatives of derivative kernels at the "
                                   "level they need")
    if isinstance(tape, ti.ad.Tape):
        in_place = kernel.restorable_fields(*args, **kwargs)
        if in_place:
            names = ", ".join(f"'{REGISTRY.name_of(f)}'" for f in in_place)
            raise KernDiffError(f"{kernel.dotted_name} updates {names} in place, so its reverse needs the values "
                                "from before the launch, and ti.ad.Tape keeps no copies",
                                remedy="use kd.Tape, which snapshots such fields and restores them for the reverse")
        entry = _TaichiTapeEntry(kernel, kwargs)
        tape.insert(entry, args)
        return lambda: _off_taichi_records(runtime, lambda: entry(*args))
    return lambda: kernel.own_values(_off_taichi_records(runtime, lambda: kernel.forward.launch(*args, **kwargs)))


def _off_taichi_records(runtime, launch):
    """Run a kerndiff launch with Taichi's grad_replaced flag up, so that neither ti.ad.Tape nor
    ti.ad.FwdMode records the generated Taichi kernels it runs (the kerndiff kernel stands for them)."""
    before = runtime.grad_replaced
    runtime.grad_replaced = True
    try:
        return launch()
    finally:
        runtime.grad_replaced = before


class _TaichiTapeEntry:
    """A kerndiff kernel's launch as ti.ad.Tape records it: Taichi calls `grad(*args)` on the way
    back (and sets autodiff_mode, which marks a primal kernel for it)."""

    def __init__(self, kernel, kwargs):
        from taichi.lang.enums import AutodiffMode
        from .runtime.draws import new_seed
        self.kernel, self.kwargs = kernel, kwargs
        self.autodiff_mode = AutodiffMode.NONE
        self.seed = new_seed()  # of the random numbers the launch draws, drawn again by its reverse

    def __call__(self, *args):  # the launch; ti.ad.Tape(grad_check=[...]) reruns its calls
        return self.kernel.launch_seeded(self.seed, args, self.kwargs)

    def grad(self, *args):
        # a value the kernel returns is not the loss: its cotangent is 0, as under kd.Tape
        self.kernel.reverse.launch_seeded(self.seed, args, self.kwargs,
                                          cotangent=0.0 if self.kernel.returned_values() else None)


def is_custom_gradient(fn):
    """Whether a call Taichi reports to its target tape is a function decorated with
    @ti.ad.grad_replaced (its gradient set by @ti.ad.grad_for, or still None) or @ti.ad.no_grad:
    Taichi reports those before running them, with its runtime's grad_replaced flag up, and keeps
    the kernels they launch off the tape."""
    from taichi.lang import impl
    return impl.get_runtime().grad_replaced and hasattr(fn, "grad") and not hasattr(fn, "func") \
        and not hasattr(fn, "__self__") and callable(fn)


def in_custom_gradient():
    """Whether a launch happens inside a @ti.ad.grad_replaced / @ti.ad.no_grad function."""
    from taichi.lang import impl
    return bool(impl.get_runtime().grad_replaced)


def custom_gradient_name(fn):
    """The name the user gave a @ti.ad.grad_replaced / @ti.ad.no_grad function: Taichi's wrapper
    is called `decorated` and keeps the user's function in its closure."""
    for cell in getattr(fn, "__closure__", None) or ():
        inner = cell.cell_contents
        if callable(inner) and hasattr(inner, "__code__") and inner.__name__ != "decorated":
            return inner.__name__
    return fn.__name__


def custom_gradient_depth():
    """How many @ti.ad.grad_replaced / @ti.ad.no_grad functions are running, one inside another:
    the frames of their wrappers on the stack (Taichi's flag for them is one bool, cleared when
    the innermost returns)."""
    import sys
    wrappers = _custom_gradient_wrappers()
    depth, frame = 0, sys._getframe(1)
    while frame is not None:
        depth += frame.f_code in wrappers
        frame = frame.f_back
    return depth


@functools.lru_cache(maxsize=None)
def _custom_gradient_wrappers():
    """The code objects of the functions Taichi's grad_replaced and no_grad wrap a function in."""
    import taichi as ti
    return frozenset({ti.ad.grad_replaced(lambda: None).__code__, ti.ad.no_grad(lambda: None).__code__})


# Taichi's own kernels that overwrite a whole field from Python (`fill`, `from_numpy`, `copy_from`),
# with the position of that field among their arguments
WHOLE_FIELD_WRITERS = {"fill_field": 0, "field_fill_python_scope": 0, "ext_arr_to_tensor": 1,
                       "ext_arr_to_matrix": 1, "tensor_to_tensor": 0,
                       "ext_arr_to_ndarray": 1, "ext_arr_to_ndarray_matrix": 1, "ndarray_to_ndarray": 0}
# (an ndarray's fill and element writes: _ArrayWrites)


def element_accessors(f):
    """The host accessors of f's components, through which Python reads and writes its elements."""
    f._initialize_host_accessors()
    return f.host_accessors


def raw_element(f, key):
    """Element `key` of ndarray f (with the component's indexes after the array's), read past
    the setter _ArrayWrites wraps."""
    return f.arr.read_float(key) if is_float(from_taichi(f.dtype)) else f.arr.read_int(key)


def set_raw_element(f, key, value):
    (f.arr.write_float if is_float(from_taichi(f.dtype)) else f.arr.write_int)(key, value)


class _ArrayWrites:
    """Writes from Python into ndarrays, reported to the open kd.Tape / kd.FwdMode as Taichi
    reports those into fields. Taichi reports none of an ndarray's element writes (`a[i] = v`,
    `p[i][0] = v`) and not its fill (a runtime call on the CPU and CUDA), so while a context is
    open the fill of every ndarray is wrapped, and so is the setter of each ndarray's host
    accessor, which every element write goes through (Ndarray._initialize_host_accessor wraps
    it). A fill is reported before it runs, as a whole write; an element write keeps the old
    value first where a recorded launch touched the array (as Tape._watch does for fields) and
    is reported after it."""

    saved = None
    wrapped = []  # [(host accessor, its own setter)]

    @classmethod
    def install(cls, guard):
        from taichi.lang._ndarray import Ndarray
        own_fill, own_initialize = Ndarray.fill, Ndarray._initialize_host_accessor

        def fill(arr, value):
            guard._python_write(arr, whole=True)
            own_fill(arr, value)

        def initialize(arr):
            own_initialize(arr)
            accessor = arr.host_accessor
            if not any(a is accessor for a, _ in cls.wrapped):
                own_set = accessor.setter

                def setter(value, *key):
                    cls._element_write(guard, arr, key, lambda: own_set(value, *key))

                accessor.setter = setter
                cls.wrapped.append((accessor, own_set))

        cls.saved = (own_fill, own_initialize)
        Ndarray.fill, Ndarray._initialize_host_accessor = fill, initialize

    @staticmethod
    def _element_write(guard, arr, key, write):
        owner = guard.owner
        touched = owner.touched.fields if isinstance(owner.touched, _Touched) else owner.touched
        keep = getattr(owner, "_element_written", None)
        if keep is None or id(arr) not in touched:
            write()
            guard._python_write(arr, whole=False, key=key)
            return
        keep(arr, None, key, raw_element(arr, key))
        owner.writing_element = True  # (kept: the report after the write has nothing to do)
        try:
            write()
            guard._python_write(arr, whole=False, key=key)
        finally:
            owner.writing_element = False

    @classmethod
    def remove(cls):
        from taichi.lang._ndarray import Ndarray
        if cls.saved is not None:
            Ndarray.fill, Ndarray._initialize_host_accessor = cls.saved
            cls.saved = None
        for accessor, own in cls.wrapped:
            accessor.setter = own
        cls.wrapped = []


class _ReportSetters:
    """Taichi's field setters (`x[i] = v` in Python) report each write, after making it, to a target
    tape that has a grad_checker; this one checks nothing and makes them report to the kd.Tape or
    kd.FwdMode that is open."""
    to_check = ()


class _TaichiLaunchGuard:
    """Installed as Taichi's `runtime.target_tape` while a kd.Tape or kd.FwdMode is open: Taichi
    reports every primal ti.kernel launch to it (that is how ti.ad.Tape records). kerndiff's own
    generated kernels and Taichi's internal ones (fill, from_numpy) pass; a user's plain
    ti.kernel is refused, because the context cannot see its derivative, and leaving it out would
    make a silently wrong gradient. Writes from Python into a field a launch in the context
    touched go to the context (Tape.python_write, FwdMode.python_write)."""

    def __init__(self, context: str, owner):
        self.context = context
        self.owner = owner
        self.grad_checker = _ReportSetters()

    def insert(self, kernel, args):
        if is_custom_gradient(kernel):  # a @ti.ad.grad_replaced / @ti.ad.no_grad function, before it runs
            try:
                self.owner.custom_gradient(kernel, args)
            except KernDiffError:
                # Taichi set runtime.grad_replaced before reporting the call and resets it only
                # around the function's own run, which a refusal here prevents: every later
                # kerndiff launch would take itself for one inside a custom-gradient function
                from taichi.lang import impl
                impl.get_runtime().grad_replaced = False
                raise
            return
        fn = getattr(kernel, "func", None)
        if fn is None and hasattr(kernel, "__self__"):  # a setter's report, after writing: (key, value)
            self._python_write(kernel.__self__, whole=False, key=args[0])
            return
        code = getattr(fn, "__code__", None)
        if code is None or code.co_filename.startswith("<kerndiff"):
            return
        module = getattr(fn, "__module__", "") or ""
        if module == "taichi._kernels" and fn.__name__ in WHOLE_FIELD_WRITERS:  # before it runs
            self._python_write(args[WHOLE_FIELD_WRITERS[fn.__name__]], whole=True)
            return
        if module.startswith(("taichi", "kerndiff")):
            return
        from .frontend.source import parse_function
        reason = (f"the Taichi kernel '{fn.__name__}' ran inside {self.context}, which differentiates only "
                  "kerndiff kernels: its part of the derivative would be missing")
        remedy = ("decorate it with @kd.kernel (kernels that compute nothing differentiable are fine), or "
                  "launch it outside the with-block")
        try:
            src = parse_function(fn)
        except KernDiffError:
            raise KernDiffError(reason, remedy=remedy) from None
        raise src.error(src.tree, reason, remedy)

    def _python_write(self, target, whole, key=None):
        given = getattr(self.owner, "given_inputs", None)
        if given:
            refuse_setting_given_inputs(self.owner, given, target)
        self.owner.python_write(target, whole, key)

    @staticmethod
    def install(context, owner):
        from taichi.lang import impl
        runtime = impl.get_runtime()
        if runtime.target_tape is not None:  # inside Taichi's own ti.ad.Tape: leave it be
            return None
        runtime.target_tape = _TaichiLaunchGuard(context, owner)
        _ArrayWrites.install(runtime.target_tape)
        return runtime.target_tape

    @staticmethod
    def remove(guard):
        from taichi.lang import impl
        runtime = impl.get_runtime()
        if guard is not None and runtime.target_tape is guard:
            runtime.target_tape = None
            _ArrayWrites.remove()


def refuse_setting_given_inputs(context, given, target):
    """A host function over a program (kd.backward / kd.forward / kd.hvp) sets the inputs to the
    values it is given, then runs the program under `context`; a program that writes one of them
    from Python before any of its kernels read it throws those values away, and its derivative
    is taken at the values it set instead, which the caller did not ask for. given: (the host
    function's name, {id(field): field} of its inputs)."""
    name, fields = given
    field, _ = touched_field(fields, target)
    touched = context.touched.fields if isinstance(context.touched, _Touched) else context.touched
    if field is None or id(field) in touched:
        return
    # (named by its place in the inputs: the registry's name for a field is the first one a kernel
    # source gave it, maybe a template parameter's; the error shows the line that writes it)
    position = list(fields).index(id(field))
    raise KernDiffError(
        f"the program sets its input {position} from Python before a kernel reads it, so the values {name} was "
        "given for it never reach the output, and the derivative would be taken at the values the program sets",
        remedy="set it before calling the program (and pass those values), or take the derivative with respect "
               "to what the program sets it from")


def _snapshot(f):
    return f.to_numpy()


def _restore(f, arr):
    f.from_numpy(arr)


def _zero(f):
    f.fill(0)


class Tape:
    """Like ti.ad.Tape: `with kd.Tape(loss): ...` then read adjoints (kd.adjoint(x) / x.grad)."""

    def __init__(self, loss=None, clear_gradients=True):
        self.loss = loss
        self.clear_gradients = clear_gradients
        # (kernel, args, kwargs, {id(field): (field, snapshot before launch)}, the same for the
        # fields the kernel updates in place, which its own reverse needs back); kernel None for
        # a whole field written from Python (python_write); an _ElementWrite for an element
        self.records = []
        self.touched = _Touched()  # index patterns earlier recorded launches accessed
        self.watched = {}  # id(field) -> (field, [(host accessor, its own setter)]): see _watch
        self.writing_element = False
        self.custom = None  # the last @ti.ad.grad_replaced function called inside (_CustomGradient)
        self.draw_seeds = {}  # id(record) -> the seed its launch drew random numbers from (runtime/draws.py)

    def __enter__(self):
        if _ACTIVE:
            raise KernDiffError("kd.Tape / kd.FwdMode cannot be nested",
                                remedy="finish the outer context first")
        if self.clear_gradients:
            clear_derivatives("adjoint")
        if self.loss is not None:
            _zero(self.loss)
        self.guard = _TaichiLaunchGuard.install("kd.Tape", self)
        _ACTIVE.append(self)
        return self

    def launch(self, kernel, args, kwargs):
        def run():
            accesses = kernel.footprint(*args, **kwargs)
            if self.custom is not None and in_custom_gradient():
                # inside a @ti.ad.grad_replaced function: run, unrecorded, keeping what it overwrites
                self._keep_overwritten(accesses, self.custom.saved)
                out = kernel.launch(*args, **kwargs)
                self._note(accesses)
                return out
            saved = self._keep_overwritten(accesses, {})
            # x[i] += dt * v[i]: the kernel's own reverse needs x as it was before the launch.
            before = {id(f): saved.get(id(f)) or (f, _snapshot(f)) for f in kernel.restorable_fields(*args, **kwargs)}
            out = kernel.launch(*args, **kwargs)
            self._note(accesses)
            self.records.append((kernel, args, kwargs, saved, before))
            self.draw_seeds[id(self.records[-1])] = kernel.root.draw_seed  # (its reverse draws the same)
            return out
        return run

    def _keep_overwritten(self, accesses, saved):
        """Snapshot into `saved` (id(field) -> (field, values)) each field a launch may overwrite
        where an earlier launch touched it, unless it holds one already (x[t + 1, i] = ... after
        reads of x[t, i] needs nothing); returns `saved`."""
        for f, kind, index in accesses:
            if kind == "write" and id(f) not in saved and self.touched.overlaps(f, index):
                saved[id(f)] = (f, _snapshot(f))
        return saved

    def _note(self, accesses):
        """After a launch: what it accessed is touched from now on, and its fields watched."""
        for f, kind, index in accesses:
            self.touched.add(f, index)
            self._watch(f)

    def custom_gradient(self, fn, args):
        """A @ti.ad.grad_replaced (or @ti.ad.no_grad) function is about to run: as under
        ti.ad.Tape, its gradient function stands for the kernels it launches, and runs in their
        place on the way back."""
        if custom_gradient_depth() > 1:
            raise KernDiffError(
                f"'{custom_gradient_name(fn)}' has a custom gradient (ti.ad.grad_replaced or no_grad) and was "
                f"called inside another one, '{custom_gradient_name(self.custom.fn)}'; both gradient functions "
                "would run, counting its part twice",
                remedy="decorate only the outer function, or call this one outside it")
        if fn.grad is None:
            name = custom_gradient_name(fn)
            raise KernDiffError(f"'{name}' is decorated with @ti.ad.grad_replaced but has no gradient "
                                "function, so kd.Tape could not go back through it",
                                remedy=f"define one with @ti.ad.grad_for({name})")
        self.custom = _CustomGradient(fn, args)
        self.records.append(self.custom)

    def _watch(self, f):
        """From now on an element write from Python into f (`x[0] = 5.0`, `p[1][2] = 3.0`, `p[i] =
        [...]`) keeps the element's old value first: every such write goes through the setter of
        one of f's host accessors (one per component), which is wrapped here until the Tape ends.
        Taichi's own report of the write comes only after it, too late to read the old value."""
        from .runtime.registry import is_ndarray
        if id(f) in self.watched or not hasattr(f, "_initialize_host_accessors") or is_ndarray(f):
            return  # (an ndarray's element writes: _ArrayWrites)
        wrapped = []
        for component, accessor in enumerate(element_accessors(f)):
            own = accessor.setter

            def setter(value, *key, _own=own, _get=accessor.getter, _component=component):
                self._element_written(f, _component, key, _get(*key))
                self.writing_element = True
                try:
                    _own(value, *key)
                finally:
                    self.writing_element = False

            accessor.setter = setter
            wrapped.append((accessor, own))
        self.watched[id(f)] = (f, wrapped)

    def _element_written(self, f, component, key, old):
        """An element of f is about to be written from Python: keep its old value (_ElementWrite)."""
        self.records.append(_ElementWrite(f, component, key, old))

    def _unwatch(self):
        for _, wrapped in self.watched.values():
            for accessor, own in wrapped:
                accessor.setter = own
        self.watched = {}

    def python_write(self, target, whole, key=None):
        """A write from Python (target: the field of a `fill`/`from_numpy`/`copy_from`, reported
        before it runs, whole=True; or the SNode of an element `x[i] = v`, reported after it) into
        a field that a recorded launch read or wrote. The launches before it read the old values,
        so their reverses need them back: a whole field is snapshot here and recorded as a write
        whose reverse puts the old values back and zeroes the field's adjoint (the values it
        overwrote reach nothing after it; the new ones are constants). An element write into a
        touched field was recorded, with its old value, by the setter _watch wrapped; one that
        was not (a field reached some other way) came too late to keep: refused. Writes into
        fields no recorded launch touched set inputs and pass."""
        if not whole and self.writing_element:
            return  # recorded by the wrapped setter, before the write
        field, _ = touched_field(self.touched.fields, target)
        if field is None:
            return
        if whole:
            self.records.append((None, (), {}, {id(field): (field, _snapshot(field))}, {}))
            return
        name = REGISTRY.name_of(field)
        raise KernDiffError(
            f"'{name}' was written from Python inside kd.Tape after a kernel the Tape recorded touched it; that "
            "kernel's reverse needs the values it read, and an element write leaves no copy of them",
            remedy=f"pass the value as a kernel argument, write '{name}' before the Tape, or write it inside with "
                   f"a @kd.kernel or {name}.fill / {name}.from_numpy (the Tape takes those as overwrites)")

    def __exit__(self, exc_type, exc, tb):
        _ACTIVE.pop()
        _TaichiLaunchGuard.remove(self.guard)
        self._unwatch()
        if exc_type is not None:
            return False
        if self.loss is None:
            return False
        level = self.level()
        # Every field a recorded kernel writes carries an adjoint, flags or not.
        requests = []
        for rec in self.records:
            if isinstance(rec, _CustomGradient):
                continue  # its gradient function keeps its own adjoints
            if isinstance(rec, _ElementWrite):
                written = [rec.field]
            else:
                kernel, args, kwargs, saved, _ = rec
                written = kernel.fields(*args, **kwargs)[0] if kernel is not None else [f for f, _ in saved.values()]
            requests += [(f, "adjoint", level) for f in written if is_float(from_taichi(f.dtype))]
        REGISTRY.allocate_many(requests)
        loss_adj = REGISTRY.get_or_make(self.loss, "adjoint", level)
        if tuple(self.loss.shape):
            raise KernDiffError("the Tape's loss must be a 0-d field", remedy="reduce the loss into loss[None]")
        customs = [rec for rec in self.records if isinstance(rec, _CustomGradient)]
        if level > 1 and customs:
            raise KernDiffError(
                f"the Tape differentiates a derivative kernel (its reverse runs on level-{level} adjoints), but "
                f"'{custom_gradient_name(customs[0].fn)}' has a custom gradient, which writes level-1 adjoints "
                "(x.grad)",
                remedy="record the derivative kernel and the custom-gradient function in separate Tapes")
        if level > 1 and self.clear_gradients:
            clear_derivatives("adjoint", level)  # level 1 was cleared on entry
        loss_adj[None] = 1.0
        elements = [rec for rec in self.records if isinstance(rec, _ElementWrite)]
        final = {i: (f, _snapshot(f)) for rec in self.records
                 if not isinstance(rec, (_ElementWrite, _CustomGradient))
                 for snaps in rec[3:] for i, (f, _) in snaps.items()}
        final.update((i, (f, _snapshot(f))) for rec in customs for i, (f, _) in rec.saved.items())
        final.update((id(rec.field), (rec.field, _snapshot(rec.field))) for rec in elements)
        for rec in reversed(self.records):
            if isinstance(rec, _ElementWrite):
                rec.undo(level)
                continue
            if isinstance(rec, _CustomGradient):
                rec.fn.grad(*rec.args)
                for f, arr in rec.saved.values():
                    _restore(f, arr)
                continue
            kernel, args, kwargs, saved, before = rec
            for f, arr in before.values():
                _restore(f, arr)
            if kernel is None:  # a whole field overwritten from Python: its old values reach nothing
                for f, _ in saved.values():
                    if is_float(from_taichi(f.dtype)):
                        _zero(REGISTRY.get_or_make(f, "adjoint", level))
            else:
                # A value the kernel returned is not the loss: its cotangent is 0 (a reverse kernel
                # launched alone seeds it with 1).
                kernel.reverse_at(level, from_inputs=bool(before)).launch_seeded(
                    self.draw_seeds[id(rec)], args, kwargs, cotangent=0.0 if kernel.returned_values() else None)
            for f, arr in saved.values():
                _restore(f, arr)
        for f, arr in final.values():
            _restore(f, arr)
        return False

    def level(self):
        """The level of the adjoints the reverse pass runs on: 1, or, where a recorded kernel is
        itself a reverse kernel (`f(); f.reverse(); penalty()`: a function of a gradient), the level
        of that kernel's reverse (2 for `f.reverse`), at which every recorded kernel is then
        reversed. The level-1 adjoints such a kernel writes are values of the recorded program
        then, and the derivatives land in kd.adjoint(x, level)."""
        return max([1] + [rec[0].reverse.level() for rec in self.records
                           if not isinstance(rec, (_ElementWrite, _CustomGradient)) and rec[0] is not None])

    def grad(self):
        raise KernDiffError("use the adjoint fields after the with-block", remedy="read kd.adjoint(x) or x.grad")


class _CustomGradient:
    """A call of a @ti.ad.grad_replaced / @ti.ad.no_grad function inside kd.Tape: the Tape's reverse
    pass calls `fn.grad(*args)` at its place, as ti.ad.Tape does, instead of reversing the kernels
    it launched. Those launches run as they are; where one overwrites a field that a recorded
    launch touched, the old values are kept (saved) and put back after the gradient function ran,
    for the reverses of the launches before it."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args
        self.saved = {}  # id(field) -> (field, values before the function's first overwrite)


class _ElementWrite:
    """An element written from Python inside kd.Tape into a field a recorded launch had touched
    (`x[0] = 5.0`; component: which of a vector or matrix field's components, key: Taichi's
    padded index; for an ndarray component None and the key its accessor's, the component's
    indexes after the element's), with the value it held before: the launches before the write
    read that."""

    def __init__(self, field, component, key, old):
        self.field, self.component, self.key, self.old = field, component, key, old

    def undo(self, level):
        """Going backward past the write: the new value was a constant, so the adjoint gathered at
        the element so far reaches nothing (zeroed); the old value goes back for the reverses of
        the launches before it."""
        adjoint = REGISTRY.get_or_make(self.field, "adjoint", level) if is_float(from_taichi(self.field.dtype)) \
            else None
        if self.component is None:
            if adjoint is not None:
                set_raw_element(adjoint, self.key, 0.0)
            set_raw_element(self.field, self.key, self.old)
            return
        if adjoint is not None:
            element_accessors(adjoint)[self.component].setter(0.0, *self.key)
        element_accessors(self.field)[self.component].setter(self.old, *self.key)


class _Touched:
    """Index patterns (see ad.hazards.footprints) that recorded launches accessed, per field and
    grouped by their first index, so that a launch compares its writes with the few patterns that
    can overlap them: a simulation's x[t, i] touches one group per step, and comparing with every
    earlier step would cost the Tape time quadratic in the number of steps."""

    def __init__(self):
        self.groups = {}  # id(field) -> {first index or None: set of patterns}
        self.fields = {}  # id(field) -> field

    def add(self, f, pattern):
        self.groups.setdefault(id(f), {}).setdefault(pattern[0] if pattern else None, set()).add(pattern)
        self.fields[id(f)] = f

    def overlaps(self, f, pattern):
        from .ad.hazards import overlap

        groups = self.groups.get(id(f), {})
        first = pattern[0] if pattern else None
        candidates = groups.values() if first is None else (groups.get(first, ()), groups.get(None, ()))
        return any(overlap(pattern, old) for group in candidates for old in group)


def touched_field(fields, target):
    """(field, component) for a Python write's target among `fields` (id -> field): target is a
    field (component None), or a Taichi SNode of one component of one, as a setter reports it
    (component: its position in field.vars); (None, None) where none of them is written."""
    if id(target) in fields:
        return fields[id(target)], None
    if hasattr(target, "_snode"):
        return None, None  # a field nothing touched
    for f in fields.values():
        for k, v in enumerate(getattr(f, "vars", ())):
            if target == v.ptr.snode():
                return f, k
    return None, None


def refuse_forward_of_another_level(kernel, context="kd.FwdMode"):
    """kd.FwdMode seeds and clears level-1 duals on entry, before it sees a launch. A kernel launched
    in it whose forward is of another level (`f.forward`: its forward reads level-2 duals, API.md
    §2) would run on duals nobody seeded and give zeros or a partial tangent without a word:
    refused at the launch. (kd.Tape instead runs its whole reverse pass at the highest level a
    recorded kernel needs, Tape.level.)"""
    derived = kernel.forward
    if derived.level() == 1:
        return
    path = kernel.dotted_name
    reason = (f"{path} was launched inside {context}, which runs each kernel's forward with level-1 duals; "
              f"{derived.dotted_name} uses level-{derived.level()} duals (it differentiates a derivative kernel), "
              "so its tangent would leave out the seed")
    remedy = (f"call kd.forward({path}, inputs=[...], output=...), which seeds the duals of that level, or set "
              f"kd.dual(x, {derived.level()}) and launch {path}.forward yourself")
    raise KernDiffError(reason, remedy=remedy)  # (its place: the user's line, errors.user_site)


def clear_derivatives(kind, level=1):
    """Zero every level-`level` adjoint or dual field known to Taichi (needs_grad, needs_dual: level
    1 only) or to kerndiff, as ti.ad.Tape and ti.ad.FwdMode clear theirs on entry: a value left
    from an earlier run would otherwise join this one's derivative."""
    import taichi as ti
    from taichi.lang.enums import SNodeGradType
    if level == 1:
        ti.ad.clear_all_gradients(SNodeGradType.ADJOINT if kind == "adjoint" else SNodeGradType.DUAL)
    REGISTRY.check_runtime()  # never touch fields of an earlier ti.init
    for key, f in list(REGISTRY.derived.items()):
        if len(key) == 3 and key[1] == kind and key[2] == level:
            _zero(f)


class FwdMode:
    """Like ti.ad.FwdMode: kernels launched inside run their forward (dual) kernel. On entry every
    dual is cleared (clear_gradients=True) and the param's set to the seed; on exit the seed is
    cleared again, so the tangents it produced stay readable and nothing else carries it."""

    def __init__(self, loss, param, seed=None, clear_gradients=True):
        self.loss = loss if isinstance(loss, (list, tuple)) else [loss]
        self.param = param
        self.seed = seed
        self.clear_gradients = clear_gradients

    def __enter__(self):
        if _ACTIVE:
            raise KernDiffError("kd.Tape / kd.FwdMode cannot be nested", remedy="finish the outer context first")
        from .api import _check_field
        from .factories import field_shape
        _check_field(self.param, "kd.FwdMode's param")
        dual = REGISTRY.get_or_make(self.param, "dual", 1)
        shape = field_shape(self.param)
        if self.seed is None:
            if shape:
                raise KernDiffError("a seed is needed for a non-scalar param",
                                    remedy="pass seed=[...] with one entry per element")
            seed = np.ones(())
        else:
            seed = np.asarray(self.seed, dtype=np.float64)
            if seed.size != int(np.prod(shape)):
                raise KernDiffError(f"the seed has {seed.size} entries but the param has {int(np.prod(shape))}",
                                    remedy="pass one seed entry per element of the param")
            seed = seed.reshape(shape)
        for f in self.loss:
            REGISTRY.get_or_make(f, "dual", 1)
        if self.clear_gradients:
            clear_derivatives("dual")
        if shape:
            dual.from_numpy(seed.astype(dual.to_numpy().dtype))
        else:
            dual[None] = float(seed)
        self.seeded = dual
        self.touched = {}  # id(field) -> field: what launches in the context read or wrote
        self.guard = _TaichiLaunchGuard.install("kd.FwdMode", self)
        _ACTIVE.append(self)
        return self

    def custom_gradient(self, fn, args):
        """A @ti.ad.grad_replaced / @ti.ad.no_grad function called inside: its gradient function is
        a reverse one, and the kernels it launches would run without tangents (as under
        ti.ad.FwdMode, silently): refused."""
        raise KernDiffError(
            f"'{custom_gradient_name(fn)}' has a custom reverse gradient (ti.ad.grad_replaced or ti.ad.no_grad) and "
            "was called "
            "inside kd.FwdMode: the kernels it launches would run without their tangents",
            remedy="call it outside the with-block, or without the decorator (kd.FwdMode then runs its kernels' "
                   "forward)")

    def launch(self, kernel, args, kwargs):
        refuse_forward_of_another_level(kernel)
        def run():
            out = kernel.forward.launch(*args, **kwargs)
            written, read = kernel.fields(*args, **kwargs)
            self.touched.update((id(f), f) for f in written + read)
            return kernel.own_values(out)
        return run

    def python_write(self, target, whole, key=None):
        """A write from Python into a field a launch in the context read or wrote (see
        Tape.python_write for what target is): the values written are constants, so their tangent
        is zero; the dual held the tangent of the values they replace (or the seed), which later
        forward kernels would otherwise take for theirs. Whole fields: the dual is cleared before
        the write; an element: that element of the dual, after it. Writes into fields no launch
        touched set inputs (the param's seed stays)."""
        field, component = touched_field(self.touched, target)
        dual = None if field is None else REGISTRY.get(field, "dual", 1)
        if dual is None:
            return
        if whole:
            _zero(dual)
        elif component is None:  # an ndarray's element
            set_raw_element(dual, key, 0.0)
        else:
            dual.vars[component].ptr.snode().write_float(key, 0.0)  # the setter's own call, on the dual

    def __exit__(self, exc_type, exc, tb):
        _ACTIVE.pop()
        _TaichiLaunchGuard.remove(self.guard)
        _zero(self.seeded)  # as Taichi does: a later forward kernel must not find the seed there
        return False


class ForwardTape(Tape):
    """H·v of a program (kd.hvp, kd.check_grad(order=2) of a Python function launching kernels):
    kd.Tape over the program's forward kernels, reverse over forward. Each kernel launched inside
    runs its forward kernel, as under kd.FwdMode, with the inputs' duals set to the direction v
    (`seeds`); the Tape records those launches, and on exit their reverses (k.forward.reverse) run
    backward from the adjoint of the output's dual, ∇f·v. An input's adjoint then holds
    ∂(∇f·v)/∂x = H·v (the Hessian is symmetric), and its dual's adjoint, where it has one, ∇f.
    (k.reverse.forward gives H·v of one kernel the other way round; a Tape records only launches,
    so forward over the recorded reverse pass would need the reverse pass recorded too.)

    Python writes into fields a launch touched make values constants: the dual goes to zero with
    them (as under kd.FwdMode), and the Tape keeps both the old values and the old tangents for
    the reverses of the launches before."""

    def __init__(self, output, seeds, clear_gradients=True):
        super().__init__(REGISTRY.get_or_make(output, "dual", 1), clear_gradients)
        self.output, self.seeds = output, seeds

    def __enter__(self):
        from .factories import write
        if not _ACTIVE:  # (else Tape.__enter__ refuses the nesting)
            if self.clear_gradients:
                clear_derivatives("dual")
            _zero(self.output)
            for f, tangent in self.seeds:
                write(REGISTRY.get_or_make(f, "dual", 1), tangent, "a tangent")
        return super().__enter__()

    def launch(self, kernel, args, kwargs):
        if kernel.path:
            raise KernDiffError(f"{kernel.dotted_name} is a derivative kernel, launched in a program whose H·v is "
                                "taken; kerndiff takes H·v of programs of kernels as written",
                                remedy="take H·v of the kernel itself: kd.hvp(kernel, inputs, output)")
        refuse_forward_of_another_level(kernel, "a program whose H·v is taken")
        run = super().launch(kernel.forward, args, kwargs)
        return lambda: kernel.own_values(run())

    def custom_gradient(self, fn, args):
        raise KernDiffError(
            f"'{custom_gradient_name(fn)}' has a custom reverse gradient (ti.ad.grad_replaced or ti.ad.no_grad) and "
            "was called in a program whose H·v is taken: H·v needs the forward mode of its kernels, which the "
            "gradient function does not give",
            remedy="take H·v of the program without the decorator (its kernels' own derivatives are used)")

    def python_write(self, target, whole, key=None):
        if whole and not self.writing_element:
            field, _ = touched_field(self.touched.fields, target)
            dual = None if field is None else REGISTRY.get(field, "dual", 1)
            if dual is not None:
                self.records.append((None, (), {}, {id(dual): (dual, _snapshot(dual))}, {}))
                _zero(dual)
        super().python_write(target, whole, key)

    def _element_written(self, f, component, key, old):
        super()._element_written(f, component, key, old)
        dual = REGISTRY.get(f, "dual", 1)
        if dual is not None:
            if component is None:  # an ndarray's element
                self.records.append(_ElementWrite(dual, None, key, raw_element(dual, key)))
                set_raw_element(dual, key, 0.0)
                return
            self.records.append(_ElementWrite(dual, component, key, element_accessors(dual)[component].getter(*key)))
            dual.vars[component].ptr.snode().write_float(key, 0.0)  # past the setter Tape._watch wraps
