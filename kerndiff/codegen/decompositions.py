"""Taichi's own decompositions, as generated kernels call them (frontend.polar).

polar_rotation(dt, a00, a01, ..., a22): the nine entries, row by row, of the rotation R of the
polar decomposition A = R S that ti.polar_decompose gives for the 3x3 matrix A with those
entries, computed in precision dt. polar_rotation_entry gives one of them, for code in which the
nine are not computed together.

(No `from __future__ import annotations` here: Taichi reads a ti.func's annotations as objects.)
"""
import taichi as ti


@ti.func
def _rotation(dt: ti.template(), a00, a01, a02, a10, a11, a12, a20, a21, a22):
    A = ti.Matrix([[a00, a01, a02], [a10, a11, a12], [a20, a21, a22]], dt)
    R, _ = ti.polar_decompose(A, dt)
    return R


@ti.func
def polar_rotation(dt: ti.template(), a00, a01, a02, a10, a11, a12, a20, a21, a22):
    """The nine entries of the rotation of A's polar decomposition, row by row."""
    R = _rotation(dt, a00, a01, a02, a10, a11, a12, a20, a21, a22)
    return R[0, 0], R[0, 1], R[0, 2], R[1, 0], R[1, 1], R[1, 2], R[2, 0], R[2, 1], R[2, 2]


@ti.func
def polar_rotation_entry(dt: ti.template(), k: ti.template(), a00, a01, a02, a10, a11, a12, a20, a21, a22):
    """Entry k (row by row) of the rotation of A's polar decomposition."""
    R = _rotation(dt, a00, a01, a02, a10, a11, a12, a20, a21, a22)
    return R[k // 3, k % 3]
