"""Forward mode: IR -> IR computing primal values and their tangents (duals) side by side.

Every local that depends on an active input gets a tangent local assigned next to it (before it,
so `v = v * x` reads the old v); every store into a field also stores its tangent into the
field's dual of this level. A tangent that is structurally zero is `None` and emits nothing.
"""
from __future__ import annotations

import dataclasses

from ..ir import build as B
from ..ir import nodes as N
from ..ir.types import is_float
from .piecewise_zeros import is_piecewise, is_steep, piecewise_locals
from .rules import NO_DERIVATIVE, count_derivative, guards_a_singularity, partials, zero_safe_jvp
from .activity import check_function_body, field_activity, varied_vars


def squared_bases(e):
    """[x, y, ...] where e is x * x + y * y + ... (a norm's square, as vec.norm_sqr builds it),
    else None."""
    if isinstance(e, N.Call) and e.op == "add":
        left, right = squared_bases(e.args[0]), squared_bases(e.args[1])
        return None if left is None or right is None else left + right
    if isinstance(e, N.Call) and e.op == "mul" and e.args[0] == e.args[1]:
        return [e.args[0]]
    return None


class Forward:
    def __init__(self, names, dual_of_field, tangent_names=None, loaded_dual=None):
        self.names = names                # NameAllocator shared with the IR being transformed
        self.dual_of_field = dual_of_field  # FieldRef -> FieldRef of its dual, or None (constant)
        # FieldRef -> the field a load's tangent reads; dual_of_field unless told otherwise
        self.loaded_dual = loaded_dual or dual_of_field
        self.tan = dict(tangent_names or {})  # local name -> tangent local name
        self.minmax_mode = None  # atomic max/min: None, or 'primal' / 'tangent' pass (minmax.py)
        # piecewise_zeros.piecewise_locals of the code: a singular op's partial multiplies the
        # tangent of an argument holding a min/max/abs/select (or one of these) with mul_or_zero
        self.piecewise = frozenset()
        # a norm's tangent is 0 where no component moves (_norm_tangent). Off over a reverse
        # kernel (k.reverse.forward): there the reverse's own r / |r| is already NaN at r = 0, and
        # the guard would hide the tangent from opt.algebra's collection of like terms
        self.guard_norms = True

    # ----------------------------------------------------------- expressions
    def jvp(self, e: N.Expr, memo=None):
        """The tangent of e, or None where it is structurally zero."""
        memo = {} if memo is None else memo
        key = id(e)
        if key in memo:
            return memo[key][1]
        out = self._jvp(e, memo)
        memo[key] = (e, out)  # keep e alive so its id stays unique
        return out

    def _jvp(self, e, memo):
        if not is_float(e.dtype):
            return None
        if isinstance(e, N.Const):
            return None
        if isinstance(e, N.Var):
            t = self.tan.get(e.name)
            return None if t is None else B.var(t, e.dtype)
        if isinstance(e, N.Load):
            d = self.loaded_dual(e.ref)
            return None if d is None else B.load(d, e.index)
        if e.op in NO_DERIVATIVE:
            return None
        if e.op == "cast":
            t = self.jvp(e.args[0], memo)
            return None if t is None else B.cast(t, e.dtype)
        tangents = [self.jvp(a, memo) for a in e.args]
        if all(t is None for t in tangents):
            return None
        if e.op == "mul_or_zero":
            return B.sum_of(zero_safe_jvp(*e.args, *tangents), e.dtype)
        if guards_a_singularity(e):  # the tangent of the branch taken (the other's may be NaN there)
            zero = B.const(0, e.dtype)
            return B.select(e.args[0], zero if tangents[1] is None else tangents[1],
                            zero if tangents[2] is None else tangents[2])
        ps = partials(e.op, e.args, e)
        zero_safe = is_steep(e)
        terms = [B.call("mul_or_zero", t, p) if zero_safe and is_piecewise(a, self.piecewise) else B.mul(p, t)
                 for a, p, t in zip(e.args, ps, tangents) if t is not None and p is not None]
        tangent = B.sum_of(terms, e.dtype)
        if e.op == "sqrt" and self.guard_norms:
            return self._norm_tangent(e, tangent, memo)
        return tangent

    def _norm_tangent(self, e, tangent, memo):
        """A norm's tangent, (r · ṙ) / |r|, is 0 / 0 at r = 0 even where nothing moves r (two bodies
        at rest, `(v_a - v_b).norm()`, seeded along a weight that reaches them only later). Where
        every component's tangent is zero the norm does not move: its tangent is 0 there, exactly;
        where some component moves at r = 0 it stays NaN, as the norm has no derivative there (and
        its reverse says NaN too). `e` is sqrt of a sum of squares; other roots keep `tangent`."""
        bases = squared_bases(e.args[0])
        if bases is None:
            return tangent
        moving = [t for t in (self.jvp(x, memo) for x in bases) if t is not None]
        still = None
        for t in moving:
            zero = B.call("eq", t, B.const(0, t.dtype))
            still = zero if still is None else B.call("and", still, zero)
        return tangent if still is None else B.select(still, B.const(0, e.dtype), tangent)

    # ----------------------------------------------------------- statements
    def block(self, stmts):
        out = []
        for s in stmts:
            out.extend(self.stmt(s))
        return tuple(out)

    def stmt(self, s):
        tag = dict(src=s.src, tag="tangent")
        if isinstance(s, N.Assign):
            t = self.tan.get(s.name)
            if t is None:
                return [s]
            dt = self.jvp(s.value)
            return [N.Assign(t, dt if dt is not None else B.const(0, s.value.dtype), **tag), s]
        if isinstance(s, N.Store):
            d = self.dual_of_field(s.ref)
            if d is None:
                return [s]
            dt = self.jvp(s.value)
            return [N.Store(d, s.index, dt if dt is not None else B.const(0, d.dtype), **tag), s]
        if isinstance(s, N.Atomic):
            d = self.dual_of_field(s.ref)
            if d is None:
                return [s]
            if s.op != "add":
                return self.atomic_minmax(s, d)
            dt = self.jvp(s.value)
            return [s] if dt is None else [N.Atomic("add", d, s.index, dt, **tag), s]
        if isinstance(s, N.For) and s.parallel and getattr(self, "minmax_mode", None) is None:
            from .minmax import forward_loop, minmax_atomics
            targets = minmax_atomics(s.body, lambda ref: self.dual_of_field(ref) is not None)
            if targets:
                return forward_loop(self, s, targets)
        if isinstance(s, (N.If, N.For, N.While)):
            from ..ir.walk import blocks_of, rebuild_stmt
            return [rebuild_stmt(s, [self.block(b) for b in blocks_of(s)])]
        if isinstance(s, N.Return):
            ts = []
            for v in s.values:
                t = self.jvp(v)
                ts.append(t if t is not None else B.const(0, v.dtype))
            return [dataclasses.replace(s, values=tuple(s.values) + tuple(ts))]
        return [s]

    def atomic_minmax(self, s, d):
        from .minmax import forward_atomic_minmax
        return forward_atomic_minmax(self, s, d)


