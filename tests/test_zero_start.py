"""Zeroed accumulators started at their first contribution (opt.zero_start), on IR built by hand:
what folds, and what must stay (a read or a nested write first, another dtype, a self-reference).
(On real kernels the golden sources and every derivative test cover it.)"""
from kerndiff.ir import build as B
from kerndiff.ir import nodes as N
from kerndiff.opt.zero_start import fold_zero_starts


def _v(name, dtype="f64"):
    return B.var(name, dtype)


ZERO = N.Assign("x", B.const(0.0, "f64"))
E = B.mul(_v("a"), _v("b"))


def test_accumulations_after_a_zero_become_assignments():
    other = N.Assign("y", _v("a"))
    assert fold_zero_starts((ZERO, other, N.Assign("x", B.add(_v("x"), E)))) == \
        (other, N.Assign("x", E))
    assert fold_zero_starts((ZERO, N.Assign("x", B.add(E, _v("x"))))) == (N.Assign("x", E),)
    assert fold_zero_starts((ZERO, N.Assign("x", B.sub(_v("x"), E)))) == (N.Assign("x", B.neg(E)),)
    # a plain overwrite makes the zero dead; only the first accumulation changes
    later = N.Assign("x", B.add(_v("x"), _v("c")))
    assert fold_zero_starts((ZERO, N.Assign("x", E), later)) == (N.Assign("x", E), later)
    # inside nested blocks too
    loop = N.For(("k",), ((B.const(0, "i32"), B.const(3, "i32")),), (ZERO, N.Assign("x", B.add(_v("x"), E))))
    (folded,) = fold_zero_starts((loop,))
    assert folded.body == (N.Assign("x", E),)


def test_zeros_that_are_read_or_written_elsewhere_first_stay():
    cases = [
        (ZERO, N.Assign("t", B.mul(_v("x"), E)), N.Assign("x", B.add(_v("x"), E))),  # read first
        (ZERO, N.If(_v("c", "i32"), (N.Assign("x", B.add(_v("x"), E)),), ()),),    # written in a branch
        (ZERO, N.Assign("x", B.add(_v("x"), B.mul(_v("x"), E)))),                  # reads itself again
        (ZERO, N.Assign("x", N.Call(dtype="f64", op="add", args=(_v("x"), _v("h", "f32"))))),  # another dtype
        (ZERO, N.Assign("x", B.sub(E, _v("x")))),                                   # e - x is not e
    ]
    for body in cases:
        assert fold_zero_starts(body) == body, body
