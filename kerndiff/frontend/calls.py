"""Calls inside kernels: builtins, vector methods, Taichi types, ti.func and kd.func inlining."""
from __future__ import annotations

import ast
import inspect
import math

import taichi as ti

from ..errors import KernDiffError
from ..ir import build as B
from ..ir import nodes as N
from ..ir.types import from_taichi, is_float
from . import builtins as BI
from . import vec as V
from .loops import RangeSpec, field_spec, ndrange_spec, range_spec
from .source import assigned_names, parse_function
from .values import Local, Method, StructMethod, StructValue, is_field
from .vec import Vec

MAX_INLINE_DEPTH = 32


def compile_time_call(lw, fn, args, kwargs, node):
    """Calls that do their work while the kernel compiles, as in Taichi: ti.static_assert checks
    its condition now, ti.static_print prints now, and ti.block_local (a hint to cache fields in
    a GPU block's shared memory) is dropped: kerndiff's kernels read the fields directly, and the
    hint's loop shape need not survive a transform."""
    if fn is ti.static_print:
        print(*args, **kwargs)
    elif fn is ti.static_assert:
        cond = args[0] if args else kwargs.get("cond")
        msg = args[1] if len(args) > 1 else kwargs.get("msg")
        if isinstance(cond, (N.Expr, Vec)):
            raise lw.error(node, "ti.static_assert needs a compile-time condition",
                           "use assert for a run-time check, or build the condition from ti.static values")
        if not cond:
            raise lw.error(node, "ti.static_assert failed" + (f": {msg}" if msg else ""),
                           "fix the condition or the values")
    return None


def lower_call(lw, fn, args, kwargs, node):
    if isinstance(fn, Method):
        return vec_method(lw, fn, args, kwargs, node)
    if isinstance(fn, StructMethod):
        return inline_function(lw, unwrap_ti_func(fn.fn), [fn.target] + list(args), kwargs, node,
                               self_by_reference=True)
    from taichi.lang.struct import StructType
    if isinstance(fn, StructType):
        return struct_value(lw, fn, args, kwargs, node)
    if fn is range:
        return range_spec(lw, args, node)
    if fn is ti.ndrange:
        return ndrange_spec(lw, args, node)
    if fn is ti.grouped:
        (target,) = args
        spec = field_spec(target) if is_field(target) else target
        if not isinstance(spec, RangeSpec):
            raise lw.error(node, "ti.grouped takes a field or ti.ndrange", "pass one of those")
        return RangeSpec(spec.bounds, spec.step, grouped=True)
    if fn is ti.static:
        v = args[0] if len(args) == 1 else tuple(args)
        if isinstance(v, RangeSpec):
            return static_range(lw, v, node)
        if isinstance(v, N.Const):  # Taichi math on constants, folded: ti.static(ti.log(2.0)) in ti.math.log2
            return v.value
        if isinstance(v, N.Expr):
            raise lw.error(node, "ti.static got a runtime value", "pass compile-time constants to ti.static")
        return v
    if fn in (ti.static_assert, ti.static_print, ti.block_local):
        return compile_time_call(lw, fn, args, kwargs, node)
    handler = BI.lookup(fn)
    if handler is not None:
        try:
            args, kwargs = BI.positional(fn, args, kwargs)
        except TypeError as e:
            raise lw.error(node, f"{getattr(fn, '__name__', fn)}: {e}", "pass the arguments Taichi's function takes")
        return handler(lw, node, args, kwargs)
    from ..funcs import DeviceFunction
    from .. import api
    if fn in (api.forward, api.grad, api.jvp, api.vjp, api.reverse, api.backward, api.func):
        # Transform factories run at compile time: kd.grad(U)(r) inside a kernel.
        if any(isinstance(a, (N.Expr, Vec)) for a in args):
            raise lw.error(node, f"kd.{fn.__name__} takes a function, not a value", "write kd.grad(U)(r)")
        try:
            return fn(*args, **kwargs)
        except KernDiffError as e:  # placed at the call in the kernel, not at the kernel's launch
            raise lw.error(node, e.reason, e.remedy) from None
    if isinstance(fn, DeviceFunction):
        return fn.lower_call(lw, args, node, kwargs)
    if inspect.ismethod(fn) and isinstance(fn.__func__, DeviceFunction):  # self.helper(i): a @kd.func method
        return fn.__func__.lower_call(lw, [fn.__self__] + list(args), node, kwargs)
    if getattr(fn, "_is_taichi_function", False):
        if inspect.ismethod(fn):  # self.helper(i) in a @ti.data_oriented class: Python bound self
            args = [fn.__self__] + list(args)
        return inline_function(lw, unwrap_ti_func(fn), args, kwargs, node)
    from ..ir.types import from_taichi
    try:
        dt = from_taichi(fn)
    except (KeyError, TypeError):
        dt = None
    from taichi.lang.matrix import MatrixType, VectorType
    if kwargs and (dt is not None or isinstance(fn, (VectorType, MatrixType))):
        raise lw.error(node, "a type called as a constructor or cast takes its values by position; keywords would "
                             "be dropped", "pass the values positionally")
    if dt is not None:
        (x,) = args
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return B.const(x, dt)  # ti.f64(0.1) is an f64 literal, where ti.cast(0.1, ti.f64) widens 0.1f
        return lw.cast(x, fn, node)
    if isinstance(fn, VectorType):
        items = []
        for a in args:
            items.extend(a.items if isinstance(a, Vec) else (a if isinstance(a, (list, tuple)) else [a]))
        if len(items) == 1:
            items = items * fn.n
        return lw.cast(Vec((fn.n,), [lw.scalar(e, node) for e in items]), fn.dtype, node)
    if isinstance(fn, MatrixType):
        items = []
        for a in args:
            items.extend(a.items if isinstance(a, Vec) else (a if isinstance(a, (list, tuple)) else [a]))
        flat = []
        for e in items:
            flat.extend(e if isinstance(e, (list, tuple)) else [e])
        if len(flat) == 1:
            flat = flat * (fn.n * fn.m)
        return lw.cast(Vec((fn.n, fn.m), [lw.scalar(e, node) for e in flat]), fn.dtype, node)
    if fn is ti.random or fn is ti.randn:
        return random_draw(lw, fn, args, kwargs, node)
    if _is_plain_python(fn):
        return python_call(lw, fn, args, kwargs, node)
    if callable(fn):
        mod = getattr(fn, "__module__", "") or ""
        what = "a numpy call" if mod.startswith("numpy") else f"a call to {getattr(fn, '__name__', fn)!r}"
        raise lw.error(node, f"{what} cannot run inside a kerndiff kernel",
                       "use Taichi math (ti.sin, ti.exp, ...), or make it a ti.func / kd.func")
    raise lw.error(node, f"{fn!r} is not callable", "check the name")


