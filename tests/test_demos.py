"""Every demo, with tiny sizes on the CPU, must meet its own success criterion (so demos cannot rot)."""
import os
import subprocess
import sys

import pytest
import taichi as ti

DEMOS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demos")
sys.path.insert(0, DEMOS)


@pytest.fixture
def f64():
    ti.init(arch=ti.cpu, default_fp=ti.f64)
    yield
    ti.reset()


@pytest.fixture
def f32():
    ti.init(arch=ti.cpu, default_fp=ti.f32)
    yield
    ti.reset()


def test_quickstart_runs_and_checks_its_results():
    out = subprocess.run([sys.executable, os.path.join(DEMOS, "quickstart.py")], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert "quickstart: all results as expected" in out.stdout


def test_newton_converges_quadratically(f64):
    import newton_mass_spring as demo
    result = demo.solve(5, tol=1e-8, max_steps=25, verbose=False)
    r = result["residuals"]
    assert result["converged"] and r[-1] < 1e-8
    assert r[-1] < r[-2] ** 1.5  # quadratic-ish at the end


def test_billiards_loss_falls_tenfold(f64):
    import diff_sim_control as demo
    history, paths, v0 = demo.optimise(steps=60, iters=60, verbose=False)
    assert history[-1] < history[0] / 10


def test_particle_blob_reaches_the_target(f64):
    """Neighbour grids built by atomics' old values and noise drawn by ti.randn in the step kernel,
    whose reverse draws it again, under kd.Tape; the noisy gradient against central differences."""
    import particle_blob as demo
    history, clouds, v0, error = demo.optimise(side=4, steps=60, iters=30, verbose=False)
    assert error < 1e-6
    assert history[-1] < history[0] / 5


def test_pinn_trains(f32):
    import pinn_poisson as demo
    history, rel, u, exact, secs = demo.train(steps=300, width=6, n_pde=120, n_bc=40, verbose=False)
    assert history[-1] < history[0] / 10
    assert rel < 0.5, rel


def tutorial_script():
    """docs/tutorial.md's code blocks in order, but for the PINN sketch of section 6 (its network
    is `...`; demos/pinn_poisson.py is the full program), and checks of what the text says."""
    import re
    path = os.path.join(os.path.dirname(DEMOS), "docs", "tutorial.md")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    sections = re.split(r"\n## ", text)

    def code(s):
        return "\n".join(re.findall(r"```python\n(.*?)```", s, re.S))

    # section 4's checks come where its first part ends: its H·v of a program (session 49) clears
    # the derivative fields, as kd.Tape does
    section4 = next(s for s in sections if s.startswith("4. "))
    first, program_hvp = section4.split("A whole program has H·v too")
    checks = """
xs = np.linspace(0, 1, 8)
assert np.allclose(x.grad.to_numpy(), np.sin(2 * xs)), x.grad.to_numpy()          # section 4's Tape left grad E
assert np.allclose(kd.adjoint(x, 2).to_numpy(), 2 * np.sin(4 * xs)), kd.adjoint(x, 2).to_numpy()
assert np.allclose(kd.dual(x.grad).to_numpy(), 2 * np.cos(2 * xs) * v)             # H·v
"""
    program_checks = """
def numpy_cost(kv):
    yv = xs.copy()
    for t in range(3):
        yv = yv + 0.1 * np.sin(kv * yv)
    return float((yv ** 2).sum())
second = (numpy_cost(2.0 + 1e-4) - 2 * numpy_cost(2.0) + numpy_cost(2.0 - 1e-4)) / 1e-8
assert abs(d2 - second) < 1e-5 * max(1.0, abs(second)), (d2, second)                # d²cost/dk²
"""
    before = [code(s) for s in sections[:sections.index(section4)] if not s.startswith("6. ")]
    after = [code(s) for s in sections[sections.index(section4) + 1:] if not s.startswith("6. ")]
    return "\n".join(before + [code(first), checks, code(program_hvp), program_checks] + after) + \
        '\nprint("tutorial: as the text says")\n'


def test_tutorial_code_runs_and_gives_what_the_text_says(tmp_path):
    script = tmp_path / "tutorial.py"
    script.write_text(tutorial_script())
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tutorial: as the text says" in out.stdout


def test_mpm_throw_through_a_polar_decomposition(f64):
    """3-D MPM with a fixed-corotated stress (3x3 ti.polar_decompose, which Taichi's own grad
    does not support): the throw aimed, then the Tape's gradient at the aimed v0 against central
    differences of the program along a random direction (kd.check_grad of the program, which the
    demo runs, would compile every kernel's forward mode too: 24 s more)."""
    import kerndiff as kd
    import numpy as np
    import mpm_elastic_3d as demo
    world = demo.build(side=2, steps=60)
    history, paths, v0, _ = demo.optimise(world, iters=12, verbose=False, check=False)
    assert history[-1] < history[0] / 5
    x, v0_field, loss, simulate = world
    with kd.Tape(loss):
        simulate()
    grad = kd.adjoint(v0_field).to_numpy()
    d, h = np.random.default_rng(0).standard_normal(3), 1e-6

    def loss_at(v):
        v0_field.from_numpy(v)
        simulate()
        return loss[None]

    fd = (loss_at(v0 + h * d) - loss_at(v0 - h * d)) / (2 * h)
    assert np.dot(grad, d) == pytest.approx(fd, rel=1e-6)
    assert abs(fd) > 1e-4
