"""`@kd.kernel` objects: a Python function plus a transform path ('forward', 'reverse', ...).

`k.forward`, `k.reverse` are Kernel objects again (memoized), so any composition is just a longer
path. Calling one specializes the function on its template arguments, runs the pipeline
(frontend -> transforms -> optimize -> codegen), compiles with Taichi and launches. Everything
generated is cached per runtime; it is regenerated only when the set of derivative fields changed
(the registry's version), because activity depends on which derivative fields exist.
"""
from __future__ import annotations

import dataclasses
import inspect
import itertools
import numbers
import time

import taichi as ti
from taichi.lang import impl

from ..errors import KernDiffError
from ..ir.types import from_taichi, is_float
from . import offline_cache  # (its digest of kerndiff's sources is read at import)
from .cache import CACHE
from .equal_fields import fields_equal
from .registry import REGISTRY

TIMINGS = {"transform": 0.0, "fields": 0.0}  # seconds; "fields": Taichi materializing our fields
# a kernel compiled for this many different sets of ndarrays says so (Kernel._note_array_specialization)
ARRAY_SPECIALIZATIONS = 16
# k...forward.forward runs its equal-directions variant when both levels' seeds are equal
# (ad/equal_directions.py); False runs the kernel as generated always (for tests and measurements)
EQUAL_DIRECTIONS = True


def split_step(step):
    """(transform, level given with it or None) of a path step: "reverse" -> ("reverse", None),
    "reverse_at2" -> ("reverse", 2) (Kernel.reverse_at)."""
    base, sep, given = step.rpartition("_at")
    if sep and given.isdigit():
        return base, int(given)
    return step, None


def _is_template(ann):
    return type(ann).__name__ == "Template" or ann is ti.template


def _is_ndarray_type(ann):
    return type(ann).__name__ == "NdarrayType" or ann is ti.types.ndarray


_SERIAL = itertools.count()


