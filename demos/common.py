"""Shared by the demos: Taichi start-up with a GPU fallback, a progress bar, and Adam."""
import numpy as np
import taichi as ti


def init(arch="cpu", default_fp=ti.f64, f64_math=False):
    """ti.init on the GPU when asked and available, else on the CPU (with a one-line notice).

    f64_math: the demo calls transcendental functions on default_fp values; Taichi's SPIR-V
    backends (Vulkan, Metal) have none in f64, so there it runs in f32 instead (with a notice)."""
    if arch == "gpu":
        try:
            ti.init(arch=ti.gpu, default_fp=default_fp)
            from taichi.lang import impl
            got = impl.current_cfg().arch
            if got in (ti.vulkan, ti.metal, ti.opengl) and default_fp == ti.f64 and f64_math:
                print(f"{got.name}: no f64 transcendental functions there, running in f32")
                ti.init(arch=got, default_fp=ti.f32)
                return
            if got not in (ti.x64, ti.arm64):
                return
        except Exception:  # noqa: BLE001 — any failure means: no usable GPU
            pass
        print("no GPU found: running on the CPU instead")
    ti.init(arch=ti.cpu, default_fp=default_fp)


@ti.func
def bounce(x, v):
    """A 2-D position and velocity after elastic bounces off the walls of the unit box."""
    for k in ti.static(range(2)):
        if x[k] < 0.0:
            x[k] = -x[k]
            v[k] = -v[k]
        if x[k] > 1.0:
            x[k] = 2.0 - x[k]
            v[k] = -v[k]
    return x, v


def progress(iterable, verbose=True, desc=""):
    if not verbose:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, leave=False)


class Adam:
    """Adam on a vector of parameters: `step(g)` is the change to subtract for gradient g. decay:
    the learning rate's factor per step (1: constant)."""

    def __init__(self, n, lr, decay=1.0):
        self.m, self.s, self.lr, self.decay, self.steps = np.zeros(n), np.zeros(n), lr, decay, 0

    def step(self, g):
        self.steps += 1
        self.m = 0.9 * self.m + 0.1 * g
        self.s = 0.999 * self.s + 0.001 * g * g
        rate = self.lr * self.decay ** (self.steps - 1)
        return rate * (self.m / (1 - 0.9 ** self.steps)) / (np.sqrt(self.s / (1 - 0.999 ** self.steps)) + 1e-12)


def descend(simulate, loss, param, adam, iters, record, verbose=True):
    """Gradient descent on the 0-d field `param` through a differentiable program: each iteration
    runs `simulate` under kd.Tape(loss) and steps param by Adam on its adjoint. Returns (the losses,
    record() after the first and after the last run)."""
    import kerndiff as kd
    history, records = [], []
    for it in progress(range(iters), verbose, "optimising"):
        with kd.Tape(loss):
            simulate()
        history.append(loss[None])
        if it in (0, iters - 1):
            records.append(record())
        param[None] = param.to_numpy() - adam.step(kd.adjoint(param).to_numpy())
    return history, records


def report_descent(history, v0):
    """The line the optimising demos end with: how far the loss fell, and the velocity found."""
    print(f"loss {history[0]:.4e} -> {history[-1]:.4e} ({history[0] / max(history[-1], 1e-300):.0f}x lower); "
          f"v0 = {np.round(v0, 4)}")


def save_descent_figure(history, loss_title, draw, title, out):
    """The 2-D demos' figure: the loss by iteration on the left, draw(ax) on the unit square on
    the right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 4.4))
    ax[0].semilogy(history)
    ax[0].set_xlabel("iteration")
    ax[0].set_title(loss_title)
    draw(ax[1])
    ax[1].set_xlim(0, 1)
    ax[1].set_ylim(0, 1)
    ax[1].set_aspect("equal")
    ax[1].legend(loc="upper left", fontsize=8)
    ax[1].set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
