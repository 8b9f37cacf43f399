"""Fuzzing: hypothesis generates random kernels — expression trees over every differentiable op with
domain-safe wrappers, branches, inner loops with loop-carried locals (one, or two assigned together
from each other's old values, or a sum of terms that do not read it; the step guarded by a branch,
or followed by a conditional break; or a while loop whose condition reads them), gathers through an
integer index field — and each is checked: its values against Taichi's, forward mode against f64
finite differences, the dot-product test for reverse mode, and Taichi's own kernel.grad() where
Taichi supports the kernel. Again with private copies, checkpoints, and kerndiff's own sin/cos pairs
and tanh (opt.cpu_math) forced on.

Profiles: a short one by default (derandomized under CI=true), KERNDIFF_FUZZ=long for 10,000 per test
(KERNDIFF_FUZZ_N to change that).
"""
import os
import tempfile

import numpy as np
import pytest
import taichi as ti
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import kerndiff as kd
from harness import check, load_elementwise, runs_recorder, second_order_outputs, skip_unless_all_ran_before
from kerndiff.pipeline import _on_cpu as pipeline_on_cpu

N = 3
LONG = os.environ.get("KERNDIFF_FUZZ") == "long"
settings.register_profile("short", max_examples=12, deadline=None, derandomize=os.environ.get("CI") == "true",
                          suppress_health_check=list(HealthCheck))
settings.register_profile("long", max_examples=int(os.environ.get("KERNDIFF_FUZZ_N", 10000)), deadline=None,
                          suppress_health_check=list(HealthCheck))
PROFILE = "long" if LONG else "short"

UNARY = {  # op -> template making the op safe on any real input
    "sin": "ti.sin({})", "cos": "ti.cos({})", "tanh": "ti.tanh({})", "exp": "ti.exp(ti.tanh({}))",
    "log": "ti.log(1.0 + ({0}) * ({0}))", "sqrt": "ti.sqrt(0.5 + ({0}) * ({0}))",
    "rsqrt": "ti.rsqrt(0.5 + ({0}) * ({0}))", "tan": "ti.tan(0.5 * ti.tanh({}))",
    "asin": "ti.asin(0.9 * ti.tanh({}))", "acos": "ti.acos(0.9 * ti.tanh({}))", "neg": "-({})",
    "abs": "ti.abs({})", "square": "({}) ** 2", "cube": "({}) ** 3",
}
BINARY = {
    "add": "({}) + ({})", "sub": "({}) - ({})", "mul": "({}) * ({})",
    "div": "({0}) / (1.5 + ({1}) * ({1}))", "pow": "(1.0 + ({0}) * ({0})) ** ti.tanh({1})",
    "atan2": "ti.atan2({0}, 1.0 + ({1}) * ({1}))", "min": "ti.min({}, {})", "max": "ti.max({}, {})",
    # a comparison of comparisons: generated code must keep the grouping (Python chains a < b == c)
    "gate": "({0}) * ((({0}) > 0.3) == (({1}) < 0.2))",
}
LEAVES = ["x[i]", "x[idx[i]]", "y[1, i]", "y[1, idx[i]]", "0.7", "x[(i + 1) % 3]"]


def expr(depth, extra=()):
    leaves = st.sampled_from(LEAVES + list(extra))
    if depth == 0:
        return leaves
    sub = expr(depth - 1, extra)
    return st.one_of(
        leaves,
        st.tuples(st.sampled_from(sorted(UNARY)), sub).map(lambda t: UNARY[t[0]].format(t[1])),
        st.tuples(st.sampled_from(sorted(BINARY)), sub, sub).map(lambda t: BINARY[t[0]].format(t[1], t[2])),
    )