class Kernel:
    def __init__(self, fn, path=(), root=None, bound=None):
        self.uid = next(_SERIAL)  # cache keys use this, never id(): ids of dead kernels are reused
        self.fn = fn
        self.path = tuple(path)
        self.root = root or self
        self.bound = bound  # the instance, for a method of a @ti.data_oriented class
        self._bound_copies = {}
        self.array_specializations = set()  # (the root's: template keys with ndarrays compiled for)
        self._method = None
        self._children = {}
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__doc__ = getattr(fn, "__doc__", None)
        self._signature = None
        self._return_shape = None  # `-> ti.math.vec3`: (3,); its components are returned as a tuple
        self._last_key = None
        self.draw_seed = None  # (the root's: the seed of the family's latest launch that drew, runtime/draws.py)

    # ---------------------------------------------------------------- transforms
    def _child(self, step):
        k = self._children.get(step)
        if k is None:
            k = Kernel(self.fn, self.path + (step,), self.root, self.bound)
            self._children[step] = k
        return k

    def __get__(self, instance, owner=None):
        """`sim.step` for a kernel defined in a (@ti.data_oriented) class: a kernel bound to sim,
        which is passed as its `self` (a compile-time argument, like a ti.template())."""
        if instance is None or self.bound is not None or self.path or not self._takes_self():
            return self
        # kept on the instance (its compiled kernels live as long as it does), else here
        store = getattr(instance, "__dict__", None)
        store = store if store is not None else self._bound_copies
        key = f"_kerndiff_{self.uid}" if store is not self._bound_copies else id(instance)
        k = store.get(key)
        if k is None or k.bound is not instance:
            k = Kernel(self.fn, bound=instance)
            store[key] = k
        return k

    @property
    def forward(self):
        """The forward-mode (dual/JVP) kernel: primal outputs and their tangents."""
        return self._child("forward")

    @property
    def reverse(self):
        """The reverse-mode (adjoint/VJP) kernel: accumulates adjoints of inputs."""
        return self._child("reverse")

    grad = reverse
    backward = reverse

    @property
    def reverse_from_inputs(self):
        """The reverse kernel for a caller that restores `restorable_fields` to their values from
        before the launch first (kd.Tape): kernels that update their state in place."""
        return self._child("reverse_from_inputs")

    def reverse_at(self, level, from_inputs=False):
        """This kernel's reverse (or reverse_from_inputs) with level-`level` adjoints: the one kd.Tape
        runs for every kernel it recorded when one of them is itself a reverse kernel (`f.reverse`,
        whose reverse has level-2 adjoints), so that all of them meet on the same level."""
        plain = self.reverse_from_inputs if from_inputs else self.reverse
        if level == plain.level():
            return plain
        return self._child(f"{plain.path[-1]}_at{int(level)}")

    def restorable_fields(self, *args, **kwargs):
        """Fields this kernel overwrites after reading them, whose old values its reverse needs
        and a caller can restore (ad/owned.py); [] for kernels whose reverse needs no help."""
        from ..ad import forward_reverse
        from ..ad.owned import restorable_fields
        templates, _, _ = self._bind(args, kwargs)
        entry = self._compiled(templates)
        if "restorable" not in entry:
            if self.path == ("forward",) and forward_reverse.swapped_for(self, entry["ir"], self.root.ir(templates)):
                fields = forward_reverse.restorable_fields(self, args, kwargs)
            else:
                fields = restorable_fields(entry["ir"])
            entry["restorable"] = [f for f in fields if not REGISTRY.internal(f)]
        return entry["restorable"]

    def level(self, step_index=None):
        """Derivative level of the transform at path[step_index] (API.md §2)."""
        path = self.path if step_index is None else self.path[: step_index + 1]
        levels = {}
        for step in path:
            kind = step.split("_")[0]  # reverse_from_inputs is a reverse
            _, given = split_step(step)
            levels[kind] = given if given is not None else levels.get(kind, 0) + 1
        return levels[path[-1].split("_")[0]] if path else 0

    @property
    def dotted_name(self):
        """How the user spells this kernel: `f.reverse.forward`."""
        return ".".join((self.__name__,) + self.path)

    def __repr__(self):
        return f"<kerndiff kernel {self.__name__}{''.join('.' + p for p in self.path)}>"

    # ---------------------------------------------------------------- signature
    def signature(self):
        if self._signature is None:
            sig = inspect.signature(self.fn, eval_str=True)  # also under `from __future__ import annotations`
            params = []
            for k, p in enumerate(sig.parameters.values()):
                ann = p.annotation
                if k == 0 and p.name == "self" and ann is inspect.Parameter.empty:
                    params.append((p.name, "template"))  # a method: the instance, at compile time
                    continue
                if ann is inspect.Parameter.empty:
                    raise self._parameter_error(p.name, f"parameter '{p.name}' of kernel {self.__name__} has no "
                                                        "type annotation",
                                                "annotate it with ti.f32 / ti.f64 / ti.i32 / ti.template()")
                if _is_template(ann):
                    params.append((p.name, "template"))
                elif _is_ndarray_type(ann):
                    params.append((p.name, NdarrayParam(ann)))
                elif _is_vector_type(ann):
                    params.append((p.name, VectorParam.of(ann)))
                else:
                    try:
                        params.append((p.name, from_taichi(ann)))
                    except (KeyError, TypeError):
                        raise self._parameter_error(
                            p.name, f"unsupported annotation {_type_name(ann)} of parameter '{p.name}'",
                            "use ti.f32, ti.f64, ti.i32, float, int, a vector or matrix type, ti.template() "
                            "or ti.types.ndarray()")
            ret = sig.return_annotation
            try:
                if ret is inspect.Signature.empty or ret is None:
                    rdt = None
                elif _is_vector_type(ret):
                    self._return_shape = _type_shape(ret)
                    dtype = from_taichi(ret.dtype if ret.dtype is not None else impl.get_runtime().default_fp)
                    rdt = (dtype,) * _size(self._return_shape)
                elif isinstance(ret, tuple):
                    rdt = tuple(from_taichi(r) for r in ret)
                else:
                    rdt = from_taichi(ret)
            except (KeyError, TypeError):
                raise self._parameter_error(None, f"unsupported return type {_type_name(ret)} of kernel "
                                                  f"{self.__name__}",
                                            "return a scalar (ti.f32, ti.f64, ti.i32, float, int), a tuple "
                                            "of them, a vector or matrix type, or write into a field") from None
            self._signature = (params, rdt)
        return self._signature

    def _parameter_error(self, name, reason, remedy):
        """A KernDiffError pointing at the parameter in the kernel's `def` line (name None: the
        line itself)."""
        from ..frontend.source import parse_function
        try:
            src = parse_function(self.fn)
        except KernDiffError:
            return KernDiffError(reason, remedy=remedy)
        arg = next((a for a in src.tree.args.args if a.arg == name), src.tree)
        return src.error(arg, reason, remedy)

    def returned_values(self):
        """How many values the kernel returns (`-> float`: 1, `-> (ti.f64, ti.f64)`: 2)."""
        rdt = self.signature()[1]
        return 0 if rdt is None else len(rdt) if isinstance(rdt, tuple) else 1

    def returns_one_float(self):
        """Whether the kernel returns one float (`-> float`, `-> ti.f32`; not a vector): the value
        kd.backward, kd.forward, kd.hvp and kd.check_grad differentiate where no output field is
        given."""
        returned = self.signature()[1]
        return self.returned_values() == 1 and not isinstance(returned, tuple) and is_float(returned) \
            and self._return_shape is None

    def _takes_self(self):
        """Whether the function's first parameter is `self` (a method); looked up once."""
        if self._method is None:
            params = list(inspect.signature(self.fn).parameters)
            self._method = bool(params) and params[0] == "self"
        return self._method

    def _bind(self, args, kwargs):
        if self.bound is not None:
            args = (self.bound,) + tuple(args)
        params, rdt = self.signature()
        names = [p for p, _ in params]
        if len(args) > len(names):
            raise KernDiffError(f"{self.__name__} takes {len(names)} arguments, got {len(args)}",
                                remedy="pass the primal kernel's arguments")
        values = dict(zip(names, args))
        for k, v in kwargs.items():
            if k not in names:
                raise KernDiffError(f"{self.__name__} got an unexpected argument '{k}'",
                                    remedy=f"its parameters are {names}")
            values[k] = v
        missing = [n for n in names if n not in values]
        if missing:
            given = [n for n in missing if inspect.signature(self.fn).parameters[n].default
                     is not inspect.Parameter.empty]
            raise KernDiffError(f"{self.__name__} is missing arguments {missing}"
                                + (f" ({given} have default values, which kernels do not take, as in Taichi)"
                                   if given else ""), remedy="pass every argument")
        templates = {n: values[n] for n, d in params if d == "template"}
        templates.update({n: d.checked(n, values[n], self) for n, d in params if isinstance(d, NdarrayParam)})
        scalars = []
        for n, d in params:
            if isinstance(d, NdarrayParam):
                continue
            if isinstance(d, VectorParam):
                scalars += d.flatten(n, values[n], self.__name__)
            elif d != "template":
                if not isinstance(values[n], numbers.Number) and not _numpy_scalar(values[n]):
                    raise KernDiffError(f"argument '{n}' of {self.__name__} is a {d} parameter, but got "
                                        f"{type(values[n]).__name__}",
                                        remedy="pass a number; annotate the parameter ti.template() to pass a "
                                               "field, or with a vector type to pass a vector")
                scalars.append((n, d, values[n]))
        return templates, scalars, rdt

    # ---------------------------------------------------------------- pipeline
    def ir(self, templates=None):
        """The (transformed, optimized) IR of this kernel for the given template arguments."""
        from ..pipeline import kernel_ir
        templates = templates or {}
        return kernel_ir(self, templates)

    def fields(self, *args, **kwargs):
        """(fields the primal writes, fields it only reads) for these arguments."""
        from ..ad.activity import read_refs, written_fields
        templates, _, _ = self._bind(args, kwargs)
        ir = self._compiled(templates)["ir"]  # this kernel's own (transformed) IR
        written = [f for f in written_fields(ir.body) if not REGISTRY.internal(f)]
        read_ = []
        for r in read_refs(ir.body):
            if not REGISTRY.internal(r.field) and not any(r.field is f for f in written + read_):
                read_.append(r.field)
        return written, read_

    def footprint(self, *args, **kwargs):
        """Concrete per-launch field accesses [(field, 'read'|'write', index pattern)], see hazards."""
        from ..ad.hazards import concrete, footprints
        templates, scalars, _ = self._bind(args, kwargs)
        entry = self._compiled(templates)
        if "footprints" not in entry:
            entry["footprints"] = footprints(entry["ir"])
        values = {n: v for n, _, v in scalars}
        values.update({p.name: 1.0 for p in entry["ir"].params if p.name not in values})
        return [(f, kind, concrete(p, values)) for f, kind, p in entry["footprints"] if not REGISTRY.internal(f)]

    def _compiled(self, templates):
        REGISTRY.check_runtime()
        tkey = tuple((n, id(v)) for n, v in sorted(templates.items()))
        key = ("kernel", self.root.uid, self.path, tkey)
        entry = CACHE.get(key)
        if entry is not None and entry["version"] == REGISTRY.version:
            return entry
        self._note_array_specialization(templates, tkey)
        t0, fields0 = time.perf_counter(), REGISTRY.taichi_seconds
        ir = self.ir(templates)
        entry = {"version": REGISTRY.version, "ir": ir, "keep": templates}
        entry["kernel"], entry["source"] = self._generated(ir, t0, fields0)
        CACHE[key] = entry
        self._last_key = key
        return entry

    def _note_array_specialization(self, templates, tkey):
        """A kernel is specialized on the ndarrays passed to it, as on template fields: one called
        with a new array each time compiles each time (and kerndiff keeps every array it saw).
        Taichi's own ndarray kernels do not, so a user may not expect it: said once, at the
        ARRAY_SPECIALIZATIONS-th array set."""
        from .registry import is_ndarray
        if not any(is_ndarray(v) for v in templates.values()):
            return
        seen = self.root.array_specializations
        seen.add(tkey)
        if len(seen) == ARRAY_SPECIALIZATIONS:
            import warnings
            from ..codegen.load import _frames_in_package
            warnings.warn(f"kerndiff kernel {self.__name__} was compiled for {len(seen)} different sets of ndarrays: "
                          "kerndiff specializes a kernel on the ndarrays passed to it (as on template fields), so a "
                          "new array each call compiles each call; make the arrays once and refill them "
                          "(a.from_numpy, a.copy_from)", RuntimeWarning, stacklevel=_frames_in_package())

    def _generated(self, ir, t0, fields0, plain=False):
        """(compiled Taichi kernel, its source) for this kernel's transformed IR `ir` (plain: a
        helper kernel of its own, finalized as a primal); the time since t0, less Taichi's part
        of it, counts as kerndiff's transform time."""
        from ..codegen.load import array_params, bind_globals, compile_source, generate_bound, with_arrays
        from ..opt.finalize import finalize
        from ..codegen.backend import check_backend
        check_backend(ir)
        fn_name = ir.name
        if plain:
            options = {"plain": True}

            def make(helpers):
                return generate_bound(finalize(ir), fn_name)
        else:
            derivative = (lambda f: id(f) in REGISTRY.parents) if self.path else None
            on_cpu = impl.current_cfg().arch in (ti.x64, ti.arm64)
            cpu_math = on_cpu and derivative is not None
            scatter = _scatter_config(self)
            options = {"derived": derivative is not None, "cpu_math": cpu_math,
                       "scatter_threads": None if scatter is None else scatter[0]}

            def make(helpers):
                """finalize and codegen, with helper fields from helpers.private_copies and
                helpers.packed (the registry's, or offline_cache's recorder of them)."""
                with_copies = None if scatter is None else \
                    (scatter[0], helpers.private_copies, scatter[2], REGISTRY.display_name)
                # (packs only with cpu_math, which is part of the cache key)
                packs = (helpers.packed, REGISTRY.ref, REGISTRY.display_name) if cpu_math else None
                return generate_bound(finalize(ir, with_copies, derivative, cpu_math=cpu_math, packs=packs,
                                               gathers=REGISTRY.is_derivative_field), fn_name)
        src, bound, components = offline_cache.generated(ir, fn_name, options, make, REGISTRY)
        g = bind_globals(src, bound, components)
        arrays = array_params(bound)
        fields = REGISTRY.taichi_seconds - fields0
        TIMINGS["transform"] += time.perf_counter() - t0 - fields
        TIMINGS["fields"] += fields
        skey = ("source", src, tuple(sorted((k, id(v)) for k, v in g.items())))
        compiled = CACHE.get(skey)
        if compiled is None:
            compiled = with_arrays(compile_source(src, g, fn_name), arrays)
            CACHE[skey] = compiled
        return compiled, src

    def _equal_directions(self, entry, templates):
        """(compiled variant, seed field pairs, its source) of k...forward.forward for launches
        whose two forward levels are seeded alike (ad/equal_directions.py), or None."""
        if "equal_directions" not in entry:
            entry["equal_directions"] = None
            if self.path[-2:] == ("forward", "forward"):
                from ..ad.equal_directions import equal_directions_variant
                t0, fields0 = time.perf_counter(), REGISTRY.taichi_seconds
                parent = self.root
                for step in self.path[:-1]:
                    parent = parent._child(step)
                v = equal_directions_variant(parent.ir(templates), self.level(len(self.path) - 2), self.level())
                if v is not None:
                    from ..pipeline import without_unused_seed
                    ir = without_unused_seed(dataclasses.replace(v.ir, name=entry["ir"].name + "_equal_directions"))
                    compiled, src = self._generated(ir, t0, fields0)
                    entry["equal_directions"] = (compiled, v.seed_pairs, src, ir.params)
        return entry["equal_directions"]

    def _store_checks(self, entry, templates):
        """The run-time checks (ad/claims.py) of each reverse step of this kernel's path whose
        input stores at indices read from data: [StoreCheck], run before each launch."""
        if "store_checks" not in entry:
            from ..ad.claims import StoreCheck, check_kernel
            checks = []
            t0, fields0 = time.perf_counter(), REGISTRY.taichi_seconds
            for i, step in enumerate(self.path):
                if step == "forward":
                    continue
                parent = self.root
                for earlier in self.path[:i]:
                    parent = parent._child(earlier)
                made = check_kernel(parent.ir(templates), self.level(i))
                if made is not None:
                    ir, described, record = made
                    compiled, src = self._generated(ir, t0, fields0, plain=True)  # (counts the time)
                    checks.append(StoreCheck(compiled, ir, described, record, src))
                    t0, fields0 = time.perf_counter(), REGISTRY.taichi_seconds
            fields = REGISTRY.taichi_seconds - fields0
            TIMINGS["transform"] += time.perf_counter() - t0 - fields
            TIMINGS["fields"] += fields
            entry["store_checks"] = checks
        return entry["store_checks"]

    @property
    def source(self) -> str:
        """The generated Taichi source of this kernel (for its last-used template arguments)."""
        entry = CACHE.get(self._last_key) if self._last_key else None
        if entry is None:
            params, _ = self.signature()
            if any(d == "template" or isinstance(d, NdarrayParam) for _, d in params):
                raise KernDiffError(f"{self!r} has template or ndarray parameters; call it once to generate its source",
                                    remedy="call the kernel (or the transform) with its arguments first")
            entry = self._compiled({})
        return entry["source"]

    @property
    def equal_directions_source(self):
        """The generated source of the variant that k...forward.forward runs when its two levels'
        seeds are equal (ad/equal_directions.py), or None where it has none."""
        self.source  # the entry for the last-used template arguments, made if there are none
        templates = CACHE.get(self._last_key)["keep"]
        variant = self._equal_directions(self._compiled(templates), templates)
        return None if variant is None else variant[2]

    def __call__(self, *args, cotangent=None, **kwargs):
        from ..tape import intercept
        if any(_host_array(v) for v in args + tuple(kwargs.values())):
            staged = self._staged(args, kwargs)
            if staged is not None:
                return staged(cotangent)
        redirected = intercept(self, args, kwargs)
        if redirected is not None:
            return redirected()
        return self.launch(*args, cotangent=cotangent, **kwargs)

    def _staged(self, args, kwargs):
        """A launch taking numpy arrays or torch tensors for ndarray parameters, as Taichi's
        kernels take them: each array is copied into a ti.ndarray kept for its parameter, shape
        and dtype (the kernel is specialized on the array, so it compiles once), the kernel runs
        on those, and what they hold then is copied back into the arrays (into a tensor by copy_).
        Only the primal, outside kd.Tape and kd.FwdMode: derivative kernels need the arrays'
        derivative arrays (kd.adjoint(a), kd.dual(a)), which a numpy array or a tensor has no place
        for (a tensor's .grad is torch's, filled by torch's autograd). None if no ndarray parameter
        got one."""
        from taichi.lang.util import to_taichi_type
        from .. import tape
        params, _ = self.signature()
        names = [n for n, _ in params][1 if self.bound is not None else 0:]
        values = {**dict(zip(names, args)), **kwargs}
        arrays = {n: values[n] for n, d in params if isinstance(d, NdarrayParam) and n in values
                  and _host_array(values[n])}
        if not arrays:
            return None
        name = next(iter(arrays))
        if self.path or tape.active_context() is not None:
            where = f"{self.dotted_name}, a derivative kernel," if self.path else \
                f"{self.__name__}, launched inside {tape.active_context()},"
            raise KernDiffError(f"argument '{name}' of {where} is a {_host_array(arrays[name])}, which has no place "
                                "for its derivatives (kd.adjoint(a), kd.dual(a))",
                                remedy=f"copy it into a ti.ndarray ({name}_array = ti.ndarray(ti.f64, shape); "
                                       f"{name}_array.from_numpy(array)) and pass that")
        staged = {}
        for n, a in arrays.items():
            try:
                dtype = to_taichi_type(a.dtype.type if _host_array(a) == "numpy array" else a.dtype)
            except Exception:
                raise KernDiffError(f"argument '{n}' of {self.__name__} is a {_host_array(a)} of {a.dtype}, which "
                                    "Taichi has no type for", remedy="pass an array of float32, float64, int32 "
                                                                     "or int64") from None
            shape = tuple(a.shape)
            staged[n] = REGISTRY.staging((self.uid, n, shape, str(a.dtype)), dtype, shape)
            staged[n].from_numpy(a if _host_array(a) == "numpy array" else a.detach().cpu().numpy())
        given = list(args)
        for k, n in enumerate(names[:len(given)]):
            given[k] = staged.get(n, given[k])

        def run(cotangent):
            out = self.launch(*given, cotangent=cotangent, **{k: staged.get(k, v) for k, v in kwargs.items()})
            for n, a in arrays.items():
                if _host_array(a) == "torch tensor":
                    import torch
                    with torch.no_grad():  # (what a kernel writes is no operation torch's autograd saw)
                        a.copy_(torch.from_numpy(staged[n].to_numpy()))
                elif a.flags.writeable:
                    a[...] = staged[n].to_numpy()
            return out
        return run

    def launch(self, *args, cotangent=None, **kwargs):
        """Run this kernel now (no Tape / FwdMode interception)."""
        return self.launch_seeded(None, args, kwargs, cotangent)

    def launch_seeded(self, seed, args, kwargs, cotangent=None):
        """launch, drawing random numbers from `seed` (runtime/draws.py), or, if None, from a new one
        for a kernel that runs the program (the primal, forward kernels) and from the seed of the
        family's latest such launch for one with a reverse step. The seed a launch took is the
        root's `draw_seed` afterwards (kd.Tape keeps it for the launch's reverse)."""
        templates, scalars, _ = self._bind(args, kwargs)
        entry = self._compiled(templates)
        ir = entry["ir"]
        call_args = [v for _, _, v in scalars]
        if ir.seed:
            call_args.append(self._launch_seed(seed))
        extra = [p for p in ir.params[len(call_args):]]
        if extra:
            per_value = "pass one cotangent per returned value"
            if self._return_shape is not None:
                per_value = (f"pass a cotangent of the returned value's shape {self._return_shape} (a list, array or "
                             "ti.Vector / ti.Matrix), a tuple of them for a forward kernel's reverse, or a number")
                if cotangent is not None and not isinstance(cotangent, numbers.Number):
                    try:
                        cotangent = _flat_components(cotangent)
                    except (TypeError, ValueError):
                        raise KernDiffError(f"{self!r} cannot read {cotangent!r} as a cotangent",
                                            remedy=per_value) from None
            cts = cotangent if isinstance(cotangent, (tuple, list)) else \
                [1.0 if cotangent is None else cotangent] * len(extra)
            if len(cts) != len(extra):
                raise KernDiffError(f"{self!r} takes {len(extra)} cotangents, got {len(cts)}", remedy=per_value)
            # an integer result has an integer cotangent parameter (which nothing reads)
            call_args.extend(float(c) if is_float(p.dtype) else int(c) for p, c in zip(extra, cts))
        elif cotangent is not None:
            raise KernDiffError(f"{self!r} returns nothing to seed with a cotangent",
                                remedy="seed the adjoints of output fields instead")
        run = entry["kernel"]
        values = {p.name: v for p, v in zip(ir.params, call_args)}
        for check in self._store_checks(entry, templates) if self.path else ():
            check.run(values)
        if len(self.path) > 1 and EQUAL_DIRECTIONS:
            variant = self._equal_directions(entry, templates)
            if variant is not None and all(fields_equal(a, b) for a, b in variant[1]):
                # (by name: the variant may have dropped a draw seed the kernel takes, or kept one)
                run, call_args = variant[0], [values[p.name] if p.name in values else self._launch_seed(None)
                                            for p in variant[3]]
        out = run(*call_args)
        return self.returned(tuple(out) if isinstance(out, list) else out)

    def _launch_seed(self, given):
        from . import draws
        reverses = any(step.startswith("reverse") for step in self.path)
        if given is None:
            given = self.root.draw_seed if reverses and self.root.draw_seed is not None else draws.new_seed()
        if not reverses:
            draws.note_seed(self.root, given)
        return given

    def own_values(self, forward_out):
        """What this kernel returns when a forward-mode context (kd.FwdMode, ti.ad.FwdMode) runs its
        forward kernel in its place: its own values, as under ti.ad.FwdMode (the forward kernel
        returned them followed by their tangents)."""
        returns = self.returned_values()
        if not returns:
            return forward_out
        if self._return_shape is not None:
            return forward_out[0]  # (value, tangent) as vectors or matrices
        return forward_out[0] if returns == 1 else tuple(forward_out[:returns])

    def returned(self, out):
        """A launch's result as the user sees it: for `-> ti.math.vec3`, the components regrouped
        into ti.Vector (ti.Matrix) values as Taichi returns them: one for the primal, the values
        and then each level's tangents for forward kernels (`k.forward()` -> (value, tangent))."""
        if self._return_shape is None or out is None:
            return out
        flat = list(out) if isinstance(out, tuple) else [out]
        n = _size(self._return_shape)
        make = ti.Vector if len(self._return_shape) == 1 else \
            (lambda xs: ti.Matrix([xs[r * self._return_shape[1]:(r + 1) * self._return_shape[1]]
                                   for r in range(self._return_shape[0])]))
        groups = [make(flat[k:k + n]) for k in range(0, len(flat), n)]
        return groups[0] if len(groups) == 1 else tuple(groups)


