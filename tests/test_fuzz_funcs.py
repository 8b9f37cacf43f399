"""Fuzzing device functions and their transforms (API.md §3): hypothesis draws a `@kd.func f(a, b)`
— expressions over every differentiable op, a branch reassigning a local (with or without an
else), an early `return` under a branch, an inner loop carrying a local (with a conditional
`break`, or a while loop), vector locals (`ti.Vector([...])`, `.norm()`, `.dot`), a `ti.func` or
`kd.func` helper it calls — and a chain of one or two transforms over it, each `kd.forward(g,
argnum)` or `kd.grad(g, argnum)` of the one before. Each is checked:

- f's values against Taichi's own, from the same body as a `ti.func` (an early return, which
  Taichi 1.7.4 refuses in a non-static if, written there as an if/else);
- each transform in the chain against central finite differences (f64) of the one before it,
  evaluated through kernels (so a second derivative is checked against differences of the
  checked first one, never against nested differences);
- `kd.jvp`, `kd.vjp` and `kd.grad` (every argument) of the chain's last function against those
  differences too;
- f's Hessian through transforms of kd.grad's tuple, `kd.forward(kd.grad(f), argnum=0)` and
  `kd.vjp(kd.grad(f))(a, b, (0.3, -0.7))`, against differences of kd.grad(f);
- the kernel that calls the chain's last function, itself differentiated: its k.forward and
  k.reverse against finite differences of the kernel (harness.check), so derivative code that
  device transforms emitted goes through the kernel transforms again (order up to three; these
  last two checks only up to order two where f has a loop).

Chains stop at two: with a loop in f, orders three and up grow large (each reverse of a loop
recomputes it inside its adjoint loop, with checkpoint code for trip counts it cannot bound, and
the next transform differentiates all of it: an order-three kernel of a 2-trip loop spent minutes
in kerndiff's optimizer, an order-four one was a megabyte of source). Taichi 1.7.4's IR verifier
(`block->parent != current_container_stmt`) refuses about one order-three kernel in 300 of valid
generated source; since session 35 kerndiff compiles such a kernel again without Taichi's
cfg_optimization pass (codegen/load.py), and those draws are checked like the rest (until then
they were recorded, not failures). test_funcs.py checks chains of four on straight-line code.

It found (session 33): the reverse of a device function ran its while loop's forward sweep
without counting trips (the backward sweep replayed none: a silently wrong kd.grad); a second
reverse reading, after an `if`, a local only one branch of it had defined (the first
reverse's recompute `if` and adjoint `if`), as its value from before a loop; and a third
derivative whose unnamed expressions nested past Python's recursion limit.

test_funcs.py holds the hand-written cases; this module draws the meetings of constructs.
Profiles as in test_fuzz.py: short by default (derandomized under CI=true), KERNDIFF_FUZZ=long.
"""
import os
import random
import tempfile

import numpy as np
import pytest
import taichi as ti
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import kerndiff as kd
from harness import check, load_module, runs_recorder, signature, skip_unless_all_ran_before
from test_fuzz import BINARY, UNARY

POINTS = 4
LONG = os.environ.get("KERNDIFF_FUZZ") == "long"
PROFILE = settings(max_examples=int(os.environ.get("KERNDIFF_FUZZ_N", 10000)) if LONG else 10, deadline=None,
                   derandomize=os.environ.get("CI") == "true" and not LONG, suppress_health_check=list(HealthCheck))
_tmp = tempfile.mkdtemp(prefix="kerndiff_fuzz_funcs_")


@pytest.fixture(scope="module")
def fields():
    ti.init(arch=ti.cpu, default_fp=ti.f64)
    made = {name: ti.field(ti.f64, shape=POINTS) for name in ("pa", "pb", "o0", "o1", "o2", "o3")}
    for name in ("pa", "pb"):  # (the kernel transforms differentiate with respect to these)
        kd.dual(made[name])
        kd.adjoint(made[name])
    yield made
    ti.reset()


