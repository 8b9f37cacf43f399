"""Kernels taking `ti.types.ndarray()` parameters (session 50; refused before): ndarrays of
scalars, of any dimension (ndarrays of vectors and matrices are refused: Taichi 1.7.4
miscompiles their components, see the test). The generated kernels take the arrays, and their
derivative arrays, as ndarray parameters; kd.dual / kd.adjoint of an ndarray are ndarrays
(`a.grad` at level 1 where it was made with needs_grad=True).

References: Taichi's own `kernel.grad()` on the same kernel written with ndarrays (Taichi's AD
takes ndarrays with needs_grad), analytic derivatives in numpy, and kd.check_grad's central
differences; kd.Tape / kd.FwdMode with writes from Python into the arrays (fill, from_numpy,
element writes) against the analytic gradient of the program with those writes."""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from kerndiff.runtime.kernel import Kernel

pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)

N = 6
X0 = np.linspace(0.3, 1.1, N)


@pytest.fixture(scope="module")
def springs(runtime):
    """A mass-spring energy over 2-D positions in an ndarray (P, 2), spring ends in an i32
    ndarray (S, 2) and rest lengths in a third; the energy in a field. S is large enough that the
    reverse adds into private copies of the positions' adjoint array (opt.scatter)."""
    rng = np.random.default_rng(3)
    P, S = 40, 1500
    pos = ti.ndarray(ti.f64, (P, 2), needs_grad=True)
    ends = ti.ndarray(ti.i32, (S, 2))
    rest = ti.ndarray(ti.f64, S)
    E = ti.field(ti.f64, shape=(), needs_grad=True)
    pos.from_numpy(rng.normal(size=(P, 2)))
    e = rng.integers(0, P, (S, 2))
    e[:, 1] = np.where(e[:, 1] == e[:, 0], (e[:, 0] + 1) % P, e[:, 1])
    ends.from_numpy(e.astype(np.int32))
    rest.from_numpy(rng.uniform(0.1, 0.5, S))

    def energy(x: ti.types.ndarray(dtype=ti.f64, ndim=2), ends: ti.types.ndarray(), rest: ti.types.ndarray()):
        for s in range(ends.shape[0]):
            a, b = ends[s, 0], ends[s, 1]
            d = ti.Vector([x[a, 0] - x[b, 0], x[a, 1] - x[b, 1]])
            E[None] += 0.5 * (d.norm() - rest[s]) ** 2

    return pos, ends, rest, E, energy


def reverses(energy, args, E, inputs):
    """(kerndiff's kernel of `energy`, [the inputs' adjoints by Taichi's kernel.grad()], [the same
    by kerndiff's reverse]), each after the kernel ran on args with E's adjoint seeded with 1."""
    ours, grads = kd.kernel(energy), []
    for k in (ti.kernel(energy), ours):
        E[None] = 0.0
        k(*args)
        E.grad[None] = 1.0
        for a in inputs:
            a.grad.fill(0.0)
        k.grad(*args)
        grads.append([a.grad.to_numpy() for a in inputs])
    return ours, grads[0], grads[1]


def test_reverse_matches_taichis_grad_on_ndarrays(springs):
    pos, ends, rest, E, energy = springs
    ours, (expected,), (got,) = reverses(energy, (pos, ends, rest), E, [pos])
    assert kd.adjoint(pos) is pos.grad
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert "x: ti.types.ndarray(dtype=ti.f64, ndim=2), x_adj: ti.types.ndarray(" in ours.reverse.source


def test_hvp_of_ndarray_kernel_against_differences(springs):
    pos, ends, rest, E, energy = springs
    k = kd.kernel(energy)
    err = kd.check_grad(lambda: k(pos, ends, rest), [pos], E, order=2)
    assert err < 1e-5


