"""Divisions by one value share its reciprocal, in derivative code (a last rewrite, for speed).

The chain rule through quotients and roots divides by the same value again and again: the adjoint
of 1/sqrt(r2) + 0.1/r2 is 0.5/r * (1/r/r * g) + 0.1/r2/r2 * g, and its tangent (Hessian-vector
products) divides by r and r2 nine times. A division costs the CPU several multiplications' time
and is not pipelined like them; an n-body pair loop is bound by its divider. So where a block
divides by one value at least twice, it computes `r_inv = 1.0 / r` once and multiplies.

x * (1/y) may differ from x / y in the last bit (and where 1/y itself over- or underflows: |y|
below ~1e-38 or above ~1e38 in f32, which compilers' reciprocal fast-math flag accepts too).
That is harmless in a derivative value and not harmless elsewhere: a recomputed branch must go
the way the primal went, and a primal output must be the primal's number. So only values that
feed derivatives alone are rewritten: never a value that reaches (through any chain of
assignments) a condition, a comparison, an index, a rounding or integer op, a return value, or a
store into a field that is not a derivative field.
"""
from __future__ import annotations

import dataclasses

from ..ir import build as B
from ..ir import nodes as N
from ..ir.ops import BITWISE, CLASSIFY, COMPARE, LOGIC
from ..ir.types import is_float
from ..ir.walk import (assigned_names, blocks_of, expr_children, expr_children_of_stmt, iter_stmts,
                       rebuild_stmt, vars_in)

MIN_USES = 2  # divisions by one value (of one version) in a block before it gets a reciprocal
DISCRETE = COMPARE | LOGIC | BITWISE | CLASSIFY | {"floor", "ceil", "round", "floordiv", "mod"}


def _discrete_vars(e, out):
    """Vars whose exact value e depends on discretely: operands of comparisons, rounding and
    integer ops, select conditions, casts to integers, indices."""
    if isinstance(e, N.Load):
        for i in e.index:
            out.update(v.name for v in vars_in(i))
        return
    if isinstance(e, N.Call):
        if e.op in DISCRETE or (e.op == "cast" and not is_float(e.dtype)):
            for a in e.args:
                out.update(v.name for v in vars_in(a))
            return
        if e.op == "select":
            out.update(v.name for v in vars_in(e.args[0]))
    for c in expr_children(e):
        _discrete_vars(c, out)


def exact_names(body, is_derivative) -> set:
    """Locals whose value must stay bit-exact (see the module docstring; an atomic max or min
    compares what it stores, so its value counts as a condition); by name, over the whole
    kernel, so a name assigned in several places is exact if any use of it needs it."""
    exact, flows = set(), {}
    for s in iter_stmts(body):
        for e in expr_children_of_stmt(s):
            _discrete_vars(e, exact)
        if isinstance(s, (N.If, N.While)):
            exact.update(v.name for v in vars_in(s.cond))
        elif isinstance(s, N.For):
            exact.update(v.name for e in expr_children_of_stmt(s) for v in vars_in(e))
        elif isinstance(s, (N.Return, N.Print)):
            exact.update(v.name for e in expr_children_of_stmt(s) for v in vars_in(e))
        elif isinstance(s, (N.Store, N.Atomic)):
            exact.update(v.name for i in s.index for v in vars_in(i))
            if not is_derivative(s.ref.field) or isinstance(s, N.Atomic) and s.op != "add":
                exact.update(v.name for v in vars_in(s.value))
        elif isinstance(s, N.Assign):
            flows.setdefault(s.name, set()).update(v.name for v in vars_in(s.value))
    todo = list(exact)
    while todo:
        for v in flows.get(todo.pop(), ()):
            if v not in exact:
                exact.add(v)
                todo.append(v)
    return exact


def rewritable(s, exact, is_derivative):
    """s computes a value that only derivatives use (see exact_names)."""
    if isinstance(s, N.Assign):
        return s.name not in exact
    if isinstance(s, N.Store) or isinstance(s, N.Atomic) and s.op == "add":
        return is_derivative(s.ref.field)
    return False  # an atomic max / min compares what it stores


def _divides_by_local(e):
    return e.op == "div" and is_float(e.dtype) and isinstance(e.args[1], N.Var) and e.args[1].dtype == e.dtype


def free_args(e):
    """Positions of e's arguments whose value may change in the last bit: none under comparisons,
    rounding and integer ops, not a select's condition (those operands stay exact)."""
    if e.op in DISCRETE or e.op == "cast" and not is_float(e.dtype):
        return ()
    return range(1, 3) if e.op == "select" else range(len(e.args))


def rewrite_free(e, replacement):
    """e with each call that replacement(call) gives a replacement for (top-down: a replaced call's
    arguments are not looked into) replaced, at the positions where the value may change in the
    last bit (free_args; a guarded select's branches included: evaluated there or not, a value is
    the same one)."""
    if not isinstance(e, N.Call):
        return e
    new = replacement(e)
    if new is not None:
        return new
    args = list(e.args)
    for k in free_args(e):
        args[k] = rewrite_free(e.args[k], replacement)
    if tuple(args) == e.args:
        return e
    return B.cast(args[0], e.dtype) if e.op == "cast" else B.call(e.op, *args)


def _divisions(e, denominator_key, out):
    """(key, dtype) of each float division by a local in e, where it may be rewritten."""
    if not isinstance(e, N.Call):
        return
    if free_args(e) and _divides_by_local(e):
        out.append((denominator_key(e.args[1].name), e.dtype))
    for i in free_args(e):
        _divisions(e.args[i], denominator_key, out)