def expression(rand, depth, leaves):
    if depth == 0 or rand.random() < 0.3:
        return rand.choice(leaves)
    if rand.random() < 0.45:
        return UNARY[rand.choice(sorted(UNARY))].format(expression(rand, depth - 1, leaves))
    return BINARY[rand.choice(sorted(BINARY))].format(expression(rand, depth - 1, leaves),
                                                      expression(rand, depth - 1, leaves))


def function_body(rand):
    """(kerndiff's lines, Taichi's lines) of f(a, b)'s body: the same function, but for an early
    return, which Taichi's version holds as an if/else around the rest."""
    leaves = ["a", "b", "0.7"]
    lines = [f"t = {expression(rand, 2, leaves)}"]
    leaves.append("t")
    if rand.random() < 0.5:
        lines += [f"if {expression(rand, 1, leaves)} > 0.1:", f"    t = {expression(rand, 2, leaves)}"]
        if rand.random() < 0.5:
            lines += ["else:", f"    t = {expression(rand, 2, leaves)}"]
    if rand.random() < 0.3:  # vector locals
        lines += [f"p = ti.Vector([{expression(rand, 1, leaves)}, {expression(rand, 1, leaves)}])",
                  rand.choice(["t = (p + 0.25).norm() * t", "t = p.dot(ti.Vector([0.3, -0.2])) + t",
                               "t = (p * t).norm_sqr()", "t = p[1] - p[0] * t"])]
    if rand.random() < 0.4:
        call = rand.choice(["helper", "kd_helper"])
        lines.append(f"t = {call}({expression(rand, 1, leaves)}, {rand.choice(leaves)})")
    early = None
    if rand.random() < 0.25:
        early = (f"{expression(rand, 1, leaves)} > 0.4", expression(rand, 2, leaves))
    rest = []
    if rand.random() < 0.5:
        trips = rand.randint(1, 4)
        rest.append("acc = 0.5")
        step = f"acc = 0.5 * acc + ti.tanh({expression(rand, 2, leaves + ['acc'])})"
        kind = rand.choice(["for", "for", "break", "while"])
        if kind == "while":
            rest += ["k = 0", f"while k < {trips} and {expression(rand, 1, leaves + ['acc'])} < 1.5:",
                     f"    {step}", "    k += 1"]
        else:
            rest += [f"for k in range({trips}):", f"    {step}"]
            if kind == "break":
                rest += [f"    if {expression(rand, 1, leaves + ['acc'])} > 0.5:", "        break"]
        leaves.append("acc")
    result = expression(rand, 2, leaves)
    if early is None:
        mine = theirs = lines + rest + [f"return {result}"]
    else:
        condition, value = early
        mine = lines + [f"if {condition}:", f"    return {value}"] + rest + [f"return {result}"]
        theirs = lines + ["r = 0.0", f"if {condition}:", f"    r = {value}", "else:"] + \
            [f"    {line}" for line in rest + [f"r = {result}"]] + ["return r"]
    return mine, theirs


TRANSFORMS = ("forward", "grad")


