"""Long serial loops whose carried values the backward sweep needs restore them from checkpoints
(kerndiff/ad/reverse.py): for a loop of run-time trips, or in a kernel that a reverse transform
takes as its input, two levels in locals, 16 per segment stack, 16 per sub-segment stack; for a
loop of constant trips in a derived kernel on the CPU that nothing reverses again, helper fields
with one row per parallel iteration. Checked against f64 finite differences at the trip counts
where the segment arithmetic could go wrong (no trips, fewer trips than checkpoints, exact
multiples, one past them, and past 16 x 16, where sub-segments get longer than one step), for
while loops and nested loops, on every path."""
import re

import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import ON_CPU, PATH_IDS, PATHS, check_path


pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)


@pytest.fixture(scope="module")
def kernels(runtime):
    x = ti.field(ti.f64, shape=3)
    y = ti.field(ti.f64, shape=3)
    x.from_numpy(np.array([0.15, 0.5, 0.85]))

    @kd.kernel
    def two_carried(steps: ti.i32):
        for i in x:
            s, t = x[i], 0.3
            for j in range(steps):
                s, t = ti.sin(s) * 0.9 + 0.1 * x[i] * t, t * 0.99 + s * 0.01 * ti.cos(0.1 * j)
            y[i] = s * t + s

    @kd.kernel
    def long_while():
        for i in x:
            v = x[i]
            n = 0
            while v < 30.0:  # 40-odd trips, recorded in the forward sweep
                v = v * 1.05 + ti.sin(v) * 0.1 + 0.2
                n += 1
            y[i] = v * ti.sqrt(v) + n

    @kd.kernel
    def nested():
        for i in x:
            s = x[i]
            for a in range(37):
                u = s
                for b in range(35):
                    u = ti.tanh(u) * 0.8 + 0.3 * s
                s = s * 0.7 + u * 0.2
            y[i] = s

    @kd.kernel
    def with_jumps(steps: ti.i32):
        for i in x:
            v = x[i]
            for j in range(steps):
                if j % 5 == 2:
                    continue
                v = ti.cos(v) * 0.5 + x[i] * 0.6
                if v > 0.99:  # leaves early for some elements
                    break
            y[i] = v

    return {k.__name__: k for k in (two_carried, long_while, nested, with_jumps)}