# Modules whose functions a kernel never runs at compile time: numbers drawn there (numpy.random,
# random, time) would be baked into each kernel as it compiles, so the primal and its derivative
# kernels could hold different ones.
_LIBRARY_MODULES = ("numpy", "random", "time", "taichi", "kerndiff", "builtins")


def random_draw(lw, fn, args, kwargs, node):
    """ti.random(dtype) and ti.randn(dt): each number drawn is bound to a local of its own at once
    (named as the local the call is assigned to, where it is) and numbered apart (ir.ops.RANDOM),
    so that every use reads the same draw. The number is keyed (codegen/draws.py): a hash of the
    launch's seed (the kernel's u32 parameter NameAllocator.seed), the draw's number and the
    indices of the loops around it (a while loop's: a count of its trips), so that a reverse
    kernel, given the primal launch's seed, draws again exactly what the primal drew. ti.randn is
    Taichi's Box-Muller, from two draws."""
    name = "dtype" if fn is ti.random else "dt"
    dtype = args[0] if args else kwargs.get(name)
    try:
        dt = from_taichi(float if dtype is None else dtype)
    except KeyError:
        raise lw.error(node, f"ti.{fn.__name__} takes a dtype, not {dtype!r}", "pass ti.f32, ti.f64, float or int") from None
    if fn is ti.randn and not is_float(dt):
        raise lw.error(node, f"ti.randn draws floats, not {dt}", "pass ti.f32 or ti.f64")
    lw.names.seed = lw.names.seed or lw.names.fresh("draw_seed")
    key = [B.var(lw.names.seed, "u32")]
    for indexes in lw.loop_indexes:
        if isinstance(indexes, dict):  # a while loop: the count of its trips (Lowerer.stmt_While makes it)
            indexes["name"] = indexes["name"] or lw.names.fresh("trips")
            indexes = [indexes["name"]]
        key += [B.var(v, "i32") for v in indexes]

    def draw(hint):
        lw.names.draws += 1
        return lw.materialize(B.call("random", B.const(lw.names.draws, dt), *key), hint, node)
    if fn is ti.random:
        return draw(lw.assigned_to.get(id(node)) or "drawn")
    u1 = B.sub(B.const(1.0, dt), draw("u1"))
    u2 = draw("u2")
    radius = B.call("sqrt", B.mul(B.const(-2.0, dt), B.call("log", u1)))
    return B.mul(radius, B.call("cos", B.mul(B.const(math.tau, dt), u2)))