def test_derivative_kernels_of_an_elementwise_ndarray_kernel():
    """y = c sin(x)², loss = Σ y x: forward, reverse and reverse.forward by hand-seeded derivative
    arrays, against the analytic gradient and (diagonal) Hessian."""
    x, y, c = ti.ndarray(ti.f64, N, needs_grad=True), ti.ndarray(ti.f64, N), ti.ndarray(ti.f64, N)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    x.from_numpy(X0)
    cs = np.arange(1.0, N + 1)
    c.from_numpy(cs)

    @kd.kernel
    def k(x: ti.types.ndarray(), y: ti.types.ndarray(), c: ti.types.ndarray()):
        for i in x:
            y[i] = c[i] * ti.sin(x[i]) ** 2
        for i in y:
            loss[None] += y[i] * x[i]

    grad = cs * (np.sin(2 * X0) * X0 + np.sin(X0) ** 2)
    hess = cs * (2 * np.cos(2 * X0) * X0 + 2 * np.sin(2 * X0))
    v = np.array([0.5, -1.0, 2.0, 0.3, -0.7, 1.1])
    dual = kd.dual(x)
    assert type(dual) is type(x) and dual.shape == x.shape and not dual.to_numpy().any()
    k(x, y, c)
    dual.from_numpy(v)
    kd.dual(loss)[None] = 0.0
    k.forward(x, y, c)
    np.testing.assert_allclose(kd.dual(loss)[None], grad @ v, rtol=1e-12)
    np.testing.assert_allclose(kd.dual(y).to_numpy(), cs * np.sin(2 * X0) * v, rtol=1e-12)
    x.grad.fill(0.0)
    kd.dual(x.grad).fill(0.0)
    loss.grad[None] = 1.0
    k.reverse.forward(x, y, c)
    np.testing.assert_allclose(x.grad.to_numpy(), grad, rtol=1e-12)
    np.testing.assert_allclose(kd.dual(x.grad).to_numpy(), hess * v, rtol=1e-12)


def test_stencil_and_grouped_loops_over_2d_ndarrays():
    rng = np.random.default_rng(5)
    u = ti.ndarray(ti.f64, (7, 5), needs_grad=True)
    u.from_numpy(rng.normal(size=(7, 5)))
    out = ti.field(ti.f64, shape=())

    @kd.kernel
    def smooth(u: ti.types.ndarray()):
        for i, j in ti.ndrange((1, u.shape[0] - 1), (1, u.shape[1] - 1)):
            r = u[i + 1, j] + u[i - 1, j] + u[i, j + 1] + u[i, j - 1] - 4 * u[i, j]
            out[None] += r * r
        for I in ti.grouped(u):
            out[None] += ti.exp(0.2 * u[I]) * u[I]

    assert kd.check_grad(lambda: smooth(u), [u], out, order=2) < 1e-6


W0 = np.linspace(1.1, 0.4, N)


def _programs():
    """Programs that update x in place twice, scaled by w, and write w from Python between the
    steps: a whole fill, an element write, a from_numpy."""
    x = ti.ndarray(ti.f64, N, needs_grad=True)
    w = ti.ndarray(ti.f64, N, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)

    @kd.kernel
    def step(x: ti.types.ndarray(), w: ti.types.ndarray()):
        for i in x:
            x[i] = w[i] * x[i] * x[i] + 0.5

    @kd.kernel
    def total(x: ti.types.ndarray()):
        for i in x:
            loss[None] += ti.sin(x[i])

    def between(write):
        def program():
            step(x, w)
            write()
            step(x, w)
            total(x)
        return program

    def element():
        w[2] = 0.25

    writes = {"fill": lambda: w.fill(0.25), "element": element,
              "from_numpy": lambda: w.from_numpy(np.full(N, 0.25))}
    return x, w, loss, {name: between(write) for name, write in writes.items()}


