"""Every KernDiffError path: the message names the file, the line, the source with a caret, the
reason and the remedy — raised at transform time, before any kernel runs."""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import check

N = 4


pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)


@pytest.fixture(scope="module")
def f(runtime):
    return {
        "x": ti.field(ti.f64, shape=N),
        "y": ti.field(ti.f64, shape=N),
        "s": ti.field(ti.f64, shape=()),
        "n": ti.field(ti.i32, shape=N),
        "v": ti.Vector.field(3, ti.f64, shape=N),
    }


def raises(fn, *parts, line_text=None):
    with pytest.raises(kd.KernDiffError) as info:
        fn()
    msg = str(info.value)
    assert __file__ in msg, msg
    assert "Reason:" in msg and "Remedy:" in msg, msg
    assert "^" in msg, msg
    for p in parts:
        assert p in msg, msg
    if line_text:
        assert line_text in msg, msg
    return msg


def test_unsupported_statement(f):
    x = f["x"]

    @kd.kernel
    def k():
        for i in x:
            with open("a"):
                pass

    raises(k, "'With' statements are not supported", line_text='with open("a")')


def test_numpy_call_inside_kernel(f):
    x = f["x"]

    @kd.kernel
    def k():
        for i in x:
            x[i] = np.sin(x[i])

    raises(k, "a numpy call cannot run inside a kerndiff kernel", "ti.sin", line_text="np.sin(x[i])")


def test_python_call_inside_kernel(f):
    """A plain Python function runs while the kernel compiles, as in Taichi, with compile-time
    arguments only (kerndiff's run-time values have no Python operators); its result must be a
    compile-time value; an exception it raises is reported at the call."""
    x = f["x"]

    def helper(a):
        return a * 2

    @kd.kernel
    def k():
        for i in x:
            x[i] = helper(x[i])

    raises(k, "'helper' is a plain Python function", "with compile-time arguments only", "@ti.func",
           line_text="helper(x[i])")

    def table():
        return np.ones(3)

    @kd.kernel
    def returns_an_array():
        for i in x:
            x[i] = table()[0]

    raises(returns_an_array, "'table' returned a ndarray", line_text="table()[0]")

    def broken(n):
        return [0.0] * n + None

    @kd.kernel
    def raises_inside():
        for i in x:
            x[i] = broken(2)[0]

    raises(raises_inside, "'broken' raised TypeError", "while compiling the kernel", line_text="broken(2)[0]")

    # a field read while compiling would be a constant: refused, whether the field is passed in,
    # read as a global (here through a helper of the helper), or reached through an object
    def first(f):
        return f[0]

    def scale():
        return 2.0 * first_of_y()

    def first_of_y():
        return y[0]

    y = f["y"]

    @kd.kernel
    def passes_a_field():
        for i in x:
            x[i] = first(y) * x[i]

    raises(passes_a_field, "'first' is a plain Python function", "passes a run-time value or a field",
           line_text="first(y) * x[i]")

    @kd.kernel
    def reads_a_field():
        for i in x:
            x[i] = scale() * x[i]

    raises(reads_a_field, "'scale' is a plain Python function that reads 'first_of_y'", "its derivative lost",
           line_text="scale() * x[i]")


def test_python_helpers_run_while_compiling(f):
    """`ti.Matrix(zero_matrix())` (DiffTaichi's liquid), an index from a helper, and a helper's
    arithmetic on constants: the values Taichi's kernel computes, with derivatives."""
    x, y, v = f["x"], f["y"], f["v"]

    def zero_vec():
        return [0.0, 0.0, 0.0]

    def zero_matrix():
        return [zero_vec(), zero_vec(), zero_vec()]

    def last(n):
        return n - 1

    def up():
        return ti.Vector([0.0, 1.0, 0.0])

    def weight(k, scale=0.5):
        return scale * (k + 1)

    def body():
        for i in x:
            m = ti.Matrix(zero_matrix()) + ti.Matrix([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]]) * x[i]
            w = ti.Vector(zero_vec()) + v[i] + up() * 0.5
            y[i] = (m @ w).sum() * weight(1, scale=0.25) + x[last(N)] ** 2

    rng = np.random.default_rng(5)
    x.from_numpy(rng.standard_normal(N))
    v.from_numpy(rng.standard_normal((N, 3)))
    ti.kernel(body)()
    expected = y.to_numpy()
    y.fill(0)
    k = kd.kernel(body)
    k()
    np.testing.assert_allclose(y.to_numpy(), expected, rtol=1e-14)
    xv, vv = x.to_numpy(), v.to_numpy()
    by_hand = xv * ((vv + [0.0, 0.5, 0.0]) @ np.array([1.0, 2.0, 3.0])) * 0.5 + xv[N - 1] ** 2
    np.testing.assert_allclose(expected, by_hand, rtol=1e-14)
    for mode in ("forward", "reverse"):
        check(k, mode)


def test_print_prints_in_the_primal_only(f, capfd):
    x, y, v = f["x"], f["y"], f["v"]

    @kd.kernel
    def k():
        for i in x:
            print("x", x[i], "v", v[i])
            y[i] = x[i] ** 2

    x.from_numpy(np.arange(N) + 0.5)
    v.from_numpy(np.ones((N, 3)))
    k()
    ti.sync()
    out = capfd.readouterr().out
    assert out.count("x ") == N and "x 1.5" in out and "v [1.0" in out, out
    check(k, "reverse", x0={x: np.linspace(0.5, 1.5, N)})
    check(k, "forward", x0={x: np.linspace(0.5, 1.5, N)})
    ti.sync()
    capfd.readouterr()
    y.fill(0)
    k.reverse()
    k.forward()
    ti.sync()
    assert "x " not in capfd.readouterr().out  # derivative kernels leave print out