@st.composite
def kernels(draw):
    a = draw(expr(2))
    cond = draw(expr(1))
    b1 = draw(expr(2, ["a"]))
    b2 = draw(expr(2, ["a"]))
    trips = draw(st.integers(0, 6))
    step = draw(expr(2, ["a", "acc"]))
    term = draw(expr(2, ["a"]))
    out = draw(expr(2, ["a", "acc"]))
    # Either acc alone is carried, or acc and a are updated together, each from both old values,
    # or acc sums terms that do not read it (the reverse's iterations then share nothing but sums,
    # and opt.loop_order runs them forward).
    update = draw(st.sampled_from([f"acc = 0.5 * acc + ti.tanh({step})",
                                   f"acc, a = 0.5 * acc + ti.tanh({step}), 0.8 * acc - 0.3 * a",
                                   f"acc, a = 0.5 * a + ti.tanh({step}), acc",
                                   f"acc = acc + ti.tanh({term} + 0.1 * k)"]))
    # The step may be guarded by a branch on what the loop carries (with an else, or without), or
    # followed by a conditional break: the reverse recomputes such a loop and runs the adjoint
    # under the same branches (one `if` per branch after opt.fuse_ifs, conditional sums merged in
    # place by opt.copies, breaks as flags).
    gate = draw(expr(1, ["a", "acc"]))
    inner = draw(st.sampled_from([[update], [f"if {gate} > 0.0:", f"    {update}"],
                                  [f"if {gate} > 0.0:", f"    {update}", "else:", "    acc = 0.9 * acc"],
                                  [update, f"if {gate} > 0.5:", "    break"], "while"]))
    if inner == "while":
        # or a while loop whose condition reads what it carries (recomputed after every trip,
        # trip count recorded for the reverse), with a counter to end it
        loop = ["k = 0", f"while k < {trips} and {gate} < 1.5:", f"    {update}", "    k += 1"]
    else:
        loop = [f"for k in range({trips}):", *(f"    {line}" for line in inner)]
    body = [
        f"a = {a}",
        f"if {cond} > 0.1:",
        f"    a = {b1}",
        "else:",
        f"    a = {b2}",
        "acc = 0.5",
        *loop,
        f"out[i] = {out}",
    ]
    return "\n".join(body)


_tmp = tempfile.mkdtemp(prefix="kerndiff_fuzz_")


def load(body, fields, head=None):
    return load_elementwise(body, fields, _tmp, **({"head": head} if head else {}))


@pytest.fixture(scope="module")
def fields():
    ti.init(arch=ti.cpu, default_fp=ti.f64)
    rng = np.random.default_rng(0)
    f = {
        "x": ti.field(ti.f64, shape=N, needs_grad=True),
        "y": ti.field(ti.f64, shape=(2, N), needs_grad=True),  # one row used: scattered slices
        "idx": ti.field(ti.i32, shape=N),
        "out": ti.field(ti.f64, shape=N, needs_grad=True),
    }
    f["x"].from_numpy(rng.uniform(-1, 1, N))
    f["y"].from_numpy(rng.uniform(-1, 1, (2, N)))
    f["idx"].from_numpy(np.array([2, 0, 1], dtype=np.int32))
    yield f
    ti.reset()


def taichi_supports(body):
    # Taichi 1.7.4 has no tan derivative, and its reverse mode refuses a break or a while loop
    return "ti.tan(" not in body and "break" not in body and "while" not in body