def draw_program(seed):
    """(module source, chain): f, its Taichi twin, a helper, and the chain of transforms
    [(kind, argnum), ...]: g0 = f, g{k+1} = kd.<kind>(g{k}, argnum=<argnum>)."""
    rand = random.Random(seed)
    mine, theirs = function_body(rand)
    helper = expression(rand, 2, ["u", "v", "0.7"])
    chain = [(rand.choice(TRANSFORMS), rand.randint(0, 1)) for _ in range(rand.choice([1, 2]))]
    src = ["import taichi as ti", "import kerndiff as kd", "", "",
           "@ti.func", "def helper(u, v):", f"    return {helper}", "", "",
           "@kd.func", "def kd_helper(u, v):", f"    w = {helper}", "    return w * v + u", "", "",
           "@kd.func", "def f(a, b):", *(f"    {line}" for line in mine), "", "",
           "@ti.func", "def f_ti(a, b):", *(f"    {line.replace('kd_helper(', 'kd_helper_ti(')}" for line in theirs),
           "", "",
           "@ti.func", "def kd_helper_ti(u, v):", f"    w = {helper}", "    return w * v + u", "", "",
           "g0 = f"]
    for level, (kind, argnum) in enumerate(chain, 1):
        src.append(f"g{level} = kd.{kind}(g{level - 1}, argnum={argnum})")
    last = f"g{len(chain)}"
    src += ["", "", f"jvp_last = kd.jvp({last})", f"vjp_last = kd.vjp({last})", f"grad_last = kd.grad({last})"]
    src += ["", "", "@ti.kernel", "def reference():", "    for i in pa:", "        o0[i] = f_ti(pa[i], pb[i])"]
    for level in range(len(chain) + 1):
        src += ["", "", f"def level{level}():", "    for i in pa:", f"        o0[i] = g{level}(pa[i], pb[i])"]
    src += ["", "", "def transforms_of_last():", "    for i in pa:",
            "        out, tangent = jvp_last(pa[i], pb[i], 0.3, -0.7)",
            "        ca, cb = vjp_last(pa[i], pb[i], 1.3)",
            "        ga, gb = grad_last(pa[i], pb[i])",
            "        o0[i] = out",
            "        o1[i] = tangent",
            "        o2[i] = ca + 10.0 * ga",
            "        o3[i] = cb + 10.0 * gb"]
    # f's Hessian through transforms of kd.grad's tuple (session 46)
    src += ["", "", "grad_f = kd.grad(f)", "hessian_column_a = kd.forward(grad_f, argnum=0)", "hvp_f = kd.vjp(grad_f)",
            "", "", "def grads_of_f():", "    for i in pa:",
            "        ga, gb = grad_f(pa[i], pb[i])", "        o0[i] = ga", "        o1[i] = gb",
            "", "", "def hessian_of_f():", "    for i in pa:",
            "        haa, hba = hessian_column_a(pa[i], pb[i])",
            "        va, vb = hvp_f(pa[i], pb[i], (0.3, -0.7))",
            "        o0[i] = haa", "        o1[i] = hba", "        o2[i] = va", "        o3[i] = vb"]
    return "\n".join(src) + "\n", chain


def load(src, fields):
    return load_module(src, fields, _tmp, "generated_funcs")


def points(seed):
    rng = np.random.default_rng(seed % 2 ** 32)
    return rng.uniform(-1, 1, POINTS), rng.uniform(-1, 1, POINTS)


def values(kernel, fields, a, b, outs=("o0",)):
    fields["pa"].from_numpy(a)
    fields["pb"].from_numpy(b)
    kernel()
    return [fields[o].to_numpy() for o in outs]


def partial(kernel, fields, a, b, argnum, outs=("o0",)):
    """∂/∂(a or b) of kernel's outputs at every point, by central differences: (h = 1e-6, then 1e-4
    where the first disagrees: see close())."""
    shift = [np.zeros(POINTS), np.zeros(POINTS)]
    result = []
    for h in (1e-6, 1e-4):
        shift[argnum][:] = h
        plus = values(kernel, fields, a + shift[0], b + shift[1], outs)
        minus = values(kernel, fields, a - shift[0], b - shift[1], outs)
        result.append([(p - m) / (2 * h) for p, m in zip(plus, minus)])
    return result


def close(got, estimates, what, src):
    """got agrees with one of the finite-difference estimates (the finer step first; the coarser
    one where roundoff in a large derivative swamps the finer)."""
    for fd in estimates:
        if np.allclose(got, fd, rtol=1e-5, atol=1e-6):
            return
    raise AssertionError(f"{what}: {got} against finite differences {estimates[0]} (h = 1e-6), "
                         f"{estimates[1]} (h = 1e-4)\n{src}")


