"""Derivative kernels written by hand in plain Taichi: the yardstick of what a person would write
(the "hand" system in the tables).

Each kernel computes what the kerndiff kernel of its row computes, from the same fields, so
that the two times compare code, not work: W1's gradient adds into x.grad and y.grad, its JVP
adds the loss and its tangent along (x.dual, y.dual); an HVP adds the gradient into pos.grad and
H·v into hv. They are written the way a Taichi user would first write them: `+=` into fields
(atomic adds in a parallel loop, as in W2's scatter), and for W3 the forces of the pair sum as a
gather over j, using the energy's symmetry (each pair's two terms give the same r2), which no
transform of the kernel as written can do. The derivatives are worked out on paper:

    W2: E_s = (|d| - r)² / 2, d = pos[a] - pos[b]; ∇_d E_s = k d with k = 1 - r / |d|;
        its Hessian is k I + (r / |d|³) d dᵀ.
    W3: E = ½ Σ_i Σ_{j≠i} e(r2_ij), e(r2) = r2^-½ + 0.1 r2^-1, r2 = |p_i - p_j|² + 0.01;
        ∇_i E = Σ_j 2 e'(r2) d_ij, e' = -½ r2^-3/2 - 0.1 r2^-2;
        (H·v)_i = Σ_j 2 e'(r2) (v_i - v_j) + 4 e''(r2) (d_ij · (v_i - v_j)) d_ij, e'' = ¾ r2^-5/2 + 0.2 r2^-3.
"""
from __future__ import annotations


def w1(ti, x, y, loss):
    """(gradient, JVP) of loss = Σ sin(x) exp(y)."""
    @ti.kernel
    def grad():
        w = loss.grad[None]
        for i in x:
            e = ti.exp(y[i])
            x.grad[i] += w * ti.cos(x[i]) * e
            y.grad[i] += w * ti.sin(x[i]) * e

    @ti.kernel
    def jvp():
        for i in x:
            s, e = ti.sin(x[i]), ti.exp(y[i])
            loss[None] += s * e
            loss.dual[None] += e * (ti.cos(x[i]) * x.dual[i] + s * y.dual[i])

    return grad, jvp


def w2(ti, pos, ends, rest, E):
    """(gradient, HVP factory) of the spring energy; the factory takes the fields v and hv."""
    @ti.kernel
    def grad():
        w = E.grad[None]
        for s in ends:
            a, b = ends[s][0], ends[s][1]
            d = pos[a] - pos[b]
            g = w * (1.0 - rest[s] / d.norm()) * d
            pos.grad[a] += g
            pos.grad[b] -= g

    def hvp(v, hv):
        @ti.kernel
        def run():
            w = E.grad[None]
            for s in ends:
                a, b = ends[s][0], ends[s][1]
                d, dv = pos[a] - pos[b], v[a] - v[b]
                length = d.norm()
                k = 1.0 - rest[s] / length
                g = w * k * d
                h = w * (k * dv + rest[s] / (length * length * length) * d.dot(dv) * d)
                pos.grad[a] += g
                pos.grad[b] -= g
                hv[a] += h
                hv[b] -= h
        return run

    return grad, hvp


def w3(ti, pos, E):
    """(gradient, HVP factory) of the pair energy, as gathers over j."""
    n = pos.shape[0]

    @ti.kernel
    def grad():
        w = E.grad[None]
        for i in pos:
            f = ti.Vector([0.0, 0.0, 0.0])
            for j in range(n):
                if i != j:
                    d = pos[i] - pos[j]
                    inv = 1.0 / (d.norm_sqr() + 0.01)
                    de = -0.5 * ti.sqrt(inv) * inv - 0.1 * inv * inv
                    f += 2.0 * de * d
            pos.grad[i] += w * f

    def hvp(v, hv):
        @ti.kernel
        def run():
            w = E.grad[None]
            for i in pos:
                f = ti.Vector([0.0, 0.0, 0.0])
                h = ti.Vector([0.0, 0.0, 0.0])
                for j in range(n):
                    if i != j:
                        d, dv = pos[i] - pos[j], v[i] - v[j]
                        inv = 1.0 / (d.norm_sqr() + 0.01)
                        s = ti.sqrt(inv)
                        de = -0.5 * s * inv - 0.1 * inv * inv
                        dde = 0.75 * s * inv * inv + 0.2 * inv * inv * inv
                        f += 2.0 * de * d
                        h += 2.0 * de * dv + 4.0 * dde * d.dot(dv) * d
                pos.grad[i] += w * f
                hv[i] += w * h
        return run

    return grad, hvp
