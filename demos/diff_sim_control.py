"""A billiards shot optimised through a differentiable simulation (DiffTaichi style).

A ball starts at a fixed spot with initial velocity v0, loses speed to friction and bounces off
the cushions of a unit table. `kd.Tape` records the time steps (kernels) and runs their reverse
kernels backward, giving d loss / d v0, where the loss is the squared distance of the ball's final
position to a target. Gradient descent (Adam) on v0 aims the shot.

    python demos/diff_sim_control.py [--steps 150] [--iters 120] [--out billiards.png] [--arch cpu|gpu]
"""
import argparse

import taichi as ti

import kerndiff as kd
from common import Adam, bounce, descend, init, report_descent, save_descent_figure

START = (0.2, 0.3)
TARGET = (0.75, 0.8)


def build(steps, dt=0.01, friction=0.6):
    x = ti.Vector.field(2, ti.f64, shape=steps + 1)
    v = ti.Vector.field(2, ti.f64, shape=steps + 1)
    v0 = ti.Vector.field(2, ti.f64, shape=())
    loss = ti.field(ti.f64, shape=())
    kd.adjoint(v0)  # v0 is what we differentiate with respect to

    @kd.kernel
    def shoot():
        x[0] = ti.Vector([START[0], START[1]])
        v[0] = v0[None]

    @kd.kernel
    def step(t: ti.i32):
        vn = v[t] * (1.0 - friction * dt)
        x[t + 1], v[t + 1] = bounce(x[t] + dt * vn, vn)  # (elastic bounces off the cushions)

    @kd.kernel
    def measure():
        d = x[steps] - ti.Vector([TARGET[0], TARGET[1]])
        loss[None] = d.norm_sqr()

    def simulate():
        shoot()
        for t in range(steps):
            step(t)
        measure()

    return x, v0, loss, simulate


def optimise(steps, iters, lr=0.05, verbose=True):
    x, v0, loss, simulate = build(steps)
    v0[None] = ti.Vector([1.0, -0.5])
    history, paths = descend(simulate, loss, v0, Adam(2, lr), iters, lambda: x.to_numpy().copy(), verbose)
    return history, paths, v0.to_numpy()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="simulation time steps")
    p.add_argument("--iters", type=int, default=120, help="optimisation iterations")
    p.add_argument("--out", default="billiards.png")
    p.add_argument("--arch", choices=["cpu", "gpu"], default="cpu")
    args = p.parse_args()
    init(args.arch, ti.f64)
    history, paths, v0 = optimise(args.steps, args.iters)
    report_descent(history, v0)

    def draw(ax):
        for path, style, label in zip(paths, ("0.6", "C0"), ("first shot", "optimised shot")):
            ax.plot(path[:, 0], path[:, 1], color=style, label=label)
        ax.plot(*START, "ko", label="start")
        ax.plot(*TARGET, "r*", ms=12, label="target")
    save_descent_figure(history, "loss: squared distance to the target", draw, "trajectories", args.out)


if __name__ == "__main__":
    main()