def _expected_gradients(name):
    """(d loss / d x, d loss / d w) of the program with that write into w between the steps."""
    kept = np.arange(N) != 2 if name == "element" else np.zeros(N, bool)  # elements of w left as they were
    w1 = np.where(kept, W0, 0.25)
    x1 = W0 * X0 ** 2 + 0.5
    x2 = w1 * x1 ** 2 + 0.5
    return np.cos(x2) * 2 * w1 * x1 * 2 * W0 * X0, np.cos(x2) * (2 * w1 * x1 * X0 ** 2 + kept * x1 ** 2)


@pytest.mark.parametrize("name", ["fill", "element", "from_numpy"])
def test_tape_and_fwdmode_see_python_writes_into_ndarrays(name):
    """Taichi reports no element write into an ndarray, and no fill on the CPU: without
    tape._ArrayWrites the first step's reverse would read the written w where the step read the
    old one, and kd.FwdMode would carry w's seed through the written elements."""
    x, w, loss, programs = _programs()
    program = programs[name]
    dx, dw = _expected_gradients(name)
    x.from_numpy(X0)
    w.from_numpy(W0)
    x.grad.fill(0.0)
    w.grad.fill(0.0)
    with kd.Tape(loss):
        program()
    np.testing.assert_allclose(x.grad.to_numpy(), dx, rtol=1e-12)
    np.testing.assert_allclose(w.grad.to_numpy(), dw, rtol=1e-12, atol=1e-14)
    v = np.array([0.5, -1.0, 2.0, 0.3, -0.7, 1.1])
    x.from_numpy(X0)
    w.from_numpy(W0)
    with kd.FwdMode(loss=loss, param=w, seed=v):
        program()
    np.testing.assert_allclose(kd.dual(loss)[None], dw @ v, rtol=1e-12)
    x.from_numpy(X0)
    w.from_numpy(W0)
    assert kd.check_grad(program, [x, w], loss, order=2) < 1e-5
    from taichi.lang._ndarray import ScalarNdarray
    assert ScalarNdarray.fill.__module__.startswith("taichi")  # unwrapped when the contexts ended


def test_host_functions_over_ndarray_inputs():
    x, w, loss, programs = _programs()
    program = programs["element"]
    grads = kd.backward(program, inputs=[x, w], output=loss)([X0, W0])
    for got, expected in zip(grads, _expected_gradients("element")):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(w.to_numpy(), np.where(np.arange(N) == 2, 0.25, W0))

    def fills_its_input():
        x.fill(0.5)
        program()

    with pytest.raises(kd.KernDiffError, match="sets its input 0 from Python before a kernel reads it"):
        kd.backward(fills_its_input, inputs=[x, w], output=loss)([X0, W0])


@pytest.fixture(scope="module")
def components(runtime):
    """Positions (N, 2) and 2x2 maps (N, 2, 2) in scalar ndarrays, the components as last
    dimensions (how kerndiff takes vectors in ndarrays: see the refusal below)."""
    rng = np.random.default_rng(11)
    p = ti.ndarray(ti.f64, (N, 2), needs_grad=True)
    m = ti.ndarray(ti.f64, (N, 2, 2), needs_grad=True)
    E = ti.field(ti.f64, shape=(), needs_grad=True)
    P0, M0 = rng.normal(size=(N, 2)), rng.normal(size=(N, 2, 2)) + 2 * np.eye(2)

    def starting_values():
        p.from_numpy(P0)
        m.from_numpy(M0)

    return p, m, E, starting_values


def test_arrays_of_components_against_taichis_grad(components):
    p, m, E, starting_values = components

    def energy(x: ti.types.ndarray(dtype=ti.f64, ndim=2), A: ti.types.ndarray(dtype=ti.f64, ndim=3)):
        for i in range(x.shape[0]):
            v = ti.Vector([x[i, 0], x[i, 1]])
            M = ti.Matrix([[A[i, 0, 0], A[i, 0, 1]], [A[i, 1, 0], A[i, 1, 1]]])
            E[None] += (M @ v).norm_sqr() * ti.sin(v[0]) + M.determinant() * v.y

    starting_values()
    ours, expected, got = reverses(energy, (p, m), E, [p, m])
    assert np.abs(expected[0]).max() > 1.0
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    assert kd.check_grad(lambda: ours(p, m), [p, m], E, order=2) < 1e-6