def _is_plain_python(fn):
    """fn is a function (or a method of a plain object) the user wrote in Python, not a ti.func."""
    target = fn.__func__ if inspect.ismethod(fn) else fn
    if not inspect.isfunction(target) or getattr(target, "_is_taichi_function", False):
        return False
    module = getattr(target, "__module__", "") or ""
    return module.split(".")[0] not in _LIBRARY_MODULES


def _is_compile_time(v):
    """v is a value Python code may compute with while the kernel compiles: a number, a string, None,
    or a list or tuple of these."""
    if isinstance(v, (list, tuple)):
        return all(_is_compile_time(x) for x in v)
    return v is None or isinstance(v, (bool, int, float, str))


def _hidden_state(fn, seen=None):
    """The name of a global or closure value that fn (or a plain function it names) reads that is
    not plain data (numbers, strings, arrays, functions, modules, classes, and lists, tuples and
    dicts of these), or None. Run while the kernel compiles, a read of a field there would take
    the value the field holds now and keep it, where Taichi, running the function in Taichi
    scope, reads the field at run time: the derivative would miss it."""
    import numpy as np
    seen = set() if seen is None else seen
    if id(fn) in seen:
        return None
    seen.add(id(fn))

    def plain(v):
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        if isinstance(v, dict):
            return all(plain(x) for x in v.values())
        if inspect.isfunction(v):
            return _hidden_state(v, seen) is None
        return v is None or isinstance(v, (bool, int, float, complex, str, bytes, np.ndarray, np.generic)) \
            or inspect.ismodule(v) or inspect.isclass(v) or inspect.isbuiltin(v)

    codes, names = [fn.__code__], set()
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes.extend(c for c in code.co_consts if inspect.iscode(c))
    values = {n: fn.__globals__[n] for n in sorted(names) if n in fn.__globals__}
    values.update(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
    return next((n for n, v in values.items() if not plain(v)), None)


def python_call(lw, fn, args, kwargs, node):
    """A plain Python function called in a kernel runs while the kernel compiles, as Taichi runs it
    (`cauchy = ti.Matrix(zero_matrix())`, `weights[i, n_inputs() - 1]`), where its arguments are
    compile-time values; its result must be one too. Taichi would also run it on run-time values
    (Taichi's expressions overload Python's operators); kerndiff's do not, so there it says to
    make the function a ti.func."""
    name = getattr(fn, "__name__", repr(fn))
    target = fn.__func__ if inspect.ismethod(fn) else fn
    hidden = "self" if inspect.ismethod(fn) else _hidden_state(target)
    if hidden is not None:
        raise lw.error(node, f"'{name}' is a plain Python function that reads '{hidden}', which may hold fields: "
                             "kerndiff runs such a function while the kernel compiles, and a field read there "
                             "would be a constant, its derivative lost (Taichi reads it at run time)",
                       f"decorate '{name}' with @ti.func (or @kd.func)")
    if not all(_is_compile_time(a) for a in list(args) + list(kwargs.values())):
        raise lw.error(node, f"'{name}' is a plain Python function: kerndiff runs one while the kernel compiles, "
                             "with compile-time arguments only (numbers, strings, lists of them), and this call "
                             "passes a run-time value or a field",
                       f"decorate '{name}' with @ti.func (or @kd.func)")
    try:
        result = fn(*args, **kwargs)
    except KernDiffError:
        raise
    except Exception as e:
        raise lw.error(node, f"'{name}' raised {type(e).__name__} ({e}) when kerndiff ran it while compiling the kernel",
                       "fix the function, or decorate it with @ti.func") from None
    from taichi.lang.matrix import Matrix
    if isinstance(result, Matrix) and _is_compile_time(result.to_list()):  # ti.Vector([0.0, 1.0]) made there
        return lw.from_list(result.to_list(), node)
    if not _is_compile_time(result):
        raise lw.error(node, f"'{name}' returned a {type(result).__name__}, which a kernel cannot use",
                       "return numbers, or lists or tuples of them, or decorate the function with @ti.func")
    return result


def struct_value(lw, stype, args, kwargs, node):
    """Sphere(r=2.0) or Body(pos, mass) inside a kernel: a struct value, members cast to their types
    (missing ones zero, as in Taichi)."""
    from taichi.lang.matrix import MatrixType
    from taichi.lang.struct import StructType

    from ..ir.types import from_taichi

    members = {}
    for k, (name, dtype) in enumerate(stype.members.items()):
        given = k < len(args) or name in kwargs
        value = args[k] if k < len(args) else kwargs.get(name, 0)
        if isinstance(dtype, StructType):  # a nested struct: another struct value, or zero
            if given and not (isinstance(value, StructValue) and set(value.members) == set(dtype.members)):
                raise lw.error(node, f"member '{name}' is a struct with members {list(dtype.members)}",
                               "pass a struct value of that type")
            members[name] = struct_value(lw, dtype, [], value.members if given else {}, node)
            continue
        if isinstance(dtype, MatrixType):
            if not isinstance(value, (Vec, list, tuple)):
                value = [value] * (dtype.n * (dtype.m if dtype.ndim == 2 else 1))
            shape = (dtype.n, dtype.m) if dtype.ndim == 2 else (dtype.n,)
            items = lw.vec(value, node).items if not isinstance(value, Vec) else value.items
            members[name] = Vec(shape, [B.cast(lw.scalar(e, node), from_taichi(dtype.dtype)) for e in items])
        else:
            members[name] = B.cast(lw.scalar(value, node), from_taichi(dtype))
    return StructValue(members, stype.methods)


def static_range(lw, spec, node):
    """ti.static(range(...)), ti.static(ti.ndrange(3, 3)) and ti.static(ti.grouped(ti.ndrange(...))):
    what the unrolled loop runs over (ints, tuples of ints, or constant vectors)."""
    import itertools


    if not all(isinstance(b, int) for bound in spec.bounds for b in bound):
        raise lw.error(node, "ti.static needs compile-time bounds", "use constants")
    if len(spec.bounds) == 1 and not spec.grouped:
        return range(spec.bounds[0][0], spec.bounds[0][1], spec.step)
    points = itertools.product(*(range(lo, hi) for lo, hi in spec.bounds))
    if spec.grouped:
        return [Vec((len(p),), [B.const(c, "i32") for c in p]) for p in points]
    return list(points)


def unwrap_ti_func(fn):
    """The Python function under a @ti.func wrapper."""
    import types
    while not isinstance(fn, types.FunctionType) or getattr(fn, "_is_taichi_function", False):
        fn = fn.func
    return fn


def vec_method(lw, m, args, kwargs, node):
    t, name = m.target, m.name
    if not isinstance(t, Vec):
        raise lw.error(node, f"scalars have no method '{name}'", "call methods on vectors and matrices")
    with_eps = {"norm": V.norm, "norm_inv": V.norm_inv, "normalized": V.normalized}
    if name in with_eps:  # v.norm(eps), v.normalized(eps=1e-8): Taichi's safeguard at v = 0
        eps = args[0] if args else kwargs.get("eps", 0)
        return with_eps[name](t, eps if isinstance(eps, (int, float)) else lw.scalar(eps, node))
    simple = {"norm_sqr": V.norm_sqr, "transpose": V.transpose, "trace": V.trace,
              "determinant": V.determinant, "inverse": V.inverse}
    if name in simple:
        if args or kwargs:
            raise lw.error(node, f"'{name}' takes no arguments", f"call v.{name}()")
        return simple[name](t)
    if name == "dot":
        return V.dot(t, lw.vec(args[0], node))
    if name == "cross":
        return V.cross(t, lw.vec(args[0], node))
    if name == "outer_product":
        return V.outer(t, lw.vec(args[0], node))
    if name == "sum":
        return B.sum_of(t.items, t.dtype)
    if name in ("any", "all"):  # (v > 0.5).all(): whether every component is nonzero, as Taichi's 0 or 1
        if args or kwargs:
            raise lw.error(node, f"'{name}' takes no arguments", f"call v.{name}()")
        out = lw.truth(t.items[0], node)
        for e in t.items[1:]:
            out = lw.logic("or" if name == "any" else "and", out, e, node)
        return out
    if name in ("max", "min"):
        out = t.items[0]
        for e in t.items[1:]:
            out = lw.binary(name, out, e, node)
        return out
    if name == "cast":
        return lw.cast(t, args[0], node)
    raise lw.error(node, f"vector method '{name}' is not supported", "use " + ", ".join(BI.VECTOR_METHODS))


def inline_function(lw, pyfn, args, kwargs, node, self_by_reference=False):
    """Inline a ti.func / kd.func body at the call site; returns its return value.

    self_by_reference: the first argument is a dataclass method's `self`, which Taichi passes by
    reference (the method's `self.m = ...` changes the caller's struct)."""
    from .lower import Lowerer

    if len(_chain(lw)) > MAX_INLINE_DEPTH:
        raise lw.error(node, "functions nest too deeply (recursion?)", "kerndiff inlines functions; avoid recursion")
    src = parse_function(pyfn)
    a = src.tree.args
    bound = bind_arguments(lw, pyfn, args, kwargs, node)
    names = list(bound)
    child = Lowerer(src, {}, lw.names, parent=lw)
    child.blocks = lw.blocks
    reassigned = assigned_names(src.tree)  # a parameter among them gets a copy of its argument, as
    # Taichi passes arguments by value
    templates = {p.arg for p in a.args + a.kwonlyargs if _is_template(p.annotation)}
    annotations, returns = _annotations(pyfn)
    for p in names:
        v = bound[p] if p in templates else converted(bound[p], annotations.get(p))
        if self_by_reference and p == names[0] and isinstance(v, StructValue):
            if p in reassigned and not _held_in_locals(v):
                raise lw.error(node, "this method assigns to `self`, and it is called on a field element: Taichi "
                                     "writes those assignments back into the field, which kerndiff does not",
                               "copy the element to a local, call the method on it, and store the local back")
            child.scope[p] = v
        elif isinstance(v, StructValue):
            _bind_at_call(child, lw, p, v, node)  # a copy, as Taichi passes structs by value
        elif not isinstance(v, (N.Expr, Vec)) and (p in templates or not isinstance(v, (bool, int, float))):
            # compile-time, as in Taichi: ti.math.eye(n: template()) unrolls over n, and a dtype
            # passed on (Taichi's _polar_decompose2d(A, dt)) stays a dtype
            child.scope[p] = v
        elif isinstance(v, N.Var) and (p not in reassigned or p in templates):
            # a local read-only here, or a ti.template() parameter, which Taichi passes by reference
            child.scope[p] = Local([v.name], None, [v.dtype])
        elif isinstance(v, Vec) and all(isinstance(e, N.Var) for e in v.items) and \
                (p not in reassigned or p in templates):
            child.scope[p] = Local([e.name for e in v.items], v.shape, [e.dtype for e in v.items])
        else:
            _bind_at_call(child, lw, p, v, node)
    return converted(lower_body_with_returns(child, list(src.tree.body)), returns)


def _bind_at_call(child, caller, name, value, call):
    """Bind the inlined function's parameter `name` to `value` where the caller calls it: the
    call node belongs to the caller's source, so the binding's statements (and any error) are
    placed at the call's line, not at the line of the function's source with the same number."""
    own = child.src
    child.src = caller.src
    try:
        child.bind_local(name, value, call)
    finally:
        child.src = own


def _annotations(pyfn):
    """({parameter: annotation}, return annotation or None) of pyfn, evaluated (({}, None) where
    they cannot be: an annotation naming something the function's module lacks fails Taichi's
    own parser too, and kerndiff goes on without it)."""
    try:
        sig = inspect.signature(pyfn, eval_str=True)
    except Exception:
        return {}, None
    params = {n: p.annotation for n, p in sig.parameters.items() if p.annotation is not inspect.Parameter.empty}
    return params, (None if sig.return_annotation is inspect.Signature.empty else sig.return_annotation)


def converted(value, annotation):
    """value as the scalar type a ti.func annotation names. Taichi 1.7 casts a ti.func's scalar
    arguments to the types of their parameters (`a: ti.i32` passed 2.7 is 2) and its scalar
    result to the return type (`-> ti.i32`); vector and matrix annotations (`v: ti.math.ivec2`)
    cast nothing there, and so pass here as is, like anything else."""
    from ..ir.types import from_taichi

    if annotation is None or value is None or type(annotation).__name__ in ("VectorType", "MatrixType"):
        return value
    try:
        dtype = from_taichi(annotation)
    except (KeyError, TypeError):  # ti.template() and anything else that names no scalar type
        return value
    if isinstance(value, N.Expr):
        return B.cast(value, dtype)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return B.const(value, dtype)
    return value


def bind_arguments(lw, pyfn, args, kwargs, node):
    """{parameter: value} by Python's own rules: keywords, keyword-only parameters and defaults
    (evaluated where the function was defined, as Python does)."""
    sig = inspect.signature(pyfn)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        raise lw.error(node, f"{pyfn.__name__} takes *args or **kwargs, which a kernel cannot pass",
                       "name each parameter")
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise lw.error(node, f"{pyfn.__name__}: {e}", "pass one value per parameter")
    bound.apply_defaults()
    return dict(bound.arguments)


def _held_in_locals(struct):
    """Whether every member of a struct value is a local (not a field element's loads)."""
    items = [e for v in struct.members.values() for e in (v.items if isinstance(v, Vec) else [v])]
    return all(isinstance(e, N.Var) for e in items)


def _is_template(annotation):
    """Whether a parameter annotation is `template()` / `ti.template()`."""
    if not isinstance(annotation, ast.Call):
        return False
    f = annotation.func
    return (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)) == "template"