def _scatter_config(k):
    """Per-thread private copies for scattered adds: derived kernels on Taichi's CPU backends."""
    cfg = impl.current_cfg()
    if not k.path or cfg.arch not in (ti.x64, ti.arm64):
        return None
    return (max(1, int(cfg.cpu_max_num_threads)), REGISTRY.private_copies, REGISTRY.ref)


def kernel(fn):
    """Decorator: a kerndiff kernel (primal, with .forward / .reverse derivative kernels)."""
    if isinstance(fn, Kernel):
        return fn
    return Kernel(fn)


class VectorParam:
    """A vector or matrix kernel parameter (`g: ti.math.vec2`). Generated kernels take its
    components as scalar parameters `g_0, g_1` (the frontend binds `g` to them), and a launch
    passes the user's vector, list or array as those scalars. Like a scalar parameter it is a
    constant of the derivatives."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype

    @classmethod
    def of(cls, ann):
        return cls(_type_shape(ann), from_taichi(ann.dtype))

    def names(self, name):
        return [f"{name}_{'_'.join(map(str, idx))}" for idx in itertools.product(*map(range, self.shape))]

    def flatten(self, name, value, kernel_name):
        import numpy as np
        try:
            arr = np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, dtype=np.float64)
        except (TypeError, ValueError):
            arr = None
        if arr is None or arr.shape != self.shape:
            raise KernDiffError(f"argument '{name}' of {kernel_name} must have shape {self.shape}, got "
                                f"{None if arr is None else arr.shape}",
                                remedy="pass a Taichi vector/matrix, a list or a numpy array of that shape")
        cast = int if not self.dtype.startswith("f") else float
        return [(n, self.dtype, cast(x)) for n, x in zip(self.names(name), arr.reshape(-1))]


class NdarrayParam:
    """A `ti.types.ndarray()` kernel parameter. Like a ti.template() field the kernel is
    specialized on the array passed (its shape and dtype are the IR's), but the generated kernels
    take it, and its derivative arrays, as ndarray parameters (codegen.load.array_params): Taichi
    reads an ndarray only through a parameter. Scalar-element ti.ndarray objects only."""

    __slots__ = ("annotation",)

    def __init__(self, annotation):
        self.annotation = annotation

    def checked(self, name, value, kernel):
        """value, if it is an ndarray this parameter takes; otherwise a KernDiffError saying why."""
        from taichi.lang._ndarray import Ndarray
        from .registry import element_shape
        if not isinstance(value, Ndarray):
            raise KernDiffError(
                f"argument '{name}' of {kernel.__name__} is an ndarray parameter, but got "
                + ("a numpy array" if type(value).__module__ == "numpy" else type(value).__name__),
                remedy="pass a ti.ndarray (ti.ndarray(ti.f32, shape), ti.ndarray(ti.math.vec3, shape)); copy a "
                       "numpy array in with a.from_numpy(array)")
        want, want_ndim = getattr(self.annotation, "dtype", None), getattr(self.annotation, "ndim", None)
        if want is not None and not isinstance(want, type):  # (dtype=float: any)
            want_shape = () if getattr(want, "n", None) is None else \
                (want.n,) if want.ndim == 1 else (want.n, want.m)
            want_scalar = getattr(want, "dtype", want)
            got = _element_name(element_shape(value), value.dtype)
            if want_shape != element_shape(value) or \
                    want_scalar is not None and from_taichi(want_scalar) != from_taichi(value.dtype):
                raise KernDiffError(f"argument '{name}' of {kernel.__name__} is an ndarray of {got}, but the "
                                    f"parameter is annotated with dtype {_element_name(want_shape, want_scalar)}",
                                    remedy="pass an ndarray of the annotated dtype, or change the annotation")
        if want_ndim is not None and want_ndim != len(value.shape):
            raise KernDiffError(f"argument '{name}' of {kernel.__name__} has {len(value.shape)} dimensions, "
                                f"but the parameter is annotated with ndim={want_ndim}",
                                remedy="pass an ndarray with that many dimensions, or change the annotation")
        return value


def _host_array(value):
    """"numpy array" or "torch tensor" for an array a primal kernel copies into a ti.ndarray for
    an ndarray parameter (Kernel._staged), else ""."""
    module = type(value).__module__.split(".")[0]
    if module == "numpy" and hasattr(value, "shape"):
        return "numpy array"
    if module == "torch" and hasattr(value, "shape") and hasattr(value, "detach"):
        return "torch tensor"
    return ""


def _element_name(shape, scalar):
    """f32, vector(3, f32), matrix(2, 2, f64): an ndarray's element type, as errors name it."""
    scalar = "float" if scalar is None else from_taichi(scalar)
    return scalar if not shape else f"{'vector' if len(shape) == 1 else 'matrix'}({', '.join(map(str, shape))}, {scalar})"


def _numpy_scalar(v):
    import numpy as np
    return isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.shape == ())