def forward_kernel(ir: N.KernelIR, level: int, loaded_dual=None, guard_norms=True) -> N.KernelIR:
    """The forward-mode (JVP) kernel of `ir` at derivative level `level`. loaded_dual: which
    field a load's tangent reads, given the field it loads (default: its dual of this level).
    guard_norms: see Forward.guard_norms."""
    from .names import NameAllocator, tangent_var

    ir = dataclasses.replace(ir, body=count_derivative(ir.body))
    dual_of_field = field_activity(ir, "dual", level)
    names = NameAllocator.for_kernel(ir)
    varied = varied_vars(ir.body, lambda ref: dual_of_field(ref) is not None, seeds=())
    # named as the fields' tangents of this level are (s_dual2 beside h1_dual2, s_dual_dual2)
    tangent_names = {v: names.fresh(tangent_var(v, level)) for v in sorted(varied)}
    fwd = Forward(names, dual_of_field, tangent_names,
                  None if loaded_dual is None else loaded_dual(dual_of_field))
    fwd.piecewise = piecewise_locals(ir.body)
    fwd.guard_norms = guard_norms
    body = fwd.block(ir.body)
    returns = tuple(ir.returns) + tuple(ir.returns)
    return dataclasses.replace(ir, name=f"{ir.name}_fwd", body=body, returns=returns)


def forward_block(stmts, names, seeds: dict, level: int = 1):
    """Differentiate local code (a device function's body) with respect to seeded locals.

    seeds: local name -> tangent expression. Fields are constants here. level: which forward
    transform of a chain this is (the tangents' names: s_dual, s_dual2). Returns the new statements
    and a function mapping an expression of the original code to its tangent (or None).
    """
    from .names import tangent_var

    check_function_body(stmts)
    stmts = count_derivative(stmts)
    varied = varied_vars(stmts, lambda ref: False, seeds=tuple(seeds))
    tangent_names = {v: names.fresh(tangent_var(v, level)) for v in sorted(varied)}
    fwd = Forward(names, lambda ref: None, tangent_names)
    fwd.piecewise = piecewise_locals(stmts)
    pre = [N.Assign(tangent_names[v], e) for v, e in seeds.items()]
    return tuple(pre) + fwd.block(stmts), fwd.jvp