def test_f_strings_print_as_in_taichi(f, capfd):
    """print(f"...") with format specs, vectors and compile-time values gives Taichi's text."""
    x, v = f["x"], f["v"]
    x.from_numpy(np.arange(N) + 0.25)
    v.from_numpy(np.ones((N, 3)) * 0.5)
    width = 4

    def formatted():
        for i in range(2):
            print(f"x[{i:2d}] = {x[i] * 2:.3f} 'q' v={v[i]} {v[i] * x[i]:.2f} w={width:4d}", 1.5, True)

    printed = []
    for k in (ti.kernel(formatted), kd.kernel(formatted)):
        k()
        ti.sync()
        printed.append(sorted(capfd.readouterr().out.splitlines()))
    assert printed[1] == printed[0] and "x[ 1] = 2.500 'q' v=[0.500000" in printed[0][1], printed

    @kd.kernel
    def braces():
        for i in x:
            print(f"{{x}} = {x[i]}")

    raises(braces, "cannot show braces in an f-string", line_text='print(f"{{x}} = {x[i]}")')


def test_undefined_name(f):
    x = f["x"]

    @kd.kernel
    def k():
        for i in x:
            x[i] = undefined_thing + 1  # noqa: F821

    raises(k, "name 'undefined_thing' is not defined")


def test_overwriting_a_field_it_read(f):
    x = f["x"]

    @kd.kernel
    def k():
        for i in x:
            x[i] = x[i] * x[i]

    k()  # the primal runs
    k.forward()  # forward mode is fine
    raises(k.reverse, "overwrites 'x' after reading it", "kd.Tape", line_text="x[i] = x[i] * x[i]")


def test_accumulating_into_a_field_read_in_the_same_loop(f):
    x, s = f["x"], f["s"]

    @kd.kernel
    def k():
        for i in x:
            s[None] += x[i] * s[None]

    raises(k.reverse, "adds into 's' after reading it", line_text="s[None] += x[i] * s[None]")


def test_an_update_after_an_earlier_read_names_the_field_and_the_read(f):
    x, s = f["x"], f["s"]
    z = ti.field(ti.f64, shape=N)

    @kd.kernel
    def k():
        for i in range(N - 1):
            s[None] += z[i] * x[i + 1]
            ti.atomic_min(z[i + 1], z[i])

    line = k.fn.__code__.co_firstlineno + 3
    raises(k.reverse, f"updates 'z' by ti.atomic_min after reading it, at line {line} "
                      "('s[None] += z[i] * x[i + 1]')", line_text="ti.atomic_min(z[i + 1], z[i])")


def test_construct_the_frontend_fails_on_is_named_not_a_traceback(f):
    """A Python error inside the frontend (here a runtime value where Taichi needs a compile-time
    size) still comes out as a KernDiffError at the user's line."""
    x, s = f["x"], f["s"]

    @kd.kernel
    def k():
        for i in x:
            s[None] += (ti.Matrix.identity(ti.f64, i) * x[i]).sum()

    raises(k, "cannot lower this statement", "TypeError",
           line_text="s[None] += (ti.Matrix.identity(ti.f64, i) * x[i]).sum()")


def test_bitwise_operators_need_integers(f):
    x, s = f["x"], f["s"]

    @kd.kernel
    def on_float():
        for i in x:
            s[None] += x[i] & 1

    raises(on_float, "bitwise operator on a floating-point value", line_text="s[None] += x[i] & 1")

    @kd.kernel
    def or_into_float_field():
        for i in x:
            x[i] |= 1

    raises(or_into_float_field, "an atomic or needs an integer field; 'x' holds f64", line_text="x[i] |= 1")

    @kd.kernel
    def static_assert_fails():
        ti.static_assert(N == 5, "four is not five")
        for i in x:
            s[None] += x[i]

    raises(static_assert_fails, "ti.static_assert failed: four is not five", line_text="ti.static_assert(N == 5")

    @kd.kernel
    def static_assert_at_run_time():
        for i in x:
            ti.static_assert(x[i] > 0.0)

    raises(static_assert_at_run_time, "needs a compile-time condition", "assert",
           line_text="ti.static_assert(x[i] > 0.0)")


def test_random_numbers_inside_a_kernel(f):
    """ti.randn draws floats; ti.random takes a dtype (kernels that draw: test_random)."""
    x, n = f["x"], f["n"]

    @kd.kernel
    def integers():
        for i in n:
            n[i] = ti.cast(ti.randn(ti.i32), ti.i32)

    @kd.kernel
    def not_a_dtype():
        for i in x:
            x[i] = ti.random(3)

    raises(integers, "ti.randn draws floats, not i32", line_text="n[i] = ti.cast(ti.randn(ti.i32), ti.i32)")
    raises(not_a_dtype, "ti.random takes a dtype, not 3", line_text="x[i] = ti.random(3)")


# An element built in place by its own iteration is a local (tests/test_owned.py); these are not.
def test_element_other_iterations_touch_is_refused(runtime):
    x = ti.field(ti.f64, shape=N)
    acc = ti.field(ti.f64, shape=2)
    y = ti.field(ti.f64, shape=N)

    @kd.kernel
    def shared():
        for i in x:
            acc[i % 2] += x[i]
            y[i] = acc[i % 2] * 2.0

    raises(shared.reverse, "reads a field it accumulates into ('acc')", line_text="y[i] = acc[i % 2] * 2.0")


def test_row_shared_by_an_ndrange_is_refused(runtime):
    x = ti.field(ti.f64, shape=(N, N))
    r = ti.field(ti.f64, shape=N)

    @kd.kernel
    def rows():
        for i, j in ti.ndrange(N, N):
            r[i] += x[i, j]
            r[i] = r[i] * 2.0

    raises(rows.reverse, line_text="r[i] = r[i] * 2.0")


def test_old_value_destroyed_is_still_refused(runtime):
    """`y[i] += x[i]; y[i] = y[i] ** 2` needs y's value from before the kernel, which it overwrote."""
    x = ti.field(ti.f64, shape=N)
    y = ti.field(ti.f64, shape=N)

    @kd.kernel
    def update():
        for i in x:
            y[i] += x[i]
            y[i] = y[i] ** 2

    raises(update.reverse, "overwrites 'y' after reading it", "kd.Tape")


