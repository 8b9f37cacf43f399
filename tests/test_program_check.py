"""kd.check_grad of a program: a plain Python function launching @kd.kernels, checked as a whole
(kd.Tape's gradient and kd.FwdMode's tangent against central differences of the program).

Before session 43 such a function got an AttributeError ('function' object has no attribute
'forward'). The programs here run the state forward (ping-pong buffers passed as template
arguments, a fill inside, a loss accumulated with +=), so a check that did not put the fields
back before each run would compare derivatives of different programs and fail. References:
the check's own finite differences, and an analytic gradient in numpy for the Tape's numbers."""
import warnings

import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from kerndiff import tape as tape_module

pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)

N = 6
A0 = np.linspace(0.2, 0.9, N)
W0 = np.linspace(1.1, 0.4, N)


@pytest.fixture(scope="module")
def sim(runtime):
    a = ti.field(ti.f64, shape=N, needs_grad=True)
    b = ti.field(ti.f64, shape=N)
    w = ti.field(ti.f64, shape=N)
    loss = ti.field(ti.f64, shape=())

    @kd.kernel
    def step(src: ti.template(), dst: ti.template(), k: ti.f64):
        for i in range(N):
            dst[i] = src[i] + k * ti.sin(w[i] * src[(i + 1) % N])

    @kd.kernel
    def total(src: ti.template()):
        for i in range(N):
            loss[None] += src[i] ** 2

    def program():
        b.fill(0.0)
        for t in range(3):
            step(a, b, 0.1 * (t + 1))
            step(b, a, 0.2)
        total(a)

    return a, b, w, loss, step, total, program


def _reset(a, w, loss):
    a.from_numpy(A0)
    w.from_numpy(W0)
    loss[None] = 0.0


def _numpy_program(av, wv):
    x = av.copy()
    for t in range(3):
        y = x + 0.1 * (t + 1) * np.sin(wv * np.roll(x, -1))
        x = y + 0.2 * np.sin(wv * np.roll(y, -1))
    return float((x ** 2).sum())


def test_a_program_is_checked_and_its_fields_are_put_back(sim):
    a, b, w, loss, step, total, program = sim
    _reset(a, w, loss)
    a.grad.from_numpy(np.full(N, 7.0))  # an adjoint the user holds: kept
    before = {name: f.to_numpy() for name, f in (("a", a), ("b", b), ("w", w), ("loss", loss), ("a.grad", a.grad))}
    err = kd.check_grad(program, [a, w], loss)
    assert err < 1e-7
    for name, f in (("a", a), ("b", b), ("w", w), ("loss", loss), ("a.grad", a.grad)):
        np.testing.assert_array_equal(f.to_numpy(), before[name], err_msg=name)
    # the derivative fields the check made are left zero-filled
    assert not np.any(kd.adjoint(w).to_numpy()) and not np.any(kd.dual(a).to_numpy())