def lower_body_with_returns(lw, stmts):
    for i, s in enumerate(stmts):
        rest = stmts[i + 1:]
        if isinstance(s, ast.Return):
            if rest:
                raise lw.error(rest[0], "code after return", "remove it")
            return None if s.value is None else lw.expr(s.value)
        if isinstance(s, ast.If) and _has_return(s):
            if rest and _always_returns([s]):
                raise lw.error(rest[0], "code after an if/else whose every branch returns: it never runs",
                               "remove it, or move it into the branch it belongs to")
            cond = lw.expr(s.test)
            # the code after the if runs on the paths that leave it without returning: it is
            # lowered at the end of each branch that can (`if a: return x / elif b: return y /
            # return z`), as a function written with else branches would read
            body, orelse = (list(branch) + ([] if _always_returns(branch) else rest) for branch in (s.body, s.orelse))
            if not isinstance(cond, (N.Expr, Vec)):
                return lower_body_with_returns(lw, body if cond else orelse)
            c = lw.truth(cond, s.test)
            result = lw.names.fresh("ret")
            outs = []
            for branch in (body, orelse):
                lw.blocks.append([])
                lw.depth += 1
                v = lower_body_with_returns(lw, branch)
                if v is None:
                    raise lw.error(s, "every branch must return a value", "add a return")
                lw.bind_local(result, v, s)
                lw.depth -= 1
                outs.append(tuple(lw.blocks.pop()))
            lw.emit(N.If(c, outs[0], outs[1], src=lw.loc(s.test)))
            return lw.scope[result].value()
        if _has_return(s):
            raise lw.error(s, "return inside a loop is not supported in kerndiff functions",
                           "use break and return after the loop")
        lw.stmt(s)
    return None


def _always_returns(stmts):
    """Whether every path through stmts (a branch's statements) ends in a return."""
    if not stmts:
        return False
    last = stmts[-1]
    if isinstance(last, ast.Return):
        return True
    return isinstance(last, ast.If) and _always_returns(last.body) and _always_returns(last.orelse)


def _has_return(node):
    return any(isinstance(n, ast.Return) for n in ast.walk(node))


def _chain(lw):
    out = []
    while lw is not None:
        out.append(lw)
        lw = lw.parent
    return out
