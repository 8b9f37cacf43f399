"""The run-time check behind stores at indices read from data (ad/claims.py, session 36).

`z[perm[i]] = f(x[i])` in a parallel loop is differentiated as a permutation's store. Where the
index array repeats an element, the primal keeps whichever iteration Taichi ran last and the
reverse credited whichever it met first: before session 36 a wrong gradient, without a word
(README.md documented the assumption). Now each launch of a reverse (and of k.reverse.forward,
and kd.Tape's reverses) first runs a check kernel in which each iteration claims its elements
and then looks whether another took them over, and raises KernDiffError naming the element and
two iterations, before the reverse touched any adjoint. Permutations run as before, and their derivatives are checked here against
finite differences and analytic values.
"""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import check

N = 6
PERMUTATION = [2, 0, 5, 1, 3, 4]
REPEATS = [1, 1, 3, 0, 4, 4]  # iterations 0 and 1 share z[1]; 4 and 5 share z[4]


@pytest.fixture(scope="module")
def f(runtime):
    made = {name: ti.field(ti.f64, shape=N) for name in ("x", "z", "y")}
    made["perm"] = ti.field(ti.i32, shape=N)
    made["v"] = ti.Vector.field(2, ti.f64, shape=N)
    made["x2"] = ti.field(ti.f64, shape=(N, 2))
    made["z2"] = ti.field(ti.f64, shape=(N, 2))
    made["loss"] = ti.field(ti.f64, shape=())
    made["x"].from_numpy(np.linspace(0.2, 0.9, N))
    made["x2"].from_numpy(np.linspace(0.2, 0.9, 2 * N).reshape(N, 2))
    return made


def raises(fn, *parts, line_text=None):
    """fn raises a KernDiffError pointing into this file that says each of parts."""
    with pytest.raises(kd.KernDiffError) as info:
        fn()
    msg = str(info.value)
    assert __file__ in msg and "Reason:" in msg and "Remedy:" in msg, msg
    for p in parts + ((line_text,) if line_text else ()):
        assert p in msg, msg


def use(perm, values):
    perm.from_numpy(np.array(values, dtype=np.int32))


def test_a_permutation_runs_and_repeats_are_refused_before_the_reverse(f):
    x, z, perm = f["x"], f["z"], f["perm"]

    @kd.kernel
    def scatter():
        for i in range(N):
            z[perm[i]] = (x[i] + 1.0) * x[i] * x[i]

    use(perm, PERMUTATION)
    scatter()
    check(scatter, "reverse")
    # analytic: z[perm[i]] = x^3 + x^2, so x_adj[i] = (3 x^2 + 2 x) z_adj[perm[i]]
    xs, seed = x.to_numpy(), np.arange(1.0, N + 1.0)
    kd.adjoint(z).from_numpy(seed)
    kd.adjoint(x).fill(0)
    scatter.reverse()
    np.testing.assert_allclose(kd.adjoint(x).to_numpy(), (3 * xs ** 2 + 2 * xs) * seed[PERMUTATION],
                               rtol=1e-12)

    use(perm, REPEATS)
    scatter()
    kd.adjoint(z).from_numpy(seed)
    kd.adjoint(x).from_numpy(np.full(N, 7.0))
    raises(scatter.reverse, "iterations i = 4 and i = 5 of this parallel loop both reach z[4]",
           "found at run time, before the reverse ran", "a permutation", line_text="z[perm[i]] = (x[i] + 1.0) * x[i] * x[i]")
    # nothing was touched, and the check left its helper fields clean: a permutation runs again
    np.testing.assert_array_equal(kd.adjoint(z).to_numpy(), seed)
    np.testing.assert_array_equal(kd.adjoint(x).to_numpy(), np.full(N, 7.0))
    use(perm, PERMUTATION)
    scatter()
    check(scatter, "reverse")


