"""Golden files: the generated source of a few reverse kernels is part of the contract (readable,
stable names, comments pointing at source lines). Regenerate with KERNDIFF_UPDATE_GOLDEN=1."""
import os
import re

import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import cpu_only

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)


def compare(name, text):
    path = os.path.join(GOLDEN, name + ".py.txt")
    if os.environ.get("KERNDIFF_UPDATE_GOLDEN") == "1":
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read(), f"generated source of {name} changed; see {path}"


def test_golden_energy_reverse():
    x = ti.field(ti.f64, shape=8, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)

    @kd.kernel
    def energy():
        for i in x:
            loss[None] += ti.sin(x[i]) ** 2

    compare("energy_reverse", energy.reverse.source)


def test_golden_mass_spring_reverse():
    pos = ti.Vector.field(2, ti.f64, shape=4, needs_grad=True)
    ends = ti.Vector.field(2, ti.i32, shape=3)
    rest = ti.field(ti.f64, shape=3)
    energy = ti.field(ti.f64, shape=(), needs_grad=True)

    @kd.kernel
    def springs():
        for s in ends:
            d = pos[ends[s][0]] - pos[ends[s][1]]
            energy[None] += 0.5 * (d.norm() - rest[s]) ** 2

    compare("springs_reverse", springs.reverse.source)


def test_fields_are_called_what_each_kernel_calls_them():
    """A field seen first through a template parameter (`out`) is still `uxx` in a kernel whose
    source says uxx, and so are its adjoint and tangent fields."""
    uxx = ti.field(ti.f64, shape=4, needs_grad=True)
    uyy = ti.field(ti.f64, shape=4, needs_grad=True)
    lap = ti.field(ti.f64, shape=4, needs_grad=True)

    @kd.kernel
    def fill(out: ti.template(), v: ti.f64):
        for p in out:
            out[p] = ti.sin(v * p)

    @kd.kernel
    def laplacian():
        for p in lap:
            lap[p] = uxx[p] * uyy[p]

    fill(uxx, 1.0)
    fill(uyy, 2.0)
    src = laplacian.reverse.source
    assert "uxx_adj[p] = uxx_adj[p] + uyy[p] * lap_adj_t" in src and "out" not in src, src
    assert "uyy_adj[p]" in src


def test_f32_constants_print_as_f32_does():
    from kerndiff.codegen.emit import _float_literal
    import numpy as np
    assert _float_literal(float(np.float32(1 / 250)), "f32") == "0.004"
    assert _float_literal(float(np.float32(1 / 3)), "f32") == "0.33333334"
    assert _float_literal(1 / 3, "f64") == repr(1 / 3)
    rng = np.random.default_rng(0)
    for v in (rng.standard_normal(2000) * 10.0 ** rng.integers(-30, 30, 2000)).astype(np.float32):
        assert np.float32(float(_float_literal(float(v), "f32"))) == v


@cpu_only("the golden source keeps checkpoints in fields, which kerndiff makes on the CPU backends only")
def test_golden_recurrence_reverse():
    r = ti.field(ti.f64, shape=4, needs_grad=True)
    out = ti.field(ti.f64, shape=4, needs_grad=True)

    @kd.kernel
    def recurrence():
        for i in r:
            v = 1.0
            for k in range(100):
                v = v * r[i] + 0.5
            out[i] = v

    compare("recurrence_reverse", recurrence.reverse.source)


PAIRS_SOURCE = """
import taichi as ti
ti.init(arch=ti.cpu, default_fp=ti.f64, log_level=ti.ERROR)
import kerndiff as kd
pos = ti.Vector.field(3, ti.f64, shape=8, needs_grad=True)
E = ti.field(ti.f64, shape=(), needs_grad=True)

@kd.kernel
def energy():
    for i in range(8):
        e = 0.0
        for j in range(8):
            if i != j:
                r2 = (pos[i] - pos[j]).norm_sqr() + 0.01
                e += 1.0 / ti.sqrt(r2) + 0.1 / r2
        E[None] += 0.5 * e

kd.dual(pos)
print(energy.reverse.forward.source)
"""