def _size(shape):
    count = 1
    for extent in shape:
        count *= extent
    return count


def _flat_components(cotangent):
    """A cotangent for a vector- or matrix-returning kernel as a flat list: a vector, matrix,
    array or nested list; or a tuple of them, one per returned group (a forward kernel's reverse
    takes the value's and the tangent's)."""
    import numpy as np
    if isinstance(cotangent, tuple) and any(not isinstance(c, numbers.Number) for c in cotangent):
        return [float(c) for part in cotangent for c in _flat_components(part)]
    arr = cotangent.to_numpy() if hasattr(cotangent, "to_numpy") else cotangent
    return [float(c) for c in np.asarray(arr, dtype=np.float64).ravel()]


def _is_vector_type(ann):
    return type(ann).__name__ in ("VectorType", "MatrixType")


def _type_shape(ann):
    return (ann.n,) if type(ann).__name__ == "VectorType" else (ann.n, ann.m)


def _type_name(ann):
    """A Taichi type annotation as written (its repr is an object address for vectors and structs)."""
    if type(ann).__name__ == "StructType":
        return f"ti.types.struct({', '.join(f'{k}={_type_name(v)}' for k, v in ann.members.items())})"
    if not _is_vector_type(ann):
        return str(ann) if type(ann).__name__ == "DataType" else repr(ann)
    kind = "vector" if len(_type_shape(ann)) == 1 else "matrix"
    return f"ti.types.{kind}({', '.join(map(str, _type_shape(ann)))}, {ann.dtype})"
