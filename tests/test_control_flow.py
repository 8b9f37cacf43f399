"""while / break / continue in every mode (Taichi 1.7.4's AD refuses them), checked against f64
finite differences on the paths forward, reverse, reverse.forward and forward.reverse."""
import os
import tempfile

import numpy as np
import pytest
import taichi as ti
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kerndiff as kd
from harness import PATH_IDS, PATHS, check_path, load_elementwise, load_module, make_derivative_fields
from kerndiff.pipeline import _on_cpu as pipeline_on_cpu


pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)


@pytest.fixture(scope="module")
def kernels(runtime):
    x = ti.field(ti.f64, shape=4)
    y = ti.field(ti.f64, shape=4)
    x.from_numpy(np.array([1.5, 0.7, 3.1, 2.2]))

    @kd.kernel
    def data_dependent_while():
        for i in x:
            v = x[i]
            n = 0
            while v < 10.0:  # trip count depends on the data: recorded, then replayed backward
                v = v * 1.7 + ti.sin(v)
                n += 1
            y[i] = v * n

    @kd.kernel
    def break_and_continue():
        for i in x:
            v = x[i]
            acc = 0.0
            for j in range(20):
                if j % 3 == 1:
                    continue
                acc += ti.sin(v * j)
                v = v * 1.1
                if v > 4.0:
                    break
            y[i] = acc + v

    @kd.kernel
    def continue_in_parallel_loop():
        for i in x:
            if x[i] < 1.0:
                continue
            y[i] = ti.exp(0.3 * x[i]) * x[i]

    @kd.kernel
    def while_condition_computed_before():
        for i in x:
            v = x[i]
            y[i] = v * v  # the condition's value, held in a local before the loop: the condition
            while v * v < 10.0:  # must still be computed again after every trip (it once read
                v = v * 1.5 + 0.1 * ti.sin(v)  # the local, and the derived kernels never ended)
            y[i] += v

    return {k.__name__: k for k in (data_dependent_while, break_and_continue, continue_in_parallel_loop,
                                    while_condition_computed_before)}