@pytest.mark.parametrize("how", ["component", "row", "matrix entry", "fill"])
def test_python_writes_into_arrays_of_components_inside_contexts(components, how):
    """Element writes with a component index (`p[3, 0] = ...`) go through the array's host
    accessor as any element write does (tape._ArrayWrites); p is read by the first step and
    overwritten by the second, m read by both. References: central differences (kd.check_grad
    of the program, its H·v too; kd.FwdMode's tangent against differences)."""
    p, m, E, starting_values = components

    q = ti.ndarray(ti.f64, (N, 2))

    @kd.kernel
    def step(x: ti.types.ndarray(), A: ti.types.ndarray(), out: ti.types.ndarray()):
        for i in range(x.shape[0]):
            a, b = x[i, 0], x[i, 1]
            out[i, 0] = A[i, 0, 0] * a + A[i, 0, 1] * b + 0.1 * ti.sin(a)
            out[i, 1] = A[i, 1, 0] * a + A[i, 1, 1] * b + 0.1 * ti.sin(b)

    @kd.kernel
    def total(x: ti.types.ndarray()):
        for i, c in x:
            E[None] += x[i, c] ** 2

    def write():
        if how == "component":
            p[3, 0] = 0.75
        elif how == "row":
            p[2, 0], p[2, 1] = 0.5, -0.25
        elif how == "matrix entry":
            m[1, 0, 1] = 0.5
        else:
            m.fill(0.3)

    def program():
        step(p, m, q)
        write()
        step(q, m, p)
        total(p)

    starting_values()
    assert kd.check_grad(program, [p, m], E, order=2) < 1e-6
    v = np.random.default_rng(4).normal(size=(N, 2, 2))
    starting_values()
    with kd.FwdMode(loss=E, param=m, seed=v):
        program()
    tangent = kd.dual(E)[None]

    def at(shift):
        starting_values()
        m.from_numpy(m.to_numpy() + shift * v)
        E[None] = 0.0
        program()
        return E[None]

    eps = 1e-6
    np.testing.assert_allclose(tangent, (at(eps) - at(-eps)) / (2 * eps), rtol=1e-6)


def test_ndarrays_of_vectors_are_refused_as_taichi_miscompiles_them():
    """Taichi 1.7.4 compiles accesses to components of an ndarray of vectors wrongly where two
    indexes may meet (a store at a[idx[i]] between a store at a[i] and its read is not seen),
    and derivative kernels make that pattern of any gather; scalar ndarrays of components and
    vector fields are compiled right. If this test's first assertion fails, Taichi was fixed:
    lift the refusal (frontend.assign.check_array_elements)."""
    idx_values = np.array([2, 0, 0, 3], dtype=np.int32)

    def last_read(a, idx, vectors):
        @ti.kernel
        def store_store_load(a: ti.types.ndarray(), idx: ti.types.ndarray()):
            for i in range(1, 4):
                if ti.static(vectors):
                    a[i][0] = 1.0
                    a[idx[i]][0] = 10.0
                    a[i][1] = a[i][0]
                else:
                    a[i, 0] = 1.0
                    a[idx[i], 0] = 10.0
                    a[i, 1] = a[i, 0]

        idx.from_numpy(idx_values)
        store_store_load(a, idx)
        return a.to_numpy()[3]

    idx = ti.ndarray(ti.i32, 4)
    assert last_read(ti.ndarray(ti.math.vec2, 4), idx, True)[1] == 1.0  # (10.0 is right: idx[3] == 3)
    assert last_read(ti.ndarray(ti.f64, (4, 2)), idx, False)[1] == 10.0
    out = ti.field(ti.f64, shape=())
    positions = ti.ndarray(ti.math.vec2, N)

    @kd.kernel
    def energy(x: ti.types.ndarray()):
        for i in x:
            out[None] += x[i].norm_sqr()

    with pytest.raises(kd.KernDiffError, match="'x' is an ndarray of vectors") as e:
        energy(positions)
    assert "(n, 2)), read as a[i, 0]" in e.value.remedy

    @kd.kernel
    def global_matrices():
        for i in positions:
            out[None] += positions[i][0]

    with pytest.raises(kd.KernDiffError, match="'positions' is an ndarray of vectors"):
        global_matrices()