def check_random_kernel(fields, body, head=None, args=()):
    """head, args: another first line and loop for the kernel (`def kernel(n: ti.i32)`), and the
    arguments it takes."""
    fn, src = load(body, fields, head)
    out = fields["out"]
    ti.kernel(fn)(*args)
    expected = out.to_numpy()
    k = kd.kernel(fn)
    k(*args)
    np.testing.assert_allclose(out.to_numpy(), expected, rtol=1e-12, atol=1e-14, err_msg=src)  # the primal too
    check(k, "forward", args=args, rtol=1e-5, atol=1e-7, may_be_zero=True)
    check(k, "reverse", args=args, rtol=1e-5, atol=1e-7, may_be_zero=True)
    if taichi_supports(body):
        x, y, out = fields["x"], fields["y"], fields["out"]
        tk = ti.kernel(fn)
        rng = np.random.default_rng(1)
        w = rng.standard_normal(N)
        grads = []
        for run, rev in ((tk, tk.grad), (k, k.reverse)):
            run(*args)
            for g in (x.grad, y.grad):
                g.fill(0)
            out.grad.from_numpy(w)
            rev(*args)
            grads.append((x.grad.to_numpy(), y.grad.to_numpy()))
        agree = all(np.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(*grads))
        if not agree:
            # Taichi disagrees: kerndiff must then match exact finite differences of Jᵀw, and the
            # case is recorded as a Taichi defect (the fuzzer found e.g. zero gradients after an
            # if/else reassignment followed by an inner loop).
            fd = fd_vjp(lambda: k(*args), [x, y], out, w)
            for got, ref in zip(grads[1], fd):
                np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-8, err_msg=src)
            TAICHI_WRONG.append(src)
    return k


TAICHI_WRONG = []


def fd_vjp(k, inputs, out, w, h=1e-6):
    """Jᵀ·w by central differences, one input element at a time (f64)."""
    result = []
    for f in inputs:
        base = f.to_numpy()
        g = np.zeros_like(base)
        for j in range(base.size):
            vals = []
            for sgn in (1, -1):
                pert = base.copy()
                pert.flat[j] += sgn * h
                f.from_numpy(pert)
                k()
                vals.append(np.dot(w, out.to_numpy()))
            g.flat[j] = (vals[0] - vals[1]) / (2 * h)
        f.from_numpy(base)
        result.append(g)
    return result


# one kernel whose inner loop surely sums terms that do not read the sum
SUM_EXAMPLE = "\n".join(["a = ti.sin(x[i]) * y[1, idx[i]]", "acc = 0.5", "for k in range(4):",
                         "    acc = acc + ti.tanh(a * x[i] + y[1, i] + 0.1 * k)", "out[i] = acc * acc + a"])


@settings(settings.get_profile(PROFILE))
@given(body=kernels())
@example(body=SUM_EXAMPLE)
def test_random_kernels(fields, body):
    k = check_random_kernel(fields, body)
    COUNT.append(1)
    lines = [line.strip() for line in k.reverse.source.splitlines()]
    if any(line.startswith("# adjoint of: for k in range(") and after.startswith("for k in range(")
           for line, after in zip(lines, lines[1:])):
        FORWARD_AGAIN.append(1)


FORWARD_AGAIN = []


COUNT = []


# one kernel that surely scatters into a slice (y[1, idx[i]] only), whatever the draws
SLICE_EXAMPLE = "\n".join(["a = ti.sin(y[1, idx[i]]) * x[i]", "if a > 0.1:", "    a = a * a", "else:",
                           "    a = -a", "acc = 0.5", "for k in range(3):", "    acc = 0.5 * acc + ti.tanh(a)",
                           "out[i] = acc * x[idx[i]]"])


@settings(settings.get_profile(PROFILE))
@given(body=kernels())
@example(body=SLICE_EXAMPLE)
def test_random_kernels_with_private_copies(fields, body, monkeypatch):
    """The same kernels with opt.scatter forced on for these 3-iteration loops, so every scattered
    adjoint (x[idx[i]], x[(i + 1) % 3], and y[1, idx[i]] through copies of the row) goes through
    per-thread private copies; and opt.packed_gathers on for fields of any size, so the forward
    kernel reads x[idx[i]] and its tangent from one record."""
    from kerndiff.opt import packed_gathers, scatter, split_ranges, transposed_gathers
    monkeypatch.setattr(scatter, "MIN_TRIPS", 2)
    monkeypatch.setattr(scatter, "MIN_WORK", 2)
    monkeypatch.setattr(scatter, "MIN_ADDS_PER_ELEMENT", 0)
    monkeypatch.setattr(packed_gathers, "MIN_BYTES", 0)
    monkeypatch.setattr(transposed_gathers, "MIN_TRIPS", 0)
    monkeypatch.setattr(split_ranges, "MIN_TRIPS", 0)
    k = check_random_kernel(fields, body)
    COUNT.append(1)
    if "claim_slot(" in k.reverse.source:
        PRIVATIZED.append(1)
    if "y_adj[1, i0] = y_adj[1, i0] +" in k.reverse.source:
        SLICED.append(1)
    if "_packed[" in k.forward.source:
        PACKED.append(1)


