"""A blob of particles thrown at a target through a noisy particle simulation (stochastic gradients).

Particles repel their neighbours, which a grid finds: every step bins them into cells in parallel,
each particle's slot in its cell taken from the old value `ti.atomic_add(count[c], 1)` returns, as
Taichi programs build neighbour lists, and sums the pushes over the grid in its next loop, in the
same kernel (the old values reach only the grid's integer fields, which the reverse reads as the
step left them). Each step also kicks every particle by normal noise drawn where it is added,
`ti.randn()` in the step kernel: the walls' bounces depend on where a kick took a particle, so the
step's reverse needs the numbers its launch drew, and draws them again (kerndiff's numbers are
keyed by the launch's seed and the loop index; kd.Tape keeps each launch's seed). The loss is the
squared distance of the blob's centre to a target after the last step; gradient descent (Adam) on
the throw's velocity, with new noise every iteration, aims it. The gradient of the noisy
simulation is first checked against central differences (kd.check_grad, whose runs all draw the
same noise), in f64: a GPU's SPIR-V backend has no f64 logarithm or cosine for ti.randn, so there
the demo runs in f32, unchecked.

    python demos/particle_blob.py [--side 8] [--steps 80] [--iters 40] [--out blob.png] [--arch cpu|gpu]
"""
import argparse

import taichi as ti
from taichi.lang import impl

import kerndiff as kd
from common import Adam, bounce, descend, init, report_descent, save_descent_figure

TARGET = (0.7, 0.75)
GRID = 20  # cells per side of the unit box; the repulsion reaches one cell


def build(side, steps, dt=0.004, noise=0.2, stiffness=4.0):
    n, h = side * side, 1.0 / GRID
    x = ti.Vector.field(2, ti.f64, shape=(steps + 1, n))
    v = ti.Vector.field(2, ti.f64, shape=(steps + 1, n))
    v0 = ti.Vector.field(2, ti.f64, shape=())
    count = ti.field(ti.i32, shape=(GRID, GRID))
    members = ti.field(ti.i32, shape=(GRID, GRID, n))
    sigma = ti.field(ti.f64, shape=())
    loss = ti.field(ti.f64, shape=())
    kd.adjoint(v0)  # the throw is what we differentiate with respect to
    sigma[None] = noise

    @ti.func
    def cell_of(p):
        return ti.max(ti.min(ti.cast(ti.floor(p / h), ti.i32), GRID - 1), 0)

    @kd.kernel
    def throw():
        for i in range(n):
            x[0, i] = ti.Vector([0.2 + 0.5 * h * (i % side), 0.2 + 0.5 * h * (i // side)])
            v[0, i] = v0[None]

    @kd.kernel
    def step(t: ti.i32):
        for c in ti.grouped(count):  # the neighbour grid, binned in parallel
            count[c] = 0
        for i in range(n):
            c = cell_of(x[t, i])
            members[c, ti.atomic_add(count[c], 1)] = i
        for i in range(n):
            c = cell_of(x[t, i])
            push = ti.Vector([0.0, 0.0])
            for off in ti.static(ti.grouped(ti.ndrange((-1, 2), (-1, 2)))):
                nc = c + off
                if 0 <= nc[0] < GRID and 0 <= nc[1] < GRID:
                    for k in range(count[nc]):
                        j = members[nc, k]
                        d = x[t, i] - x[t, j]
                        r2 = d.norm_sqr()
                        if j != i and r2 < h * h:
                            push += stiffness * (1.0 - r2 / (h * h)) ** 2 * d / h
            kick = ti.Vector([ti.randn(), ti.randn()]) * sigma[None] * ti.sqrt(dt)
            vn = v[t, i] + dt * push + kick
            x[t + 1, i], v[t + 1, i] = bounce(x[t, i] + dt * vn, vn)

    @kd.kernel
    def measure():
        centre = ti.Vector([0.0, 0.0])
        for i in range(n):
            centre += x[steps, i] / n
        d = centre - ti.Vector([TARGET[0], TARGET[1]])
        loss[None] = d.norm_sqr()

    def simulate():
        throw()
        for t in range(steps):
            step(t)
        measure()

    return x, v0, sigma, loss, simulate


def optimise(side, steps, iters, lr=0.1, decay=0.97, verbose=True):
    x, v0, sigma, loss, simulate = build(side, steps)
    v0[None] = ti.Vector([1.2, -0.4])
    error = None
    if impl.current_cfg().default_fp == ti.f64:  # (f32 differences cannot resolve this gradient)
        error = kd.check_grad(simulate, [v0], loss)  # (its runs draw alike: it fixes the seeds)
    history, clouds = descend(simulate, loss, v0, Adam(2, lr, decay), iters, lambda: x.to_numpy().copy(), verbose)
    return history, clouds, v0.to_numpy(), error


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=8, help="particles along the blob's side")
    p.add_argument("--steps", type=int, default=80, help="simulation time steps")
    p.add_argument("--iters", type=int, default=40, help="optimisation iterations")
    p.add_argument("--out", default="blob.png")
    p.add_argument("--arch", choices=["cpu", "gpu"], default="cpu")
    args = p.parse_args()
    init(args.arch, ti.f64, f64_math=True)
    history, clouds, v0, error = optimise(args.side, args.steps, args.iters)
    print("gradient against central differences: " + ("not checked in f32" if error is None else f"{error:.1e}"))
    report_descent(history, v0)

    def draw(ax):
        for cloud, style, label in zip(clouds, ("0.6", "C0"), ("first throw", "optimised throw")):
            ax.plot(cloud[:, :, 0].mean(axis=1), cloud[:, :, 1].mean(axis=1), color=style, label=label)
            ax.scatter(cloud[-1, :, 0], cloud[-1, :, 1], s=4, color=style)
        ax.plot(*TARGET, "r*", ms=12, label="target")
    save_descent_figure(history, "loss: squared distance of the centre to the target", draw,
                        "the blob's centre, and its particles at the end", args.out)


if __name__ == "__main__":
    main()