@pytest.mark.parametrize("prefix,mode", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("steps", [0, 1, 15, 16, 17, 32, 33, 48, 100, 256, 257, 530])
def test_trip_counts_against_finite_differences(kernels, steps, prefix, mode):
    check_path(kernels["two_carried"], prefix, mode, args=(steps,), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("prefix,mode", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("name", ["long_while", "nested"])
def test_while_and_nested_loops_against_finite_differences(kernels, name, prefix, mode):
    check_path(kernels[name], prefix, mode, rtol=1e-6, atol=1e-8)


def test_short_constant_loops_keep_plain_recomputation(runtime):
    """A loop known to run at most 2 x 16 times restores by recomputing from its entry: no stack."""
    x = ti.field(ti.f64, shape=2, needs_grad=True)
    y = ti.field(ti.f64, shape=2, needs_grad=True)

    def loop_of(trips):
        @kd.kernel
        def loop():
            for i in x:
                s = x[i]
                for j in range(trips):
                    s = ti.sin(s) + 0.1
                y[i] = s
        return loop

    short, long = loop_of(32), loop_of(33)
    assert "_ck" not in short.reverse.source
    assert "checkpoints of: for j in range(trips):" in long.reverse.source


@pytest.mark.parametrize("prefix,mode", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("steps", [20, 200])
def test_break_and_continue_in_long_loops(kernels, steps, prefix, mode):
    check_path(kernels["with_jumps"], prefix, mode, args=(steps,), rtol=1e-6, atol=1e-8)


def _pendulum_fields(needs_grad):
    q = ti.field(ti.f64, shape=3, needs_grad=needs_grad)
    E = ti.field(ti.f64, shape=(), needs_grad=needs_grad)
    q.from_numpy(np.array([-0.7, 0.2, 0.9]))
    return q, E


def _pendulums(steps, q, E):
    """Three pendulums integrated for `steps` steps inside the kernel (W6's loop), their energies
    summed into E."""
    @kd.kernel
    def pendulum():
        for i in q:
            a, w = q[i], 0.0
            for t in range(steps):
                w = w - 0.05 * (ti.sin(a) + 0.1 * w)
                a = a + 0.05 * w
            E[None] += 0.5 * w * w + 1.0 - ti.cos(a)
    return pendulum


@pytest.mark.parametrize("prefix,mode", PATHS, ids=PATH_IDS)
def test_a_long_loop_read_after_it_runs_forward_once(runtime, prefix, mode):
    """The loop's values are needed after it (w, a) and its backward sweep needs checkpoints: the
    checkpointing run serves both, instead of a plain forward run followed by a second one that
    stores checkpoints (W6's reverse: 202 -> 146 ms)."""
    pendulum = _pendulums(40, *_pendulum_fields(needs_grad=False))
    check_path(pendulum, prefix, mode, rtol=1e-6, atol=1e-8)
    if (prefix, mode) == ("", "reverse"):
        src = pendulum.reverse.source
        loops = re.findall(r"^ *for (\w+) in range\(40\):", src, re.MULTILINE)
        assert loops == ["t_ck", "t_rev"], src  # the checkpointing run and the backward sweep
        assert src.index("for t_ck in range(40):") < src.index("# adjoint of: E[None] +="), src


@pytest.mark.parametrize("prefix,mode", PATHS, ids=PATH_IDS)
def test_a_long_serialized_outermost_loop_read_after_it_runs_forward_once(runtime, prefix, mode):
    """The same at a kernel's top level: one pendulum integrated in a ti.loop_config(serialize=True)
    outermost loop whose locals carry from step to step (a serial loop), read after it."""
    q, E = _pendulum_fields(needs_grad=False)

    @kd.kernel
    def pendulum():
        a, w = q[0], 0.0
        ti.loop_config(serialize=True)
        for t in range(40):
            w = w - 0.05 * (ti.sin(a) + 0.1 * w) * q[1]
            a = a + 0.05 * w
        E[None] += 0.5 * w * w + 1.0 - ti.cos(a) * q[2]

    check_path(pendulum, prefix, mode, rtol=1e-6, atol=1e-8)
    if (prefix, mode) == ("", "reverse"):
        src = pendulum.reverse.source
        loops = re.findall(r"^ *for (\w+) in range\(40\):", src, re.MULTILINE)
        assert loops == ["t_ck", "t_rev"], src
        assert src.index("for t_ck in range(40):") < src.index("# adjoint of: E[None] +="), src


def test_checkpoints_in_fields_or_in_locals(runtime, monkeypatch):
    """A derived kernel that no reverse transform takes as input (k.reverse, k.reverse.forward,
    k.forward.reverse) keeps a long constant loop's checkpoints in helper fields with one row per
    parallel iteration, on the CPU: every step's values where they fit the memory budget, else
    about sqrt(trips) segment starts and the values at each step of the segment being reversed.
    k.reverse.reverse's inner reverse keeps them in locals (a reverse pass over it could not read
    back values that later segments overwrote), and so does a kernel whose fields would not fit at
    all. Each checked against finite differences on every path."""
    from kerndiff.ad import reverse
    q, E = _pendulum_fields(needs_grad=True)

    def make():
        return _pendulums(100, q, E)

    # every step: 3 rows x 100 steps x the angle (the backward sweep reads no velocity): 2400 bytes
    k = make()
    src = k.reverse.source
    if not ON_CPU:  # checkpoint fields are made on the CPU backends only: locals here, on every path
        assert "_ck0" in src and "_ck[" not in src, src
        for prefix, mode in PATHS + [("reverse", "reverse")]:
            check_path(k, prefix, mode, rtol=1e-5, atol=1e-7)
        return
    assert re.search(r"\w+_ck\[i, t_ck\] = \w+", src) and re.search(r"= \w+_ck\[i, t\]", src), src
    assert "_seg[" not in src and "_ck0" not in src, src
    for prefix, mode in PATHS:
        check_path(k, prefix, mode, rtol=1e-6, atol=1e-8)
    assert "_ck[i, " in k.reverse.forward.source and "_ck[i, " in k.forward.reverse.source
    check_path(k, "reverse", "reverse", rtol=1e-5, atol=1e-7)
    # the inner reverse's checkpoints are locals (their adjoints appear); the outer reverse, which
    # nothing reverses again, keeps its own long loops' checkpoints in fields
    outer = k.reverse.reverse.source
    assert "_ck0_" in outer and "_ck[i, " in outer, outer

    # segments: 3 rows x (10 starts + 10 steps) x angle and velocity: 960 bytes
    monkeypatch.setattr(reverse, "CHECKPOINT_FIELD_BYTES", 1000)
    segmented = make()
    src = segmented.reverse.source
    assert re.search(r"\w+_ck\[i, t_ck // 10\] = \w+", src) and re.search(r"= \w+_seg\[i, t - t_start\]", src), src
    for prefix, mode in PATHS:
        check_path(segmented, prefix, mode, rtol=1e-6, atol=1e-8)

    monkeypatch.setattr(reverse, "CHECKPOINT_FIELD_BYTES", 64)
    small = make()
    assert "_ck0" in small.reverse.source and "_ck[" not in small.reverse.source
    check_path(small, "", "reverse", rtol=1e-6, atol=1e-8)


def test_checkpoint_rows_of_a_loop_over_two_indices(runtime):
    """One row per (i, j) of `ti.ndrange(3, 2)`: `i * 2 + j`; and a parallel loop of no
    iterations, which gets no fields (Taichi refuses a field dimension of 0)."""
    x = ti.field(ti.f64, shape=3, needs_grad=True)
    y = ti.field(ti.f64, shape=3, needs_grad=True)
    x.from_numpy(np.array([-0.4, 0.3, 0.8]))

    @kd.kernel
    def pairs():
        for i, j in ti.ndrange(3, 2):
            s = x[i] * (j + 1)
            for t in range(50):
                s = ti.sin(s) + 0.1 * j
            y[i] += s

    @kd.kernel
    def nothing():
        for i in range(0):
            s = x[i]
            for t in range(50):
                s = ti.sin(s)
            y[i] = s

    assert ("_ck[i * 2 + j, t_ck] = " if ON_CPU else "_ck0") in pairs.reverse.source
    # every step kept: stored at each step, with no `if 1:` around the store (before session 46)
    assert "if 1:" not in pairs.reverse.source and "if 0:" not in pairs.reverse.source
    for prefix, mode in PATHS:
        check_path(pairs, prefix, mode, rtol=1e-6, atol=1e-8)
    nothing()
    nothing.reverse()
    assert "_ck[" not in nothing.reverse.source


def test_kernels_share_checkpoint_fields(runtime):
    """Checkpoint fields hold values within one launch, so kernels share them (the n-th field of
    a dtype and shape each kernel asks for): a second kernel of the same shape makes no SNode
    tree (Taichi allows a program 512) and no memory, and its source names the field after its own
    local; both kernels' derivatives stay right (the first checked again after the second ran)."""
    from taichi.lang import impl
    x = ti.field(ti.f64, shape=4, needs_grad=True, needs_dual=True)
    y = ti.field(ti.f64, shape=4, needs_grad=True, needs_dual=True)
    x.from_numpy(np.array([0.3, 0.8, 0.45, 1.1]))

    @kd.kernel
    def damped():
        for i in x:
            acc = x[i]
            for t in range(50):
                acc = acc + 0.02 * ti.sin(acc * x[t % 4])
            y[i] = acc

    @kd.kernel
    def coupled():
        for i in x:
            v = x[i]
            w = 0.5 * x[i]
            for t in range(50):
                v, w = v + 0.02 * ti.sin(w * x[t % 4]), w - 0.02 * v
            y[i] = v + w

    for prefix, mode in PATHS:
        check_path(damped, prefix, mode, rtol=1e-6, atol=1e-8)
    trees = impl.get_runtime().prog.get_snode_tree_size()
    for prefix, mode in PATHS:
        check_path(coupled, prefix, mode, rtol=1e-6, atol=1e-8)
    assert impl.get_runtime().prog.get_snode_tree_size() == trees
    if not ON_CPU:  # (checkpoint fields are made on the CPU backends only: locals elsewhere)
        assert "_ck0" in damped.reverse.source and "_ck[" not in coupled.reverse.source
        return
    assert "acc_1_ck[i, t_ck] = acc_1" in damped.reverse.source
    assert "w_1_ck[i, t_ck] = w_1" in coupled.reverse.source and "acc_1_ck" not in coupled.reverse.source
    for prefix, mode in PATHS:
        check_path(damped, prefix, mode, rtol=1e-6, atol=1e-8)
