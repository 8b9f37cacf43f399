"""An elastic cube thrown at a target: 3-D MLS-MPM, differentiated through ti.polar_decompose.

A jelly cube (fixed-corotated elasticity, whose stress needs the rotation R of each particle's
deformation gradient F = R S) is thrown spinning, with initial velocity v0, and falls under
gravity towards the floor of a unit box. `kd.Tape` records the time steps (particle-to-grid, grid update,
grid-to-particle kernels) and runs their reverse kernels backward, giving d loss / d v0, where the
loss is the squared distance of the cube's centre of mass at the end to a target. Gradient
descent (Adam) on v0 aims the throw. (In flight the centre's path does not depend on the
elastic forces, only on v0, gravity and, at the end, the floor; the spin makes every particle's
F a turning rotation, so the stress's polar decompositions do real work all the same, and the
gradient the Tape returns goes through all of them, as `kd.check_grad` of the whole program,
run first, confirms against central differences.) Taichi's own `kernel.grad()` stops at the 3x3
polar decomposition ("Not supported"): Taichi computes it with a builtin SVD statement. kerndiff
refines Taichi's rotation by two Newton steps whose derivatives are the rotation's (exact also
at F = I, where the cube starts and an SVD's own derivatives are undefined).

    python demos/mpm_elastic_3d.py [--side 6] [--steps 60] [--iters 25] [--out mpm3d.png] [--arch cpu|gpu]
"""
import argparse

import numpy as np
import taichi as ti

import kerndiff as kd
from common import Adam, descend, init, report_descent

TARGET = (0.7, 0.3, 0.6)
MIDDLE = (0.4, 0.4, 0.4)  # the cube's centre at the start
SPIN = (0.0, 6.0, 0.0)  # its angular velocity (radians per second, about the vertical)


def build(side, steps, n_grid=16, dt=2e-3, E=200.0, nu=0.2):
    n_p = side ** 3
    dx = 1.0 / n_grid
    p_vol, p_mass = (dx * 0.5) ** 3, (dx * 0.5) ** 3
    mu, la = E / (2 * (1 + nu)), E * nu / ((1 + nu) * (1 - 2 * nu))
    vec, mat = ti.types.vector(3, ti.f64), ti.types.matrix(3, 3, ti.f64)
    x = ti.Vector.field(3, ti.f64, shape=(steps + 1, n_p))
    v = ti.Vector.field(3, ti.f64, shape=(steps + 1, n_p))
    C = ti.Matrix.field(3, 3, ti.f64, shape=(steps + 1, n_p))
    F = ti.Matrix.field(3, 3, ti.f64, shape=(steps + 1, n_p))
    grid_v = ti.Vector.field(3, ti.f64, shape=(n_grid, n_grid, n_grid))
    grid_m = ti.field(ti.f64, shape=(n_grid, n_grid, n_grid))
    start = ti.Vector.field(3, ti.f64, shape=n_p)
    v0 = ti.Vector.field(3, ti.f64, shape=())
    centre = ti.Vector.field(3, ti.f64, shape=())
    loss = ti.field(ti.f64, shape=())
    kd.adjoint(v0)  # what we differentiate with respect to
    cells = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    start.from_numpy(0.3 + 0.2 * (cells + 0.5) / side)  # a cube of side 0.2, clear of the walls

    @ti.func
    def stencil(xp):
        """The base grid node of a particle and the quadratic B-spline weights of its 3x3x3 nodes."""
        base = ti.cast(xp / dx - 0.5, ti.i32)
        fx = xp / dx - ti.cast(base, ti.f64)
        return base, fx, [0.5 * (1.5 - fx) ** 2, 0.75 - (fx - 1.0) ** 2, 0.5 * (fx - 0.5) ** 2]

    @kd.kernel
    def throw():
        for p in range(n_p):
            x[0, p] = start[p]
            # thrown with a spin about the vertical (its velocity field's gradient, ŝ, is C), so
            # each particle's F turns: its rotation R is what the stress takes out
            v[0, p] = v0[None] + ti.Vector(SPIN).cross(start[p] - ti.Vector(MIDDLE))
            C[0, p] = ti.Matrix([[0.0, -SPIN[2], SPIN[1]], [SPIN[2], 0.0, -SPIN[0]], [-SPIN[1], SPIN[0], 0.0]])
            F[0, p] = ti.Matrix.identity(ti.f64, 3)

    @kd.kernel
    def clear_grid():
        for I in ti.grouped(grid_m):
            grid_v[I] = vec(0.0)
            grid_m[I] = 0.0

    @kd.kernel
    def p2g(t: ti.i32):
        for p in range(n_p):
            base, fx, w = stencil(x[t, p])
            new_F = (ti.Matrix.identity(ti.f64, 3) + dt * C[t, p]) @ F[t, p]
            F[t + 1, p] = new_F
            R, _ = ti.polar_decompose(new_F)
            J = new_F.determinant()
            stress = 2 * mu * (new_F - R) @ new_F.transpose() + ti.Matrix.identity(ti.f64, 3) * la * J * (J - 1)
            affine = -(dt * p_vol * 4 / dx ** 2) * stress + p_mass * C[t, p]
            for i, j, k in ti.static(ti.ndrange(3, 3, 3)):
                offset = ti.Vector([i, j, k])
                dpos = (ti.cast(offset, ti.f64) - fx) * dx
                weight = w[i][0] * w[j][1] * w[k][2]
                grid_v[base + offset] += weight * (p_mass * v[t, p] + affine @ dpos)
                grid_m[base + offset] += weight * p_mass

    @kd.kernel
    def grid_update():
        for i, j, k in grid_m:
            if grid_m[i, j, k] > 0:
                vel = grid_v[i, j, k] / grid_m[i, j, k] + dt * ti.Vector([0.0, -9.8, 0.0])
                for d in ti.static(range(3)):  # the walls and the floor of the box stop what moves into them
                    index = ti.Vector([i, j, k])[d]
                    if index < 3 and vel[d] < 0 or index > n_grid - 3 and vel[d] > 0:
                        vel[d] = 0.0
                grid_v[i, j, k] = vel

    @kd.kernel
    def g2p(t: ti.i32):
        for p in range(n_p):
            base, fx, w = stencil(x[t, p])
            new_v, new_C = vec(0.0), mat(0.0)
            for i, j, k in ti.static(ti.ndrange(3, 3, 3)):
                offset = ti.Vector([i, j, k])
                weight = w[i][0] * w[j][1] * w[k][2]
                g_v = grid_v[base + offset]
                new_v += weight * g_v
                new_C += 4 * weight * g_v.outer_product((ti.cast(offset, ti.f64) - fx) * dx) / dx ** 2
            v[t + 1, p] = new_v
            C[t + 1, p] = new_C
            x[t + 1, p] = x[t, p] + dt * new_v

    @kd.kernel
    def measure():
        centre[None] = vec(0.0)
        for p in range(n_p):
            centre[None] += x[steps, p] / n_p
        loss[None] = (centre[None] - ti.Vector(TARGET)).norm_sqr()

    def simulate():
        throw()
        for t in range(steps):
            clear_grid()
            p2g(t)
            grid_update()
            g2p(t)
        measure()

    return x, v0, loss, simulate