def check_funcs(fields, seed):
    src, chain = draw_program(seed)
    mod = load(src, fields)
    a, b = points(seed)
    levels = [kd.kernel(getattr(mod, f"level{n}")) for n in range(len(chain) + 1)]
    (expected,) = values(mod.reference, fields, a, b)
    (got,) = values(levels[0], fields, a, b)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14, err_msg=f"f's values\n{src}")
    for n, (kind, argnum) in enumerate(chain, 1):
        (got,) = values(levels[n], fields, a, b)
        fd = [e[0] for e in partial(levels[n - 1], fields, a, b, argnum)]
        close(got, fd, f"g{n} = kd.{kind}(g{n - 1}, argnum={argnum})", src)
    check_hessian(mod, fields, a, b, src)
    if len(chain) == 2 and ("for k in" in src or "while k" in src):
        CHECKED.append(len(chain))
        return  # (order three of a loop: the growth the module's docstring describes)
    last = levels[-1]
    (value,) = values(last, fields, a, b)
    d_a = [e[0] for e in partial(last, fields, a, b, 0)]
    d_b = [e[0] for e in partial(last, fields, a, b, 1)]
    out, tangent, ca, cb = values(kd.kernel(mod.transforms_of_last), fields, a, b, ("o0", "o1", "o2", "o3"))
    np.testing.assert_allclose(out, value, rtol=1e-12, atol=1e-14, err_msg=f"kd.jvp's value\n{src}")
    close(tangent, [0.3 * x - 0.7 * y for x, y in zip(d_a, d_b)], "kd.jvp's tangent (0.3, -0.7)", src)
    close(ca, [11.3 * x for x in d_a], "kd.vjp's (1.3) and kd.grad's cotangent of a", src)
    close(cb, [11.3 * y for y in d_b], "kd.vjp's (1.3) and kd.grad's cotangent of b", src)
    # the kernel around the last function, differentiated with respect to pa and pb
    kernel = kd.kernel(getattr(mod, f"level{len(chain)}"))
    inputs, _, _ = signature(kernel)  # (a derivative may no longer read a or b)
    x0 = {f: v for f, v in ((fields["pa"], a), (fields["pb"], b)) if any(f is g for g in inputs)}
    for mode in ("forward", "reverse"):
        try:
            check(kernel, mode, x0=x0, rtol=1e-5, atol=1e-6, may_be_zero=True)
        except AssertionError:
            check(kernel, mode, x0=x0, eps=1e-4, rtol=1e-4, atol=1e-5, may_be_zero=True)  # (roundoff: as in close())
    CHECKED.append(len(chain))


def check_hessian(mod, fields, a, b, src):
    """kd.forward(kd.grad(f), argnum=0) (a Hessian column: one tangent per entry of kd.grad's
    tuple) and kd.vjp(kd.grad(f)) with a tuple cotangent (v·H) against differences of kd.grad."""
    grads = kd.kernel(mod.grads_of_f)
    by_a = partial(grads, fields, a, b, 0, ("o0", "o1"))  # [h][∂ga/∂a, ∂gb/∂a]
    by_b = partial(grads, fields, a, b, 1, ("o0", "o1"))
    haa, hba, va, vb = values(kd.kernel(mod.hessian_of_f), fields, a, b, ("o0", "o1", "o2", "o3"))
    close(haa, [e[0] for e in by_a], "kd.forward(kd.grad(f), argnum=0)[0]", src)
    close(hba, [e[1] for e in by_a], "kd.forward(kd.grad(f), argnum=0)[1]", src)
    close(va, [0.3 * da[0] - 0.7 * da[1] for da in by_a], "kd.vjp(kd.grad(f))(a, b, (0.3, -0.7))[0]", src)
    close(vb, [0.3 * db[0] - 0.7 * db[1] for db in by_b], "kd.vjp(kd.grad(f))(a, b, (0.3, -0.7))[1]", src)


CHECKED = []


@PROFILE
@given(seed=st.integers(0, 2 ** 32 - 1))
@example(seed=9)  # a chain of one transform
@example(seed=0)  # and of two: the module's summary no longer rests on the draws
def test_random_device_functions(fields, seed):
    check_funcs(fields, seed)


RAN = set()
record_run = runs_recorder(RAN)


def test_chains_of_every_length_were_checked(request):
    skip_unless_all_ran_before(request, RAN)
    assert set(CHECKED) >= {1, 2}, CHECKED


def teardown_module():
    print(f"\nfuzz funcs: {len(CHECKED)} drawn functions checked, chains of length "
          f"{ {n: CHECKED.count(n) for n in sorted(set(CHECKED))} }")
