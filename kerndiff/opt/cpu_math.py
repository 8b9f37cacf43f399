"""kerndiff's own f32 math in derived kernels on the CPU (for speed only; codegen.cpu_math).

Sine and cosine together. The derivative of sin is cos of the same argument (and of cos, -sin),
so the reverse kernels of code that calls ti.sin or ti.cos need both. Taichi's CPU backend calls
libm's sinf and cosf for them: two range reductions, two polynomials, and a branch on |x| < pi/4
in each that the CPU mispredicts when the values straddle it. One call of codegen.cpu_math.sincos
gives both for about the cost of sinf alone (W1's reverse, `sum(sin(x) * exp(y))`, in one
process: 1.0-1.1x Taichi's grad before, 0.74-0.76x after). In a block, when the block's own
statements take sin(e) and cos(e) of one f32 expression e, with no statement between them writing
a local or field e reads, both are computed once before the first, as two locals (`sin_x, cos_x =
sincos(x[i])`), and read from there; a local that holds just one of them and is assigned once
becomes that local.

tanh. Taichi's ti.tanh on the CPU is glibc's tanhf, 6-9 times the cost of ti.exp; reverse kernels
recompute tanh for its derivative 1 - tanh^2 (a tanh network's every layer), and
codegen.cpu_math.tanh_via_exp gives it from one exp, 3.3x faster and closer to the exact value.

Only where the value may change in the last bit: these are within 0.82 ulp, not libm's bits, so,
as for shared reciprocals (opt.reciprocal), only values that feed derivatives alone are computed
so; one that reaches a condition, an index, a rounding, or a primal output (the value a forward
kernel also returns) keeps libm's call. Nor does a sine or cosine in a branch of a guarded select
(`a if c else b`, whose unchosen branch must not be evaluated) start a pair.

When: derived kernels on Taichi's CPU backends, f32 only (f64 keeps libm's functions, which these
double-precision steps could not match). Primal kernels keep the user's calls. GPU backends have
fast sin, cos and tanh of their own.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

from ..ir import build as B
from ..ir import nodes as N
from ..ir.walk import (blocks_of, expr_children_of_stmt, guarded_select, iter_expr, iter_stmts, loads_in, map_stmts,
                       mentions, rebuild_stmt, vars_in, writes_of)
from .reciprocal import exact_names, free_args, rewritable, rewrite_free

PAIR_OPS = {"sin": "sincos_sin", "cos": "sincos_cos"}
REPLACED = {"tanh": "tanh_via_exp"}
DTYPES = {"f32"}  # what codegen.cpu_math's functions take (tests/test_fuzz.py widens it, with stand-ins)


def _ours(call):
    """call is a function codegen.cpu_math has a version of, on its dtype."""
    return call.dtype in DTYPES and call.args[0].dtype == call.dtype


def use_cpu_math(ir: N.KernelIR, names, is_derivative) -> N.KernelIR:
    """ir with sin(e) and cos(e) of each f32 e that a block takes both of computed together, and
    f32 tanh from codegen.cpu_math, where the values feed derivatives alone (names: the
    allocator for the new locals; is_derivative: the test for derivative fields)."""
    if not any(isinstance(x, N.Call) and (x.op in PAIR_OPS or x.op in REPLACED)
               for s in iter_stmts(ir.body) for e in expr_children_of_stmt(s) for x in iter_expr(e)):
        return ir  # most kernels: nothing to look at (and exact_names costs a pass over the kernel)
    context = pairing_context(ir, names, is_derivative)
    body = _pair_block(ir.body, context)
    return dataclasses.replace(ir, body=map_stmts(body, lambda s: _with_replacements(s, context)))


def pairing_context(ir: N.KernelIR, names, is_derivative) -> "_Context":
    """What pairing needs to know of the whole kernel (a pass over it)."""
    once = Counter(s.name for s in iter_stmts(ir.body) if isinstance(s, N.Assign))
    return _Context(names, {name for name, count in once.items() if count == 1},
                    exact_names(ir.body, is_derivative), is_derivative)


def takes_sin_or_cos(stmts) -> bool:
    """Some statement of stmts (straight-line code) takes an f32 sine or cosine that could be paired."""
    return any(isinstance(x, N.Call) and x.op in PAIR_OPS and _ours(x)
               for s in stmts for e in expr_children_of_stmt(s) for x in iter_expr(e))


def takes_exp(stmts) -> bool:
    """Some statement of stmts assigns an f32 exponential to a local (`t1 = ti.exp(y[i])`)."""
    return any(_exp_assignment(s) for s in stmts)


def free_exps(stmts, context) -> set:
    """The positions in stmts of the assignments of an f32 exponential whose values feed
    derivatives alone (opt.element_groups computes four of them from one codegen.cpu_math.exp4)."""
    return {k for k, s in enumerate(stmts) if _exp_assignment(s) and context.free(s)}


def _exp_assignment(s):
    return isinstance(s, N.Assign) and isinstance(s.value, N.Call) and s.value.op == "exp" and _ours(s.value)


def with_lone_pairs(stmts, context) -> tuple:
    """stmts (the straight-line body of a loop that opt.element_groups runs four elements per pass)
    with each sine or cosine that feeds derivatives alone and has no partner computed by a pair all
    the same, its partner unread. Why: four elements' pairs from one sincos4 cost less than four
    libm calls of the one function (the reverse of `y[i] = ti.sin(x[i])`, 1e7 elements: 12.8 against
    49.9 ms; its forward, whose sine stays libm's for y, 47.2 against 56.0 ms). Only there: alone,
    a pair costs more than the one function (W1's forward with `sincos` for its cosine: 72 against
    66 ms)."""
    stmts, i = list(stmts), 0
    while i < len(stmts):
        calls = _calls(stmts[i], context)
        if not calls:
            i += 1
            continue
        arg = calls[0][1]
        end = _extent(stmts, i, arg)
        stmts[i:end] = _paired(stmts[i:end], arg, context)
        i += 2
    return tuple(stmts)


def _extent(stmts, i, arg):
    """The end of the run of statements from stmts[i] that do not change arg before the last of
    them is evaluated."""
    read_names, read_fields = {v.name for v in vars_in(arg)}, {id(x.ref.field) for x in loads_in(arg)}
    end = i + 1
    while end < len(stmts):
        names, fields = writes_of(stmts[end - 1])
        if names & read_names or fields & read_fields:
            break
        end += 1
    return end


def _with_replacements(s, context):
    if _value(s, context) is None:
        return s
    return dataclasses.replace(s, value=rewrite_free(s.value, _replacement))


def _replacement(call):
    if call.op in REPLACED and _ours(call):
        return N.Call(call.dtype, REPLACED[call.op], call.args)
    return None


@dataclasses.dataclass
class _Context:
    names: object  # NameAllocator
    once: set      # locals assigned once in the kernel
    exact: set     # locals whose values must keep their bits (opt.reciprocal.exact_names)
    is_derivative: object

    def free(self, s):
        """s computes a value that feeds derivatives alone (opt.reciprocal.rewritable)."""
        return rewritable(s, self.exact, self.is_derivative)


def _pair_block(stmts, context):
    stmts = [rebuild_stmt(s, [_pair_block(b, context) for b in blocks_of(s)]) if blocks_of(s) else s
             for s in stmts]
    i = 0
    while i < len(stmts):
        paired = _first_pair(stmts, i, context)
        if paired is None:
            i += 1
            continue
        arg, end = paired
        stmts[i:end] = _paired(stmts[i:end], arg, context)
        i += 2  # past the pair's assignments: the statements that read them may start pairs of their own
    return tuple(stmts)


def _first_pair(stmts, i, context):
    """(e, end) for the first e that stmts[i] takes the sine or cosine of and that stmts[i:end]
    (which does not change e before its last statement is evaluated) takes both of; else None."""
    for op, arg in _calls(stmts[i], context):
        wanted, end = {"sin", "cos"} - {op}, i + 1
        read_names, read_fields = {v.name for v in vars_in(arg)}, {id(x.ref.field) for x in loads_in(arg)}
        while True:
            wanted -= {o for o, a in _calls(stmts[end - 1], context) if a == arg}
            names, fields = writes_of(stmts[end - 1])
            if not wanted or end == len(stmts) or names & read_names or fields & read_fields:
                break
            end += 1
        if not wanted:
            return arg, end
    return None


def _value(s, context):
    """The expression of s whose sines and cosines may be paired: the value of an assignment,
    store or add that feeds derivatives alone."""
    if isinstance(s, (N.Assign, N.Store, N.Atomic)) and context.free(s):
        return s.value
    return None


def _calls(s, context):
    """(op, argument) of each f32 sin and cos in s's value that may be paired, where it runs."""
    out, stack = [], [_value(s, context)] if _value(s, context) is not None else []
    while stack:
        x = stack.pop()
        if not isinstance(x, N.Call):
            continue
        if x.op in PAIR_OPS and _ours(x):
            out.append((x.op, x.args[0]))
        stack.extend(x.args[k] for k in (() if guarded_select(x) else free_args(x)))
    return out


def _paired(stmts, arg, context):
    """stmts with the pair computed before them and read in their place. A local assigned once,
    that holds just the sine or the cosine (`t2 = ti.sin(x[i])`) and is not read before that,
    becomes the pair's own local, not a copy of it."""
    base = arg.name if isinstance(arg, N.Var) else arg.ref.name if isinstance(arg, N.Load) else "t"
    local, holders, reads = {}, set(), {v.name for v in vars_in(arg)}
    for op in ("sin", "cos"):
        for k, s in enumerate(stmts):
            if isinstance(s, N.Assign) and context.free(s) and s.value == N.Call(arg.dtype, op, (arg,)) \
                    and s.name in context.once - reads and not any(mentions(t, s.name) for t in stmts[:k]):
                local[op] = B.var(s.name, arg.dtype)
                holders.add(k)
                break
        else:
            local[op] = B.var(context.names.fresh(f"{op}_{base}"), arg.dtype)
    first = stmts[0]
    pair = [N.Assign(local[op].name, N.Call(arg.dtype, PAIR_OPS[op], (arg,)), src=first.src, tag=first.tag)
            for op in ("sin", "cos")]

    def read_pair(call):
        return local[call.op] if call.op in PAIR_OPS and call.args == (arg,) else None

    rest = [dataclasses.replace(s, value=rewrite_free(s.value, read_pair)) if _value(s, context) is not None else s
            for k, s in enumerate(stmts) if k not in holders]
    return pair + rest
