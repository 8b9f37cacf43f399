"""Device functions (`@kd.func`) and their transforms (forward, grad, jvp, vjp).

A device function is inlined where it is called, like `ti.func`. A transformed one is inlined
too, then differentiated on the spot: its body is lowered into a block of its own, the block is
run through the same forward / reverse transforms as kernels (with respect to the argument
locals instead of fields), and the derivative code is emitted in its place. Because the result is
ordinary IR again, transforms nest to any depth and the kernel around them can itself be
differentiated.
"""
from __future__ import annotations

import inspect
import types

from .errors import KernDiffError
from .ir import build as B
from .ir import nodes as N
from .ir.types import is_float
from .frontend.vec import Vec


_MODES = {"forward": "forward", "jvp": "forward", "grad": "reverse", "vjp": "reverse"}


class DeviceFunction:
    """kind: 'func' (plain), 'forward', 'grad', 'jvp' or 'vjp' of `inner`."""

    def __init__(self, fn=None, kind="func", inner=None, argnum=None):
        self.fn = fn if fn is not None else inner.fn
        self.kind = kind
        self.inner = inner
        self.argnum = argnum
        self.__name__ = getattr(self.fn, "__name__", "func")
        self.__doc__ = getattr(self.fn, "__doc__", None)
        self.__wrapped__ = self.fn

    def __repr__(self):
        if self.kind == "func":
            return f"<kd.func {self.__name__}>"
        return f"<kd.{self.kind}({self.inner!r}{'' if self.argnum is None else f', argnum={self.argnum}'})>"

    def __get__(self, instance, owner=None):
        """A @kd.func defined in a class (a @ti.data_oriented one) and reached through an instance,
        `self.helper(i)`: bound to the instance, as Python binds a method, so that the call passes
        `self` first (the kernel's lowering unpacks the bound method)."""
        if instance is None:
            return self
        return types.MethodType(self, instance)

    def __call__(self, *args, **kwargs):
        raise KernDiffError(f"{self!r} is a device function: call it inside a @kd.kernel or another @kd.func",
                            remedy="wrap the call in a kernel; on the host use kd.forward/kd.backward over a kernel")

    def level(self):
        """Which forward (or reverse) transform this is, counted from the innermost of its chain,
        as kernels count theirs: its locals' derivatives are named by it (s_dual, s_dual2)."""
        mode = _MODES.get(self.kind)
        level, inner = 1, self.inner
        while inner is not None and inner.kind != "func":
            level += _MODES.get(inner.kind) == mode
            inner = inner.inner
        return level

    def arity(self):
        if self.kind in ("func", "forward", "grad"):
            return len(inspect.signature(self.fn).parameters)
        return self.inner.arity()

    # ------------------------------------------------------------------ lowering
    def lower_call(self, lw, args, node, kwargs=None):
        from .frontend.calls import bind_arguments, inline_function
        kwargs = kwargs or {}
        if self.kind == "func":
            return inline_function(lw, self.fn, args, kwargs, node)
        n = self.inner.arity()
        if self.kind in ("forward", "grad"):
            # keywords and defaults of the function, bound here: the transforms pass values by position
            args = list(bind_arguments(lw, self.fn, args, kwargs, node).values())
        elif kwargs:
            raise lw.error(node, f"{self!r} takes its primals and tangents (or cotangent) by position",
                           "pass every value positionally")
        if self.kind == "jvp":
            if len(args) != 2 * n:
                raise lw.error(node, f"{self!r} takes {n} primals and {n} tangents, got {len(args)} values",
                               "pass the primals, then one tangent per primal")
            return self._jvp(lw, args[:n], args[n:], node)
        if self.kind == "vjp":
            if len(args) != n + 1:
                raise lw.error(node, f"{self!r} takes {n} primals and one cotangent, got {len(args)} values",
                               "pass the primals, then the output's cotangent")
            return self._vjp(lw, args[:n], args[n], node)
        if len(args) != n:
            raise lw.error(node, f"{self!r} takes {n} arguments, got {len(args)}", "pass one value per parameter")
        if self.kind == "forward":
            a = args[self.argnum]
            if isinstance(a, Vec) or not is_float(lw.scalar(a, node).dtype):
                raise lw.error(node, f"kd.forward differentiates with respect to a float scalar; argument "
                                     f"{self.argnum} is {'a vector' if isinstance(a, Vec) else 'an integer'}",
                               "use kd.jvp with a tangent vector, or pass a float")
            seeds = [None] * n
            seeds[self.argnum] = B.const(1, lw.scalar(a, node).dtype)
            _, tangent = self._jvp(lw, args, seeds, node)
            return tangent
        if self.kind == "grad":
            grads = self._vjp(lw, args, 1.0, node)
            return grads if self.argnum is None else grads[self.argnum]
        raise AssertionError(self.kind)

    def _args_as_locals(self, lw, args, node):
        """Fresh locals holding the (float) arguments, so they can be seeded."""
        out = []
        for i, a in enumerate(args):
            if isinstance(a, (N.Expr, Vec, int, float)):
                v = a if isinstance(a, Vec) else lw.scalar(a, node)
                tmp = {}
                saved, lw.scope = lw.scope, tmp
                try:
                    lw.bind_local(f"arg{i}", v, node)
                finally:
                    lw.scope = saved
                out.append(tmp[f"arg{i}"].value())
            else:
                out.append(a)
        return out

    def _inline_inner(self, lw, args, node):
        params = list(inspect.signature(self.fn).parameters.values())
        positional = [a for p, a in zip(params, args) if p.kind != p.KEYWORD_ONLY]
        keywords = {p.name: a for p, a in zip(params, args) if p.kind == p.KEYWORD_ONLY}
        before = set(lw.names.taken)
        lw.blocks.append([])
        out = self.inner.lower_call(lw, positional, node, keywords)
        if isinstance(out, (tuple, list)):  # `return a, b` (kd.grad without argnum): each part differentiated
            if not out or not all(isinstance(part, (N.Expr, Vec, int, float)) for part in out):
                lw.blocks.pop()
                raise lw.error(node, f"{self.inner!r} returns {len(out)} values, not all scalars or vectors; "
                                     f"{self!r} differentiates scalars and vectors",
                               "return scalars and ti.Vectors (or one of them)")
            out = tuple(p if isinstance(p, (N.Expr, Vec)) else lw.scalar(p, node) for p in out)
        return _without_dead_code(lw.blocks.pop(), out, before), out

    def _jvp(self, lw, primals, tangents, node):
        from .ad.forward import forward_block
        args = self._args_as_locals(lw, primals, node)
        seeds = {}
        for a, t in zip(args, tangents):
            if t is None:
                continue
            items = a.items if isinstance(a, Vec) else [a]
            titems = t.items if isinstance(t, Vec) else ([t] * len(items) if not isinstance(t, (list, tuple))
                                                         else list(t))
            for e, te in zip(items, titems):
                if isinstance(e, N.Var) and is_float(e.dtype):
                    seeds[e.name] = B.cast(lw.scalar(te, node), e.dtype)
        stmts, out = self._inline_inner(lw, args, node)
        if out is None:
            raise lw.error(node, f"{self.inner!r} returns nothing", "return the value to differentiate")
        new, jvp = forward_block(stmts, lw.names, seeds, self.level())
        for s in _named_if_grown(lw, new):
            lw.emit(s)

        def tan(e):
            e = lw.scalar(e, node)
            t = jvp(e)
            return t if t is not None else B.const(0, e.dtype if is_float(e.dtype) else "f32")
        def tangent_of(part):
            return part.map(tan) if isinstance(part, Vec) else tan(part)
        return out, tuple(map(tangent_of, out)) if isinstance(out, tuple) else tangent_of(out)

    def _vjp(self, lw, primals, cotangent, node):
        from .ad.reverse import local_dtypes, reverse_block
        args = self._args_as_locals(lw, primals, node)
        stmts, out = self._inline_inner(lw, args, node)
        if out is None:
            raise lw.error(node, f"{self.inner!r} returns nothing", "return the value to differentiate")
        if self.kind == "grad" and (isinstance(out, tuple) or isinstance(out, Vec)):
            raise lw.error(node, f"kd.grad needs a scalar-valued function; {self.inner!r} returns "
                                 f"{f'{len(out)} values' if isinstance(out, tuple) else f'shape {out.shape}'}",
                           "use kd.vjp with a cotangent, or reduce the output")
        parts = out if isinstance(out, tuple) else (out,)
        if isinstance(out, tuple):  # one cotangent per returned value, as JAX's vjp takes them
            if not isinstance(cotangent, (list, tuple)) or len(cotangent) != len(out):
                raise lw.error(node, f"{self.inner!r} returns {len(out)} values: {self!r} takes a tuple of "
                                     f"{len(out)} cotangents, one per value", "pass (c1, c2, ...) as the cotangent")
            part_cts = list(cotangent)
        else:
            part_cts = [cotangent]
        outs, cts = [], []
        for part, ct in zip(parts, part_cts):
            items = part.items if isinstance(part, Vec) else [lw.scalar(part, node)]
            outs += items
            if isinstance(ct, Vec):
                cts += ct.items
            elif isinstance(ct, (list, tuple)):
                cts += list(ct)
            else:  # a scalar cotangent: the same for every component
                cts += [ct] * len(items)
        if len(cts) != len(outs):
            raise lw.error(node, f"{len(cts)} cotangent components for {len(outs)} output components",
                           "pass a cotangent of the output's shape")
        cts = [B.cast(lw.scalar(c, node), o.dtype) for c, o in zip(cts, outs)]
        wrt = []
        for a in args:
            for e in (a.items if isinstance(a, Vec) else [a]):
                if isinstance(e, N.Var) and is_float(e.dtype):
                    wrt.append(e.name)
        dtypes = local_dtypes(stmts)
        for a in args:
            for e in (a.items if isinstance(a, Vec) else [a]):
                if isinstance(e, N.Var):
                    dtypes[e.name] = e.dtype
        new, grads = reverse_block(stmts, lw.names, outs, cts, wrt, dtypes, self.level())
        for s in _named_if_grown(lw, new):
            lw.emit(s)

        def g(e):
            if isinstance(e, N.Var) and e.name in grads:
                return grads[e.name]
            return B.const(0, e.dtype if is_float(e.dtype) else "f32")
        return tuple(a.map(g) if isinstance(a, Vec) else g(a) for a in args)


