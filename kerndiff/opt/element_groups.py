"""Four elements per pass of an elementwise loop whose sines and cosines come from sincos (CPU).

Why: Taichi's CPU backend compiles for generic x86-64 (SSE2) and runs a parallel loop's body once
per index; LLVM's SLP vectorizer packs what one basic block computes alike, and codegen.cpu_math's
`sincos` branches on |x| < 120, so one element's polynomials are all it can pack. With four
elements per pass and one branch for the four (`sincos4`), it packs their conversions, polynomial
steps, quadrant selects and the f32 arithmetic and loads around them across elements. W1's
reverse (`sum(sin(x) * exp(y))`, 1e7 elements, in one process, minima of 25 rounds): 31.3-32.2 ms
as generated before, 27.1-27.4 ms with two elements per pass, 24.8-24.9 ms with four.

What: a parallel loop over one index with constant bounds, whose body is straight-line code
(assignments, stores and atomic adds: no branches or inner loops; no adds into a primal field,
below) and takes a sincos pair (opt.cpu_math), becomes a loop over groups of four consecutive
indices `i, i_1, i_2, i_3`: the body's statements for the four elements one after another (each
copy's locals renamed), with each sincos pair of the four one call (`s, c, s_1, c_1, ... =
sincos4(x[i], x[i_1], ...)`), and, where the count is not a multiple of four, a loop over the
last one to three indices with the body as it was.

Why it is exact: a parallel loop's iterations are independent (Taichi runs them in any order,
several on one thread), so running four on one thread, statement by statement, is a schedule
Taichi may use anyway; locals are per copy. Each element's sine and cosine are computed as by
`sincos`, except that where any of the four is outside sincos's range (|x| >= 120, infinities,
NaN) all four take libm's: within one ulp either way, and only values that feed derivatives
alone are computed by sincos at all (opt.cpu_math).

Exponentials. In a loop grouped so, each local assigned an f32 exponential whose value feeds
derivatives alone (`t1 = ti.exp(y[i])`, opt.cpu_math.free_exps) takes the four elements' from one
codegen.cpu_math.exp4 (`t1, t1_1, t1_2, t1_3 = exp4(y[i], y[i_1], ...)`): straight double-precision
arithmetic that LLVM packs across the four, where libm's expf is one call per element. Within
0.501 ulp (libm's: 0.502), so its values are not libm's bits, and an exponential that a primal
output, a condition or an index reads stays ti.exp. W1's reverse, 1e7 elements, one process,
alternating processes of the code before and after: 35.3-38.4 ms before, 34.2-35.4 after (Taichi's
grad 42-46 ms on this machine in this phase: 0.84-0.87 -> 0.78-0.79 of it). Loops with
exponentials but no sines or cosines keep one element per pass: the reverse of a softplus sum
(`loss[None] += ti.log(1.0 + ti.exp(x[i]))`, 1e7 elements) ran 18.2-18.5 ms grouped by hand
against 18.6-18.9 as generated, bound by its division and memory, not by expf.

Sines or cosines alone. Such a loop that takes the sine of a value but not its cosine (or the
reverse), where the value feeds derivatives alone, takes it from sincos4 too, the partner unread
(opt.cpu_math.with_lone_pairs): four from one call cost less than four libm calls. The reverse of
`y[i] = ti.sin(x[i])` over 1e7 elements: 12.8 ms against 49.9 as one cosine per element; its
forward (y's sine stays libm's, its tangent's cosine is paired): 47.2 against 56.0 ms, the
primal's speed (hand-written kernels in one process, minima of 15 rounds). Only in loops of up to
LONE_PAIRS_UP_TO statements: a long body, four times over, costs Taichi's compiler more than the
calls gain (the PINN demo's residual, whose reverse recomputes the forcing term's two sines, has
hundreds); and not in the last one to three elements, which run as written.

Not grouped: a loop that adds into a field that is not a derivative field (a forward kernel's
primal sum, `loss[None] += ...`). Taichi sums per thread, and four elements per pass split the sum
into other partial sums than the primal's, so the sum would differ from the primal's in its last
bits; a forward kernel's primal outputs keep the primal's bits (opt.cpu_math). W1's forward
(`loss[None] += ti.sin(x[i]) * ti.exp(y[i])`) is one: grouped, it would run 58.4 against 65.6 ms.
"""
from __future__ import annotations

import dataclasses

from ..errors import SrcLoc
from ..ir import build as B
from ..ir import nodes as N
from ..ir.walk import renamed, vars_in
from .cpu_math import free_exps, pairing_context, takes_exp, takes_sin_or_cos, with_lone_pairs

GROUP = 4
LONE_PAIRS_UP_TO = 24  # statements in the loop's body: beyond, four copies cost compile time (a PINN's residual)
PAIR = ("sincos_sin", "sincos_cos")
GROUPED = {"sincos_sin": "sincos4_sin", "sincos_cos": "sincos4_cos"}  # codegen emits the eight as one call


def group_elements(ir: N.KernelIR, names, is_derivative) -> N.KernelIR:
    """ir with each top-level loop that qualifies (see the module docstring) run four elements
    per pass (names: the allocator for the new locals; is_derivative: the test for derivative
    fields). A sine or cosine without its partner that feeds derivatives alone is paired here
    (opt.cpu_math.with_lone_pairs), in the loops to be grouped only."""
    out, context = [], None
    for s in ir.body:
        if not _groupable(s, is_derivative):
            out.append(s)
            continue
        grouped = s
        if not _has_pair(s.body) and len(s.body) <= LONE_PAIRS_UP_TO and takes_sin_or_cos(s.body):
            context = context or pairing_context(ir, names, is_derivative)
            grouped = dataclasses.replace(s, body=with_lone_pairs(s.body, context))
        if not _has_pair(grouped.body):
            out.append(s)
            continue
        exps = set()
        if takes_exp(grouped.body):
            context = context or pairing_context(ir, names, is_derivative)
            exps = free_exps(grouped.body, context)
        out.extend(_grouped(grouped, names, tail=s, exps=exps))
    return dataclasses.replace(ir, body=tuple(out))