def test_iterations_racing_on_an_element_are_refused(runtime):
    """`z[i + 1] = ...` beside `z[i] += ...` in a parallel loop: which iteration reaches z[i] first
    decides the primal's result, so no gradient can match it (the reverse used to return one that
    matched no order). Serialized, the order is fixed and the gradient is checked; two atomic adds
    commute and stay accepted."""
    x, y = ti.field(ti.f64, shape=N), ti.field(ti.f64, shape=N)
    z = ti.field(ti.f64, shape=N)
    x.from_numpy(np.linspace(0.2, 0.8, N))
    y.from_numpy(np.linspace(-0.5, 0.5, N))

    @kd.kernel
    def racing():
        for i in range(N - 1):
            z[i + 1] = x[i] * 2.0
            z[i] += y[i] * x[i]

    racing()  # the primal is Taichi's, order and all
    raises(racing.reverse, "iterations of this parallel loop", "other iterations write ('z[i] += y[i] * x[i]')",
           "serialize=True", line_text="z[i + 1] = x[i] * 2.0")

    @kd.kernel
    def serialized():
        ti.loop_config(serialize=True)
        for i in range(N - 1):
            z[i + 1] = x[i] * 2.0
            z[i] += y[i] * x[i]

    @kd.kernel
    def commuting():
        for i in range(N - 1):
            z[i + 1] += x[i] * 2.0
            z[i] += y[i] * x[i]

    for k in (serialized, commuting):
        z.fill(0)
        k()
        check(k, "reverse")



def test_every_iteration_storing_into_one_element_is_refused(runtime):
    """`z[i] = f(x[r])` in `for i, r in ti.ndrange(...)`, `s[None] = x[i]` in `for i in ...`: every
    iteration stores into the same element, so which value is left depends on the order Taichi
    runs them in (the reverse gave a gradient matching no order; found by a fuzzer of multi-loop
    programs in session 31). Stored from one iteration (`if r == 0:`), from a loop that runs once,
    or as an inner loop, the gradient is checked."""
    x = ti.field(ti.f64, shape=N)
    z = ti.field(ti.f64, shape=N)
    s = ti.field(ti.f64, shape=())
    x.from_numpy(np.linspace(0.2, 0.8, N))

    @kd.kernel
    def every_r():
        for i, r in ti.ndrange(N, 3):
            z[i] = x[r] * x[i]

    @kd.kernel
    def every_i():
        for i in range(N):
            s[None] = x[i] * 2.0

    raises(every_r.reverse, "store into the same element of 'z' (its index does not depend on r)",
           "if r == 0:", line_text="z[i] = x[r] * x[i]")
    raises(every_i.reverse, "store into the same element of 's' (its index does not depend on i)",
           line_text="s[None] = x[i] * 2.0")

    @kd.kernel
    def one_r():
        for i, r in ti.ndrange(N, 3):
            if r == 2:
                z[i] = x[r] * x[i]

    @kd.kernel
    def once():
        for i, r in ti.ndrange(N, 1):
            z[i] = x[r] * x[i]

    @kd.kernel
    def inner():
        for i in range(N):
            for r in range(3):
                z[i] = x[r] * x[i]

    for k in (one_r, once, inner):
        z.fill(0)
        k()
        check(k, "reverse")