@pytest.mark.parametrize("prefix,mode", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("name", ["data_dependent_while", "break_and_continue", "continue_in_parallel_loop",
                                  "while_condition_computed_before"])
def test_control_flow_against_finite_differences(kernels, name, prefix, mode):
    check_path(kernels[name], prefix, mode, rtol=1e-6)


def test_tuple_unpacking_keeps_names_and_reads_old_values(runtime):
    """`a, b = ...` binds the user's names directly (they are what the generated kernels call
    them); a swap `p, q = q, p * a + q` reads the old values (through temporaries)."""
    x = ti.field(ti.f64, shape=4, needs_grad=True, needs_dual=True)
    y = ti.field(ti.f64, shape=4, needs_grad=True, needs_dual=True)
    xs = np.array([0.3, -0.8, 1.1, 0.5])
    x.from_numpy(xs)

    @kd.kernel
    def recurrence():
        for i in x:
            a, b = x[i], ti.sin(x[i])
            p, q = a, b
            for j in range(3):
                p, q = q, p * a + q
            y[i] = p + 2.0 * q

    recurrence()
    p, q = xs, np.sin(xs)
    for _ in range(3):
        p, q = q, p * xs + q
    np.testing.assert_allclose(y.to_numpy(), p + 2.0 * q, rtol=1e-12)
    src = recurrence.reverse.source
    assert "a = x[i]" in src and "b = ti.sin(x[i])" in src and "tmp = p_1 * a + q_1" in src, src
    for prefix, mode in PATHS:
        check_path(recurrence, prefix, mode, rtol=1e-6, atol=1e-8)


def test_bitwise_index_arithmetic(runtime):
    """Integer bit operations (& | ^ << >> ~, and ^= on a local) pick the elements: the primal
    agrees with ti.kernel (Taichi's own AD refuses this kernel: "Not supported"), and every
    derivative path with finite differences."""
    n = 16
    x = ti.field(ti.f64, shape=n)
    loss = ti.field(ti.f64, shape=())
    x.from_numpy(np.linspace(0.2, 1.0, n))

    def gather():
        for i in x:
            k = ((i * 7 + 3) >> 1) ^ (i & 3) | (i << 2) & 12
            b = ~i & 1
            m = 5
            m ^= i
            loss[None] += x[k % n] * x[i] * (b + 1) + x[(m << 1) % n] ** 2

    kk, tk = kd.kernel(gather), ti.kernel(gather)
    values = []
    for k in (kk, tk):
        loss[None] = 0
        k()
        values.append(loss[None])
    assert values[0] == pytest.approx(values[1], rel=1e-14)
    assert "k = (((i * 7 + 3) >> 1) ^ (i & 3)) | ((i << 2) & 12)" in kk.source, kk.source
    for prefix, mode in PATHS:
        check_path(kk, prefix, mode, rtol=1e-6, atol=1e-8)


@pytest.fixture(scope="module")
def recurrences(runtime):
    """Trips that read what an earlier trip stored: y[i] = f(y[i - 1]) in an outermost loop run
    with ti.loop_config(serialize=True), z[i, t] = g(z[i, t - 1]) in an inner serial loop, and
    locals carried through a serialized outermost loop."""
    n, T = 6, 5
    x = ti.field(ti.f64, shape=n)
    y = ti.field(ti.f64, shape=n)
    z = ti.field(ti.f64, shape=(n, T))
    out = ti.field(ti.f64, shape=())
    x.from_numpy(np.linspace(0.1, 0.6, n))

    @kd.kernel
    def serialized_prefix():
        y[0] = x[0]
        ti.loop_config(serialize=True)
        for i in range(1, n):
            y[i] = ti.sin(y[i - 1]) * x[i] + x[i]
        for i in y:
            out[None] += y[i] ** 2

    @kd.kernel
    def inner_history():
        for i in x:
            z[i, 0] = x[i]
            for t in range(1, T):
                z[i, t] = z[i, t - 1] * (1.0 - 0.3 * x[i]) + 0.1 * ti.cos(z[i, t - 1])
            out[None] += z[i, T - 1] * z[i, 1]

    @kd.kernel
    def carried_locals():
        # locals carried from trip to trip of a serialized outermost loop: a scalar, a vector
        # updated by component, and a product; read after the loop
        acc = 0.2
        p = ti.Vector([1.0, 0.0])
        prod = 1.0
        ti.loop_config(serialize=True)
        for i in range(n):
            acc = ti.sin(acc) * 0.9 + x[i] * acc
            p[0] = p[0] * ti.cos(x[i]) - p[1] * acc
            p[1] += p[0] * x[i]
            prod *= 1.0 + x[i]
            out[None] += acc * p[1]
        out[None] += acc * acc + p[0] * prod

    q = ti.field(ti.f64, shape=(T + 1, n))
    p = ti.field(ti.f64, shape=(T + 1, n))
    h = ti.field(ti.f64, shape=(T + 2, n))

    @kd.kernel
    def time_loop():
        # a whole simulation in one kernel: a serialized time loop whose trip t writes the rows
        # t + 1 of q and p from rows t (and p's new row), in inner loops over the particles
        for i in range(n):
            q[0, i] = x[i]
            p[0, i] = 1.0 - x[i]
        ti.loop_config(serialize=True)
        for t in range(T):
            for i in range(n):
                p[t + 1, i] = p[t, i] - 0.3 * ti.sin(q[t, i] - q[t, (i + 1) % n])
            for i in range(n):
                q[t + 1, i] = q[t, i] + 0.3 * p[t + 1, i]
        for i in range(n):
            out[None] += q[T, i] ** 2 + p[T, i] * q[T - 1, i]

    @kd.kernel
    def two_step_time_loop():
        # row t + 2 from rows t + 1 and t
        for i in range(n):
            h[0, i] = x[i]
            h[1, i] = x[i] * x[i]
        ti.loop_config(serialize=True)
        for t in range(T):
            for i in range(n):
                h[t + 2, i] = 1.5 * h[t + 1, i] - 0.5 * h[t, i] + 0.1 * ti.cos(h[t + 1, (i + 1) % n])
        for i in range(n):
            out[None] += h[T + 1, i] ** 2

    @kd.kernel
    def serialized_running_adds():
        # y[i] += f(y[i - 1]): each trip adds into its own element after reading what the trip
        # before added (refused before session 49)
        for i in y:
            y[i] = x[i]
        ti.loop_config(serialize=True)
        for i in range(1, n):
            y[i] += ti.sin(y[i - 1]) * x[i]
            y[i] -= 0.2 * y[i - 1] * y[i - 1]
        for i in y:
            out[None] += y[i] ** 2

    @kd.kernel
    def inner_running_adds():
        # the same in an inner serial loop, each parallel iteration in its own row
        for i, t in z:
            z[i, t] = x[i] * (t + 1)
        for i in x:
            for t in range(1, T):
                z[i, t] += z[i, t - 1] * z[i, t - 1] * 0.2 - x[i]
        for i in x:
            out[None] += z[i, T - 1] * z[i, 1]

    return {"serialized_prefix": serialized_prefix, "inner_history": inner_history,
            "carried_locals": carried_locals, "time_loop": time_loop, "two_step_time_loop": two_step_time_loop,
            "serialized_running_adds": serialized_running_adds, "inner_running_adds": inner_running_adds}


@pytest.mark.parametrize("prefix,mode", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("name", ["serialized_prefix", "inner_history", "carried_locals", "time_loop",
                                  "two_step_time_loop", "serialized_running_adds", "inner_running_adds"])
def test_trips_reading_what_earlier_trips_stored(recurrences, name, prefix, mode):
    check_path(recurrences[name], prefix, mode)


def test_a_serialized_outermost_loop_carrying_locals_runs_serially_in_every_derivative(recurrences):
    """A local carried through a serialized outermost loop makes it a serial loop, as Taichi runs
    it: every loop at the top level of each derivative kernel keeps ti.loop_config(serialize=True)
    (without it Taichi would run the reverse sweep's trips in parallel; the derivatives are
    checked against finite differences above)."""
    k = recurrences["carried_locals"]
    make_derivative_fields(k)
    for derived in (k.reverse, k.forward, k.reverse.forward, k.forward.reverse):
        lines = derived.source.splitlines()
        top_loops = [i for i, line in enumerate(lines) if line.startswith("    for ")]
        assert top_loops, derived.source
        for i in top_loops:
            assert lines[i - 1] == "    ti.loop_config(serialize=True)", derived.source


def test_a_trip_overwriting_what_an_earlier_trip_read_is_still_refused(runtime):
    y = ti.field(ti.f64, shape=5)

    @kd.kernel
    def shifts_down():
        ti.loop_config(serialize=True)
        for i in range(1, 5):
            y[i - 1] = y[i] * 2.0  # trip i overwrites y[i - 1], which trip i - 1 read

    with pytest.raises(kd.KernDiffError, match="overwrites 'y' after reading it"):
        shifts_down.reverse()


def test_running_adds_that_read_ahead_or_race_are_still_refused(runtime):
    """Adds reading what a later trip adds into (the value read is not the one the field keeps),
    and the same recurrence run by every iteration of a parallel loop (the value read depends on
    the order Taichi runs them in) are refused."""
    y = ti.field(ti.f64, shape=5)

    @kd.kernel
    def reads_ahead():
        ti.loop_config(serialize=True)
        for i in range(4):
            y[i] += y[i + 1] * 0.5

    @kd.kernel
    def every_iteration():
        for k in range(3):
            for i in range(1, 5):
                y[i] += y[i - 1] * 0.5

    for k in (reads_ahead, every_iteration):
        with pytest.raises(kd.KernDiffError, match="adds into 'y' after reading it"):
            k.reverse()

    z = ti.field(ti.f64, shape=5)

    @kd.kernel
    def reads_ahead_after_adding():
        ti.loop_config(serialize=True)
        for i in range(1, 4):
            y[i] += 0.5 * z[i]
            z[i] = y[i + 1] * 2.0  # trip i + 1 adds into y[i + 1] later

    with pytest.raises(kd.KernDiffError, match="a trip may read an element that a later trip adds into"):
        reads_ahead_after_adding.reverse()


def test_a_time_loop_reading_the_row_its_trip_writes_is_still_refused(runtime):
    """In a serialized time loop, q[t + 1, i] = ... reading q[t + 1, i + 1]: trip t overwrites
    elements of row t + 1 that the same trip read before (i + 1 is read at i, written at i + 1),
    so the time loop's rows do not make the read safe."""
    q = ti.field(ti.f64, shape=(4, 5))

    @kd.kernel
    def reads_ahead():
        ti.loop_config(serialize=True)
        for t in range(3):
            for i in range(4):
                q[t + 1, i] = q[t, i] + q[t + 1, i + 1] * 0.1

    with pytest.raises(kd.KernDiffError, match="overwrites 'q' after reading it"):
        reads_ahead.reverse()


def _time_loop_source(seed):
    """A drawn serialized time loop over rows of h: trip t writes row t + a (a = 1 or 2) from reads
    of rows t + b (b = 0..2, at i, i +- 1 or 0), and maybe a second inner loop writes row t + 3
    from rows t + 1 and t. (source, whether a read reaches a row at or after the one written:
    such a trip reads what it or a later trip overwrites.)"""
    import random
    r = random.Random(seed)
    a = r.choice([1, 2])
    reads = [(r.choice([0, 1, 2]) if r.random() < 0.3 else r.choice([0, a - 1]),
              r.choice(["i", "(i + 1) % n", "(i + n - 1) % n", "0"])) for _ in range(r.choice([1, 2]))]
    terms = " + ".join(f"{c} * ti.sin(h[t + {b}, {j}])" for c, (b, j) in zip((0.3, 0.2), reads))
    second = "        for i in range(n):\n            h[t + 3, i] = 0.1 * h[t + 1, (i + 1) % n] + h[t, i]\n" \
        if r.random() < 0.5 else ""
    src = ("import taichi as ti\n\n\n"
           "def kernel():\n"
           "    for i in range(n):\n"
           "        h[0, i] = x[i]\n"
           "        h[1, i] = x[i] * x[i]\n"
           "        h[2, i] = 0.5 * x[i]\n"
           "    ti.loop_config(serialize=True)\n"
           "    for t in range(T):\n"
           "        for i in range(n):\n"
           f"            h[t + {a}, i] = 0.9 * h[t + {a - 1}, i] + {terms}\n"
           + second +
           "    for i in range(n):\n"
           "        out[None] += h[T + 2, i] ** 2 + h[T, i]\n")
    return src, any(b >= a for b, _ in reads)


def test_drawn_time_loops_are_differentiated_or_refused(runtime, tmp_path):
    """Serialized time loops drawn at random (the rule of session 43 relates a store and a read
    by any serial loop around both): each either has derivatives that agree with f64 finite
    differences on the first and second order paths (kd.check_grad, order=2), or is refused; a
    trip that reads a row at or after the one it writes is always refused, and most of the rest
    are taken."""
    n, T = 4, 3
    fields = {"n": n, "T": T, "x": ti.field(ti.f64, shape=n), "h": ti.field(ti.f64, shape=(T + 4, n)),
              "out": ti.field(ti.f64, shape=())}
    fields["x"].from_numpy(np.linspace(0.2, 0.8, n))
    taken = safe = 0
    for seed in range(12):
        src, reads_ahead = _time_loop_source(seed)
        k = kd.kernel(load_module(src, fields, tmp_path, "time_loop").kernel)
        safe += not reads_ahead
        try:
            err = kd.check_grad(k, [fields["x"]], fields["out"], order=2)
        except kd.KernDiffError as e:
            assert "overwrites 'h' after reading it" in e.reason, src
            continue
        assert not reads_ahead, src
        assert err < 1e-6, src
        taken += 1
    assert safe >= 6 and taken >= safe - 2, (taken, safe)


def test_branches_with_nothing_to_recompute_and_constant_conditions_read_plainly(runtime):
    """The reverse kernel recomputes only what the adjoint needs, inside the adjoint's own branches
    (one if chain, not a recomputing chain with `if c: pass else:` and then another); a
    condition that folds to a constant (`... and c == 0.0` with c a constant 0.2) is folded, and
    the branch it never takes is gone, not written `elif 0:`. The derivatives are checked
    against finite differences."""
    z = ti.field(ti.f64, shape=6)
    out = ti.field(ti.f64, shape=6)
    z.from_numpy(np.array([-1.3, -0.4, 0.2, 0.7, 1.6, 2.4]))

    @kd.kernel
    def piecewise():
        for i in z:
            v = z[i]
            c = 0.2
            if v < -1.0:
                out[i] = v ** 2
            elif v < 0.5:
                w = ti.sin(v)
                out[i] = w * v
            elif v > 2.0 and c == 0.0:
                out[i] = 0.0
            else:
                out[i] = v * c + ti.exp(-v)

    for mode in ("forward", "reverse"):
        check_path(piecewise, "", mode)
    check_path(piecewise, "reverse", "forward")
    code = [line.strip() for line in piecewise.reverse.source.splitlines() if not line.strip().startswith("#")]
    assert code.count("if v < -1.0:") == 1 and "pass" not in code and "w = ti.sin(v)" in code
    assert not any(" and 0" in line or "and c" in line or line == "elif 0:" for line in code)


def test_loop_config_options_reach_the_derivative_kernels_loops(runtime):
    """ti.loop_config(block_dim=..., parallelize=...) tunes how Taichi runs the loop after it (the
    block size on a GPU, the thread count on a CPU): kerndiff's primal keeps it, and so does each
    derivative kernel's loop made from that loop. A non-constant value is refused."""
    x = ti.field(ti.f64, shape=5)
    y = ti.field(ti.f64, shape=5)
    x.from_numpy(np.linspace(0.1, 0.9, 5))

    @kd.kernel
    def tuned():
        ti.loop_config(block_dim=32, parallelize=2)
        for i in x:
            y[i] = ti.sin(x[i]) * x[i]

    for prefix, mode in PATHS:
        check_path(tuned, prefix, mode)
    for k in (tuned, tuned.forward, tuned.reverse, tuned.reverse.forward):
        lines = k.source.splitlines()
        loop = next(i for i, line in enumerate(lines) if line.startswith("    for "))
        assert lines[loop - 1] == "    ti.loop_config(block_dim=32, parallelize=2)", k.source

    @kd.kernel
    def unknown(b: ti.i32):
        ti.loop_config(block_dim=b)
        for i in x:
            y[i] = x[i]

    with pytest.raises(kd.KernDiffError, match=r"ti.loop_config\(block_dim=...\) needs a compile-time value"):
        unknown(32)


def test_stores_outside_the_range_a_loop_read_are_accepted(runtime):
    """Boundary values set after the interior: the loop reads y[i] for i in range(1, n - 1) and
    the kernel then stores y[0] and y[n - 1], elements the loop never read, so the reverse pass
    has every value it needs (refused before: only launch-constant shifts were compared). A store
    into the range read is still refused."""
    n = 8
    x = ti.field(ti.f64, shape=n)
    y = ti.field(ti.f64, shape=n)
    x.from_numpy(np.linspace(0.2, 0.9, n))

    @kd.kernel
    def boundaries():
        for i in range(1, n - 1):
            y[i] = x[i - 1] * x[i + 1] + ti.sin(x[i])
        acc = 0.0
        ti.loop_config(serialize=True)
        for i in range(1, n - 1):
            acc = acc * 0.9 + y[i] * 0.1
        y[0] = acc
        y[n - 1] = y[1] * y[n - 2]

    for prefix, mode in PATHS:
        check_path(boundaries, prefix, mode)

    @kd.kernel
    def overlapping():
        for i in range(1, n):
            y[i] = x[i] * 2.0
        for i in range(0, n - 1):
            x[i + 1] = y[i] * 0.5  # x[1 .. n - 1], which the first loop read

    with pytest.raises(kd.KernDiffError, match="overwrites 'x' after reading it"):
        overlapping.reverse()


@pytest.fixture(scope="module")
def exclusive(runtime):
    """A field element read in one branch of an if and overwritten in the other: each iteration
    takes one branch, so the value read is still in the field when the reverse pass reads it."""
    x = ti.field(ti.f64, shape=6)
    g = ti.field(ti.f64, shape=(6, 2))
    y = ti.field(ti.f64, shape=6)
    x.from_numpy(np.array([0.4, -0.7, 1.3, -0.2, 0.9, -1.1]))
    g.from_numpy(np.arange(12.0).reshape(6, 2) * 0.1 + 0.3)

    @kd.kernel
    def read_or_overwrite():
        for i in x:
            if x[i] > 0.0:
                y[i] = g[i, 1] * ti.sin(x[i]) + g[i, 0]
            else:
                g[i, 1] = x[i] * x[i]
                y[i] = g[i, 1] * g[i, 0]  # read after the store, in the same branch: the new value

    @kd.kernel
    def in_an_inner_loop():
        for i in x:
            for r in range(2):
                if x[i] > 0.3 * r:
                    y[i] += g[i, 0] * x[i]
                else:
                    g[i, 0] = x[i]  # a later trip of r may read what this trip stored

    @kd.kernel
    def another_element():
        for i in x:
            if x[i] > 0.0:
                y[i] = g[(i + 1) % 6, 0] * x[i]  # another iteration's element, which it may overwrite
            else:
                g[i, 0] = x[i]

    @kd.kernel
    def condition_reads_it():
        for i in x:
            if g[i, 0] > 0.5:  # the condition itself reads the element before the store
                y[i] = x[i]
            else:
                g[i, 0] = x[i]

    return read_or_overwrite, (in_an_inner_loop, another_element, condition_reads_it)


@pytest.mark.parametrize("prefix,mode", PATHS, ids=PATH_IDS)
def test_a_read_and_an_overwrite_in_exclusive_branches(exclusive, prefix, mode):
    check_path(exclusive[0], prefix, mode, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("which", range(3))
def test_exclusive_branches_that_may_still_meet_are_refused(exclusive, which):
    k = exclusive[1][which]
    with pytest.raises(kd.KernDiffError, match="after reading it"):
        k.reverse.source


def test_conditions_on_whole_vectors_any_and_all(runtime):
    """`if (v > c).all():` / `elif (v > d).any():`, as Taichi writes tests on every or some
    component (they were refused: "vector method 'all' is not supported"). The primal against
    numpy, the derivatives on the four paths against f64 finite differences."""
    n = 6
    v = ti.Vector.field(3, ti.f64, shape=n)
    out = ti.field(ti.f64, shape=())
    values = np.array([[0.5, 0.6, 0.7], [0.3, 0.9, 0.5], [0.45, 0.5, 0.42], [0.2, 0.3, 0.35],
                       [0.65, 0.1, 0.2], [0.8, 0.85, 0.9]])
    v.from_numpy(values)

    @kd.kernel
    def k():
        for i in v:
            if (v[i] > 0.4).all():
                out[None] += v[i].sum() ** 2
            elif (v[i] > 0.6).any():
                out[None] += v[i].norm_sqr() * v[i][0]

    k()
    every = (values > 0.4).all(1)
    some = ~every & (values > 0.6).any(1)
    expected = np.sum(values[every].sum(1) ** 2) + np.sum((values[some] ** 2).sum(1) * values[some][:, 0])
    assert out[None] == pytest.approx(expected, rel=1e-13)
    assert every.sum() == 3 and some.sum() == 2  # both branches and the fall-through taken
    for prefix, mode in PATHS:
        check_path(k, prefix, mode)


def test_a_guarded_division_of_a_local_has_finite_derivatives_at_its_guard(runtime):
    """`h = 0.5 / d if d != 0 else 0` with d a local: where the guard holds the branch taken is
    the constant, and the derivatives are its (zero). The division's partial is infinite there,
    and its adjoint was `select(d != 0, h_adj, 0) * inf`: NaN (as JAX's `where` gives). The
    transforms now keep a guarding select's branch derivatives under its condition. Values
    against the analytic derivative of 0.5 x / z^2 elsewhere, on every path."""
    x = ti.field(ti.f64, shape=3)
    z = ti.field(ti.f64, shape=3)
    out = ti.field(ti.f64, shape=())

    @kd.kernel
    def guarded():
        for i in x:
            d = z[i] * z[i]
            h = 0.5 / d if d != 0.0 else 0.0
            out[None] += x[i] * h + ti.log(d) * 0.0 if d > 0.0 else x[i]

    xs, zs = np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.0, -1.5])
    x.from_numpy(xs)
    z.from_numpy(zs)
    for f in (x, z, out):
        kd.adjoint(f), kd.dual(f), kd.dual(kd.adjoint(f))
    guarded()
    kd.adjoint(out)[None] = 1.0
    guarded.reverse()
    expected_z = np.where(zs != 0, -xs / np.where(zs != 0, zs, 1) ** 3, 0.0)
    expected_x = np.where(zs != 0, 0.5 / np.where(zs != 0, zs, 1) ** 2, 1.0)
    np.testing.assert_allclose(kd.adjoint(z).to_numpy(), expected_z, rtol=1e-14)
    np.testing.assert_allclose(kd.adjoint(x).to_numpy(), expected_x, rtol=1e-14)
    kd.dual(z).from_numpy(np.ones(3))
    kd.dual(out)[None] = 0.0
    out[None] = 0.0
    guarded.forward()
    assert kd.dual(out)[None] == pytest.approx(expected_z.sum(), rel=1e-14)
    guarded.forward()  # (the tangents the HVP reads)
    guarded.reverse.forward()
    hz = kd.dual(kd.adjoint(z)).to_numpy()
    assert np.isfinite(hz).all() and hz[0] == 0.0
    np.testing.assert_allclose(hz[1:], 3 * xs[1:] / zs[1:] ** 4, rtol=1e-13)


def test_a_pair_skipped_by_a_guard_on_its_distance_has_finite_derivatives(runtime):
    """`r = d.norm()` then `if r > eps: f += 1 / r` (or `q = 1 / r; f += q if r > eps else 0`,
    or a ti.func returning early, `if r < eps: return 0.0`) is how pair forces skip a particle's
    own pair and coincident ones. The reverse added the branch's zero into r's adjoint and
    multiplied it by the norm's partials d / r = 0/0: NaN in every gradient the pair reached
    (JAX's and Taichi's own AD too). Such locals' contributions are now mul_or_zero(adjoint,
    partial), zero where the adjoint is (ad/zero_adjoints.py). x[3] sits on x[0]: the gradient,
    the JVP and the HVP against the analytic ones of the pairs the guard keeps, and every path
    against f64 finite differences (steps far below the guard's 1e-3)."""
    n = 5
    x = ti.Vector.field(2, ti.f64, shape=n)
    out = ti.field(ti.f64, shape=())

    @kd.kernel
    def in_an_if():
        for i in range(n):
            d = x[i] - x[0]
            r = d.norm()
            if r > 1e-3:
                out[None] += 1.0 / r

    @kd.kernel
    def through_a_local():
        for i in range(n):
            d = x[i] - x[0]
            r = d.norm()
            q = 1.0 / r
            out[None] += q if r > 1e-3 else 0.0

    @ti.func
    def potential(d):
        r = d.norm()
        if r < 1e-3:
            return 0.0
        return 1.0 / r

    @kd.kernel
    def in_a_func_returning_early():
        for i in range(n):
            out[None] += potential(x[i] - x[0])

    rng = np.random.default_rng(3)
    xs = rng.random((n, 2))
    xs[3] = xs[0]
    v = rng.standard_normal((n, 2))
    kept = np.arange(n)[np.linalg.norm(xs - xs[0], axis=1) > 1e-3]
    assert list(kept) == [1, 2, 4]
    grad, hvp = np.zeros((n, 2)), np.zeros((n, 2))
    for i in kept:
        d = xs[i] - xs[0]
        r = np.linalg.norm(d)
        g = -d / r**3
        H = 3 * np.outer(d, d) / r**5 - np.eye(2) / r**3
        grad[i] += g
        grad[0] -= g
        Hv = H @ (v[i] - v[0])
        hvp[i] += Hv
        hvp[0] -= Hv
    for k in (in_an_if, through_a_local, in_a_func_returning_early):
        x.from_numpy(xs)
        got = np.array(kd.backward(k, inputs=[x], output=out)(xs)[0])
        np.testing.assert_allclose(got, grad, rtol=1e-13, atol=1e-13)
        jvp = kd.forward(k, inputs=[x], output=out)(xs, tangents=[v])
        assert jvp == pytest.approx(np.sum(grad * v), rel=1e-13)
        got = np.array(kd.hvp(k, inputs=[x], output=out)(xs, tangents=[v])[0])
        np.testing.assert_allclose(got, hvp, rtol=1e-12, atol=1e-12)
        x.from_numpy(xs)
        for prefix, mode in PATHS:
            check_path(k, prefix, mode)


def test_a_guarded_local_whose_adjoint_is_zero_by_chance_keeps_its_second_derivatives(runtime):
    """The guarded contribution is `mul_or_zero(r_adj, partial)`, zero where r_adj is: with w[2] =
    0, r_adj = w / r is zero for pair 2 though the branch ran, and the HVP's term d(r_adj)/dw *
    partial is not. (Guarding with `select(r_adj != 0, ...)` dropped it: the fuzzer's seed 532.)
    Every path against finite differences, and the mixed second derivative against its closed
    form d/dw_i of the gradient in x_i: d_i / r_i^2."""
    n = 4
    x = ti.Vector.field(2, ti.f64, shape=n)
    w = ti.field(ti.f64, shape=n)
    out = ti.field(ti.f64, shape=())

    @kd.kernel
    def weighted():
        for i in range(n):
            d = x[i] - x[0]
            r = d.norm()
            if r > 1e-3:
                out[None] += w[i] * ti.log(r)

    rng = np.random.default_rng(4)
    xs, ws = rng.random((n, 2)), np.array([0.7, 1.3, 0.0, -0.4])
    x.from_numpy(xs)
    w.from_numpy(ws)
    for prefix, mode in PATHS:
        check_path(weighted, prefix, mode)
    tangent_w = np.array([0.0, 0.0, 1.0, 0.0])
    hvp = kd.hvp(weighted, inputs=[x, w], output=out)([xs, ws], tangents=[np.zeros((n, 2)), tangent_w])
    d = xs[2] - xs[0]
    np.testing.assert_allclose(np.array(hvp[0])[2], d / (d @ d), rtol=1e-13)


def test_ranges_with_steps_outer_and_inner(runtime):
    """`range(start, stop, step)` with negative and positive steps, on the parallel loop and on
    inner loops (bounds from the outer index and a kernel argument): Taichi refuses a third
    argument, kerndiff counts trips (`for i_step in range(3): i = i_step * -3 + 8`). Values
    against numpy, derivatives to second order against finite differences."""
    x = ti.field(ti.f64, shape=9, needs_grad=True, needs_dual=True)
    y = ti.field(ti.f64, shape=9, needs_grad=True, needs_dual=True)
    xv = np.linspace(0.2, 1.2, 9)
    x.from_numpy(xv)

    @kd.kernel
    def stepped(n: ti.i32):
        for i in range(8, 0, -3):
            acc = x[i]
            for j in range(i - 1, -1, -2):
                acc = acc * ti.sin(x[j]) + x[j] ** 2
            for j in range(0, n, 4):
                acc += ti.cos(acc * x[j])
            y[i] = acc

    expected = np.zeros(9)
    for i in range(8, 0, -3):
        acc = xv[i]
        for j in range(i - 1, -1, -2):
            acc = acc * np.sin(xv[j]) + xv[j] ** 2
        for j in range(0, 9, 4):
            acc += np.cos(acc * xv[j])
        expected[i] = acc
    stepped(9)
    np.testing.assert_allclose(y.to_numpy(), expected, rtol=1e-14)
    assert np.count_nonzero(expected) == 3
    assert kd.check_grad(stepped, [x], y, args=(9,), order=2) < 1e-6


def test_counters_stepped_every_trip_are_set_from_the_trip_number(runtime):
    """Integer locals that every trip steps by the same amount (induction variables: `j += 3`, a
    while loop's `k -= d` with d set before the loop) are set in the backward sweep from the
    trip's number, `j = j0 + 3 * t`, instead of checkpointed or replayed from the loop's entry;
    a counter stepped under a condition or by a draw is still replayed. Derivatives against
    finite differences on every path, and, for the pure counters, no checkpoint in the reverse
    and no replay loop besides the while loop's one count of its trips; beside a carried float
    that the sweep needs, the checkpoints (in locals, or in helper fields) keep the float alone."""
    x = ti.field(ti.f64, shape=5, needs_grad=True, needs_dual=True)
    y = ti.field(ti.f64, shape=5, needs_grad=True, needs_dual=True)
    x.from_numpy(np.linspace(0.3, 1.1, 5))

    @kd.kernel
    def stepped_counter():
        for i in x:
            j = i
            acc = 0.0
            for t in range(40):  # long enough for checkpoints, had j needed them
                j += 3
                acc += ti.sin(x[j % 5] * x[i] + 0.01 * t)
            y[i] = acc

    @kd.kernel
    def while_counter(d: ti.i32):
        for i in x:
            k = 12 + i
            acc = x[i]
            while k > 0:
                acc += ti.sin(x[k % 5] * x[i] + 0.1 * k)
                k -= d
            y[i] = acc

    @kd.kernel
    def conditional_counter():
        for i in x:
            j = i
            acc = 0.0
            for t in range(40):
                if x[t % 5] > 0.6:
                    j += 1
                acc += ti.sin(x[j % 5] * x[i])
            y[i] = acc

    @kd.kernel
    def drawn_counter():
        for i in x:
            j = i
            acc = 0.0
            for t in range(12):
                j += ti.cast(ti.random() * 3.0, ti.i32)
                acc += ti.sin(x[j % 5] * x[i])
            y[i] = acc

    @kd.kernel
    def long_while_counter():  # beside a float the sweep needs: checkpoints of it alone
        for i in x:
            k = 0
            acc = x[i]
            while k < 50 + i:
                acc = acc + 0.02 * ti.sin(acc * x[k % 5])
                k += 1
            y[i] = acc

    @kd.kernel
    def long_for_counter():  # (constant trips: checkpoint rows in helper fields, of acc alone)
        for i in x:
            j = i
            acc = x[i]
            for t in range(60):
                j += 2
                acc = acc + 0.02 * ti.sin(acc * x[j % 5])
            y[i] = acc

    for k, args in ((stepped_counter, ()), (while_counter, (2,)), (conditional_counter, ()),
                    (long_while_counter, ()), (long_for_counter, ())):
        for prefix, mode in PATHS:
            check_path(k, prefix, mode, args=args, rtol=1e-6)
    import re
    while_source, for_source = long_while_counter.reverse.source, long_for_counter.reverse.source
    assert re.search(r"\bacc_\d+_ck0\b", while_source) and not re.search(r"\bk_\d+_ck0\b", while_source)
    assert re.search(r"\bacc_\d+_ck\[", for_source) and not re.search(r"\bj_\d+_ck\[", for_source), for_source
    assert kd.check_grad(drawn_counter, [x], y, order=2) < 1e-6  # (its launches draw alike here)
    for k in (stepped_counter, while_counter):
        source = k.reverse.source
        assert "checkpoints of" not in source and "_re " not in source and "_re_" not in source, source
    assert "j_1 = i + t * 3" in stepped_counter.reverse.source
    assert "k_1 = k - d * it" in while_counter.reverse.source
    assert "checkpoints of" in conditional_counter.reverse.source


_COUNTER_LINES = ["j += 3", "j += d", "if x[j % 5] > 0.6:\n    j += 1", "acc = acc + 0.05 * ti.sin(acc * x[j % 5])",
                  "acc += 0.1 * ti.cos(x[j % 5] * x[i] + 0.01 * j)", "if acc > 2.5:\n    break",
                  "if x[(j + 2) % 5] > 0.95:\n    continue", "acc = 0.9 * acc + 0.1 * x[j % 5] * ti.cast(j % 3, ti.f64)"]
_COUNTER_DIR = tempfile.mkdtemp(prefix="kerndiff_counters_")
_REAL_ON_CPU = pipeline_on_cpu  # (restored between examples)
_COUNTER_TALLY = {"long": 0, "short": 0}


@settings(max_examples=int(os.environ.get("KERNDIFF_FUZZ_N", 300)) if os.environ.get("KERNDIFF_FUZZ") == "long"
          else 8, deadline=None, derandomize=os.environ.get("CI") == "true",
          suppress_health_check=list(HealthCheck))
@given(picks=st.lists(st.sampled_from(range(len(_COUNTER_LINES))), min_size=1, max_size=4),
       loop=st.sampled_from(["for", "while"]), trips=st.sampled_from([3, 40]), where=st.sampled_from(["rows", "locals"]))
def test_drawn_counters_in_loops(runtime, monkeypatch, picks, loop, trips, where):
    """Loops drawn with integer counters stepped every trip (induction variables, set from the
    trip's number in the reverse), under a condition (replayed), beside floats the sweep needs
    (checkpointed: 40 trips; in helper-field rows or in locals), with breaks and continues:
    kd.check_grad, orders 1 and 2, agrees with central differences."""
    from kerndiff import pipeline
    monkeypatch.setattr(pipeline, "_on_cpu", (lambda: False) if where == "locals" else _REAL_ON_CPU)
    if not _COUNTERS:
        _COUNTERS.update(x=ti.field(ti.f64, 5), y=ti.field(ti.f64, 5))
        _COUNTERS["x"].from_numpy(np.array([0.35, 0.8, 0.55, 1.05, 0.2]))
    lines = [line for p in picks for line in _COUNTER_LINES[p].splitlines()]
    if loop == "for":
        head = [f"for t in range({trips}):"]
    else:  # (the counter steps first: a continue cannot skip it)
        head, lines = ["k = 0", f"while k < {trips}:"], ["k += 1"] + lines
    body = "\n".join(["j = i", "acc = x[i]", *head, *("    " + line for line in lines), "y[i] = acc + 0.01 * j"])
    fn, src = load_elementwise(body, _COUNTERS, _COUNTER_DIR, head="def kernel(d: ti.i32):\n    for i in x:")
    k = kd.kernel(fn)
    assert kd.check_grad(k, [_COUNTERS["x"]], _COUNTERS["y"], args=(2,), order=2) < 1e-6, src
    _COUNTER_TALLY["long" if trips > 32 else "short"] += 1


_COUNTERS = {}