def _has_pair(body):
    return any(_is_pair(body, k) for k in range(len(body)))


def _groupable(s, is_derivative):
    """s is a loop whose iterations may run four per pass (the module docstring, but for the pair)."""
    if not (isinstance(s, N.For) and s.parallel and not s.serialize and len(s.vars) == 1):
        return False
    (lo, hi), = s.bounds
    if not (isinstance(lo, N.Const) and isinstance(hi, N.Const) and hi.value - lo.value >= GROUP):
        return False
    if not all(isinstance(t, (N.Assign, N.Store, N.Atomic)) for t in s.body):
        return False
    if any(isinstance(t, N.Atomic) and not is_derivative(t.ref.field) for t in s.body):
        return False  # a sum a forward kernel returns: Taichi would split it into other partial sums
    if any(isinstance(t, N.Assign) and t.name == s.vars[0] for t in s.body):
        return False
    # every local the body assigns is assigned before the body reads it (its own, per element)
    own, assigned = {t.name for t in s.body if isinstance(t, N.Assign)}, set()
    for t in s.body:
        if {v.name for e in _exprs(t) for v in vars_in(e)} & (own - assigned):
            return False
        if isinstance(t, N.Assign):
            assigned.add(t.name)
    return True


def _exprs(t):
    return (t.value,) if isinstance(t, N.Assign) else tuple(t.index) + (t.value,)


def _is_pair(body, k):
    a = body[k]
    b = body[k + 1] if k + 1 < len(body) else None
    return (isinstance(a, N.Assign) and isinstance(a.value, N.Call) and a.value.op == PAIR[0]
            and isinstance(b, N.Assign) and isinstance(b.value, N.Call) and b.value.op == PAIR[1]
            and b.value.args == a.value.args)


def _grouped(loop, names, tail, exps):
    """loop four elements per pass, and the last one to three elements by `tail` (the loop as it
    was before any lone pairs); exps: the positions of the body's exponentials to take from exp4."""
    var = loop.vars[0]
    (lo, hi), = loop.bounds
    lo_v, hi_v = int(lo.value), int(hi.value)
    groups = (hi_v - lo_v) // GROUP
    group = names.fresh(f"{var}_group")
    index = [var] + [names.fresh(var) for _ in range(1, GROUP)]
    assigned = [t.name for t in loop.body if isinstance(t, N.Assign)]
    copies = [{}] + [dict({n: names.fresh(n) for n in dict.fromkeys(assigned)}, **{var: index[k]})
                     for k in range(1, GROUP)]

    def copy(t, k):
        return _renamed_stmt(t, copies[k]) if k else t

    note = SrcLoc(loop.src.file if loop.src else "<kerndiff>", loop.src.line if loop.src else 0,
                  text=f"{GROUP} elements per pass ({', '.join(index)}): "
                  + ("sines, cosines and exponentials four to a call" if exps else "their sines and cosines from one call"))
    i32 = "i32"
    first = B.add(B.mul(B.var(group, i32), B.const(GROUP, i32)), B.const(lo_v, i32)) if lo_v \
        else B.mul(B.var(group, i32), B.const(GROUP, i32))
    body = [N.Assign(var, first, src=note)]
    body += [N.Assign(index[k], B.add(B.var(var, i32), B.const(k, i32)), src=note) for k in range(1, GROUP)]
    k = 0
    while k < len(loop.body):
        if _is_pair(loop.body, k):
            sin_s, cos_s = loop.body[k], loop.body[k + 1]
            args = tuple(copy(sin_s, c).value.args[0] for c in range(GROUP))
            for c in range(GROUP):
                for t in (sin_s, cos_s):
                    name = copy(t, c).name
                    body.append(N.Assign(name, N.Call(t.value.dtype, GROUPED[t.value.op], args + (B.const(c, i32),)),
                                         src=t.src, tag=t.tag))
            k += 2
        elif k in exps:
            t = loop.body[k]
            args = tuple(copy(t, c).value.args[0] for c in range(GROUP))
            body += [N.Assign(copy(t, c).name, N.Call(t.value.dtype, "exp4", args + (B.const(c, i32),)),
                              src=t.src, tag=t.tag) for c in range(GROUP)]
            k += 1
        else:
            body += [copy(loop.body[k], c) for c in range(GROUP)]
            k += 1
    out = [N.For((group,), ((B.const(0, i32), B.const(groups, i32)),), tuple(body), parallel=True,
                 config=loop.config, src=loop.src, tag=loop.tag)]
    if lo_v + groups * GROUP < hi_v:  # the last one to three elements, as the loop was
        out.append(dataclasses.replace(tail, bounds=((B.const(lo_v + groups * GROUP, i32), hi),)))
    return out


def _renamed_stmt(t, names):
    """t with the locals in `names` (old -> new) renamed, the one it assigns too."""
    if isinstance(t, N.Assign):
        return dataclasses.replace(t, name=names.get(t.name, t.name), value=renamed(t.value, names))
    return dataclasses.replace(t, index=tuple(renamed(e, names) for e in t.index), value=renamed(t.value, names))