def test_generated_source_does_not_depend_on_the_hash_seed():
    """Taichi's offline cache is keyed by the kernel's source: generated code that varied from run
    to run (set iteration order) would be recompiled in every new process."""
    import subprocess
    import sys
    import tempfile
    out = []
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(PAIRS_SOURCE)  # kerndiff reads kernels' source: a file, not `python -c`
    for seed in ("1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        got = subprocess.run([sys.executable, f.name], env=env, capture_output=True, text=True)
        assert got.returncode == 0, got.stderr
        out.append(got.stdout)
    os.unlink(f.name)
    assert "pos_adj_0_acc" in out[0] and "pos_adj_dual_2_acc" in out[0]
    assert out[0] == out[1] == out[2]


def test_runs_of_copies_are_written_as_one_assignment_only_when_that_means_the_same():
    """Checkpoint shift registers (a3 = a2; a2 = a1; a1 = a0; a0 = v) become one assignment; a
    chain in the other order (a1 = a0; a2 = a1; ...) reads what the run just set and stays as is."""
    from kerndiff.codegen.emit import Emitter
    from kerndiff.ir import nodes as N

    def var(n):
        return N.Var("f64", n)

    def emitted(pairs):
        em = Emitter({})
        em.lines, em.decls = [], {}
        em.block([N.Assign(a, var(b)) for a, b in pairs], 0, ())
        return em.lines

    assert emitted([("a3", "a2"), ("a2", "a1"), ("a1", "a0"), ("a0", "v")]) == ["a3, a2, a1, a0 = a2, a1, a0, v"]
    assert emitted([("a0", "v"), ("a1", "v"), ("a2", "v"), ("a3", "v")]) == ["a0 = a1 = a2 = a3 = v"]
    chain = [("a1", "a0"), ("a2", "a1"), ("a3", "a2"), ("a4", "a3")]
    assert emitted(chain) == [f"{a} = {b}" for a, b in chain]
    assert emitted(chain[:3]) == [f"{a} = {b}" for a, b in chain[:3]]  # short runs stay as they are


def test_locals_derivatives_are_named_by_level_as_fields_are():
    """In k.forward.forward the second level's tangent of a local s is s_dual2 and the mixed one
    s_dual_dual2, as the fields' are (h_dual2, h_dual_dual2), not s_dual_1 / s_dual_dual; the
    same for adjoints in k.reverse.reverse (t_adj2). Values against central finite differences."""
    n = 4
    x = ti.field(ti.f64, shape=n)
    h = ti.field(ti.f64, shape=n)
    u = ti.field(ti.f64, shape=())

    @kd.kernel
    def layer():
        for p in range(n):
            s = 0.5
            for k in range(n):
                s += x[k] * x[p] * (k + 1)
            h[p] = ti.tanh(s)
            u[None] += h[p] * h[p]

    xv = np.linspace(0.1, 0.4, n)
    v1, v2 = np.linspace(1.0, -1.0, n), np.linspace(0.3, 0.9, n)

    def value(at):
        x.from_numpy(at)
        u[None] = 0.0
        layer()
        return u[None]

    x.from_numpy(xv)
    kd.dual(x).from_numpy(v1)
    kd.dual(x, 2).from_numpy(v2)
    kd.dual(kd.dual(x), 2).fill(0.0)
    for f in (u, kd.dual(u), kd.dual(u, 2), kd.dual(kd.dual(u), 2)):
        f.fill(0.0)
    layer.forward.forward()
    eps = 1e-4
    second = (value(xv + eps * (v1 + v2)) - value(xv + eps * (v1 - v2)) - value(xv - eps * (v1 - v2))
              + value(xv - eps * (v1 + v2))) / (4 * eps * eps)
    assert kd.dual(kd.dual(u), 2)[None] == pytest.approx(second, rel=1e-6)
    source = layer.forward.forward.source
    assert "s_dual2 = s_dual2 + " in source and "s_dual_dual2 = s_dual_dual2 + " in source
    assert not re.search(r"\bs_dual_\d|\bs_dual_dual\b", source), source

    @kd.kernel
    def potential():
        for p in range(n):
            s = x[p] * x[p]
            u[None] += ti.sin(s) * s

    w = np.linspace(-0.5, 1.0, n)
    x.from_numpy(xv)
    for f in (kd.adjoint(x), kd.adjoint(x, 2), kd.adjoint(kd.adjoint(u), 2)):
        f.fill(0.0)
    kd.adjoint(u)[None] = 1.0
    kd.adjoint(kd.adjoint(x), 2).from_numpy(w)
    potential.reverse.reverse()  # x's level-2 adjoint: H w, here f''(x_p) w_p for each p
    g2 = 10 * xv**2 * np.cos(xv**2) - 4 * xv**4 * np.sin(xv**2) + 2 * np.sin(xv**2)
    np.testing.assert_allclose(kd.adjoint(x, 2).to_numpy(), g2 * w, rtol=1e-12)
    source = potential.reverse.reverse.source
    assert "s_adj2 = " in source and "x_adj2[p] = x_adj2[p] + " in source
    assert not re.search(r"\w_adj_adj\b", source), source


def test_device_functions_name_their_derivatives_by_level_too():
    """kd.forward(kd.forward(u, argnum=0), argnum=1): the outer transform is level 2, so its
    tangent of the local s is s_dual2 and the mixed one s_dual_dual2 (not s_dual_1 / s_dual_dual);
    a kd.grad inside a kd.forward is the first of its kind, named t_adj. Values: u_xy analytic."""
    n = 3
    X, Y, out = (ti.field(ti.f64, shape=n) for _ in range(3))
    xv, yv = np.array([0.3, -0.7, 1.1]), np.array([0.5, 0.2, -0.9])
    X.from_numpy(xv)
    Y.from_numpy(yv)

    @kd.func
    def u(x, y):
        s = ti.sin(x * y)
        return s * x ** 2 + y

    # u = sin(xy) x^2 + y: u_x = y cos(xy) x^2 + 2x sin(xy); u_xy = x^2 cos(xy) - x^3 y sin(xy) + 2x^2 cos(xy)
    c, s = np.cos(xv * yv), np.sin(xv * yv)

    def u_xy_source(fn):
        """The source of a kernel applying fn at each (X[i], Y[i]), once its values are checked."""
        @kd.kernel
        def mixed():
            for i in X:
                out[i] = fn(X[i], Y[i])

        mixed()
        np.testing.assert_allclose(out.to_numpy(), 3 * xv**2 * c - xv**3 * yv * s, rtol=1e-12)
        return mixed.source

    source = u_xy_source(kd.forward(kd.forward(u, argnum=0), argnum=1))
    assert "s_dual2 = " in source and "s_dual_dual2 = " in source, source
    assert not re.search(r"\bs_dual_1\b|\bs_dual_dual\b", source)
    source = u_xy_source(kd.forward(kd.grad(u, argnum=0), argnum=1))
    assert "s_adj" in source and "_adj2" not in source, source


def test_golden_noisy_while_reverse():
    """A while loop drawing noise each trip: the reverse keys each trip's draws by the trip's
    number, set from the backward sweep's counter (`trips_2 = it + 1`: no checkpoints of it)."""
    x = ti.field(ti.f64, shape=4, needs_grad=True)
    y = ti.field(ti.f64, shape=4, needs_grad=True)

    @kd.kernel
    def noisy_walk():
        for i in x:
            v = x[i]
            k = 0
            while k < 3:
                v = v * 0.9 + 0.1 * ti.randn() * v
                k += 1
            y[i] = v

    compare("noisy_walk_reverse", noisy_walk.reverse.source)