def test_derived_kernels_and_the_tape_run_the_check(f):
    """k.reverse.forward (kd.hvp's kernel), k.forward.reverse and kd.Tape's reverse launch the
    check of the reverse step they contain; with a permutation their values stand."""
    x, z, perm, loss = f["x"], f["z"], f["perm"], f["loss"]

    @kd.kernel
    def energy():
        for i in range(N):
            z[perm[i]] = x[i] * x[i] * x[i]
        for i in range(N):
            loss[None] += z[i] * z[i]

    use(perm, PERMUTATION)
    for prefix, mode in (("reverse", "forward"), ("forward", "reverse")):
        loss[None] = 0
        energy()
        loss[None] = 0
        check(getattr(energy, prefix), mode)
    # analytic HVP of sum(x^6): 30 x^4 v
    xs, v = x.to_numpy(), np.linspace(1.0, 2.0, N)
    got = kd.hvp(energy, inputs=[x], output=loss)([xs], tangents=[v])
    np.testing.assert_allclose(np.asarray(got[0]), 30 * xs ** 4 * v, rtol=1e-10)
    with kd.Tape(loss):
        loss[None] = 0
        energy()
    np.testing.assert_allclose(kd.adjoint(x).to_numpy(), 6 * xs ** 5, rtol=1e-12)

    use(perm, REPEATS)

    def taped():
        with kd.Tape(loss):
            loss[None] = 0
            energy()
    for run in (energy.reverse.forward, energy.forward.reverse, energy.reverse,
                lambda: kd.hvp(energy, inputs=[x], output=loss)([xs], tangents=[v]), taped):
        loss[None] = 0
        energy()
        raises(run, "i = 4 and i = 5", "both reach z[4]", line_text="z[perm[i]] = x[i] * x[i] * x[i]")


def test_each_kind_of_index_that_data_decides_is_checked(f):
    """A vector field's components (one claim per element), a two-dimensional loop (the message
    names both variables), a loop bounded by a kernel argument (checked for the iterations that
    launch runs), a local counted in a while loop (`z[(i + j) % 6]`, which
    no static check decides: its counter has no range) and a third trip of an inner loop of
    run-time bounds (ad/races.py takes such a loop as two trips)."""
    x, z, perm, v, x2, z2 = f["x"], f["z"], f["perm"], f["v"], f["x2"], f["z2"]
    m = ti.field(ti.i32, shape=())

    @kd.kernel
    def vectors():
        for i in range(N):
            v[perm[i]] = ti.Vector([x[i], x[i] * x[i]])

    @kd.kernel
    def rows():
        for i, j in ti.ndrange(N, 2):
            z2[perm[i], j] = x2[i, j] ** 3

    @kd.kernel
    def bounded(n: ti.i32):
        for i in range(n):
            z[perm[i]] = 1.0 / (1.0 + x[i] * x[i])

    @kd.kernel
    def counted():
        for i in range(N):
            j = 0
            while j < 2:
                z[(i + j) % 6] = x[i] * (j + 1.0)
                j += 1

    @kd.kernel
    def third_trip():
        for i in range(N):
            if i % 3 == 0:
                for j in range(m[None]):
                    z[(i + j) % 6] = x[i] * x[j]

    use(perm, PERMUTATION)
    m[None] = 3
    for k, args in ((vectors, ()), (rows, ()), (bounded, (N,)), (third_trip, ())):
        k(*args)
        check(k, "reverse", args=args)
    use(perm, REPEATS)
    for k, args, text in ((vectors, (), "iterations i = 4 and i = 5 of this parallel loop both reach v[4]"),
                          (rows, (), "iterations (i, j) = (4, 1) and (5, 1) of this parallel loop both reach "
                                     "z2[4, 1]"),
                          (bounded, (N,), "iterations i = 4 and i = 5 of this parallel loop both reach z[4]")):
        k(*args)
        raises(lambda: k.reverse(*args), text)
    use(perm, [0, 1, 2, 3, 4, 4])
    bounded(4)
    check(bounded, "reverse", args=(4,))  # iterations 0 to 3 only: z[4] is not reached
    counted()
    # i stores z[i] and z[i + 1]: the last element found shared is z[5], by i = 4 and i = 5
    raises(counted.reverse, "iterations i = 4 and i = 5 of this parallel loop both reach z[5]",
           line_text="z[(i + j) % 6] = x[i] * (j + 1.0)")
    m[None] = 4  # i = 0 reaches z[3] on its fourth trip, where i = 3 stores
    third_trip()
    raises(third_trip.reverse, "iterations i = 0 and i = 3 of this parallel loop both reach z[3]")


