"""Other ways of writing W1-W3, as a user (or a checker) might, and W2 at smaller sizes: kerndiff's
kernels against Taichi's own AD on each, kernels alone (`python -m bench --only variants`). The
targets are stated for the workloads as the issue spells them; these rows show how far the ratios
carry to other spellings of the same kinds of kernel, and how W2's depend on its size. One process
for the whole family (W3's spellings need Taichi's ad_stack_size >= N, set once by ti.init).
Registered into workloads.WORKLOADS."""
import numpy as np

from .workloads import WORKLOADS, energy_systems, init_taichi, random_ends, run_systems, spring_data


def variants(args):
    rng = np.random.default_rng(0)
    n1 = 10**5 if args.quick else 10**7
    n3 = 256 if args.quick else 4096
    ti = init_taichi(args.arch, ad_stack_size=n3 + 8)
    import kerndiff as kd
    E = ti.field(ti.f32, shape=(), needs_grad=True)

    def rows(name, energy, pos, v, rtol=5e-3, truth=None, args=()):
        """kerndiff's and Taichi's primal and gradient of `energy`, and kerndiff's HVP where a
        direction v is given (checked by the gradient and HVP dotted with a random u)."""
        u = rng.standard_normal(pos.grad.to_numpy().shape).astype(np.float32)
        systems = energy_systems(ti, kd, kd.kernel(energy), ti.kernel(energy), pos, E, v, u, args=args)
        if v is None:
            del systems["taichi"][1]["hvp"]
        run_systems(name, systems, rtol, truth=truth(u) if truth else None)

    # ---------------------------------------------------------------- W1: elementwise
    x = ti.field(ti.f32, shape=n1, needs_grad=True)
    y = ti.field(ti.f32, shape=n1, needs_grad=True)
    x.from_numpy(rng.random(n1, dtype=np.float32))
    y.from_numpy(rng.random(n1, dtype=np.float32))

    def log_cos():
        for i in x:
            E[None] += ti.log(1.0 + x[i] * x[i]) * ti.cos(y[i])

    def tanh_sqrt():
        for i in x:
            E[None] += ti.tanh(x[i]) * y[i] + ti.sqrt(x[i] + 1.0)

    def sin_squared():
        for i in range(n1):
            s = ti.sin(x[i])
            E[None] += s * s * ti.exp(-y[i])

    def sin_plus_cos():  # each reverse needs the other function of its argument alone
        for i in x:
            E[None] += ti.sin(x[i]) + ti.cos(y[i])

    for name, energy in (("W1 log·cos", log_cos), ("W1 tanh·y + sqrt", tanh_sqrt), ("W1 sin²·exp(-y)", sin_squared),
                         ("W1 sin(x) + cos(y)", sin_plus_cos)):
        rows(name, energy, x, None)

    # ---------------------------------------------------------------- W2: springs
    posv, endsv, restv = spring_data(args.quick, rng)
    P, S = len(posv), len(endsv)
    pos3 = ti.Vector.field(3, ti.f32, shape=P, needs_grad=True)
    pos3.from_numpy(np.concatenate([posv, rng.random((P, 1), dtype=np.float32)], axis=1))
    a, b = ti.field(ti.i32, shape=S), ti.field(ti.i32, shape=S)
    a.from_numpy(endsv[:, 0].copy())
    b.from_numpy(endsv[:, 1].copy())
    rest, stiffness = ti.field(ti.f32, shape=S), ti.field(ti.f32, shape=S, needs_grad=True)
    rest.from_numpy(restv)
    stiffness.from_numpy((rng.random(S, dtype=np.float32) + 0.5).astype(np.float32))
    px, py = ti.field(ti.f32, shape=P, needs_grad=True), ti.field(ti.f32, shape=P, needs_grad=True)
    px.from_numpy(posv[:, 0].copy())
    py.from_numpy(posv[:, 1].copy())

    def springs_3d():
        for s in rest:
            d = pos3[a[s]] - pos3[b[s]]
            E[None] += 0.5 * stiffness[s] * (d.norm() - rest[s]) ** 2

    def springs_scalar():
        for s in range(S):
            dx = px[a[s]] - px[b[s]]
            dy = py[a[s]] - py[b[s]]
            stretch = ti.sqrt(dx * dx + dy * dy) - rest[s]
            E[None] += 0.5 * stretch * stretch

    def springs_counted(m: ti.i32):
        for s in range(m):
            d = pos3[a[s]] - pos3[b[s]]
            E[None] += 0.5 * (d.norm() - rest[s]) ** 2

    rows("W2 3-D, stiffness field", springs_3d, pos3, rng.standard_normal((P, 3)).astype(np.float32))
    rows("W2 component fields", springs_scalar, px, rng.standard_normal(P).astype(np.float32))
    rows("W2 spring count an argument", springs_counted, pos3, rng.standard_normal((P, 3)).astype(np.float32),
         args=(S,))

    # W2 as written, as many springs between 30% and 10% of the particles: the arrays its kernels
    # gather from and add into at random (positions, and the reverse's private copies of their
    # adjoint, one per thread) then stay in the cache, as at full size they do not
    # (bench/RESULTS.md, "Reading the targets")
    for share in (0.3, 0.1):
        Pk = int(P * share)
        posk = ti.Vector.field(2, ti.f32, shape=Pk, needs_grad=True)
        endsk = ti.Vector.field(2, ti.i32, shape=S)
        posk.from_numpy(rng.random((Pk, 2), dtype=np.float32))
        endsk.from_numpy(random_ends(Pk, S, rng))

        def springs_fewer_particles():
            for s in range(S):
                d = posk[endsk[s][0]] - posk[endsk[s][1]]
                E[None] += 0.5 * (d.norm() - rest[s]) ** 2

        rows(f"W2 {Pk:.0e} particles".replace("e+0", "e"), springs_fewer_particles, posk,
             rng.standard_normal((Pk, 2)).astype(np.float32))

    # ---------------------------------------------------------------- W3: pair loops
    q = ti.Vector.field(3, ti.f32, shape=n3, needs_grad=True)
    qv = (rng.random((n3, 3), dtype=np.float32) * 10).astype(np.float32)
    q.from_numpy(qv)

    def pairs_inner_add():
        for i in q:
            for j in range(n3):
                if i != j:
                    r2 = (q[i] - q[j]).norm_sqr() + 0.01
                    E[None] += 0.5 * (1.0 / ti.sqrt(r2) + 0.1 / r2)

    def half_pairs():
        for i in range(n3):
            for j in range(i + 1, n3):
                r2 = (q[i] - q[j]).norm_sqr() + 0.01
                E[None] += 1.0 / ti.sqrt(r2) + 0.1 / r2

    def lennard_jones():
        for i in range(n3):
            e = 0.0
            for j in range(n3):
                if i != j:
                    r = (q[i] - q[j]).norm()
                    s6 = (1.0 / r) ** 6
                    e += 4.0 * (s6 * s6 - s6)
            E[None] += 0.5 * e

    def pairs_counted(m: ti.i32):
        for i in range(m):
            for j in range(m):
                if i != j:
                    r2 = (q[i] - q[j]).norm_sqr() + 0.01
                    E[None] += 0.5 * (1.0 / ti.sqrt(r2) + 0.1 / r2)

    def gaussians():
        for i in range(n3):
            e = 0.0
            for j in range(n3):
                e += ti.exp(-0.1 * (q[i] - q[j]).norm_sqr())
            E[None] += e

    def gaussian_truth(u):
        """The Gaussians' gradient dotted with u, in f64: Taichi 1.7.4's grad of this kernel (an
        exponential summed in a local over an inner loop) is wrong, so the rows are checked
        against this instead (tests/test_taichi_reference.py has the small case)."""
        p = qv.astype(np.float64)
        g = np.zeros_like(p)
        for lo in range(0, n3, 512):
            d = p[lo:lo + 512, None, :] - p[None, :, :]
            w = np.exp(-0.1 * (d * d).sum(-1))
            g[lo:lo + 512] = -0.4 * (w[:, :, None] * d).sum(1)
        return {"grad": float(np.sum(g * u))}

    v3 = rng.standard_normal((n3, 3)).astype(np.float32)
    rows("W3 struct-for, adds in the inner loop", pairs_inner_add, q, v3)
    rows("W3 half the pairs", half_pairs, q, v3)
    rows("W3 Lennard-Jones", lennard_jones, q, v3)
    rows("W3 particle count an argument", pairs_counted, q, v3, args=(n3,))
    rows("W3 Gaussians", gaussians, q, v3, truth=gaussian_truth)


WORKLOADS.update({"variants": variants})