def test_refused_arguments_of_ndarray_parameters():
    out = ti.field(ti.f64, shape=())

    @kd.kernel
    def k(x: ti.types.ndarray(dtype=ti.f64, ndim=1)):
        for i in x:
            out[None] += x[i]

    with pytest.raises(kd.KernDiffError, match="ndarray parameter, but got list") as e:
        k(list(X0))
    assert "a.from_numpy(array)" in e.value.remedy
    with pytest.raises(kd.KernDiffError, match="ndarray of f32, but the parameter is annotated with dtype f64"):
        k(X0.astype(np.float32))  # (a numpy array is copied into a ti.ndarray of its own dtype)
    with pytest.raises(kd.KernDiffError, match=r"ndarray of vector\(2, f64\), but the parameter is annotated "
                                               r"with dtype f64"):
        k(ti.ndarray(ti.math.vec2, N))
    with pytest.raises(kd.KernDiffError, match="ndarray of f32, but the parameter is annotated with dtype f64"):
        k(ti.ndarray(ti.f32, N))
    with pytest.raises(kd.KernDiffError, match="has 2 dimensions, but the parameter is annotated with ndim=1"):
        k(ti.ndarray(ti.f64, (N, 2)))


def test_numpy_arrays_for_ndarray_parameters():
    """The primal takes numpy arrays for ndarray parameters, as Taichi's kernels do: they are
    copied into ti.ndarrays kept per parameter, shape and dtype (one compile for every array of
    that shape), and what the kernel writes is copied back. Derivative kernels, and launches
    inside kd.Tape, refuse them: a numpy array has no derivative array."""
    loss = ti.field(ti.f64, shape=(), needs_grad=True)

    @kd.kernel
    def scaled(a: ti.types.ndarray(), b: ti.types.ndarray(dtype=ti.f64, ndim=1), c: ti.f64):
        for i in a:
            b[i] = c * ti.sin(a[i])
            loss[None] += b[i]

    compiles = []
    original = Kernel._generated

    def counted(self, *args):
        compiles.append(self)
        return original(self, *args)

    out = np.zeros(N)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Kernel, "_generated", counted)
        for scale in (2.0, 0.5):
            first = X0 * scale
            scaled(first, out, scale)
            np.testing.assert_allclose(out, scale * np.sin(first), rtol=1e-15)
            np.testing.assert_array_equal(first, X0 * scale)  # (read, not written: as it was)
    assert compiles == [scaled]
    with pytest.raises(kd.KernDiffError, match="argument 'a' of scaled.reverse, a derivative kernel, is a numpy "
                                               "array, which has no place for its derivatives"):
        scaled.reverse(X0, out, 1.0)
    with pytest.raises(kd.KernDiffError, match="argument 'b' of scaled, launched inside kd.Tape, is a numpy array"):
        with kd.Tape(loss):
            scaled(ti.ndarray(ti.f64, N), out, 1.0)


