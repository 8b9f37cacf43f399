"""Compile-time vectors and matrices: a static grid of scalar IR expressions.

Taichi's sizes are static, so the frontend scalarizes every vector/matrix operation here and the
IR never sees one. Shapes: (n,) for vectors, (n, m) for matrices.
"""
from __future__ import annotations

import itertools

from ..ir import build as B
from ..ir.nodes import Expr


class ShapeError(ValueError):
    """Operands whose shapes the operation does not take (a 3-vector dotted with a 2-vector, the
    determinant of a 2x3 matrix): Taichi refuses them at compile time, and so does kerndiff,
    rather than reading the components the shapes share."""


def _same_shape(op, a, b):
    if a.shape != b.shape:
        raise ShapeError(f"{op} of {a!r} and {b!r}: the shapes must agree")


def _square(op, a):
    if a.is_vector or a.shape[0] != a.shape[1]:
        raise ShapeError(f"the {op} of {a!r}: it needs a square matrix")


class Vec:
    __slots__ = ("shape", "items")

    def __init__(self, shape: tuple, items: list):
        self.shape = tuple(shape)
        self.items = list(items)  # row-major scalar IR expressions
        assert len(self.items) == _size(self.shape), (shape, len(items))

    def __repr__(self):  # what error messages show: "cannot index (a 2-vector,)"
        return f"a {self.shape[0]}-vector" if self.is_vector else f"a {self.shape[0]}x{self.shape[1]} matrix"

    # --- construction
    @staticmethod
    def from_nested(rows) -> "Vec":
        if rows and isinstance(rows[0], (list, tuple)):
            return Vec((len(rows), len(rows[0])), [e for r in rows for e in r])
        return Vec((len(rows),), list(rows))

    def map(self, fn) -> "Vec":
        return Vec(self.shape, [fn(e) for e in self.items])

    @property
    def is_vector(self):
        return len(self.shape) == 1

    def at(self, *idx) -> Expr:
        if len(self.shape) == 1:
            return self.items[idx[0]]
        return self.items[idx[0] * self.shape[1] + idx[1]]

    def row(self, i) -> "Vec":
        n, m = self.shape
        return Vec((m,), self.items[i * m:(i + 1) * m])

    def indices(self):
        return itertools.product(*(range(s) for s in self.shape))

    @property
    def dtype(self):
        d = self.items[0].dtype
        for e in self.items[1:]:
            from ..ir.types import promote
            d = promote(d, e.dtype)
        return d


def uniform(v: Vec) -> Vec:
    """A ti.Vector / ti.Matrix made of entries holds one type, to which Taichi promotes them all
    (an f32 and an f64 entry make an f64 vector, an int and an f32 an f32 one): so a component
    assigned later keeps that precision."""
    dt = v.dtype
    if all(e.dtype == dt for e in v.items):
        return v
    return v.map(lambda e: B.cast(e, dt))


def picks(idx, shape):
    """Per dimension, the positions a subscript names: a slice's range, or the one index (an
    int, or an IR expression known at run time)."""
    return [list(range(n))[i] if isinstance(i, slice) else [i] for i, n in zip(idx, shape)]


def _size(shape):
    out = 1
    for s in shape:
        out *= s
    return out


def broadcast(op, a, b, fn):
    """Elementwise binary op with scalar broadcasting, as Taichi does for vectors."""
    if isinstance(a, Vec) and isinstance(b, Vec):
        if a.shape != b.shape:
            raise ShapeError(f"shapes {a.shape} and {b.shape} differ in '{op}'")
        return Vec(a.shape, [fn(x, y) for x, y in zip(a.items, b.items)])
    if isinstance(a, Vec):
        return a.map(lambda x: fn(x, b))
    return b.map(lambda y: fn(a, y))


def dot(a: Vec, b: Vec) -> Expr:
    if not (a.is_vector and b.is_vector):
        raise ShapeError(f"dot of {a!r} and {b!r}: it takes two vectors")
    _same_shape("dot", a, b)
    return B.sum_of([B.mul(x, y) for x, y in zip(a.items, b.items)], B.mul(a.items[0], b.items[0]).dtype)