PRIVATIZED = []
SLICED = []
PACKED = []


@settings(settings.get_profile(PROFILE))
@given(body=kernels(), n=st.sampled_from([N, 2]))
@example(body=SLICE_EXAMPLE, n=N)
def test_random_kernels_with_private_copies_chosen_at_launch(fields, body, n, monkeypatch):
    """The same kernels over `range(n)`, n a kernel argument, with opt.scatter forced on: the
    reverse holds the chunks and the loop with atomic adds, and chooses at launch: with work of 3
    iterations enough here, the chunks for n = 3, the atomics for n = 2 unless an inner loop
    adds iterations."""
    from kerndiff.opt import scatter
    monkeypatch.setattr(scatter, "MIN_WORK", 3)
    monkeypatch.setattr(scatter, "MIN_ADDS_PER_ELEMENT", 0)
    k = check_random_kernel(fields, body, head="def kernel(n: ti.i32):\n    for i in range(n):", args=(n,))
    if "claim_slot(" in k.reverse.source:
        assert "use_copies = " in k.reverse.source
        AT_LAUNCH.append(1)
    COUNT.append(1)


AT_LAUNCH = []

# one kernel whose loop surely carries a value the backward sweep needs
CARRIED_EXAMPLE = "\n".join(["a = x[i] * 0.7", "if a > 0.1:", "    a = a * a", "else:", "    a = -a", "acc = 0.5",
                             "for k in range(6):", "    acc = 0.5 * acc + ti.tanh(a * acc + y[1, i])",
                             "out[i] = acc * x[idx[i]]"])


@settings(settings.get_profile(PROFILE))
@given(body=kernels(), where=st.sampled_from(["locals", "every step", "segments"]))
@example(body=CARRIED_EXAMPLE, where="locals")
@example(body=CARRIED_EXAMPLE, where="every step")
@example(body=CARRIED_EXAMPLE, where="segments")
def test_random_kernels_with_checkpoints(fields, body, where, monkeypatch):
    """The same kernels with the checkpointed loop reversal forced on their 0-6 trip loops: with
    2 checkpoints per level in locals, so that segments, sub-segments longer than one step and the
    partial last ones all occur, or in helper fields with a row per parallel iteration (as derived
    kernels that no reverse transform takes as input get them on the CPU; the others,
    k.reverse.reverse's inner reverse, keep locals either way): every step's values, or segments
    of ceil(sqrt(trips)) steps."""
    from kerndiff import pipeline
    from kerndiff.ad import reverse
    monkeypatch.setattr(reverse, "CHECKPOINTS", 2)
    monkeypatch.setattr(reverse.Reverse, "worth_checkpoints", staticmethod(lambda trips: True))
    # (one monkeypatch serves all of hypothesis's examples: set both every time)
    monkeypatch.setattr(pipeline, "_on_cpu", (lambda: False) if where == "locals" else _ON_CPU)
    monkeypatch.setattr(reverse.Reverse, "every_step", where == "every step")
    k = check_random_kernel(fields, body)
    COUNT.append(1)
    src = k.reverse.source
    CHECKPOINTED[where] = CHECKPOINTED.get(where, False) or ("_ck0" if where == "locals" else
                                                             "_seg[" if where == "segments" else "_ck[") in src


CHECKPOINTED = {}
_ON_CPU = pipeline_on_cpu  # the real test, restored between examples


@ti.func
def _sincos_stand_in(a):
    return ti.sin(a), ti.cos(a)