def test_torch_tensors_for_ndarray_parameters():
    """The primal takes torch tensors for ndarray parameters too, as Taichi's kernels do: copied
    in and back (a tensor that requires grad included: the kernel's writes are no operation
    torch's autograd saw); derivative kernels refuse them. Skipped without torch (the `bench`
    extra installs it)."""
    torch = pytest.importorskip("torch")

    @kd.kernel
    def squares(a: ti.types.ndarray(), b: ti.types.ndarray()):
        for i in a:
            b[i] = a[i] ** 2 + i

    a = torch.linspace(-1.0, 1.0, N, dtype=torch.float64)
    for b in (torch.zeros(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64, requires_grad=True)):
        squares(a, b)
        np.testing.assert_allclose(b.detach().numpy(), a.numpy() ** 2 + np.arange(N), rtol=1e-15)
    ints = torch.zeros(N, dtype=torch.int32)

    @kd.kernel
    def ranks(a: ti.types.ndarray(), r: ti.types.ndarray()):
        for i in a:
            r[i] = ti.cast(a[i] > 0.0, ti.i32)

    ranks(a, ints)
    np.testing.assert_array_equal(ints.numpy(), (a.numpy() > 0).astype(np.int32))
    with pytest.raises(kd.KernDiffError, match="argument 'a' of squares.reverse, a derivative kernel, is a torch "
                                               "tensor, which has no place for its derivatives"):
        squares.reverse(a, b)


def test_backward_of_a_program_with_an_output_of_components():
    """kd.backward of a program with a non-scalar output weights it by the cotangent, in a helper
    field of the output's shape (program_check.weighted_total)."""
    x, y = ti.ndarray(ti.f64, N, needs_grad=True), ti.ndarray(ti.f64, (N, 2), needs_grad=True)

    @kd.kernel
    def curve(x: ti.types.ndarray(), y: ti.types.ndarray()):
        for i in x:
            y[i, 0] = ti.sin(x[i])
            y[i, 1] = x[i] ** 2

    w = np.random.default_rng(2).normal(size=(N, 2))
    (got,) = kd.backward(lambda: curve(x, y), inputs=[x], output=y)([X0], cotangent=w)
    np.testing.assert_allclose(got, w[:, 0] * np.cos(X0) + w[:, 1] * 2 * X0, rtol=1e-12)
    assert kd.check_grad(lambda: curve(x, y), [x], y, order=2) < 1e-6


def test_a_new_array_each_call_is_said_once():
    out = ti.field(ti.f64, shape=())

    @kd.kernel
    def total(x: ti.types.ndarray()):
        for i in x:
            out[None] += x[i]

    with pytest.warns(RuntimeWarning, match="compiled for 16 different sets of ndarrays") as said:
        for k in range(20):
            a = ti.ndarray(ti.f64, 3)
            a.fill(float(k))
            out[None] = 0.0
            total(a)
            assert out[None] == 3.0 * k
    assert len([w for w in said if "different sets of ndarrays" in str(w.message)]) == 1
    assert said[0].filename == __file__


# Taichi 1.7.4 alone: an atomic add into a vector field's component at an index read from an
# ndarray makes its LLVM backend abort the process (run in a child process: it cannot be caught)
TAICHI_ABORTS = """
import numpy as np, taichi as ti
ti.init(arch=ti.cpu)
v = ti.Vector.field(2, ti.f32, 4)

@ti.kernel
def scatter(idx: ti.types.ndarray(dtype=ti.i32, ndim=1), z: ti.types.ndarray(dtype=ti.f32, ndim=1)):
    for i in range(4):
        v[idx[i]][1] += z[i]

idx, z = ti.ndarray(ti.i32, 4), ti.ndarray(ti.f32, 4)
idx.from_numpy(np.array([1, 0, 3, 2], np.int32))
scatter(idx, z)
print("compiled")
"""