def _replace(e, inv_of, denominator_key):
    if not isinstance(e, N.Call) or not free_args(e):
        return e
    args = list(e.args)
    for i in free_args(e):
        args[i] = _replace(e.args[i], inv_of, denominator_key)
    args = tuple(args)
    if _divides_by_local(e):
        inv = inv_of.get(denominator_key(e.args[1].name))
        if inv is not None:
            return B.mul(args[0], inv)
    if args == e.args:
        return e
    return B.cast(args[0], e.dtype) if e.op == "cast" else B.call(e.op, *args)


def _assigned_once(body):
    """Locals a block assigns exactly once (and its nested blocks never)."""
    counts = {}
    for x in body:
        if isinstance(x, N.Assign):
            counts[x.name] = counts.get(x.name, 0) + 1
    nested = set().union(*(assigned_names(b) for x in body for b in blocks_of(x)))
    return {n for n, c in counts.items() if c == 1} - nested


def is_reciprocal(e):
    """e is `1.0 / x` (what opt.algebra then reads as x to the power -1, where x is a local)."""
    return isinstance(e, N.Call) and e.op == "div" and B.is_const(e.args[0], 1)


def _plain_reciprocal(s, once):
    return isinstance(s, N.Assign) and s.name in once and is_reciprocal(s.value)


class _Block:
    """Versions of the locals a block assigns, and which local a plain copy `a = b` stands for."""

    def __init__(self):
        self.version, self.alias = {}, {}

    def key(self, name):
        """(local, version) a division by `name` divides by here, looking through copies."""
        while name in self.alias and self.alias[name][1] == self.version.get(name, 0):
            root, root_version = self.alias[name][0]
            if self.version.get(root, 0) != root_version:
                break
            name = root
        return name, self.version.get(name, 0)

    def assigned(self, s):
        names = {s.name} if isinstance(s, N.Assign) else assigned_names((s,))
        for n in names:
            self.version[n] = self.version.get(n, 0) + 1
        if isinstance(s, N.Assign) and isinstance(s.value, N.Var) and s.value.name != s.name:
            self.alias[s.name] = ((s.value.name, self.version.get(s.value.name, 0)), self.version[s.name])


def share_reciprocals(body, names, is_derivative, exact=None):
    """body with repeated divisions by one local in derivative code turned into multiplications by
    one reciprocal per block (names: a NameAllocator; is_derivative(taichi_field) -> bool)."""
    if exact is None:
        exact = exact_names(body, is_derivative)

    def divisions(s, state):
        found = []
        if rewritable(s, exact, is_derivative):
            _divisions(s.value, state.key, found)
        return found

    counts, state = {}, _Block()
    for s in body:
        for k, _ in divisions(s, state):
            counts[k] = counts.get(k, 0) + 1
        state.assigned(s)
    once = _assigned_once(body)
    out, state, inv_of, root_of, square_of = [], _Block(), {}, {}, {}

    def reciprocal(k, dtype, s):
        a = square_of.get(k)
        if a is not None and a not in inv_of and counts.get(a, 0) >= 1:
            reciprocal(a, dtype, s)  # 1 / a, which the block needs too, first: 1 / (a * a) is its square
        inv = names.fresh(f"{k[0]}_inv")
        out.append(N.Assign(inv, _reciprocal(k, dtype, inv_of, root_of, square_of), src=s.src, tag=s.tag))
        inv_of[k] = B.var(inv, dtype)

    for s in body:
        found = divisions(s, state)
        if len(found) == 1 and _plain_reciprocal(s, once) and counts[found[0][0]] >= MIN_USES \
                and found[0][0] not in inv_of:
            inv_of[found[0][0]] = B.var(s.name, found[0][1])  # `t = 1.0 / d` is the reciprocal already
            found = []
        for k, dtype in found:
            if counts[k] >= MIN_USES and k not in inv_of:
                reciprocal(k, dtype, s)
        if found:
            s = dataclasses.replace(s, value=_replace(s.value, inv_of, state.key))
        blocks = blocks_of(s)
        if blocks:
            s = rebuild_stmt(s, [share_reciprocals(b, names, is_derivative, exact) for b in blocks])
        out.append(s)
        state.assigned(s)
        if isinstance(s, N.Assign) and isinstance(s.value, N.Call) and s.name in once:
            if s.value.op == "sqrt" and isinstance(s.value.args[0], N.Var):
                root_of[state.key(s.value.args[0].name)] = state.key(s.name)
            elif _square_of_local(s.value):
                square_of[state.key(s.name)] = state.key(s.value.args[0].name)
    return tuple(out)


def _square_of_local(e):
    """e is `a * a` or `a ** 2` for a local a."""
    a, b = e.args[0], e.args[-1]
    if not isinstance(a, N.Var):
        return False
    return (e.op == "mul" and b == a) or (e.op == "pow" and isinstance(b, N.Const) and b.value == 2)


def _reciprocal(k, dtype, inv_of, root_of, square_of):
    """1 / k, as the square of 1 / sqrt(k) where the block has that already (`r2_inv = t4_inv *
    t4_inv` beside `t4 = ti.sqrt(r2)`, `t4_inv = 1.0 / t4`), or of 1 / a where k is `a * a`
    (`r2 = r * r` or `r ** 2` beside `r_inv`, as in `1.0 / r + 0.1 / (r * r)`): one division fewer, and the
    divider is what a pair loop's derivatives wait on (W3's HVP 6%, its reverse 2%). Within
    about 2 ulp of the division, which derivative values allow (the module docstring)."""
    root = inv_of.get(root_of.get(k)) or inv_of.get(square_of.get(k))
    if root is not None and root.dtype == dtype:
        return B.mul(root, root)
    return B.div(B.const(1, dtype), B.var(k[0], dtype))
