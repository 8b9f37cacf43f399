"""Static equilibrium of a hanging 2-D mass-spring net, by Newton's method.

Each Newton step solves H p = -g with conjugate gradients, where every H·v is one launch of
`energy.reverse.forward` (forward over reverse: a Hessian-vector product kernel) — no Hessian is
ever assembled. The top row of nodes is pinned; gravity pulls the rest down. Near the solution the
residual falls quadratically.

    python demos/newton_mass_spring.py [--size 12] [--tol 1e-9] [--out newton.png] [--arch cpu|gpu]
"""
import argparse

import numpy as np
import taichi as ti

import kerndiff as kd
from common import init, progress


def build(n):
    """An n x n net: structural and diagonal springs; rest length of the grid spacing."""
    idx = lambda i, j: i * n + j  # noqa: E731
    springs = []
    for i in range(n):
        for j in range(n):
            for di, dj in ((0, 1), (1, 0), (1, 1), (1, -1)):
                a, b = i + di, j + dj
                if 0 <= a < n and 0 <= b < n:
                    springs.append((idx(i, j), idx(a, b), np.hypot(di, dj) / (n - 1)))
    ends = np.array([(a, b) for a, b, _ in springs], dtype=np.int32)
    rest = np.array([r for _, _, r in springs])
    # row i = 0 is the top (y = 1); it is pinned
    pos0 = np.array([[j / (n - 1), 1 - i / (n - 1)] for i in range(n) for j in range(n)])
    free = np.array([0.0 if i == 0 else 1.0 for i in range(n) for j in range(n)])
    return ends, rest, pos0, free


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=12, help="nodes per side")
    p.add_argument("--tol", type=float, default=1e-9, help="stop when |gradient| is below this")
    p.add_argument("--steps", type=int, default=30, help="at most this many Newton steps")
    p.add_argument("--out", default="newton_mass_spring.png")
    p.add_argument("--arch", choices=["cpu", "gpu"], default="cpu")
    args = p.parse_args()
    init(args.arch, ti.f64)
    result = solve(args.size, args.tol, args.steps)
    for k, r in enumerate(result["residuals"]):
        print(f"Newton step {k:2d}: |gradient| = {r:.3e}   (CG iterations {result['cg'][k]})")
    print("converged" if result["converged"] else "did NOT converge", f"in {len(result['residuals']) - 1} steps")
    plot(result, args.out)
    print(f"wrote {args.out}")


def solve(n, tol, max_steps, stiffness=400.0, gravity=1.0, verbose=True):
    ends_np, rest_np, pos0, free_np = build(n)
    P, S = n * n, len(ends_np)
    x = ti.Vector.field(2, ti.f64, shape=P, needs_grad=True, needs_dual=True)
    ends = ti.Vector.field(2, ti.i32, shape=S)
    rest = ti.field(ti.f64, shape=S)
    E = ti.field(ti.f64, shape=(), needs_grad=True, needs_dual=True)
    ends.from_numpy(ends_np)
    rest.from_numpy(rest_np)

    @kd.kernel
    def energy():
        for s in range(S):
            d = x[ends[s][0]] - x[ends[s][1]]
            E[None] += 0.5 * stiffness * (d.norm() - rest[s]) ** 2 / S
        for i in range(P):
            E[None] += gravity * x[i][1] / P

    free = np.repeat(free_np[:, None], 2, axis=1)
    hv_field = kd.dual(x.grad)

    def gradient(pos):
        x.from_numpy(pos)
        E[None] = 0
        energy()
        x.grad.fill(0)
        E.grad[None] = 1
        energy.reverse()
        return x.grad.to_numpy() * free, E[None]

    def hvp(pos, v):
        x.from_numpy(pos)
        x.dual.from_numpy(v * free)
        E.dual[None] = 0
        energy.forward()  # tangents of the kernel's results (read by the H·v kernel)
        x.grad.fill(0)
        hv_field.fill(0)
        E.grad[None] = 1
        energy.reverse.forward()
        return hv_field.to_numpy() * free

    pos = pos0.copy()
    residuals, cg_its = [], []
    converged = False
    for step in progress(range(max_steps + 1), verbose, "newton"):
        g, e = gradient(pos)
        r = float(np.linalg.norm(g))
        residuals.append(r)
        if r < tol:
            converged = True
            cg_its.append(0)
            break
        p, its = conjugate_gradients(lambda v: hvp(pos, v), -g, tol=min(0.5, np.sqrt(r)) * r)
        cg_its.append(its)
        t = 1.0  # backtracking line search on the energy
        while t > 1e-6:
            trial = pos + t * p
            x.from_numpy(trial)
            E[None] = 0
            energy()
            if E[None] <= e + 1e-4 * t * np.sum(g * p):
                break
            t *= 0.5
        pos = pos + t * p
    return {"positions": pos, "initial": pos0, "ends": ends_np, "residuals": residuals, "cg": cg_its,
            "converged": converged}


def conjugate_gradients(hvp, b, tol, max_iter=500):
    """Solve H p = b with H given by products; stops on negative curvature (returns the last p)."""
    p = np.zeros_like(b)
    r = b.copy()
    d = r.copy()
    rr = np.sum(r * r)
    for k in range(max_iter):
        hd = hvp(d)
        curv = np.sum(d * hd)
        if curv <= 0:
            return (p if k else b), k
        alpha = rr / curv
        p += alpha * d
        r -= alpha * hd
        rr_new = np.sum(r * r)
        if np.sqrt(rr_new) < tol:
            return p, k + 1
        d = r + (rr_new / rr) * d
        rr = rr_new
    return p, max_iter


def plot(result, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.6))
    for pos, style, label in ((result["initial"], "0.75", "start"), (result["positions"], "C0", "equilibrium")):
        for a, b in result["ends"]:
            ax[0].plot(*zip(pos[a], pos[b]), color=style, lw=0.8)
        ax[0].plot(pos[:, 0], pos[:, 1], "o", ms=2.5, color=style, label=label)
    ax[0].set_aspect("equal")
    ax[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=2)
    ax[0].set_title("hanging mass-spring net")
    ax[1].semilogy(result["residuals"], "o-")
    ax[1].set_xlabel("Newton step")
    ax[1].set_ylabel("|gradient|")
    ax[1].set_title("convergence (Newton-CG on H·v from k.reverse.forward)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