def test_atomics_on_field_components_at_indexes_from_ndarrays(tmp_path):
    """`acc[idx[i]][1] += ...` with idx an ndarray: Taichi's own kernel kills the process (first
    assertion: when it compiles, Taichi was fixed and codegen.components.fields_apart's second part
    may go);
    kerndiff's kernels add through the component's scalar field. Every derivative kernel of the
    gather v[idx[i]] adds into v's adjoint that way too. References: numpy for the primal, central
    differences (check_grad, order 2) for the gradient and H·v."""
    import subprocess
    import sys
    script = tmp_path / "aborts.py"  # (Taichi reads a kernel's source from its file)
    script.write_text(TAICHI_ABORTS)
    child = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert child.returncode != 0 and "compiled" not in child.stdout
    assert "does not dominate all uses" in child.stderr

    M = 5
    idx_values = np.array([2, 0, 4, 2, 1, 3], dtype=np.int32)
    v = ti.Vector.field(2, ti.f64, M, needs_grad=True)
    acc = ti.Vector.field(2, ti.f64, M, needs_grad=True)
    out = ti.field(ti.f64, shape=(), needs_grad=True)
    idx, w = ti.ndarray(ti.i32, N), ti.ndarray(ti.f64, N, needs_grad=True)
    idx.from_numpy(idx_values)
    w.from_numpy(W0)
    v_values = np.stack([np.linspace(0.2, 1.0, M), np.linspace(-0.5, 0.7, M)], axis=1)
    v.from_numpy(v_values)

    @kd.kernel
    def scatter(idx: ti.types.ndarray(), w: ti.types.ndarray()):
        for i in range(idx.shape[0]):
            acc[idx[i]][1] += w[i] * ti.sin(v[idx[i]][0]) + v[i % 5][1]
        for j in acc:
            out[None] += acc[j].norm_sqr()

    def run():
        acc.fill(0.0)
        out[None] = 0.0
        scatter(idx, w)

    run()
    expected = np.zeros(M)
    np.add.at(expected, idx_values, W0 * np.sin(v_values[idx_values, 0]) + v_values[np.arange(N) % 5, 1])
    np.testing.assert_allclose(acc.to_numpy()[:, 1], expected, rtol=1e-12)
    np.testing.assert_allclose(out[None], (expected ** 2).sum(), rtol=1e-12)
    assert "acc_1[idx[i]] += " in scatter.source
    assert kd.check_grad(run, [v, w], out, order=2) < 1e-6
    assert "v_adj_0[idx[i]] += " in scatter.reverse.source


def test_fields_with_atomics_on_components_are_read_apart_throughout():
    """Where a kernel with arrays adds into a field's components, every access of that field goes
    through its scalar fields: Taichi 1.7.4 fails to compile a kernel that stores into `c[None][1]`
    and adds into `c.get_scalar_field(0)[None]` (scalarize.cpp, the process aborts). Against the
    value by hand and central differences."""
    c = ti.Vector.field(2, ti.f64, (), needs_grad=True)
    d = ti.Vector.field(2, ti.f64, 3, needs_grad=True)
    out = ti.field(ti.f64, (), needs_grad=True)
    a = ti.ndarray(ti.f64, N, needs_grad=True)
    a.from_numpy(X0)

    @kd.kernel
    def mixed(a: ti.types.ndarray()):
        c[None][0] = 1.0
        c[None][1] = a[1]
        c[None][0] += a[0] * 2.0
        d[1][0] = a[2]
        d[1][0] += a[3]
        for i in range(3):
            d[i][1] = a[i] * 2.0
            d[i][1] += a[i + 1]
        out[None] = c[None][0] * c[None][1] + d[1][0] * d[2][1]

    mixed(a)
    x = X0
    assert out[None] == pytest.approx((1 + 2 * x[0]) * x[1] + (x[2] + x[3]) * (2 * x[2] + x[3]), rel=1e-12)
    assert "    # c_0 is c[...][0], etc.: Taichi 1.7.4 cannot compile atomics" in mixed.source
    assert "c_1[None] = a[1]" in mixed.source and "d_1[i] = a[i] * 2.0" in mixed.source
    assert kd.check_grad(lambda: mixed(a), [a], out, order=2) < 1e-6