def matmul(a: Vec, b: Vec) -> Vec:
    if a.shape[-1] != b.shape[0]:
        raise ShapeError(f"{a!r} @ {b!r}: the inner dimensions ({a.shape[-1]} and {b.shape[0]}) must agree")
    if a.is_vector and b.is_vector:
        return dot(a, b)
    if b.is_vector:
        n, m = a.shape
        return Vec((n,), [dot(a.row(i), b) for i in range(n)])
    bt = transpose(b)
    if a.is_vector:  # row vector times matrix
        return Vec((b.shape[1],), [dot(a, bt.row(j)) for j in range(b.shape[1])])
    n, _ = a.shape
    _, p = b.shape
    return Vec((n, p), [dot(a.row(i), bt.row(j)) for i in range(n) for j in range(p)])


def transpose(a: Vec) -> Vec:
    if a.is_vector:
        return a
    n, m = a.shape
    return Vec((m, n), [a.at(i, j) for j in range(m) for i in range(n)])


def norm_sqr(a: Vec) -> Expr:
    """The sum of the squared components (a matrix's Frobenius norm squared, as Taichi's)."""
    return B.sum_of([B.mul(x, x) for x in a.items], B.mul(a.items[0], a.items[0]).dtype)


def _plus_eps(x: Expr, eps) -> Expr:
    """x + eps, where eps is Taichi's safeguard argument (a constant 0 adds nothing)."""
    if isinstance(eps, (int, float)):
        return x if eps == 0 else B.add(x, B.const(eps, x.dtype))
    return B.add(x, eps)


def norm(a: Vec, eps=0) -> Expr:
    """sqrt(|a|² + eps), as Taichi's v.norm(eps): eps keeps the derivative finite at a = 0."""
    return B.call("sqrt", _plus_eps(norm_sqr(a), eps))


def norm_inv(a: Vec, eps=0) -> Expr:
    return B.call("rsqrt", _plus_eps(norm_sqr(a), eps))


def normalized(a: Vec, eps=0) -> Vec:
    """a / (|a| + eps), as Taichi's v.normalized(eps): eps outside the root, so a = 0 gives 0."""
    inv = B.div(B.const(1, a.dtype if a.dtype.startswith("f") else "f32"), _plus_eps(norm(a), eps))
    return a.map(lambda e: B.mul(e, inv))


def cross(a: Vec, b: Vec):
    _same_shape("cross", a, b)
    if a.shape not in ((2,), (3,)):
        raise ShapeError(f"cross of {a!r} and {b!r}: it takes two 2-vectors or two 3-vectors")
    if a.shape == (2,):
        return B.sub(B.mul(a.items[0], b.items[1]), B.mul(a.items[1], b.items[0]))
    x1, y1, z1 = a.items
    x2, y2, z2 = b.items
    return Vec((3,), [B.sub(B.mul(y1, z2), B.mul(z1, y2)), B.sub(B.mul(z1, x2), B.mul(x1, z2)),
                      B.sub(B.mul(x1, y2), B.mul(y1, x2))])


def outer(a: Vec, b: Vec) -> Vec:
    return Vec((len(a.items), len(b.items)), [B.mul(x, y) for x in a.items for y in b.items])


def trace(a: Vec) -> Expr:
    _square("trace", a)
    return B.sum_of([a.at(i, i) for i in range(a.shape[0])], a.dtype)


def determinant(a: Vec) -> Expr:
    _square("determinant", a)
    n = a.shape[0]
    if n == 1:
        return a.at(0, 0)
    if n == 2:
        return B.sub(B.mul(a.at(0, 0), a.at(1, 1)), B.mul(a.at(0, 1), a.at(1, 0)))
    terms = []
    for j in range(n):  # Laplace expansion along the first row (n <= 4 in practice)
        minor = Vec((n - 1, n - 1), [a.at(r, c) for r in range(1, n) for c in range(n) if c != j])
        t = B.mul(a.at(0, j), determinant(minor))
        terms.append(t if j % 2 == 0 else B.neg(t))
    return B.sum_of(terms, a.dtype)


def inverse(a: Vec) -> Vec:
    _square("inverse", a)
    n = a.shape[0]
    det = determinant(a)
    inv_det = B.div(B.const(1, det.dtype if det.dtype.startswith("f") else "f32"), det)
    if n == 1:
        return Vec((1, 1), [inv_det])
    cof = []
    for i in range(n):
        for j in range(n):
            minor = Vec((n - 1, n - 1), [a.at(r, c) for r in range(n) if r != j for c in range(n) if c != i]) \
                if n > 2 else Vec((1, 1), [a.at(1 - j, 1 - i)])
            c = determinant(minor)
            cof.append(B.mul(c if (i + j) % 2 == 0 else B.neg(c), inv_det))
    return Vec((n, n), cof)
