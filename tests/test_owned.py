"""Field elements built in place by their own parallel iteration (`y[i] = b; y[i] += ...;
y[i] = tanh(y[i])`) are differentiated as locals (kerndiff/ad/owned.py); elements other
iterations can touch, and values a kernel really destroys, are still refused (test_errors.py)."""
import os
import re
import tempfile

import numpy as np
import pytest
import taichi as ti
from hypothesis import given, settings
from hypothesis import strategies as st

import kerndiff as kd
from harness import PATH_IDS, PATHS, check_path, load_elementwise

N = 4


pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)


@pytest.fixture(scope="module")
def kernels(runtime):
    rng = np.random.default_rng(3)
    x = ti.field(ti.f64, shape=N)
    x.from_numpy(rng.uniform(0.2, 1.0, N))
    v = ti.Vector.field(3, ti.f64, shape=N)
    g = ti.field(ti.f64, shape=(N, N))

    @kd.kernel
    def vector_built_in_place():
        for i in v:
            v[i] = ti.Vector([x[i], 1.0, x[(i + 1) % N]])
            for k in range(3):
                v[i] += ti.Vector([ti.sin(v[i][1]), x[i] * k, v[i][0] ** 2]) * 0.3
            v[i] = v[i].normalized() * x[i]

    @kd.kernel
    def grid_element_built_in_place():
        for i, j in ti.ndrange(N, N):
            g[i, j] = x[i] * x[j]
            g[i, j] += ti.exp(-g[i, j])
            g[i, j] = ti.sqrt(g[i, j] + 1.0)

    y, z = ti.field(ti.f64, shape=N), ti.field(ti.f64, shape=N)
    y.from_numpy(rng.uniform(0.2, 1.0, N))

    @kd.kernel
    def conditional_store_then_read():
        # accepted as written (the read sees this iteration's store or the old value), so it is
        # left as written: promoting y[i] would load the old value and then overwrite it
        for i in x:
            if x[i] > 0.5:
                y[i] = x[i] ** 2
            z[i] = y[i] * 3.0

    e, q = ti.field(ti.f64, shape=N), ti.field(ti.f64, shape=N)

    @kd.kernel
    def continue_after_the_first_store():
        # (x is 0.27, 0.39, 0.84, 0.67: two iterations end at the continue) the element's local
        # is stored before the continue too; refused until session 32
        for i in x:
            e[i] = x[i]
            if x[i] > 0.5:
                continue
            e[i] = ti.sin(e[i]) * x[(i + 1) % N]

    @kd.kernel
    def continues_before_the_first_use_and_in_branches():
        for i in x:
            if x[i] > 0.8:
                continue  # (the element untouched: nothing to store)
            q[i] = x[i] ** 2
            for k in range(2):
                q[i] += ti.cos(q[i]) * x[i]
                if q[i] > 0.5:
                    continue  # the inner loop's: ends its trip only
                q[i] += 0.25 * x[i]
            if x[i] < 0.3:
                q[i] += 1.0
                continue
            q[i] = ti.sqrt(q[i])

    return {k.__name__: k for k in (vector_built_in_place, grid_element_built_in_place,
                                    conditional_store_then_read, continue_after_the_first_store,
                                    continues_before_the_first_use_and_in_branches)}