def test_the_tape_gradient_it_compares_is_the_programs(sim):
    """The numbers the check compares, against an independent reference: the Tape's gradient
    with respect to a and w, and central differences of the same program written in numpy."""
    a, b, w, loss, step, total, program = sim
    _reset(a, w, loss)
    from kerndiff.program_check import ProgramCheck
    check = ProgramCheck(program, [a, w], loss)
    try:
        ga, gw = check.gradient([A0, W0])
        value = check.value([A0, W0])
    finally:
        check.finish()
    h, eye = 1e-6, np.eye(N)
    ref_a = [(_numpy_program(A0 + h * e, W0) - _numpy_program(A0 - h * e, W0)) / (2 * h) for e in eye]
    ref_w = [(_numpy_program(A0, W0 + h * e) - _numpy_program(A0, W0 - h * e)) / (2 * h) for e in eye]
    assert value == pytest.approx(_numpy_program(A0, W0), rel=1e-12)
    np.testing.assert_allclose(ga, ref_a, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(gw, ref_w, rtol=1e-6, atol=1e-9)


def test_a_value_that_reaches_a_kernel_through_python_is_caught(sim):
    """`step(a, b, a.to_numpy().sum() * 0.1)`: the Tape cannot see that the argument depends on a,
    so its gradient (and FwdMode's tangent) miss that term; the differences do not."""
    a, b, w, loss, step, total, program = sim
    _reset(a, w, loss)

    def leaky():
        step(a, b, float(a.to_numpy().sum()) * 0.1)
        total(b)

    with pytest.raises(AssertionError, match="derivatives disagree"):
        kd.check_grad(leaky, [a], loss)


def test_a_plain_taichi_kernel_in_the_program_is_named(sim):
    a, b, w, loss, step, total, program = sim
    _reset(a, w, loss)

    @ti.kernel
    def plain():
        for i in range(N):
            b[i] = a[i] * 2.0

    def with_plain():
        plain()
        total(b)

    with pytest.raises(kd.KernDiffError, match="the Taichi kernel 'plain' ran inside"):
        kd.check_grad(with_plain, [a], loss)


def test_what_a_program_check_cannot_do_is_refused(sim):
    a, b, w, loss, step, total, program = sim
    with pytest.raises(kd.KernDiffError, match="a program, which kd.check_grad calls without arguments"):
        kd.check_grad(program, [a], loss, args=(1.0,))

    @ti.kernel
    def plain():
        loss[None] += a[0]

    with pytest.raises(kd.KernDiffError, match="takes a @kd.kernel, or a Python function that launches them"):
        kd.check_grad(plain, [a], loss)


def test_a_program_whose_output_does_not_depend_on_the_inputs_warns(sim):
    a, b, w, loss, step, total, program = sim
    _reset(a, w, loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kd.check_grad(lambda: total(b), [a], loss)
    assert any("every derivative it compared is zero" in str(c.message) for c in caught)


def _numpy_second(u, v, av, wv, h=1e-4):
    """uᵀ H v of _numpy_program with respect to (a, w) stacked, by central second differences at
    steps h and 2h, extrapolated (Richardson): their error is c h², about 1e-6 here."""
    def f(d):
        return _numpy_program(av + d[:N], wv + d[N:])

    def second(h):
        return (f(h * u + h * v) - f(h * u - h * v) - f(-h * u + h * v) + f(-h * u - h * v)) / (4 * h * h)
    return (4 * second(h) - second(2 * h)) / 3


def test_a_programs_hvp_is_checked_and_matches_numpy(sim):
    """kd.check_grad(program, order=2) compares the program's H·v (kd.Tape over its forward
    kernels: the ping-pong steps and the fill run as forward kernels, their reverses backward)
    with differences of its gradient; and kd.hvp(program) against second differences of the
    program written in numpy. (Refused before session 49: 'first derivatives only'.)"""
    a, b, w, loss, step, total, program = sim
    _reset(a, w, loss)
    before = {name: f.to_numpy() for name, f in (("a", a), ("b", b), ("w", w), ("loss", loss))}
    assert kd.check_grad(program, [a, w], loss, order=2) < 1e-6
    for name, f in (("a", a), ("b", b), ("w", w), ("loss", loss)):
        np.testing.assert_array_equal(f.to_numpy(), before[name], err_msg=name)
    rng = np.random.default_rng(3)
    va, vw, u = rng.standard_normal(N), rng.standard_normal(N), rng.standard_normal(2 * N)
    hvp = kd.hvp(program, inputs=[a, w], output=loss)
    ha, hw = hvp([A0, W0], tangents=[va, vw])
    assert np.dot(u, np.concatenate([ha, hw])) == pytest.approx(
        _numpy_second(u, np.concatenate([va, vw]), A0, W0), rel=1e-5)
    again = hvp([A0, W0], tangents=[va, vw])  # the program starts from its state itself: same numbers
    np.testing.assert_array_equal(again[0], ha)
    assert not np.any(kd.dual(a).to_numpy()) and not np.any(kd.dual(w).to_numpy())  # the seeds are cleared


def test_the_factories_differentiate_a_program(sim):
    """kd.backward / kd.forward / kd.hvp of a Python function that launches kernels: kd.Tape's
    gradient, kd.FwdMode's tangent (and Jacobian), H·v, as for a kernel (they were refused before
    session 49, naming the contexts). References: the program in numpy."""
    a, b, w, loss, step, total, program = sim
    _reset(a, w, loss)
    h, eye = 1e-6, np.eye(N)
    ga, gw = kd.backward(program, inputs=[a, w], output=loss)([A0, W0])
    np.testing.assert_allclose(ga, [(_numpy_program(A0 + h * e, W0) - _numpy_program(A0 - h * e, W0)) / (2 * h)
                                    for e in eye], rtol=1e-6, atol=1e-9)
    ta, tw = np.linspace(-1.0, 1.0, N), np.linspace(0.5, -0.2, N)
    jvp = kd.forward(program, inputs=[a, w], output=loss)
    directional = (_numpy_program(A0 + h * ta, W0 + h * tw) - _numpy_program(A0 - h * ta, W0 - h * tw)) / (2 * h)
    assert jvp([A0, W0], tangents=[ta, tw]) == pytest.approx(directional, rel=1e-6)
    assert jvp([A0, W0], tangents=[ta, tw]) == pytest.approx(np.dot(ga, ta) + np.dot(gw, tw), rel=1e-10)
    ja, jw = jvp([A0, W0])  # without tangents: one pass per element, as over a kernel
    np.testing.assert_allclose(ja, ga, rtol=1e-10)
    np.testing.assert_allclose(jw, gw, rtol=1e-10)

    # an output with elements: weighted by the cotangent (backward) or returned whole (forward)
    def steps():
        step(a, b, 0.3)

    c = np.linspace(1.0, 2.0, N)
    (gb,) = kd.backward(steps, inputs=[a], output=b)([A0], cotangent=c)
    (jb,) = kd.forward(steps, inputs=[a], output=b)([A0])
    np.testing.assert_allclose(gb, c @ jb, rtol=1e-10)
    (hb,) = kd.hvp(steps, inputs=[a], output=b)([A0], [ta], cotangent=c)
    (hb_plus,), (hb_minus,) = (kd.backward(steps, inputs=[a], output=b)([A0 + s * h * ta], cotangent=c)
                               for s in (1, -1))
    np.testing.assert_allclose(hb, (hb_plus - hb_minus) / (2 * h), rtol=1e-5, atol=1e-8)

    # an output the program adds into and then reads: each call starts it from zero, as kd.Tape
    # zeroes its loss (else the second call's output would build on the first's)
    @kd.kernel
    def spread(src: ti.template(), dst: ti.template()):
        for i in range(N):
            dst[i] += ti.sin(src[i]) * src[(i + 1) % N]

    @kd.kernel
    def square(dst: ti.template()):
        for i in range(N):
            dst[i] = dst[i] * dst[i]

    def spread_and_square():
        spread(a, b)
        square(b)

    gs = np.sin(A0) * np.roll(A0, -1)
    expected = 2 * c * gs * np.cos(A0) * np.roll(A0, -1) + np.roll(2 * c * gs * np.sin(A0), 1)
    backward = kd.backward(spread_and_square, inputs=[a], output=b)
    for _ in range(2):
        np.testing.assert_allclose(backward([A0], cotangent=c)[0], expected, rtol=1e-12)

    @ti.kernel
    def plain():
        loss[None] += a[0]

    for factory in (kd.backward, kd.forward, kd.hvp):
        with pytest.raises(kd.KernDiffError, match="takes a @kd.kernel or a Python function that launches them"):
            factory(plain, inputs=[a], output=loss)

    def in_python():  # the output from Python: no context sees its derivative (zeros, silently)
        loss[None] = float(np.sum(a.to_numpy() ** 2))

    for factory, call in ((kd.backward, lambda f: f([A0])), (kd.forward, lambda f: f([A0], [A0])),
                          (kd.hvp, lambda f: f([A0], [A0]))):
        with pytest.raises(kd.KernDiffError, match="'in_python' launched no @kd.kernel"):
            call(factory(in_python, inputs=[a], output=loss))

    def into_elements_in_python():  # the same into an output with elements (weighted by a kernel)
        b.from_numpy(np.sin(a.to_numpy()))

    with pytest.raises(kd.KernDiffError, match="launched no @kd.kernel"):
        kd.backward(into_elements_in_python, inputs=[a], output=b)([A0], cotangent=c)
    with pytest.raises(kd.KernDiffError, match="which kd.hvp calls without arguments"):
        kd.hvp(program, inputs=[a], output=loss, args=(1.0,))


def _programs_setting_a(a, program):
    """The program, after a whole write (`a.from_numpy(...)`) or an element write (`a[0] = ...`)
    into its input a from Python."""
    def resets_a():
        a.from_numpy(A0 * 2.0)
        program()

    def sets_an_element():
        a[0] = 0.5
        program()

    return resets_a, sets_an_element


def test_the_factories_refuse_a_program_that_sets_its_input(sim):
    """A program that writes an input from Python before a kernel reads it (`a.from_numpy(...)`,
    `a[0] = ...`) throws away the values the host function was given: refused, as kd.check_grad
    refuses it, rather than a derivative at the program's own values. A write after a kernel
    read it is the Tape's business (an overwrite)."""
    a, b, w, loss, step, total, program = sim
    _reset(a, w, loss)
    for prog in _programs_setting_a(a, program):
        for factory, call in ((kd.backward, lambda f: f([A0])), (kd.forward, lambda f: f([A0], [A0])),
                              (kd.hvp, lambda f: f([A0], [A0]))):
            with pytest.raises(kd.KernDiffError, match=r"sets its input 0 from Python before a kernel "
                                                       r"reads it, so the values kd\.\w+ was given"):
                call(factory(prog, inputs=[a], output=loss))
            assert not tape_module._ACTIVE

    def resets_a_later():
        program()
        a.from_numpy(A0 * 2.0)  # after the kernels: a value of the program, not its input
        total(a)

    (ga,) = kd.backward(resets_a_later, inputs=[a], output=loss)([A0])
    (gb,) = kd.backward(program, inputs=[a], output=loss)([A0])
    np.testing.assert_allclose(ga, gb, rtol=1e-12)


def test_what_a_programs_hvp_cannot_take_is_refused(sim):
    """A derivative kernel inside the program, and a custom-gradient function (its gradient
    function is a reverse one: the forward kernels H·v needs are not there)."""
    a, b, w, loss, step, total, program = sim
    _reset(a, w, loss)

    def with_reverse():
        program()
        total.reverse(a)

    with pytest.raises(kd.KernDiffError, match="is a derivative kernel, launched in a program whose H·v is taken"):
        kd.hvp(with_reverse, inputs=[a], output=loss)([A0], [A0])

    @ti.ad.grad_replaced
    def custom():
        total(a)

    @ti.ad.grad_for(custom)
    def custom_grad():
        total.reverse(a)

    with pytest.raises(kd.KernDiffError, match="has a custom reverse gradient .* whose H·v is taken"):
        kd.hvp(custom, inputs=[a], output=loss)([A0], [A0])
    assert not tape_module._ACTIVE
    # Taichi's own flag for a custom-gradient function's run is reset after the refusal (it stayed
    # set, and later launches took themselves for ones inside such a function)
    from taichi.lang import impl
    assert not impl.get_runtime().grad_replaced


def test_a_program_that_sets_a_checked_input_from_python_is_refused(sim):
    """`a.from_numpy(...)` (or `a[0] = ...`) inside the program, before a kernel reads a: the values
    the check passes in never reach the output (differences zero), while kd.Tape takes the values
    set as the inputs; comparing the two would blame kerndiff for the program's choice. The fields
    are put back as they were."""
    a, b, w, loss, step, total, program = sim
    _reset(a, w, loss)
    for prog in _programs_setting_a(a, program):
        with pytest.raises(kd.KernDiffError, match=r"sets its input '\w+' from Python before a kernel reads it"):
            kd.check_grad(prog, [a, w], loss)
        np.testing.assert_array_equal(a.to_numpy(), A0)


def test_an_output_with_elements_is_checked_through_a_random_weighting(runtime):
    """A program whose output is a vector field: checked through ⟨w, output⟩ for a random w, as a
    kernel's output is; a value that reaches the output through Python (`b[0] = a[0] * 3.0`, a
    constant to the Tape) is caught."""
    n = 5
    a = ti.field(ti.f64, shape=n)
    b = ti.field(ti.f64, shape=n)
    p = ti.Vector.field(2, ti.f64, shape=n)
    a.from_numpy(np.linspace(0.2, 0.9, n))

    @kd.kernel
    def first():
        for i in a:
            b[i] = ti.sin(a[i]) * a[(i + 1) % n]

    @kd.kernel
    def second():
        for i in a:
            p[i] = ti.Vector([b[i] ** 2, a[i] * b[i]])

    def program():
        first()
        second()

    assert kd.check_grad(program, [a], b) < 1e-7
    assert kd.check_grad(program, [a], p) < 1e-7
    assert not p.to_numpy().any() and not b.to_numpy().any()  # put back as they were before the checks
    # the weights and the total are made once per output shape (each new field is an SNode tree,
    # and Taichi crashes past 512 of them: one per check failed a few hundred checks in)
    from kerndiff.program_check import _WEIGHTS
    def made():
        return {key: tuple(map(id, fields)) for key, fields in _WEIGHTS["fields"].items()}

    before = made()
    for seed in range(3):
        assert kd.check_grad(program, [a], p, seed=seed) < 1e-7
    assert made() == before and len(before) >= 2

    def leaky():
        first()
        b[0] = a[0] * 3.0
        second()

    with pytest.raises(AssertionError, match="derivatives disagree"):
        kd.check_grad(leaky, [a], p)


def test_the_hvp_of_a_simulation_updating_its_state_in_place(runtime):
    """H·v of a mass-spring simulation whose step updates v and x in place (kd.Tape snapshots
    them and runs the steps' reverses from the values before: here the reverses of their forward
    kernels, the tangents snapshot with them), with a fill from Python each step and an element
    write (constants: their tangents zero, as under kd.FwdMode), against differences of the
    program's gradient (kd.check_grad(order=2)) and against the same H·v assembled from columns
    of those differences."""
    n = 5
    x = ti.Vector.field(2, ti.f64, shape=n)
    v = ti.Vector.field(2, ti.f64, shape=n)
    force = ti.Vector.field(2, ti.f64, shape=n)
    stiffness = ti.field(ti.f64, shape=())
    loss = ti.field(ti.f64, shape=())
    rng = np.random.default_rng(1)
    x0, v0 = rng.uniform(size=(n, 2)), rng.uniform(-0.1, 0.1, size=(n, 2))

    @kd.kernel
    def forces():
        for i in x:
            d = x[(i + 1) % n] - x[i]
            length = d.norm()
            force[i] += stiffness[None] * (length - 0.3) * d / length

    @kd.kernel
    def step(dt: ti.f64):
        for i in x:
            v[i] += dt * (force[i] - force[(i + n - 1) % n])
        for i in x:
            x[i] += dt * v[i]

    @kd.kernel
    def energy():
        for i in x:
            loss[None] += (x[i] - ti.Vector([0.5, 0.5])).norm_sqr() * ti.sin(x[i].x)

    def simulation():
        for t in range(4):
            force.fill(0.0)
            forces()
            if t == 2:
                force[1] = [0.25, -0.5]  # a constant force on particle 1 in the third step
            step(0.05)
        energy()

    x.from_numpy(x0)
    v.from_numpy(v0)
    stiffness[None] = 3.0
    assert kd.check_grad(simulation, [x, v, stiffness], loss, order=2) < 1e-6
    tx, tv = rng.standard_normal((n, 2)), rng.standard_normal((n, 2))
    hx, hv, hk = kd.hvp(simulation, inputs=[x, v, stiffness], output=loss)([x0, v0, 3.0], [tx, tv, 0.0])
    backward = kd.backward(simulation, inputs=[x, v, stiffness], output=loss)
    h = 1e-5
    plus, minus = (backward([x0 + s * h * tx, v0 + s * h * tv, 3.0]) for s in (1, -1))
    for got, p, m in zip((hx, hv, hk), plus, minus):
        np.testing.assert_allclose(got, (np.asarray(p) - np.asarray(m)) / (2 * h), rtol=1e-5, atol=1e-7)