def optimise(world, iters, lr=0.3, verbose=True, check=True):
    """(losses, the centre's path at the first and the last throw, v0, the error kd.check_grad of
    the whole program finds before the first step, or None where check is False) for
    world = build(...)."""
    x, v0, loss, simulate = world
    v0[None] = ti.Vector([0.5, 1.0, -0.3])  # (no component zero: the walls' `vel[d] < 0` would tie)
    error = kd.check_grad(simulate, [v0], loss) if check else None  # the Tape's gradient, forward
    # mode's tangents and central differences
    adam = Adam(3, lr, decay=0.85)  # (decaying: the floor's contact makes the loss kinked, and Adam overshoots)
    history, paths = descend(simulate, loss, v0, adam, iters, lambda: x.to_numpy().mean(axis=1), verbose)
    return history, paths, v0.to_numpy(), error


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=6, help="particles along the cube's side")
    p.add_argument("--steps", type=int, default=60, help="simulation time steps")
    p.add_argument("--iters", type=int, default=25, help="optimisation iterations")
    p.add_argument("--out", default="mpm3d.png")
    p.add_argument("--arch", choices=["cpu", "gpu"], default="cpu")
    args = p.parse_args()
    init(args.arch, ti.f64)
    history, paths, v0, error = optimise(build(args.side, args.steps), args.iters)
    print(f"gradient check (kd.Tape against central differences): {error:.1e}")
    report_descent(history, v0)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(10, 4.4))
    ax = fig.add_subplot(1, 2, 1)
    ax.semilogy(history)
    ax.set_xlabel("iteration")
    ax.set_title("loss: squared distance to the target")
    ax = fig.add_subplot(1, 2, 2, projection="3d")
    for path, style, label in zip(paths, ("0.6", "C0"), ("first throw", "optimised throw")):
        ax.plot(path[:, 0], path[:, 2], path[:, 1], color=style, label=label)
    ax.scatter(TARGET[0], TARGET[2], TARGET[1], color="r", marker="*", s=120, label="target")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_zlim(0, 1)
    ax.set_xlabel("x")
    ax.set_ylabel("z")
    ax.set_zlabel("y (up)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("the cube's centre of mass")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