@pytest.mark.parametrize("prefix,mode", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("name", ["vector_built_in_place", "grid_element_built_in_place",
                                  "conditional_store_then_read", "continue_after_the_first_store",
                                  "continues_before_the_first_use_and_in_branches"])
def test_built_in_place_against_finite_differences(kernels, name, prefix, mode):
    check_path(kernels[name], prefix, mode, rtol=1e-6)


def test_reverse_recomputes_the_element_as_a_local(runtime):
    """The reverse kernel rebuilds the iteration's value in a local instead of reading the field
    it overwrote; the result matches Taichi's own reverse of the same layer written with a local."""
    W = ti.field(ti.f64, shape=(N, N), needs_grad=True)
    inp = ti.field(ti.f64, shape=N, needs_grad=True)
    out = ti.field(ti.f64, shape=N, needs_grad=True)
    rng = np.random.default_rng(4)
    W.from_numpy(rng.uniform(-1, 1, (N, N)))
    inp.from_numpy(rng.standard_normal(N))

    def in_place():
        for i in out:
            out[i] = 0.5
            for j in range(N):
                out[i] += W[i, j] * inp[j]
            out[i] = ti.tanh(out[i])

    def with_local():
        for i in out:
            s = 0.5
            for j in range(N):
                s += W[i, j] * inp[j]
            out[i] = ti.tanh(s)

    k, ref = kd.kernel(in_place), ti.kernel(with_local)
    seed = rng.standard_normal(N)
    grads = []
    for run, rev in ((k, k.reverse), (ref, ref.grad)):
        W.grad.fill(0)
        inp.grad.fill(0)
        run()
        out.grad.from_numpy(seed)
        rev()
        grads.append((W.grad.to_numpy(), inp.grad.to_numpy()))
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    code = [line.split("#")[0] for line in k.reverse.source.splitlines()]
    assert not any("out[i]" in line for line in code), k.reverse.source


def test_a_result_finished_outside_the_loops_under_tape(runtime):
    """`loss[None] = ti.sqrt(loss[None] / n)` in a kernel of its own (a root-mean-square loss
    finished after the reduction): statements outside loops run once, so the element is theirs.
    Its reverse alone needs the value it overwrote and is refused; inside kd.Tape, which restores
    it, the gradient matches f64 finite differences (kerndiff once refused it there too)."""
    n = 4
    x = ti.field(ti.f64, shape=n, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    aux = ti.field(ti.f64, shape=(), needs_grad=True)
    xv = np.linspace(0.1, 1.0, n)

    @kd.kernel
    def squares():
        for i in x:
            loss[None] += x[i] ** 2

    @kd.kernel
    def root_mean():
        loss[None] = ti.sqrt(loss[None] / n)
        aux[None] = loss[None] * 2
        if loss[None] > 0.5:
            loss[None] += aux[None] * 0.1

    def run(values):
        x.from_numpy(values)
        loss[None], aux[None] = 0.0, 0.0
        squares()
        root_mean()
        return loss[None]

    x.from_numpy(xv)
    with kd.Tape(loss):
        squares()
        root_mean()
    h = 1e-6
    fd = [(run(xv + h * e) - run(xv - h * e)) / (2 * h) for e in np.eye(n)]
    np.testing.assert_allclose(x.grad.to_numpy(), fd, rtol=1e-7)
    with pytest.raises(kd.KernDiffError, match="launch it inside kd.Tape"):
        root_mean.reverse()


@pytest.mark.parametrize("prefix,mode", PATHS, ids=PATH_IDS)
def test_own_element_finished_under_a_test_of_the_loop_index(runtime, prefix, mode):
    """`if i == 0: y[i] = y[i] * 3.0` still writes the iteration's own element: the branch knows
    i is 0 but leaves field indices alone (as `y[0]` the element was no longer recognized as the
    iteration's own, and the kernel was refused)."""
    x = ti.field(ti.f64, shape=N)
    y = ti.field(ti.f64, shape=N)
    x.from_numpy(np.linspace(0.1, 0.9, N))

    @kd.kernel
    def scaled_first():
        for i in x:
            y[i] = x[i] * x[i]
            if i == 0:
                y[i] = y[i] * 3.0

    check_path(scaled_first, prefix, mode, rtol=1e-6, atol=1e-8)


def test_serial_trips_updating_their_own_elements_under_tape(runtime):
    """A running product kept in place, each trip of a serial loop reading and then overwriting
    its own element (`acc = acc * b[i, t]; b[i, t] = acc`): no other trip touches it, so kd.Tape,
    which restores b before the reverse pass, makes it reversible (ad.owned._owned_by_trips):
    kd.check_grad of the program, orders 1 and 2, against central differences, and the gradient
    against the analytic one; so is a trip that reads its element again after overwriting it
    (the element is a local for the trip: ad.owned._promote_trips), and a scan in place, each
    trip reading the element the trip before wrote (`b[i, t] = b[i, t - 1] * b[i, t]`: the
    value is handed on in a local, ad.owned._forward_previous_trip), and one reading the element
    two trips back wrote (two locals, handed on one place each trip; refused until session 55).
    Alone the reverse is refused with that remedy; a trip re-touched by an outer serial loop is
    refused under kd.Tape too (restoring b would give it the values from before the launch, not
    the ones it read)."""
    n, T = 3, 5
    b = ti.field(ti.f64, (n, T), needs_grad=True)
    loss = ti.field(ti.f64, (), needs_grad=True)

    @kd.kernel
    def running_product():
        for i in range(n):
            acc = 1.0
            for t in range(T):
                acc = acc * b[i, t]
                b[i, t] = acc

    @kd.kernel
    def measure():
        for i in range(n):
            for t in range(T):
                loss[None] += b[i, t] * (t + 1)

    @kd.kernel
    def from_the_trip_before():
        for i in range(n):
            for t in range(1, T):
                b[i, t] = b[i, t - 1] * b[i, t]

    @kd.kernel
    def from_two_trips_before():
        for i in range(n):
            for t in range(2, T):
                b[i, t] = b[i, t - 2] * b[i, t]

    @kd.kernel
    def read_after_its_store():
        for i in range(n):
            for t in range(T):
                b[i, t] = b[i, t] * 2.0 + 0.1 * b[i, t] ** 2
                loss[None] += b[i, t] ** 2

    @kd.kernel
    def halved_twice():
        for i in range(n):
            for s in range(2):
                for t in range(T):
                    b[i, t] = b[i, t] * 0.5 + b[i, t] ** 2

    b0 = np.random.default_rng(7).uniform(0.5, 1.5, (n, T))
    b.from_numpy(b0)

    def program():
        running_product()
        measure()

    assert kd.check_grad(program, [b], loss, order=2) < 1e-6
    assert kd.check_grad(lambda: read_after_its_store(), [b], loss, order=2) < 1e-6  # (a program: kd.Tape)
    b.from_numpy(b0)
    with kd.Tape(loss):
        program()
    # d/db[i, s] of Σ_t (t + 1) Π_{u <= t} b[i, u] = Σ_{t >= s} (t + 1) Π_{u <= t} b / b[i, s]
    prods = np.cumprod(b0, axis=1)
    expected = np.array([[sum((t + 1) * prods[i, t] for t in range(s, T)) / b0[i, s] for s in range(T)]
                         for i in range(n)])
    np.testing.assert_allclose(kd.adjoint(b).to_numpy(), expected, rtol=1e-12)
    b.from_numpy(b0)
    running_product()
    with pytest.raises(kd.KernDiffError, match="launch it inside kd.Tape, which snapshots the fields"):
        running_product.reverse()
    # the scan in place: b[i, t] = Π_{u <= t} b[i, u] as running_product leaves it
    b.from_numpy(b0)
    with kd.Tape(loss):
        from_the_trip_before()
        measure()
    np.testing.assert_allclose(b.to_numpy(), prods, rtol=1e-14)
    np.testing.assert_allclose(kd.adjoint(b).to_numpy(), expected, rtol=1e-12)
    b.from_numpy(b0)
    assert kd.check_grad(lambda: (from_the_trip_before(), measure()), [b], loss, order=2) < 1e-6
    source = from_the_trip_before.reverse_from_inputs.source
    assert "b_i_0 = b[i, 0]" in source  # (read once: no trip writes it)
    # the first trip's value is that local, not a copy of it copied again (`b_prev_2 = b_i_0`,
    # `b_prev_3 = b_prev_2`, until session 55)
    assert not re.search(r"^ *(\w+) = \w+\n *\w+ = \1\n", source, re.M), source
    # two trips back: a product over every other element (b[i, 0] b[i, 2] b[i, 4] ...)
    b.from_numpy(b0)
    from_two_trips_before()
    alternate = b0.copy()
    alternate[:, 0::2], alternate[:, 1::2] = np.cumprod(b0[:, 0::2], axis=1), np.cumprod(b0[:, 1::2], axis=1)
    np.testing.assert_allclose(b.to_numpy(), alternate, rtol=1e-14)
    b.from_numpy(b0)
    with kd.Tape(loss):
        from_two_trips_before()
        measure()
    # d/db[i, s] of Σ_t (t + 1) Π_{u <= t, u = t mod 2} b[i, u]: the terms of s's parity from s on
    expected = np.array([[sum((t + 1) * alternate[i, t] for t in range(s, T, 2)) / b0[i, s] for s in range(T)]
                         for i in range(n)])
    np.testing.assert_allclose(kd.adjoint(b).to_numpy(), expected, rtol=1e-12)
    b.from_numpy(b0)
    assert kd.check_grad(lambda: (from_two_trips_before(), measure()), [b], loss, order=2) < 1e-6
    assert "b_prev2_3 = b_i_0" in from_two_trips_before.reverse_from_inputs.source  # (two locals, handed on)
    with pytest.raises(kd.KernDiffError, match="carry the running value in a local"):
        with kd.Tape(loss):
            halved_twice()


def test_a_long_scan_two_trips_back_keeps_checkpoints(runtime):
    """A scan in place reading one and two trips back over 40 trips (more than the reverse
    replays: its carried locals are checkpointed in helper-field rows), under kd.Tape: the values
    against numpy's recurrence, and kd.check_grad of the program (orders 1 and 2)."""
    n, T = 2, 40
    b = ti.field(ti.f64, (n, T), needs_grad=True)
    loss = ti.field(ti.f64, (), needs_grad=True)

    @kd.kernel
    def second_order():
        for i in range(n):
            for t in range(2, T):
                b[i, t] = b[i, t - 1] * b[i, t] * 0.5 + 0.1 * ti.sin(b[i, t - 2])

    @kd.kernel
    def measure():
        for i, t in b:
            loss[None] += b[i, t] * (1.0 + 0.01 * t)

    b0 = np.random.default_rng(5).uniform(0.5, 1.5, (n, T))
    b.from_numpy(b0)
    second_order()
    expected = b0.copy()
    for t in range(2, T):
        expected[:, t] = expected[:, t - 1] * expected[:, t] * 0.5 + 0.1 * np.sin(expected[:, t - 2])
    np.testing.assert_allclose(b.to_numpy(), expected, rtol=1e-14)
    b.from_numpy(b0)
    assert kd.check_grad(lambda: (second_order(), measure()), [b], loss, order=2) < 1e-6
    assert "b_prev2_1_ck[i, t_ck - 2] = b_prev2_1" in second_order.reverse_from_inputs.source


_TRIP_LINES = ["acc = acc * b[i, t]", "acc = acc + 0.3 * ti.sin(b[i, t])", "b[i, t] = acc",
               "b[i, t] = b[i, t] * 0.5 + acc", "b[i, t] += 0.1 * acc", "c[i, t] = b[i, t] ** 2",
               "if acc > 1.0:\n    b[i, t] = 0.5 * acc", "acc = acc + 0.2 * b[i, (t + 1) % T]",
               "b[i, t] = b[i, t - 1] * b[i, t]", "acc = acc + 0.4 * b[i, t - 1]", "b[i, t] += 0.3 * b[i, t - 1] ** 2",
               "c[i, t] = b[i, t - 1] * acc", "b[i, t] = b[i, t - 2] * b[i, t]", "acc = acc + 0.2 * b[i, t - 2]",
               "b[i, t] += 0.2 * ti.cos(b[i, t - 2]) * acc"]
_TRIPS = {}
_TRIP_COUNTS = {"checked": 0, "refused": 0}
_TRIP_DIR = tempfile.mkdtemp(prefix="kerndiff_trips_")


@settings(max_examples=int(os.environ.get("KERNDIFF_FUZZ_N", 300)) if os.environ.get("KERNDIFF_FUZZ") == "long"
          else 10, deadline=None, derandomize=os.environ.get("CI") == "true")
@given(picks=st.lists(st.sampled_from(range(len(_TRIP_LINES))), min_size=1, max_size=4))
def test_drawn_serial_trips_under_tape(picks):
    """Drawn serial trips reading and writing b's elements in place, in a program under kd.Tape:
    refused, or kd.check_grad's gradient agrees with central differences (never a wrong one)."""
    n, T = 2, 5
    if not _TRIPS:
        _TRIPS.update(b=ti.field(ti.f64, (n, T), needs_grad=True), c=ti.field(ti.f64, (n, T), needs_grad=True),
                      loss=ti.field(ti.f64, (), needs_grad=True), T=T, n=n)
    f = _TRIPS
    start = 2 if any("t - 2" in _TRIP_LINES[p] for p in picks) else 1
    body = f"acc = 0.7\nfor t in range({start}, T):\n" + "\n".join(
        "    " + line for p in picks for line in _TRIP_LINES[p].splitlines())
    fn, src = load_elementwise(body, f, _TRIP_DIR, head="def kernel():\n    for i in range(n):")
    k = kd.kernel(fn)

    @kd.kernel
    def measure():
        for i, t in f["b"]:
            f["loss"][None] += f["b"][i, t] * (t + 1) + f["c"][i, t]

    def program():
        k()
        measure()

    f["b"].from_numpy(np.linspace(0.3, 1.2, n * T).reshape(n, T))
    f["c"].fill(0)
    try:
        assert kd.check_grad(program, [f["b"]], f["loss"]) < 1e-6, src
        _TRIP_COUNTS["checked"] += 1
    except kd.KernDiffError:
        _TRIP_COUNTS["refused"] += 1


def test_scans_in_place_of_components_and_of_triangles_under_tape(runtime):
    """Scans in place in other shapes, under kd.Tape, against central differences (kd.check_grad
    of the program, orders 1 and 2): a running sum of one component of a vector field, read
    again after the trip wrote it, beside the other component read only; a scan along t from a
    start that an outer serial loop sets (`range(u + 1, T)`: the first trip of each u reads
    m[i, u, u], which no trip writes). A scan whose start is a local the trips reassign is still
    refused."""
    n, T = 2, 5
    v = ti.Vector.field(2, ti.f64, (n, T), needs_grad=True)
    m = ti.field(ti.f64, (n, 3, T), needs_grad=True)
    c = ti.field(ti.f64, (n, T), needs_grad=True)
    loss = ti.field(ti.f64, (), needs_grad=True)

    @kd.kernel
    def running_sum():
        for i in range(n):
            for t in range(1, T):
                v[i, t][0] += ti.sin(v[i, t - 1][0]) * v[i, t][1]
                c[i, t] = v[i, t][0] ** 2

    @kd.kernel
    def triangle():
        for i in range(n):
            for u in range(3):
                for t in range(u + 1, T):
                    m[i, u, t] = m[i, u, t - 1] * 0.5 + m[i, u, t] ** 2

    @kd.kernel
    def measure():
        for i, t in c:
            loss[None] += c[i, t] + v[i, t][0] * (t + 1) + v[i, t][1]
        for i, u, t in m:
            loss[None] += m[i, u, t] * (u + t + 1)

    rng = np.random.default_rng(11)
    v.from_numpy(rng.uniform(0.2, 0.9, (n, T, 2)))
    m.from_numpy(rng.uniform(0.1, 0.6, (n, 3, T)))
    for kernel in (running_sum, triangle):
        c.fill(0)
        assert kd.check_grad(lambda: (kernel(), measure()), [v, m], loss, order=2) < 1e-6
    assert "v_0_prev_3_adj" in running_sum.reverse_from_inputs.source and "m_prev_" in triangle.reverse_from_inputs.source
    # the values: the component's running sum as numpy adds it
    v0 = rng.uniform(0.2, 0.9, (n, T, 2))
    v.from_numpy(v0)
    running_sum()
    expected = v0.copy()
    for t in range(1, T):
        expected[:, t, 0] += np.sin(expected[:, t - 1, 0]) * expected[:, t, 1]
    np.testing.assert_allclose(v.to_numpy(), expected, rtol=1e-14)

    @kd.kernel
    def moving_start():
        for i in range(n):
            s = 1
            for t in range(s, T):
                c[i, t] = c[i, t - 1] * c[i, t]
                s = 2
    c.fill(0.5)
    with pytest.raises(kd.KernDiffError, match="carry the running value in a local"):
        with kd.Tape(loss):
            moving_start()


def test_later_trips_overwriting_what_a_trip_read(runtime):
    """A store that a serial loop's later trips run again over the element an earlier trip read
    after it (`b[i, t] = acc; acc += b[i, t + 1]`) is refused, with a plain reverse and inside
    kd.Tape alike: the reverse pass would read the overwritten value (a wrong gradient until
    session 53). Where no later trip can reach the element read (`c[i, 2 t]` written, `c[i, 2 t
    + 1]` read), the kernel is taken: its gradient against central differences."""
    n, T = 3, 4
    c = ti.field(ti.f64, (n, 2 * T + 1), needs_grad=True)
    x, out = ti.field(ti.f64, n, needs_grad=True), ti.field(ti.f64, n, needs_grad=True)

    @kd.kernel
    def reads_ahead():
        for i in range(n):
            acc = x[i]
            for t in range(T):
                c[i, t] = acc
                acc = acc * 0.5 + c[i, t + 1]
            out[i] = acc

    @kd.kernel
    def evens_and_odds():
        for i in range(n):
            acc = x[i]
            for t in range(T):
                c[i, 2 * t] = acc
                acc = acc * 0.5 + c[i, 2 * t + 1] ** 2
            out[i] = acc

    c.from_numpy(np.random.default_rng(5).uniform(0.2, 1.0, (n, 2 * T + 1)))
    x.from_numpy(np.array([0.3, 0.5, 0.7]))
    for launch in (lambda: reads_ahead.reverse(), lambda: kd.check_grad(lambda: reads_ahead(), [x, c], out)):
        with pytest.raises(kd.KernDiffError, match="overwrites 'c' after reading it, at line .*, in a later trip of "
                                                   "the loop around both"):
            reads_ahead()
            launch()
    assert kd.check_grad(evens_and_odds, [x, c], out, order=2) < 1e-6
