"""ti.polar_decompose of a 3x3 matrix, with derivatives.

Taichi computes it from its builtin 3x3 SVD statement, which has no Taichi source to
differentiate, and an SVD's own derivatives are undefined where singular values repeat (at the
identity, where a simulation starts). The rotation R itself is smooth there: A = R S with S
symmetric, and for a change dA, dR = R ω̂ with ((tr S) I - S) ω = axial(Rᵀ dA - dAᵀ R), whose
matrix is 2I at the identity.

So the value comes from Taichi (the op polar_rotation, taken as constant: ad.rules) and two
Newton steps towards the rotation X with Xᵀ A symmetric follow it (`refined`): each solves that
same 3x3 system for the rotation ω that makes (X e^ω̂)ᵀ A symmetric to first order, and turns X
by the Cayley transform of ω (exactly orthogonal, rational: no branch, no square root). At the
exact rotation the steps change nothing (ω = 0, up to rounding: the result is Taichi's rotation
polished, within a few ulp of it); their derivatives are the rotation's. The steps converge
cubically (the Cayley transform agrees with the exponential to second order; an error of 1e-2
in X leaves 7e-7), so a step from a value right to order k is right to order 3k + 2: from a
constant, one step gives exact derivatives to the second order and two to the eighth, which is
where ad.rules.ORDER_LIMITED draws the line. S = sym(Rᵀ A).

The step's system (tr S) I - S is singular where two singular values sum to zero (for the
rotation variant Taichi returns, det A < 0 flipping the smallest, where the two smallest are
equal: a reflection such as diag(1, 1, -1)) or where A has rank one or less; the derivative does
not exist there. The step is zero there (a guarded division, whose derivatives the transforms
keep under its guard: ad.rules.SINGULAR), so the values are Taichi's and the derivatives those of
Taichi's rotation held constant.

(No `from __future__ import annotations` here: Taichi reads a ti.func's annotations as objects.)
"""
import taichi as ti

from ..ir import build as B
from ..ir import nodes as N
from .vec import Vec


def lower_polar3(lw, node, A, dt):
    """(R, S) of the 3x3 matrix A (a Vec) in precision dt (a Taichi dtype), at the call `node`:
    Taichi's rotation, its nine entries assigned in a row as locals at the user's line (the
    generated code computes them with one call, codegen.emit; an error about them names that
    line), refined by `refined`."""
    from ..ir.types import from_taichi
    from .calls import inline_function, unwrap_ti_func

    A = lw.materialize(lw.cast(A, dt, node), "A", node)
    d = from_taichi(dt)
    entries = tuple(B.cast(lw.scalar(e, node), d) for e in A.items)
    guess = [N.Call(d, "polar_rotation", entries + (B.const(k, "i32"), B.const(0, "i32"))) for k in range(9)]
    X = lw.materialize(Vec((3, 3), guess), "rotation", node)
    return inline_function(lw, unwrap_ti_func(refined), [X, A, dt], {}, node)


@ti.func
def _newton_step(X, A, dt: ti.template()):
    """X turned towards the rotation R with Rᵀ A symmetric: by ω with ((tr S) I - S) ω =
    axial(M - Mᵀ), M = Xᵀ A, S its symmetric part (what makes (X e^ω̂)ᵀ A symmetric to first
    order), through the Cayley transform of ω."""
    h = ti.cast(0.5, dt)  # (literals in A's precision, whatever the program's default float)
    M = X.transpose() @ A
    # K = (tr S) I - S, S = the symmetric part of M (K is symmetric): ω by K's cofactors over
    # its determinant
    t = M[0, 0] + M[1, 1] + M[2, 2]
    k00, k11, k22 = t - M[0, 0], t - M[1, 1], t - M[2, 2]
    k01, k02, k12 = -h * (M[0, 1] + M[1, 0]), -h * (M[0, 2] + M[2, 0]), -h * (M[1, 2] + M[2, 1])
    c00 = k11 * k22 - k12 * k12
    c01 = k02 * k12 - k01 * k22
    c02 = k01 * k12 - k02 * k11
    c11 = k00 * k22 - k02 * k02
    c12 = k01 * k02 - k00 * k12
    c22 = k00 * k11 - k01 * k01
    det = k00 * c00 + k01 * c01 + k02 * c02
    b0, b1, b2 = M[2, 1] - M[1, 2], M[0, 2] - M[2, 0], M[1, 0] - M[0, 1]
    # u = ω / 2; Cayley: (I - û)⁻¹ (I + û) = I + 2 / (1 + |u|²) (û + û²)
    # K is singular only where the derivative does not exist (two singular values summing to
    # zero, or a matrix of rank one or less); there ω = 0 (X is Taichi's rotation already), not
    # 0 / 0
    zero = ti.cast(0.0, dt)
    half = h / det if det != zero else zero
    u0 = (c00 * b0 + c01 * b1 + c02 * b2) * half
    u1 = (c01 * b0 + c11 * b1 + c12 * b2) * half
    u2 = (c02 * b0 + c12 * b1 + c22 * b2) * half
    U = ti.Matrix([[0.0, -u2, u1], [u2, 0.0, -u0], [-u1, u0, 0.0]], dt)
    C = ti.Matrix.identity(dt, 3) + ti.cast(2.0, dt) / (ti.cast(1.0, dt) + u0 * u0 + u1 * u1 + u2 * u2) * (U + U @ U)
    return X @ C


@ti.func
def refined(X, A, dt: ti.template()):
    """(R, S) from Taichi's rotation X of A (a constant to the derivative transforms): two
    Newton steps make R's derivatives exact to the eighth order; S = the symmetric part of Rᵀ A."""
    X = _newton_step(X, A, dt)
    X = _newton_step(X, A, dt)
    M = X.transpose() @ A
    h = ti.cast(0.5, dt)
    s01, s02, s12 = h * (M[0, 1] + M[1, 0]), h * (M[0, 2] + M[2, 0]), h * (M[1, 2] + M[2, 1])
    S = ti.Matrix([[M[0, 0], s01, s02], [s01, M[1, 1], s12], [s02, s12, M[2, 2]]], dt)
    return X, S