def _without_dead_code(stmts, out, before):
    """The inner function's block without what neither its result nor an effect needs (opt.dce),
    before it is differentiated: a transform would carry dead code, a while loop's recorded
    trips and checkpoints included, into the derivative, and every later transform of a chain
    along with it (a function returning `a` beside a dead while loop made a 1 MB kernel four
    transforms on). Only locals first named in the block may die (`before`: the names taken
    before it); the caller's, which a ti.template() parameter assigns by reference, stay."""
    from .ir.walk import assigned_names, vars_in
    from .opt.dce import dce

    results = [e for part in (out if isinstance(out, tuple) else (out,))
               for e in (part.items if isinstance(part, Vec) else [part] if isinstance(part, N.Expr) else [])]
    keep = {x.name for e in results for x in vars_in(e)}
    return tuple(dce(tuple(stmts), candidates=assigned_names(stmts) - before, keep=keep))


GROWN = 400  # nodes of an expression written out as a tree ...
SHARED = 6  # ... and how many times its distinct subexpressions: a block worth naming


def _named_if_grown(lw, stmts):
    """stmts, with their repeated subexpressions computed once into temporaries (opt.cse) where
    an expression has grown: written out as a tree, over GROWN nodes and over SHARED times as many
    as it has distinct ones.

    A derivative of a compound expression repeats the expression's parts (the product rule, a
    reverse sweep's adjoint sums over every occurrence of a variable). Kernels get opt.cse after
    every transform; a device transform's block goes into the next transform of a chain as it
    is, and differentiated again and again, unnamed trees grow exponentially: a third derivative
    of `rsqrt(0.5 + (0.7 / (1.5 + a * a)) ** 2)` held a sum 454 terms deep, past Python's
    recursion limit (tests/test_fuzz_funcs.py). Other blocks stay as the transform wrote them:
    the kernel's own optimization names their repeats later, beside the names the transforms
    gave (a PINN's tanh layers, whose second derivative repeats each part about 3 times). The
    temporaries here are d1, d2, ...: the kernel's own t1, t2, ... are numbered afresh after each
    transform, and a t7 beside the adjoint t7_adj2 of another value would read as its own."""
    from .ir.walk import expr_children, expr_children_of_stmt, iter_stmts
    from .opt.cse import CSE

    def grown(e):
        written, distinct, stack = 0, set(), [e]
        while stack:
            x = stack.pop()
            written += 1
            distinct.add(id(x))
            if written > GROWN and written > SHARED * len(distinct):
                return True
            if written > 50 * GROWN:
                return False  # (large, and its parts mostly distinct: no sharing to undo)
            stack.extend(expr_children(x))
        return False
    if not any(grown(e) for s in iter_stmts(stmts) for e in expr_children_of_stmt(s)):
        return stmts
    return tuple(CSE(lw.names, stem="d").block(list(stmts)))


def func(fn):
    """Decorator: a device function, callable from kernels and other device functions."""
    if isinstance(fn, DeviceFunction):
        return fn
    return DeviceFunction(fn)


def as_device_function(fn):
    if isinstance(fn, DeviceFunction):
        return fn
    if getattr(fn, "_is_taichi_function", False):
        from .frontend.calls import unwrap_ti_func
        return DeviceFunction(unwrap_ti_func(fn))
    return None