@ti.func
def _tanh_stand_in(a):
    return ti.tanh(a)


# sin and cos of one value, several times, with a tanh: surely paired and replaced
PAIRED_EXAMPLE = "\n".join(["a = ti.sin(x[i]) * ti.cos(x[i]) + ti.sin(y[1, idx[i]])", "acc = 0.5",
                            "for k in range(3):", "    acc = 0.5 * acc + ti.tanh(a * ti.cos(acc))",
                            "out[i] = acc * ti.cos(y[1, idx[i]])"])


@settings(settings.get_profile(PROFILE))
@given(body=kernels())
@example(body=PAIRED_EXAMPLE)
def test_random_kernels_with_cpu_math(fields, body, monkeypatch):
    """The same kernels with opt.cpu_math's rewriting on for f64 (it is for f32 only), calling
    stand-ins that compute Taichi's own values: what it pairs and replaces, and where it puts the
    pair, must leave every derivative as it was (windows that end where the argument changes,
    branches, loops, guarded selects, breaks)."""
    from kerndiff.codegen import cpu_math as helpers
    from kerndiff.opt import cpu_math
    monkeypatch.setattr(cpu_math, "DTYPES", {"f32", "f64"})
    monkeypatch.setattr(helpers, "sincos", _sincos_stand_in)
    monkeypatch.setattr(helpers, "tanh_via_exp", _tanh_stand_in)
    k = check_random_kernel(fields, body)
    COUNT.append(1)
    if "= sincos(" in k.reverse.source:
        PAIRED.append(1)


PAIRED = []


@settings(settings.get_profile(PROFILE))
@given(body=kernels())
@example(body=SUM_EXAMPLE)
def test_random_kernels_second_derivative_along_one_direction(fields, body):
    """k.forward.forward with both levels seeded alike runs its equal-directions variant
    (ad/equal_directions.py): the same numbers as the kernel as generated, for every draw."""
    fn, src = load(body, fields)
    k = kd.kernel(fn)
    k()
    x, y, out = fields["x"], fields["y"], fields["out"]
    rng = np.random.default_rng(2)
    v = [rng.standard_normal(N), rng.standard_normal((2, N))]
    w = [rng.standard_normal(N), rng.standard_normal((2, N))]
    generated = second_order_outputs(k, (), [x, y], [out], v, w, equal_directions=False)
    got = second_order_outputs(k, (), [x, y], [out], v, w, equal_directions=True)
    for a, b in zip(got, generated):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * max(1.0, float(np.max(np.abs(b)))), err_msg=src)
    if k.forward.forward.equal_directions_source is not None:
        EQUAL_DIRECTIONS.append(1)


EQUAL_DIRECTIONS = []


RAN = set()
record_run = runs_recorder(RAN)


def test_private_copies_were_exercised(request):
    skip_unless_all_ran_before(request, RAN)
    assert PAIRED, "no random kernel's reverse took a sine and a cosine from one call"
    assert PRIVATIZED, "no random kernel scattered through private copies"
    assert SLICED, "no random kernel scattered into a slice (y[1, idx[i]]) through copies of the slice"
    assert PACKED, "no random kernel's forward read a gathered field and its tangent from one record"
    assert AT_LAUNCH, "no random kernel bounded by an argument chose its private copies at launch"
    assert FORWARD_AGAIN, "no random kernel's reverse ran its inner loop forward (opt.loop_order)"
    assert EQUAL_DIRECTIONS, "no random kernel had an equal-directions variant"
    for where in ("locals", "every step", "segments"):
        assert CHECKPOINTED.get(where), f"no random kernel reversed its loop from checkpoints ({where})"


def teardown_module():
    print(f"\nfuzz: {len(COUNT)} random kernels checked; Taichi's own AD was wrong on {len(TAICHI_WRONG)}")
    if TAICHI_WRONG:
        print("first such kernel:\n" + TAICHI_WRONG[0])
