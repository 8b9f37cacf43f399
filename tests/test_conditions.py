"""Conditions simplified by the equalities they contain (ir.conditions), integer comparisons
solved for their variable (ir.build), and branches that fix a local (opt.branch_facts), on IR
built by hand. The runtime-index tests in test_taichi_reference.py cover them on real kernels."""
from kerndiff.ir import build as B
from kerndiff.ir import nodes as N
from kerndiff.ir.conditions import all_of
from kerndiff.opt.branch_facts import use_branch_facts

J = B.var("j", "i32")
X = B.var("x", "f64")


def _int(v):
    return B.const(v, "i32")


def _eq(a, v):
    return B.call("eq", a, _int(v))


def test_a_conjunct_is_rewritten_with_what_the_others_fix():
    assert all_of([_eq(J, 1), B.call("not", _eq(J, 0))]) == _eq(J, 1)
    # (j + 1) % 3 == 0 cannot hold where j == 0
    assert all_of([_eq(J, 0), _eq(B.call("mod", B.add(J, _int(1)), _int(3)), 0)]) == _int(0)
    assert all_of([_eq(J, 0), _eq(B.call("mod", B.add(J, _int(1)), _int(3)), 1)]) == _eq(J, 0)
    assert all_of([_eq(J, 0), _eq(J, 1)]) == _int(0)
    assert all_of([None, None]) is None


def test_a_repeated_conjunct_is_kept_once_not_dropped_twice():
    # each copy would make the other true: the conjunction must stay j == 0
    assert all_of([_eq(J, 0), _eq(J, 0)]) == _eq(J, 0)
    assert all_of([B.call("and", _eq(J, 0), _eq(J, 0))]) == _eq(J, 0)


def test_what_fixes_nothing_is_left_alone():
    ne = B.call("and", B.call("ne", J, _int(1)), B.call("ne", J, _int(0)))
    assert all_of([B.call("ne", J, _int(1)), B.call("ne", J, _int(0))]) == ne
    # a float equality fixes nothing (0.0 == -0.0, NaN): x stays x
    half = B.call("eq", X, B.const(0.5, "f64"))
    less = B.call("lt", X, B.const(1.0, "f64"))
    assert all_of([half, less]) == B.call("and", half, less)


def test_integer_comparisons_are_solved_for_their_variable():
    assert _eq(B.sub(_int(2), J), 0) == _eq(J, 2)
    assert _eq(B.add(J, _int(1)), 100) == _eq(J, 99)
    assert B.call("ne", B.sub(J, _int(3)), _int(1)) == B.call("ne", J, _int(4))
    assert B.call("not", _eq(J, 0)) == B.call("ne", J, _int(0))
    # where the moved constant leaves i32's range the comparison stays as written (j + 1 wraps)
    wrap = _eq(B.add(J, _int(1)), -2 ** 31)
    assert isinstance(wrap, N.Call) and wrap.args[0] == B.add(J, _int(1))
    # floats are not solved: x + 1.0 == 2.0 is not x == 1.0 in floating point
    f = B.call("eq", B.add(X, B.const(1.0, "f64")), B.const(2.0, "f64"))
    assert f.args[0] == B.add(X, B.const(1.0, "f64"))


def test_a_branch_reads_the_value_its_condition_fixes():
    chain = B.select(_eq(J, 0), B.var("v0", "f64"), B.select(_eq(J, 1), B.var("v1", "f64"), B.var("v2", "f64")))
    add = N.Assign("a", B.add(B.var("a", "f64"), chain))
    (s,) = use_branch_facts((N.If(_eq(J, 1), (add,)),))
    assert s.then == (N.Assign("a", B.add(B.var("a", "f64"), B.var("v1", "f64"))),)
    # j != 0 and j != 1: the chain is down to its last choice
    (s,) = use_branch_facts((N.If(B.call("and", B.call("ne", J, _int(0)), B.call("ne", J, _int(1))), (add,)),))
    assert s.then == (N.Assign("a", B.add(B.var("a", "f64"), B.var("v2", "f64"))),)
    # a branch that assigns j learns nothing from its condition
    moved = (N.Assign("j", _int(2)), add)
    (s,) = use_branch_facts((N.If(_eq(J, 1), moved),))
    assert s.then == moved
    # the else branch is not where j == 1
    (s,) = use_branch_facts((N.If(_eq(J, 1), (), (add,)),))
    assert s.orelse == (add,)


def test_adds_are_guarded_by_one_simplified_condition():
    from kerndiff.ir.nodes import FieldRef
    from kerndiff.opt.guards import guard_zero_adds
    ref = FieldRef(object(), (), "v_adj", "f64", (3,))
    g = B.var("g", "f64")

    def atomic(value):
        return N.Atomic("add", ref, (J,), value)

    def sel(c, a, b):
        return B.select(c, B.const(a, "f64"), B.const(b, "f64"))

    # the adjoint of v[1] in v[0] if j == 0 else v[1] if j == 1 else v[2]: one `if j == 1:`
    (s,) = guard_zero_adds((atomic(B.mul(B.mul(g, sel(_eq(J, 0), 0.0, 1.0)), sel(_eq(J, 1), 1.0, 0.0))),))
    assert s == N.If(_eq(J, 1), (atomic(g),))
    # a product no j can make nonzero adds nothing
    assert guard_zero_adds((atomic(B.mul(B.mul(g, sel(_eq(J, 0), 1.0, 0.0)), sel(_eq(J, 1), 1.0, 0.0))),)) == ()
    # a local's accumulation is guarded where the condition is an index test ...
    acc = N.Assign("a", B.add(B.var("a", "f64"), B.mul(g, sel(_eq(J, 2), 1.0, 0.0))))
    assert guard_zero_adds((acc,)) == (N.If(_eq(J, 2), (N.Assign("a", B.add(B.var("a", "f64"), g)),)),)
    # ... and stays a select where it depends on data (a branch would mispredict)
    data = N.Assign("a", B.add(B.var("a", "f64"), B.mul(g, sel(B.call("gt", X, B.const(0.0, "f64")), 1.0, 0.0))))
    assert guard_zero_adds((data,)) == (data,)