def test_a_loop_reading_what_the_kernel_wrote_is_checked_where_the_values_stand(f):
    """The check reads fields as the kernel left them: an index array an earlier loop of the
    kernel computes is checked (its values stand), one the loop itself rewrites afterwards is not
    (the check would read the new values; the case stays as README.md documents it)."""
    x, z, perm = f["x"], f["z"], f["perm"]
    slot = ti.field(ti.i32, shape=N)

    @kd.kernel
    def computed_first():
        for i in range(N):
            slot[i] = perm[i]
        for i in range(N):
            z[slot[i]] = x[i] * 2.0

    use(perm, REPEATS)
    computed_first()
    raises(computed_first.reverse, "both reach z[4]", line_text="z[slot[i]] = x[i] * 2.0")
    use(perm, PERMUTATION)
    computed_first()
    check(computed_first, "reverse")


def test_a_loop_bounded_by_what_a_serial_loop_counted_is_checked(f):
    """The check recomputes what the watched loop reads before it: a top-level local a serialized
    loop sets (`m = i + 1`) bounds its loop in the check too. The message names the loop's
    variable as written (`i`, which the kernel's second loop over `i` has renamed inside)."""
    x, z, perm = f["x"], f["z"], f["perm"]
    flag = ti.field(ti.i32, shape=N)

    @kd.kernel
    def counted_first():
        m = 0
        ti.loop_config(serialize=True)
        for i in range(N):
            if flag[i] > 0:
                m = i + 1
        for i in range(m):
            z[perm[i]] = x[i] * x[i]

    use(perm, REPEATS)
    flag.from_numpy(np.array([1, 0, 0, 0, 0, 0], dtype=np.int32))  # m = 1: iteration 0 alone
    counted_first()
    check(counted_first, "reverse")
    flag.from_numpy(np.array([0, 1, 0, 0, 0, 0], dtype=np.int32))  # m = 2: z[1] twice
    counted_first()
    raises(counted_first.reverse, "iterations i = 0 and i = 1 of this parallel loop both reach z[1]",
           line_text="z[perm[i]] = x[i] * x[i]")


def test_stores_with_no_derivative_to_credit_are_not_checked(f):
    """Iterations may share an element where what they store reads no float field (a kernel
    argument, a constant through a local): there is nothing to credit, and the reverse runs."""
    x, y, z, perm = f["x"], f["y"], f["z"], f["perm"]

    @kd.kernel
    def marks(level: ti.f64):
        for i in range(N):
            mark = level * 2.0
            z[perm[i]] = mark
            y[i] = x[i] * x[i]

    use(perm, REPEATS)
    marks(0.5)
    kd.adjoint(x).fill(0)
    kd.adjoint(y).fill(1.0)
    kd.adjoint(z).fill(1.0)
    marks.reverse(0.5)
    np.testing.assert_allclose(kd.adjoint(x).to_numpy(), 2 * x.to_numpy(), rtol=1e-12)
    assert marks.reverse._compiled({})["store_checks"] == []


def test_adds_and_reads_into_what_another_iteration_stores_are_checked(f):
    """Found by tests/test_fuzz_races.py (session 36): `z[rep[i]] = ...` under a condition beside
    `z[rep[i]] += ...` from every iteration. The stores alone never meet (iterations 0, 2 and 4
    store into z[1], z[3] and z[4]), but iteration 1 adds into z[1], which iteration 0 stores:
    the sum depends on their order. The check tests each access of a watched field, adds and
    reads too, against the element's claimant."""
    x, y, z, perm = f["x"], f["y"], f["z"], f["perm"]

    @kd.kernel
    def stored_and_added():
        for i in range(N):
            if i % 2 == 0:
                z[perm[i]] = x[i] * x[i]
            z[perm[i]] += x[i]

    @kd.kernel
    def stored_and_read():
        for i in range(N):
            if i % 2 == 0:
                z[perm[i]] = x[i] * x[i]
            y[i] = z[perm[i]] * x[i]

    @kd.kernel
    def read_under_a_condition():  # (the check reads z as the kernel left it: each its own element)
        for i in range(N):
            if i % 2 == 0:
                z[perm[i]] = x[i] * x[i]
            if z[perm[i]] > 0.1:
                y[i] = z[perm[i]] * x[i]

    for k in (stored_and_added, stored_and_read, read_under_a_condition):
        use(perm, PERMUTATION)
        z.fill(0.5)
        k()
        check(k, "reverse")
        use(perm, REPEATS)
        k()
        # (z[1]: iteration 0 stores, 1 adds or reads; z[4]: 4 stores, 5 adds or reads)
        raises(k.reverse, "iterations i = 4 and i = 5 of this parallel loop both reach z[4], which one of "
                          "them stores here")


