"""A physics-informed network for the 2-D Poisson problem  -Δu = 2π² sin(πx) sin(πy)  on [0, 1]²,
u = 0 on the boundary (exact solution u = sin(πx) sin(πy)).

The network is a `kd.func` tanh MLP whose weights live in Taichi fields. Its Laplacian comes from
`kd.forward(kd.forward(u, argnum=0), argnum=0)` (+ the same in y) inside a kernel that accumulates
the PDE and boundary residuals; the weights are trained (Adam) with the reverse pass of that
kernel — reverse over forward over forward.

    python demos/pinn_poisson.py [--steps 2000] [--width 12] [--points 400] [--out pinn.png] [--arch cpu|gpu]
"""
import argparse
import math
import time

import numpy as np
import taichi as ti

import kerndiff as kd
from common import init, progress


def build(width, n_pde, n_bc, seed=0):
    rng = np.random.default_rng(seed)
    H = width
    W1 = ti.field(ti.f32, shape=(H, 2))
    b1 = ti.field(ti.f32, shape=H)
    W2 = ti.field(ti.f32, shape=(H, H))
    b2 = ti.field(ti.f32, shape=H)
    w3 = ti.field(ti.f32, shape=H)
    b3 = ti.field(ti.f32, shape=())
    params = [W1, b1, W2, b2, w3, b3]
    init_vals = [rng.standard_normal((H, 2)) * math.sqrt(1 / 2), np.zeros(H),
                 rng.standard_normal((H, H)) * math.sqrt(1 / H), np.zeros(H),
                 rng.standard_normal(H) * math.sqrt(1 / H), np.zeros(())]
    for p, v in zip(params, init_vals):
        if p.shape:
            p.from_numpy(v.astype(np.float32))
        else:
            p[None] = float(v)
    pde = ti.Vector.field(2, ti.f32, shape=n_pde)
    bc = ti.Vector.field(2, ti.f32, shape=n_bc)
    pde.from_numpy(rng.random((n_pde, 2), dtype=np.float32))
    t = (np.arange(n_bc) // 4 + 0.5).astype(np.float32) / ((n_bc + 3) // 4)  # evenly along each side
    side = np.arange(n_bc) % 4
    pts = np.stack([np.where(side == 0, 0, np.where(side == 1, 1, t)),
                    np.where(side == 2, 0, np.where(side == 3, 1, t))], axis=1).astype(np.float32)
    bc.from_numpy(pts)
    loss = ti.field(ti.f32, shape=())

    @kd.func
    def u(x, y):
        h1 = ti.Vector([ti.tanh(W1[j, 0] * x + W1[j, 1] * y + b1[j]) for j in ti.static(range(H))])
        h2 = ti.Vector([ti.tanh(sum([W2[j, k] * h1[k] for k in ti.static(range(H))]) + b2[j])
                        for j in ti.static(range(H))])
        return sum([w3[k] * h2[k] for k in ti.static(range(H))]) + b3[None]

    uxx = kd.forward(kd.forward(u, argnum=0), argnum=0)
    uyy = kd.forward(kd.forward(u, argnum=1), argnum=1)

    @kd.kernel
    def residual_loss():
        for p in pde:
            x, y = pde[p][0], pde[p][1]
            f = 2 * math.pi ** 2 * ti.sin(math.pi * x) * ti.sin(math.pi * y)
            r = uxx(x, y) + uyy(x, y) + f
            loss[None] += r * r / n_pde
        for q in bc:
            b = u(bc[q][0], bc[q][1])
            loss[None] += 10.0 * b * b / n_bc

    grid = 41
    gx = ti.Vector.field(2, ti.f32, shape=grid * grid)
    g = np.linspace(0, 1, grid, dtype=np.float32)
    gx.from_numpy(np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2))
    pred = ti.field(ti.f32, shape=grid * grid)

    @kd.kernel
    def predict():
        for i in gx:
            pred[i] = u(gx[i][0], gx[i][1])

    return params, residual_loss, loss, predict, pred, grid


def train(steps, width, n_pde, n_bc, lr=0.01, seed=0, verbose=True):
    params, residual_loss, loss, predict, pred, grid = build(width, n_pde, n_bc, seed)
    adj = [kd.adjoint(p) for p in params]
    m = [np.zeros(p.shape) for p in params]
    v = [np.zeros(p.shape) for p in params]
    history = []
    t0 = time.perf_counter()
    for step in progress(range(steps), verbose, "training"):
        with kd.Tape(loss):
            residual_loss()
        history.append(loss[None])
        for i, (p, a) in enumerate(zip(params, adj)):  # Adam
            g = a.to_numpy().astype(np.float64) if p.shape else np.float64(a[None])
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            mh, vh = m[i] / (1 - 0.9 ** (step + 1)), v[i] / (1 - 0.999 ** (step + 1))
            rate = lr if step < 0.7 * steps else lr * 0.2  # a step down for the last 30%
            new = (p.to_numpy() if p.shape else np.float64(p[None])) - rate * mh / (np.sqrt(vh) + 1e-8)
            if p.shape:
                p.from_numpy(new.astype(np.float32))
            else:
                p[None] = float(new)
    predict()
    u = pred.to_numpy().reshape(grid, grid)
    g = np.linspace(0, 1, grid)
    X, Y = np.meshgrid(g, g, indexing="ij")
    exact = np.sin(np.pi * X) * np.sin(np.pi * Y)
    rel = float(np.linalg.norm(u - exact) / np.linalg.norm(exact))
    return history, rel, u, exact, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--width", type=int, default=12)
    p.add_argument("--points", type=int, default=400, help="collocation points inside the square")
    p.add_argument("--out", default="pinn_poisson.png")
    p.add_argument("--arch", choices=["cpu", "gpu"], default="cpu")
    args = p.parse_args()
    init(args.arch, ti.f32)
    history, rel, u, exact, secs = train(args.steps, args.width, args.points, max(40, args.points // 2))
    print(f"loss {history[0]:.3e} -> {history[-1]:.3e} in {args.steps} steps ({secs:.1f} s)")
    print(f"relative L2 error of u against the exact solution: {rel:.3%}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.6))
    for a, data, title in zip(ax[:3], (u, exact, np.abs(u - exact)), ("PINN u", "exact u", "|error|")):
        im = a.imshow(data.T, origin="lower", extent=(0, 1, 0, 1), cmap="viridis")
        a.set_title(title)
        fig.colorbar(im, ax=a)
    ax[3].semilogy(history)
    ax[3].set_title(f"training loss (rel. L2 error {rel:.2%})")
    ax[3].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