def test_iterations_folded_onto_one_element_are_refused(runtime):
    """`z[i // 2] = f(x[i])` and `z[i % 3] = ...`: two iterations store into one element, the one
    Taichi runs last wins, and the reverse credited an iteration by its own order, not the
    primal's winner (before session 35 its gradient put 2·x[0] where the primal kept x[1]**2: a
    wrong number). Refused in reverse mode; still checked: a one-to-one index built from the
    same parts (`z2[i // 2, i % 2]`), a loop too short to fold (`range(2)` under `% 3`), a
    group's first iteration storing alone, and adds (`+=`), which commute."""
    x = ti.field(ti.f64, shape=N)
    z = ti.field(ti.f64, shape=N)
    z2 = ti.field(ti.f64, shape=(N // 2, 2))
    x.from_numpy(np.linspace(0.2, 0.8, N))

    @kd.kernel
    def halves():
        for i in range(N):
            z[i // 2] = x[i] * x[i]

    @kd.kernel
    def thirds():
        for i in range(N):
            z[i % 3] = ti.sin(x[i])

    raises(halves.reverse, "several iterations of this parallel loop store into one element of 'z' (i // 2",
           "if i % 2 == 0:", line_text="z[i // 2] = x[i] * x[i]")
    raises(thirds.reverse, "(i % 3 takes the same value for different i)", "if i // 3 == 0:",
           line_text="z[i % 3] = ti.sin(x[i])")

    @kd.kernel
    def pairs():
        for i in range(N):
            z2[i // 2, i % 2] = x[i] * x[i]

    @kd.kernel
    def short():
        for i in range(2):
            z[i % 3] = x[i] * x[i]

    @kd.kernel
    def first_of_each():
        for i in range(N):
            if i % 2 == 0:
                z[i // 2] = x[i] * x[i]

    @kd.kernel
    def added():
        for i in range(N):
            z[i // 2] += x[i] * x[i]

    for k in (pairs, short, first_of_each, added):
        z.fill(0)
        z2.fill(0)
        k()
        check(k, "reverse")

def test_float_index_into_local_vector(f):
    v, x = f["v"], f["x"]

    @kd.kernel
    def k():
        for i in v:
            p = v[i]
            v[i][0] = p[x[i]]

    raises(k, "vector and matrix indices must be integers", line_text="v[i][0] = p[x[i]]")


def test_assigning_outer_local_in_parallel_loop(f):
    x = f["x"]

    @kd.kernel
    def k() -> ti.f64:
        acc = 0.0
        for i in x:
            acc = x[i]
        return acc

    raises(k, "cannot be assigned inside it", "+=")


def test_return_not_last(f):
    x = f["x"]

    @kd.kernel
    def k() -> ti.f64:
        return x[0]
        x[1] = 2.0

    raises(k, "return must be the last statement")


def test_returning_other_than_the_annotation_declares(f):
    x = f["x"]

    @kd.kernel
    def scalar_for_vector() -> ti.math.vec2:
        return x[0]

    @kd.kernel
    def three_for_two() -> (ti.f64, ti.f64):
        return x[0], x[1], x[2]

    raises(scalar_for_vector, "returns 1 value(s) where its annotation declares 2", line_text="return x[0]")
    raises(three_for_two, "returns 3 value(s) where its annotation declares 2", line_text="return x[0], x[1], x[2]")


def test_missing_annotation(f):
    @kd.kernel
    def k(a):
        pass

    raises(lambda: k(1.0), "has no type annotation", line_text="def k(a):")

    @kd.kernel
    def takes_ndarray(a: ti.types.ndarray()):
        pass

    raises(lambda: takes_ndarray([0.0, 0.0]), "ndarray parameter, but got list", "a.from_numpy(array)")
    takes_ndarray(np.zeros(2))  # (a numpy array is taken, as Taichi takes it: test_ndarrays)

    @kd.kernel
    def takes_a_list(a: ti.types.struct(v=ti.f64)):
        pass

    raises(lambda: takes_a_list(1.0), "unsupported annotation", "ti.types.ndarray()",
           line_text="a: ti.types.struct(v=ti.f64)")

    @kd.kernel
    def scaled(s: ti.f64):
        for i in f["x"]:
            f["s"][None] += f["x"][i] * s

    with pytest.raises(kd.KernDiffError, match="argument 's' of scaled is a f64 parameter, but got ScalarField"):
        scaled(f["x"])  # Taichi's own launch error before

    @kd.kernel
    def returns_struct() -> ti.types.struct(a=ti.f64):  # (a vector once crashed with a KeyError)
        return 1.0

    raises(returns_struct, "unsupported return type", "a vector or matrix type, or write into a field",
           line_text="def returns_struct() -> ti.types.struct(a=ti.f64):")

    @kd.kernel
    def takes_struct(s: ti.types.struct(a=ti.f64, n=ti.i32)):
        pass

    raises(lambda: takes_struct(None), "unsupported annotation ti.types.struct(a=f64, n=i32) of parameter 's'")


def test_vector_shape_mismatch(f):
    v = f["v"]

    @kd.kernel
    def k():
        for i in v:
            v[i] = v[i] + ti.Vector([1.0, 2.0])

    raises(k, "shapes (3,) and (2,) differ")


def test_indexing_a_gradient_tuple_past_its_end_names_what_it_holds(f):
    """kd.grad of a one-argument function returns a 1-tuple; indexing it like the vector inside
    says what the tuple holds rather than showing an object address."""
    s = f["s"]

    @kd.func
    def norm(v):
        return v.norm()

    @kd.kernel
    def k():
        s[None] = kd.grad(norm)(ti.Vector([3.0, 4.0]))[1]

    raises(k, "(a 2-vector,)", line_text="kd.grad(norm)(ti.Vector([3.0, 4.0]))[1]")


def test_arithmetic_on_a_python_list(f):
    """A list in a kernel is a Python list, as in Taichi, which refuses `[...] * 2.0` too."""
    x = f["x"]

    @kd.kernel
    def k():
        for i in x:
            x[i] = ti.Vector([x[i], 1.0] * 2.0).sum()

    raises(k, "arithmetic on a Python list or tuple", "ti.Vector([...])", line_text="[x[i], 1.0] * 2.0")


def test_atomic_max_outside_parallel_loop(f):
    x, s = f["x"], f["s"]

    @kd.kernel
    def k():
        ti.atomic_max(s[None], x[0])

    @kd.kernel
    def serial():
        acc = 0.0
        ti.loop_config(serialize=True)
        for i in range(N):
            acc = acc * 0.5 + x[i]  # a carried local: the loop runs serially
            ti.atomic_min(s[None], acc)

    kd.adjoint(x)
    kd.dual(x)
    k()
    for kernel, line_text in ((k, "ti.atomic_max(s[None], x[0])"), (serial, "ti.atomic_min(s[None], acc)")):
        for derived in (kernel.reverse, kernel.forward):
            fn = "ti.max" if "max" in line_text else "ti.min"
            raises(derived, "outside a parallel loop", "runs serially", f"m = {fn}(m, v)", line_text=line_text)


def test_using_the_value_an_atomic_returns(f):
    """slot = ti.atomic_add(count[None], 1) (compaction) hands out slots in the order threads
    run, which a derivative kernel cannot replay: where the old value reaches a float (the index
    of a float store, a factor, a condition around float work, a float return) the error points
    to integer work (test_old_values: the fused form, and kernels that write integers only); of a
    local, or of a vector element, it is refused too."""
    x, n, v, s = f["x"], f["n"], f["v"], f["s"]

    @kd.kernel
    def k():
        for i in x:
            slot = ti.atomic_add(n[0], 1)
            x[slot] = 2.0 * x[i]

    @kd.kernel
    def as_a_factor():
        for i in x:
            s[None] += x[i] * ti.atomic_add(n[0], 1)

    @kd.kernel
    def first_in_its_cell():
        for i in x:
            if ti.atomic_add(n[i % 2], 1) == 0:
                s[None] += x[i]

    @kd.kernel
    def counted_trips():
        for i in x:
            trips = ti.atomic_add(n[0], 1)
            total = 0.0
            for t in range(trips):
                total += x[i]
            s[None] += total

    @kd.kernel
    def into_a_float_return() -> ti.f64:
        top = ti.atomic_sub(n[1], 1)
        return top + 0.5

    @kd.kernel
    def of_a_local():
        for i in x:
            s = 0
            n[i] = ti.atomic_add(s, 2)

    @kd.kernel
    def of_a_vector():
        for i in v:
            n[i] = ti.atomic_max(v[i], 2.0)[0]

    raises(k, "the old value ti.atomic_add returns (line", "is an index of this float field's element",
           "depends on the order the threads ran in", "running the atomic again hands out other values",
           "let the old value reach integer work only", line_text="x[slot] = 2.0 * x[i]")
    raises(as_a_factor, "reaches a float computation here", line_text="s[None] += x[i] * ti.atomic_add(n[0], 1)")
    raises(first_in_its_cell, "decides whether this float store runs", line_text="s[None] += x[i]")
    raises(counted_trips, "reaches a float computation here", line_text="s[None] += total")
    raises(into_a_float_return, "the old value ti.atomic_sub returns", "reaches a float computation here",
           line_text="return top + 0.5")
    raises(of_a_local, "ti.atomic_add returns", "not of a local or by a bitwise operation",
           line_text="n[i] = ti.atomic_add(s, 2)")
    raises(of_a_vector, "returns the old value of one scalar element, not of a vector's", "v[i][0]",
           line_text="n[i] = ti.atomic_max(v[i], 2.0)[0]")


def test_device_function_errors(f):
    @kd.func
    def g(a, b):
        return a * b

    with pytest.raises(kd.KernDiffError, match="argnum=2 is out of range"):
        kd.forward(g, argnum=2)
    with pytest.raises(kd.KernDiffError, match="argnum=5 is out of range"):
        kd.grad(g, argnum=5)
    with pytest.raises(kd.KernDiffError, match="device function"):
        g(1.0, 2.0)

    @kd.kernel
    def k() -> ti.f64:
        return kd.forward(g, argnum=0)(1, 2.0)

    raises(k, "with respect to a float scalar", "argument 0 is an integer")

    grad_of_all = kd.grad(g)  # a tuple, one entry per argument: kd.forward and kd.vjp take it, kd.grad not

    @kd.kernel
    def k2(x: ti.f64) -> ti.f64:
        return kd.grad(grad_of_all)(x, 2.0)[0]

    raises(lambda: k2(1.0), "needs a scalar-valued function", "returns 2 values", "kd.vjp with a cotangent",
           line_text="kd.grad(grad_of_all)(x, 2.0)[0]")


def test_differentiated_function_whose_loop_would_run_in_parallel(f):
    """Called outside any loop, a device function's loop is the kernel's outermost, parallel loop;
    the error says so (it once called the loop's reduction a field write). Inside a loop the same
    call works and matches finite differences."""
    x = f["x"]

    @kd.func
    def series(a):
        s = 0.0
        for k in range(3):
            s += ti.sin((k + 1) * a)
        return s

    @kd.kernel
    def at_top():
        x[0] = kd.forward(series)(0.7)

    raises(at_top, "the kernel's outermost loop here", "for i in range(1):", line_text="for k in range(3):")

    @kd.kernel
    def in_loop():
        for i in range(1):
            x[0] = kd.forward(series)(0.7)

    in_loop()
    assert x[0] == pytest.approx(sum((k + 1) * np.cos((k + 1) * 0.7) for k in range(3)), rel=1e-12)


def test_field_not_placed_yet(f):
    """`ti.field(dtype)` without a shape has no storage until placed; a kernel naming it says so
    (it failed with an AttributeError inside the frontend before)."""
    x = f["x"]
    later = ti.field(ti.f64)

    @kd.kernel
    def k():
        for i in x:
            x[i] = later[i]

    raises(k, "'later' is not placed", "ti.root.dense(ti.i, n).place(f)", line_text="x[i] = later[i]")
    ti.root.dense(ti.i, N).place(later)  # placed now, so the module's later kernels can materialize


def test_sparse_field(f):
    sp = ti.field(ti.f64)
    ti.root.pointer(ti.i, 2).dense(ti.i, 2).place(sp)
    x = f["x"]

    @kd.kernel
    def k():
        for i in sp:
            x[i] = sp[i]

    raises(k, "sparse SNode", "dense", line_text="for i in sp:")


def test_names_end_with_the_block_that_bound_them(f):
    """As in Taichi: a later loop may bind the same name afresh (this was refused as an assignment
    to an outer local); reading an iteration's value after its parallel loop, or a name bound in
    one branch of an if only, is refused instead of racy or silently zero; a name bound in both
    branches is defined after the if (one variable)."""
    x, y = f["x"], f["y"]
    x.from_numpy(np.array([0.1, 0.3, 0.7, 0.9]))  # every branch below is taken

    @kd.kernel
    def two_loops():
        for i in x:
            a = x[i] * 2.0
            y[i] = a
        for i in x:
            a = ti.sin(x[i])
            y[i] += a * a

    check(two_loops, "reverse")
    check(two_loops, "forward")
    xs = x.to_numpy()
    y.fill(0)
    two_loops()
    np.testing.assert_allclose(y.to_numpy(), 2 * xs + np.sin(xs) ** 2, rtol=1e-12)

    @kd.kernel
    def after_the_loop():
        for i in x:
            b = x[i]
        y[0] = b

    raises(after_the_loop, "'b' is bound only inside the parallel loop", "store what you need in a field",
           line_text="y[0] = b")

    @kd.kernel
    def one_branch():
        for i in x:
            if x[i] > 0.5:
                t = x[i] * 2.0
            y[i] = t  # Python and Taichi would refuse; t was silently 0 on the other path

    raises(one_branch, "'t' is bound only inside a branch of the if", "in both of its branches",
           line_text="y[i] = t")

    @kd.kernel
    def after_an_inner_loop():
        for i in x:
            for k in range(3):
                last = x[i] * k
            y[i] = last  # 0 if the loop ran no iterations

    raises(after_an_inner_loop, "'last' is bound only inside the loop at line", "before the loop",
           line_text="y[i] = last")

    @kd.kernel
    def both_branches():
        for i in x:
            if x[i] > 0.5:
                t = x[i] * 2.0
            elif x[i] > 0.2:
                t = ti.sin(x[i])
            else:
                t = 1.0
            y[i] = t

    y.fill(0)
    both_branches()
    np.testing.assert_allclose(y.to_numpy(), np.where(xs > 0.5, 2 * xs, np.where(xs > 0.2, np.sin(xs), 1.0)),
                               rtol=1e-12)
    check(both_branches, "reverse")


def test_asserts_checked_at_compile_time_or_dropped_like_taichi(f):
    x, y = f["x"], f["y"]
    n = 3

    @kd.kernel
    def wrong_size():
        for i in x:
            assert n == 4, "expects 4 components"
            y[i] = x[i]

    raises(wrong_size, "this assertion fails at compile time: expects 4 components", line_text="assert n == 4")

    @kd.kernel
    def runtime_assert():
        for i in x:
            assert x[i] > -100.0  # dropped, as Taichi does outside debug mode
            y[i] = x[i] ** 2

    x.from_numpy(np.arange(N, dtype=float))
    runtime_assert()
    np.testing.assert_array_equal(y.to_numpy(), np.arange(N) ** 2)
    check(runtime_assert, "reverse", x0={x: np.linspace(0.5, 1.5, N)})


def test_struct_field_passed_where_a_field_is_needed_names_its_members(f):
    P = ti.Struct.field({"a": ti.f64, "b": ti.math.vec2}, shape=2, needs_grad=True)
    out = f["s"]

    @kd.kernel
    def k():
        for i in P:
            out[None] += P[i].a * P[i].b.norm()

    for call in (lambda: kd.check_grad(k, [P], out), lambda: kd.adjoint(P),
                 lambda: kd.backward(k, inputs=[P], output=out), lambda: kd.FwdMode(loss=out, param=P).__enter__()):
        with pytest.raises(kd.KernDiffError, match="got StructField") as info:
            call()
        assert "pass its members, which are fields: .a, .b" in str(info.value)


def test_keywords_to_a_type_constructor_are_refused(f):
    """ti.math.vec2(1.0, y=3.0) would drop the keyword: refused with the line."""
    @kd.kernel
    def k() -> ti.f64:
        v = ti.math.vec2(1.0, y=3.0)
        return v.y

    raises(k, "takes its values by position", "positionally", line_text="ti.math.vec2(1.0, y=3.0)")


def test_factories_name_args_for_a_kernel_with_parameters():
    x, out = ti.field(ti.f64, shape=N), ti.field(ti.f64, shape=())

    @kd.kernel
    def k(a: ti.template(), c: ti.f64):
        for i in a:
            out[None] += c * a[i] ** 3

    for make, name in ((kd.backward, "kd.backward"), (kd.hvp, "kd.hvp")):
        with pytest.raises(kd.KernDiffError, match=rf"k takes 2 argument\(s\) \['a', 'c'\], but {name} was given 0") as info:
            make(k, [x], out)
        assert "args=(a, c,)" in str(info.value)
    xv = np.linspace(0.5, 1.0, N)
    grad = kd.backward(k, inputs=[x], output=out, args=(x, 0.5))([xv])
    np.testing.assert_allclose(grad[0], 1.5 * xv ** 2, rtol=1e-12)
    hv = kd.hvp(k, [x], out, args=(x, 0.5))([xv], tangents=[np.ones(N)])
    np.testing.assert_allclose(hv[0], 3.0 * xv, rtol=1e-12)


def test_stores_several_iterations_may_reach_are_refused(runtime):
    """A store whose index depends on none of the loop variable's values, reached under a
    condition on the data, in an inner loop of run-time bounds, or at a local counted up in a
    while loop: every iteration that gets there writes the same elements. Before session 35 each
    of these returned a wrong gradient (the primal kept the last iteration's value, the reverse
    credited the first). Still checked: a condition pinning the variable (`if i == N - 1`, also
    inside an `and`), and a local index read from a permutation."""
    x = ti.field(ti.f64, shape=N)
    z = ti.field(ti.f64, shape=N)
    m = ti.field(ti.i32, shape=())
    perm = ti.field(ti.i32, shape=N)
    x.from_numpy(np.linspace(0.2, 0.8, N))
    m[None] = 3
    perm.from_numpy(np.array([2, 0, 3, 1], dtype=np.int32))

    @kd.kernel
    def on_data():
        for i in range(N):
            if x[i] > 0.3:
                z[0] = x[i] * x[i]

    @kd.kernel
    def inner_of_run_time_bounds():
        for i in range(N):
            for j in range(m[None]):
                z[j] = x[i] * x[j]

    @kd.kernel
    def counted_in_a_while():
        for i in range(N):
            j = 0
            while j < 2:
                z[j] = x[i] * 2.0
                j += 1

    raises(on_data.reverse, "the iterations of this parallel loop that reach this store write the same elements "
           "of 'z' (its index does not depend on i)", "if i == ...:", line_text="z[0] = x[i] * x[i]")
    raises(inner_of_run_time_bounds.reverse, "(its index does not depend on i)", line_text="z[j] = x[i] * x[j]")
    raises(counted_in_a_while.reverse, "(its index does not depend on i)", line_text="z[j] = x[i] * 2.0")

    @kd.kernel
    def pinned():
        for i in range(N):
            if x[i] > 0.1 and i == N - 1:
                z[0] = x[i] * x[i]

    @kd.kernel
    def pinned_inner():
        for i in range(N):
            if i == 2:
                for j in range(m[None]):
                    z[j] = x[i] * x[j]

    @kd.kernel
    def permuted():
        for i in range(N):
            k = perm[i]
            z[k] = ti.sin(x[i])

    for k in (pinned, pinned_inner, permuted):
        z.fill(0)
        k()
        check(k, "reverse")


def six_element_fields(top):
    """x, y, z: three f64 fields of six elements for the race tests, x from 0.2 to `top`."""
    x, y, z = (ti.field(ti.f64, shape=6) for _ in range(3))
    x.from_numpy(np.linspace(0.2, top, 6))
    return x, y, z


def test_a_mirrored_access_to_what_the_loop_stores_is_refused(runtime):
    """`z[i] = ...` beside `... z[N - 1 - i]` in one parallel loop: iteration N - 1 - i reads (or
    writes) what iteration i writes, so the primal depends on the order Taichi runs them in;
    before session 35 the reverse returned a gradient matching no order (the race check knew
    shifts only). Still checked: the same reads in a second loop, and a mirror whose halves
    never meet (`z[i]` for i < 3 beside `z[5 - i]`)."""
    x, y, z = six_element_fields(top=0.8)

    @kd.kernel
    def read_mirrored():
        for i in range(6):
            z[i] = x[i] * x[i]
            y[i] = z[5 - i] * 2.0

    @kd.kernel
    def stored_mirrored():
        for i in range(6):
            z[i] = x[i] * x[i]
            z[5 - i] = ti.sin(x[i])

    raises(read_mirrored.reverse, "iterations of this parallel loop store into elements of z that other "
           "iterations read", "serialize=True", line_text="z[i] = x[i] * x[i]")
    raises(stored_mirrored.reverse, "that other iterations write", line_text="z[i] = x[i] * x[i]")

    @kd.kernel
    def two_loops():
        for i in range(6):
            z[i] = x[i] * x[i]
        for i in range(6):
            y[i] = z[5 - i] * 2.0

    @kd.kernel
    def halves_apart():
        for i in range(3):
            z[i] = x[i] * x[i]
            y[i] = z[5 - i] * x[i]

    for k in (two_loops, halves_apart):
        z.fill(0.5)
        y.fill(0)
        k()
        check(k, "reverse")


def test_a_read_of_what_other_iterations_store_is_refused(runtime):
    """`z[i] = ...` and then, in the same parallel loop, `z[perm[i]]`, `z[(i + 1) % 6]`,
    `z[ti.min(i + 1, 5)]` or `z[0]`: whether a read sees the stored value or the old one depends on
    the order Taichi runs the iterations in (the primal mixed both: 2, 2, 2, 18, 2, 50 for a
    permutation), and before session 35 the reverse returned the gradient of reading stored
    values, matching no run. Still checked: elements only the iteration itself stores (a row
    z2[i, :] built and read back), reads the store never meets (`z[i + 3]` for i < 3), and a
    permutation's element read back at the same index (`z[perm[i]]`)."""
    x, y, z = six_element_fields(top=0.8)
    z2 = ti.field(ti.f64, shape=(6, 3))
    perm = ti.field(ti.i32, shape=6)
    perm.from_numpy(np.array([1, 0, 3, 2, 5, 4], dtype=np.int32))

    @kd.kernel
    def permuted():
        for i in range(6):
            z[i] = x[i] * x[i]
            y[i] = z[perm[i]] * 2.0

    @kd.kernel
    def wrapped():
        for i in range(6):
            z[i] = x[i] * x[i]
            y[i] = z[(i + 1) % 6] * 2.0

    @kd.kernel
    def clamped():
        for i in range(6):
            z[i] = x[i] * x[i]
            y[i] = z[ti.min(i + 1, 5)] * 2.0

    @kd.kernel
    def first():
        for i in range(6):
            z[i] = ti.sin(x[i])
            y[i] = z[i] * z[0]

    for k, text in ((permuted, "y[i] = z[perm[i]] * 2.0"), (wrapped, "y[i] = z[(i + 1) % 6] * 2.0"),
                    (clamped, "y[i] = z[ti.min(i + 1, 5)] * 2.0"), (first, "y[i] = z[i] * z[0]")):
        raises(k.reverse, "this parallel loop reads elements of z that other iterations may store",
               "read in a later top-level loop", line_text=text)

    @kd.kernel
    def own_row():
        for i in range(6):
            for j in range(3):
                z2[i, j] = x[i] * float(j + 1)
            y[i] = z2[i, 0] * z2[i, 2]

    @kd.kernel
    def never_met():
        for i in range(3):
            z[i] = x[i] * x[i]
            y[i] = z[i + 3] * x[i]

    @kd.kernel
    def permuted_read_back():
        for i in range(6):
            z[perm[i]] = ti.sin(x[i])
            y[i] = z[perm[i]] * x[i]

    for k in (own_row, never_met, permuted_read_back):
        z.fill(0.5)
        z2.fill(0)
        y.fill(0)
        k()
        check(k, "reverse")


def test_stores_different_iterations_share_are_refused(runtime):
    """Found by tests/test_fuzz_races.py (session 35), each a wrong gradient before: a store
    beside an add into an element another iteration stores (`z[(i + 1) % 6] += ...` then `z[i] =
    ...`), a store whose index different iterations share through an inner loop (`z[(i + j) %
    6]` for j in range(2) or range(m[None]), `z[2 * i + j]` for j in range(3)), decided by
    evaluating the index over the loops' constant ranges (a run-time bound as two trips), and a
    folded index after a `continue` on the data. Still checked: `z[2 * i + j]` for j in
    range(2), whose iterations own their pairs."""
    x = ti.field(ti.f64, shape=6)
    z = ti.field(ti.f64, shape=16)
    x.from_numpy(np.linspace(0.2, 0.7, 6))

    @kd.kernel
    def add_beside_store():
        for i in range(6):
            z[(i + 1) % 6] += x[i] * 2.0
            z[i] = ti.sin(x[i])

    @kd.kernel
    def wrapped_pairs():
        for i in range(6):
            for j in range(2):
                z[(i + j) % 6] = x[i] * x[j]

    m = ti.field(ti.i32, shape=())
    m[None] = 2

    @kd.kernel
    def wrapped_pairs_run_time():
        for i in range(6):
            for j in range(m[None]):
                z[(i + j) % 6] = x[i] * x[j]

    @kd.kernel
    def overlapping_triples():
        for i in range(5):
            for j in range(3):
                z[2 * i + j] = x[i] * float(j + 1)

    @kd.kernel
    def folded_after_continue():
        for i in range(6):
            if x[i] < 0.35:
                continue
            z[i // 2] = ti.sin(x[i])

    raises(add_beside_store.reverse, "store into elements of z that other iterations may also add into",
           "separate top-level loops", line_text="z[i] = ti.sin(x[i])")
    raises(wrapped_pairs.reverse, "different iterations of this parallel loop store into the same elements of 'z'",
           line_text="z[(i + j) % 6] = x[i] * x[j]")
    raises(wrapped_pairs_run_time.reverse, "(different i reach one element of this index)",
           line_text="z[(i + j) % 6] = x[i] * x[j]")
    raises(overlapping_triples.reverse, "(different i reach one element of this index)",
           line_text="z[2 * i + j] = x[i] * float(j + 1)")
    raises(folded_after_continue.reverse, "several iterations of this parallel loop store into one element",
           line_text="z[i // 2] = ti.sin(x[i])")

    @kd.kernel
    def owned_pairs():
        for i in range(6):
            for j in range(2):
                z[2 * i + j] = x[i] * float(j + 1)

    z.fill(0)
    owned_pairs()
    check(owned_pairs, "reverse")


def test_a_pinned_store_read_by_every_iteration_is_refused(runtime):
    """`if i == 2: z[0] = ...` then `y[i] = z[0] * x[i]` in the same parallel loop: the other
    iterations read z[0] before or after iteration 2 stores it, by Taichi's order. The same index
    twice is an iteration's own element only where it reads the loop variable (`z[perm[i]]`)."""
    x, y, z = six_element_fields(top=0.7)

    @kd.kernel
    def pinned_then_read():
        for i in range(6):
            if i == 2:
                z[0] = ti.sin(x[i])
            y[i] = z[0] * x[i]

    raises(pinned_then_read.reverse, "this parallel loop reads elements of z that other iterations may store",
           line_text="y[i] = z[0] * x[i]")


def test_host_side_errors_name_the_callers_line(f):
    """A KernDiffError raised outside any kernel's source (a factory given the wrong fields, a
    kernel called with the wrong arguments, a nested kd.Tape, a device function called from
    Python) names the line of the user's code that called into kerndiff, with its caret: it once
    said only "Reason: ... Remedy: ..."."""
    x, s, n = f["x"], f["s"], f["n"]

    @kd.kernel
    def k(c: ti.f64):
        for i in x:
            s[None] += x[i] * c

    @kd.func
    def g(a):
        return a * a

    raises(lambda: kd.backward(k, inputs=[n], output=s), "dtype i32", line_text="kd.backward(k, inputs=[n], output=s)")
    raises(lambda: k(1.0, 2.0), "takes 1 arguments, got 2", line_text="k(1.0, 2.0)")
    raises(lambda: g(1.0), "device function", line_text="g(1.0)")
    raises(lambda: kd.adjoint(n), "an adjoint field was requested for", "dtype i32", line_text="kd.adjoint(n)")

    def nested():
        with kd.Tape(s):
            with kd.Tape(s):  # the inner one
                pass

    raises(nested, "cannot be nested", line_text="with kd.Tape(s):  # the inner one")


def test_a_numpy_array_passed_for_a_field_is_named(f):
    """An array given for a ti.template() parameter (a field's place): the error names the
    parameter and says to pass a field, where it said "cannot loop over array([1., ...])" or "this
    Python value cannot be indexed by a runtime value"."""
    s = f["s"]

    @kd.kernel
    def loop_over(a: ti.template()):
        for i in a:
            s[None] += a[i]

    @kd.kernel
    def index(a: ti.template()):
        for i in range(N):
            s[None] += a[i] * 2.0

    for k, what, text in ((loop_over, "cannot loop over 'a'", "for i in a:"), (index, "cannot index 'a'",
                                                                                 "s[None] += a[i] * 2.0")):
        raises(lambda: k(np.ones(N)), what, f"a numpy array of shape ({N},)", "f.from_numpy(array)", line_text=text)


def test_code_after_an_if_whose_every_branch_returns(f):
    @kd.func
    def g(a):
        if a > 0.0:
            return a
        else:
            return -a
        a = 2.0 * a

    @kd.kernel
    def k() -> ti.f64:
        return g(f["x"][0])

    raises(k, "every branch returns: it never runs", line_text="a = 2.0 * a")


def test_a_vector_reduced_into_a_scalar_local_is_refused(f):
    """`t += ti.Vector(...)` into a scalar local bound before the loop took the vector's first
    component (no error) until session 46; Taichi refuses the shapes too."""
    x, s = f["x"], f["s"]

    @kd.kernel
    def k():
        t = 0.0
        for i in x:
            t += ti.Vector([x[i], 1.0])
        s[None] = t

    raises(k, "reducing a value of shape (2,) into 't' of shape ()", line_text="t += ti.Vector([x[i], 1.0])")


@pytest.mark.parametrize("expr, reason", [
    ("v[i].dot(ti.Vector([1.0, 2.0]))", "dot of a 3-vector and a 2-vector: the shapes must agree"),
    ("ti.math.dot(v[i], ti.Vector([1.0, 2.0]))", "dot of a 3-vector and a 2-vector"),
    ("(ti.Matrix([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]) @ ti.Vector([x[i], 2.0])).sum()",
     "a 2x3 matrix @ a 2-vector: the inner dimensions (3 and 2) must agree"),
    ("v[i].cross(ti.Vector([1.0, 2.0])).sum()", "cross of a 3-vector and a 2-vector"),
    ("ti.Matrix([[x[i], 2.0, 3.0], [4.0, 5.0, 6.0]]).determinant()", "the determinant of a 2x3 matrix"),
    ("ti.Matrix([[x[i], 2.0, 3.0], [4.0, 5.0, 6.0]]).inverse().sum()", "the inverse of a 2x3 matrix"),
    ("ti.Matrix([[x[i], 2.0, 3.0], [4.0, 5.0, 6.0]]).trace()", "the trace of a 2x3 matrix"),
])
def test_vector_and_matrix_operations_on_shapes_they_do_not_take_are_refused(f, tmp_path, expr, reason):
    """Taichi refuses these at compile time; until session 46 kerndiff computed them from the
    components the shapes share (a 3-vector dotted with a 2-vector: the first two products; the
    determinant of a 2x3 matrix: a number), values and derivatives wrong with no error."""
    from harness import load_module
    src = f"import taichi as ti\n\n\ndef k():\n    for i in x:\n        s[None] += {expr}\n"
    fn = load_module(src, {"x": f["x"], "v": f["v"], "s": f["s"]}, tmp_path, "shapes").k
    with pytest.raises(kd.KernDiffError) as info:
        kd.kernel(fn)()
    msg = str(info.value)
    assert reason in msg and "Remedy:" in msg and f"s[None] += {expr}" in msg, msg