def test_a_folded_index_whose_stores_never_meet_is_checked_against_its_adds(f):
    """Found by tests/test_fuzz_races.py (session 36, seed 3308785): `z[i % 3] += ...` from
    every iteration beside `if i % 2 == 0: z[i % 3] = ...`. The stores (i = 0, 2, 4 into z[0],
    z[2], z[1]) never meet, so ad.races let the same index pass as each iteration's own element;
    but i = 3 adds into z[0], which i = 0 stores. A store whose field the loop also adds into or
    reads is checked at run time whatever its index."""
    x, z = f["x"], f["z"]

    @kd.kernel
    def folded():
        for i in range(N):
            z[i % 3] += x[i] * x[i]
            if i % 2 == 0:
                z[i % 3] = x[i] * 2.0

    z.fill(0.5)
    folded()
    raises(folded.reverse, "iterations i = 2 and i = 5 of this parallel loop both reach z[2], which one of them "
                           "stores here", line_text="z[i % 3] = x[i] * 2.0")


def test_a_short_loop_into_a_large_field_clears_only_what_it_reached(f):
    """A loop of far fewer iterations than the stored field has elements (4 into 8 x 8) has its
    helper fields cleared where it reached them, not over every element; the element found is
    decoded from its number (row-major) for the message. After a refusal the next launch starts
    clean."""
    x = f["x"]
    grid = ti.field(ti.f64, shape=(8, 8))
    rows, cols = ti.field(ti.i32, shape=4), ti.field(ti.i32, shape=4)

    @kd.kernel
    def deposit():
        for i in range(4):
            grid[rows[i], cols[i]] = x[i] * x[i]

    for cells, refused in (([(1, 2), (3, 4), (0, 7), (5, 6)], None),
                           ([(1, 2), (3, 4), (1, 2), (5, 6)], "iterations i = 0 and i = 2 of this parallel loop both "
                                                              "reach grid[1, 2]"),
                           ([(7, 7), (3, 4), (1, 2), (6, 5)], None)):
        rows.from_numpy(np.array([r for r, _ in cells], dtype=np.int32))
        cols.from_numpy(np.array([c for _, c in cells], dtype=np.int32))
        deposit()
        if refused:
            raises(deposit.reverse, refused, line_text="grid[rows[i], cols[i]] = x[i] * x[i]")
        else:
            check(deposit, "reverse")
    source = deposit.reverse._compiled({})["store_checks"][0].source
    assert "for e0" not in source and "grid_owner[rows[i], cols[i]] = 0" in source, source


def test_an_index_too_long_to_evaluate_is_checked_at_run_time(f):
    """ad.races decides an index of loop variables by evaluating it over their ranges, up to
    4,096 combinations; past that it stood aside, and `z[(2 * i) % n]` over n iterations (i and
    i + n / 2 share an element) returned a wrong gradient without a word. Undecided indices are
    now checked at run time; a strided index it decides (`z[2 * i]`) gets no check."""
    n = 5000
    x, z = ti.field(ti.f64, shape=n), ti.field(ti.f64, shape=n)
    x.from_numpy(np.linspace(0.2, 0.9, n))

    @kd.kernel
    def doubled():
        for i in range(n):
            z[(2 * i) % n] = x[i] * x[i]

    @kd.kernel
    def strided():
        for i in range(n // 2):
            z[2 * i] = x[i] * x[i]

    doubled()
    raises(doubled.reverse, "both reach z[", line_text="z[(2 * i) % n] = x[i] * x[i]")
    strided()
    kd.adjoint(x).fill(0)
    kd.adjoint(z).fill(1.0)
    strided.reverse()
    np.testing.assert_allclose(kd.adjoint(x).to_numpy()[: n // 2], 2 * x.to_numpy()[: n // 2], rtol=1e-12)
    assert strided.reverse._compiled({})["store_checks"] == []
