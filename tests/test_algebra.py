"""Like terms collected in derivative expressions (opt.algebra), on IR built by hand: what merges,
what must not be distributed, and when a temporary may be looked through. (The pass on real
kernels, against finite differences: tests/test_reciprocal.py.)"""
import re

import numpy as np

from kerndiff.ir import build as B
from kerndiff.ir import nodes as N
from kerndiff.ir.nodes import FieldRef
from kerndiff.ir.walk import iter_expr, vars_in
from kerndiff.opt.algebra import Terms, collect_terms


def _v(name):
    return B.var(name, "f64")


def _terms(e, defs=None):
    return Terms("f64", defs or {}).of(e)


def test_like_terms_merge_and_products_are_not_distributed_over_sums():
    a, b, c, x = _v("a"), _v("b"), _v("c"), _v("x")
    assert _terms(B.add(B.mul(a, b), B.mul(b, a))) == {((a, 1), (b, 1)): 2.0}
    assert _terms(B.sub(B.mul(a, b), B.mul(b, a))) == {}
    # m * (x - c) keeps x - c as one factor: m*x - m*c would lose its exactness when x ~ c
    (mono, coeff), = _terms(B.mul(a, B.sub(x, c))).items()
    assert coeff == 1.0 and any(isinstance(k, tuple) and k[0] == "sum" for k, _ in mono)
    # a power-of-two constant scales exactly, so it may go inside
    assert _terms(B.mul(B.sub(x, c), B.const(2.0, "f64"))) == {((x, 1),): 2.0, ((c, 1),): -2.0}
    assert len(_terms(B.mul(B.sub(x, c), B.const(3.0, "f64")))) == 1


def _store(value):
    ref = FieldRef(object(), (), "g_adj", "f64", (4,))
    return N.Store(ref, (B.const(0, "i32"),), value)


def test_collected_form_pulls_out_common_factors_and_looks_through_products():
    a, b, c = _v("a"), _v("b"), _v("c")
    body = (N.Assign("t", B.mul(a, b)),
            _store(B.add(B.add(B.mul(_v("t"), c), B.mul(c, B.mul(b, a))), B.mul(B.mul(a, c), a))))
    out = collect_terms(body, lambda field: True)
    # t*c + c*(b*a) + a*c*a = 2abc + a²c = a*c*(2b + a): one factor pulled out, t looked through
    value = out[-1].value
    assert value != body[-1].value
    ops = sum(1 for x in iter_expr(value) if isinstance(x, N.Call))
    assert ops < 7
    rng = np.random.default_rng(0)
    for _ in range(5):
        env = dict(zip("abc", rng.standard_normal(3)))
        assert np.isclose(_eval(value, env), _eval(body[-1].value, {**env, "t": env["a"] * env["b"]}))


def test_a_definition_is_not_looked_through_after_what_it_reads_changes():
    a, b = _v("a"), _v("b")
    body = (N.Assign("t", B.mul(a, b)),
            N.Assign("a", B.add(a, B.const(1.0, "f64"))),
            _store(B.add(B.mul(_v("t"), b), B.mul(b, _v("t")))))
    out = collect_terms(body, lambda field: True)
    names = {v.name for v in vars_in(out[-1].value)}
    assert "t" in names  # still reads t (the old a*b), not a*b with the new a


def _eval(e, env):
    if isinstance(e, N.Const):
        return e.value
    if isinstance(e, N.Var):
        return env[e.name]
    args = [_eval(x, env) for x in e.args]
    return {"add": lambda p, q: p + q, "sub": lambda p, q: p - q, "mul": lambda p, q: p * q,
            "neg": lambda p: -p}[e.op](*args)




def test_constants_are_not_merged_past_the_dtype_range():
    """(x * 1e30) * 1e30 * y is finite in f32 for x = 1e-30; one merged constant 1e60 is not."""
    x, y = B.var("x", "f32"), B.var("y", "f32")
    big = B.const(1e30, "f32")
    ref = FieldRef(object(), (), "g_adj", "f32", (4,))
    value = B.mul(B.mul(B.mul(x, big), big), B.mul(y, y))
    out = collect_terms((N.Store(ref, (B.const(0, "i32"),), value),), lambda field: True)
    assert out[0].value == value


def test_shared_constants_come_out_and_meet_the_other_constants():
    a, b, c = _v("a"), _v("b"), _v("c")
    half, two = B.const(0.5, "f64"), B.const(2.0, "f64")
    # a*0.5 + b*0.5 + c: no atom is shared, the constant 0.5 is
    out = collect_terms((_store(B.add(B.add(B.mul(a, half), B.mul(b, half)), B.mul(c, c))),), lambda f: True)
    assert out[0].value == B.add(B.mul(c, c), B.mul(B.add(a, b), half))
    # c * 0.5 * (a*2 + b*2): the sum's 2 meets the 0.5 (exactly), one multiplication fewer
    value = B.mul(B.mul(c, half), B.add(B.mul(a, two), B.mul(b, two)))
    got = _terms(value)
    assert list(got.values()) == [1.0]
    out = collect_terms((_store(value),), lambda f: True)
    assert sum(1 for x in iter_expr(out[0].value) if isinstance(x, N.Call)) == 2  # c * (a + b)


def test_powers_are_written_by_squaring_and_read_what_a_local_holds():
    """x⁵ is (x·x)·(x·x)·x, and after `t = x * x` the squares read t (opt.reuse): t·t·x."""
    from kerndiff.opt.algebra import _power
    from kerndiff.opt.reuse import reuse_held_values
    x, y = _v("x"), _v("y")
    square = B.mul(x, x)
    assert _power(x, 5) == B.mul(B.mul(square, square), x)
    assert _power(x, 4) == B.mul(square, square)
    t = B.var("t", "f64")
    body = (N.Assign("t", square), _store(B.mul(_power(x, 5), y)))
    assert reuse_held_values(body)[1].value == B.mul(B.mul(B.mul(t, t), x), y)
    # not once x (what t was computed from) or t itself is assigned again
    for moved in ("x", "t"):
        changed = (body[0], N.Assign(moved, y), body[1])
        assert reuse_held_values(changed) == changed
    # inside a nested block that assigns neither, the held value is read too
    loop = N.For(("k",), ((B.const(0, "i32"), B.const(3, "i32")),), (body[1],))
    assert reuse_held_values((body[0], loop))[1].body[0].value == B.mul(B.mul(B.mul(t, t), x), y)
    # a value read from a field is never held (the field may change)
    load = N.Load("f64", FieldRef(object(), (), "g", "f64", (4,)), (B.const(0, "i32"),))
    loaded = (N.Assign("u", B.mul(load, load)), _store(B.mul(B.mul(load, load), y)))
    assert reuse_held_values(loaded) == loaded


def test_a_local_holding_a_value_computed_before_it_moves_up_to_be_read():
    """`a = (1 - t*t) * x; b = 1 - t*t` (late forwarded copies leave this; CSE saw b's value as
    1 - t1*t1) becomes `b = 1 - t*t; a = b * x`, unless something between reads or assigns b or
    assigns t, and not into an if's branch (the value would be computed whether taken or not)."""
    from kerndiff.opt.reuse import reuse_held_values
    t, x = _v("t"), _v("x")
    value = B.sub(B.const(1.0, "f64"), B.mul(t, t))
    a, b = N.Assign("a", B.mul(value, x)), N.Assign("b", value)
    other = N.Assign("c", B.mul(x, x))
    assert reuse_held_values((a, other, b)) == (b, N.Assign("a", B.mul(B.var("b", "f64"), x)), other)
    for between in (N.Assign("t", x), N.Assign("c", B.var("b", "f64")), N.Assign("b", x)):
        assert reuse_held_values((a, between, b)) == (a, between, b)
    branch = N.If(B.call("gt", x, t), (a,), ())
    assert reuse_held_values((branch, b)) == (branch, b)
    # where an earlier local holds the value already, the later one reads it (the earlier keeps
    # its name: a reciprocal's `t4_inv` does not become a copy of a later `t9`)
    held = N.Assign("r_inv", value)
    assert reuse_held_values((held, other, b)) == (held, other, N.Assign("b", B.var("r_inv", "f64")))


def test_derivative_products_read_a_held_product_of_some_of_their_factors():
    """After `t2 = r * e`, a derivative product `d * r * e` reads `d * t2` (W2's HVP: the
    looked-through form collect_terms wrote before opt.scales gave t2 its final factors), in the
    place of the first factor it takes, and `e * r` reads t2; not in a value a non-derivative
    reads (regrouping a product may change its last bit), not once r or t2 is assigned again,
    and a chain that takes nothing keeps its association."""
    from kerndiff.opt.reuse import reuse_held_values
    d, r, e, x = _v("d"), _v("r"), _v("e"), _v("x")
    t2 = B.var("t2", "f64")
    held = N.Assign("t2", B.mul(r, e))
    adj = FieldRef(object(), (), "g_adj", "f64", (4,))
    plain = FieldRef(object(), (), "g", "f64", (4,))

    def is_derivative(f):
        return f is adj.field

    def store(ref, value):
        return N.Store(ref, (B.const(0, "i32"),), value)

    body = (held, N.Assign("d_adj", B.mul(B.mul(d, r), e)), store(adj, B.var("d_adj", "f64")))
    assert reuse_held_values(body, is_derivative)[1].value == B.mul(d, t2)
    # as written before (whole values only) where no test for derivative fields is given
    assert reuse_held_values(body)[1].value == B.mul(B.mul(d, r), e)
    # the first factor taken holds the place: (r * x) * (d * e) -> t2 * x * d
    mixed = (held, store(adj, B.mul(B.mul(r, x), B.mul(d, e))))
    assert reuse_held_values(mixed, is_derivative)[1].value == B.mul(B.mul(t2, x), d)
    # inside another operation's argument too: sqrt(d * e * r) + x
    nested = (held, store(adj, B.add(B.call("sqrt", B.mul(B.mul(d, e), r)), x)))
    assert reuse_held_values(nested, is_derivative)[1].value == B.add(B.call("sqrt", B.mul(d, t2)), x)
    # a primal value keeps its rounding
    primal = (held, store(plain, B.mul(B.mul(d, r), e)))
    assert reuse_held_values(primal, is_derivative) == primal
    # not once r is assigned again
    moved = (held, N.Assign("r", x), body[1], body[2])
    assert reuse_held_values(moved, is_derivative) == moved
    # from a local assigned again later too, before that (what it holds is held until then)
    again = body + (N.Assign("t2", x), N.Assign("f_adj", B.mul(B.mul(d, r), e)))
    out = reuse_held_values(again, is_derivative)
    assert out[1].value == B.mul(d, t2) and out[4].value == B.mul(B.mul(d, r), e)
    # the held product in another order is the held value
    assert reuse_held_values((held, store(adj, B.mul(e, r))), is_derivative)[1].value == t2
    # a chain that takes nothing keeps its association
    kept = (held, store(adj, B.mul(d, B.mul(x, e))))
    assert reuse_held_values(kept, is_derivative) == kept


def _run(stmts, env):
    """Evaluate straight-line assignments of add/sub/mul/neg/div on floats (a reference for the
    rewrites below)."""
    ops = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}

    def ev(e):
        if isinstance(e, N.Const):
            return float(e.value)
        if isinstance(e, N.Var):
            return env[e.name]
        args = [ev(a) for a in e.args]
        return -args[0] if e.op == "neg" else ops[e.op](*args)

    env = dict(env)
    for s in stmts:
        env[s.name] = ev(s.value)
    return env


def test_powers_of_two_move_between_a_local_and_its_uses():
    """opt.scales: the factor 2 of a square's adjoint, in every use of r, goes into r's definition
    (`p = t * r * 2.0` -> `p = r * t`); the 2 in d's definition goes into the constants of its
    one use (0.2, 0.75 -> 0.4, 1.5). What the uses compute is unchanged (products by powers of
    two are exact), with fewer operations; a factor 3, or a local something else reads, stays.
    A local that holds a multiple of its value is named for it: r holds twice a * b, d half its
    sum (`twice_r`, `half_d`)."""
    from kerndiff.opt.algebra import arith_ops
    from kerndiff.opt.scales import rescale_locals
    two, a, b, t, s, w, v, x, y = B.const(2.0, "f64"), *map(_v, "abtswvxy")
    body = (N.Assign("r", B.mul(a, b)),
            N.Assign("p", B.mul(B.mul(t, _v("r")), two)),
            N.Assign("q", B.mul(B.mul(s, _v("r")), two)),
            N.Assign("d", B.mul(B.add(B.mul(a, x), B.mul(b, y)), two)),
            N.Assign("g", B.mul(_v("d"), B.mul(w, B.add(B.mul(v, B.const(0.2, "f64")), B.const(0.75, "f64"))))),
            *(_store(_v(name)) for name in "pqg"))  # what the kernel keeps
    out = rescale_locals(body, lambda f: True)
    assert out[-3:] == body[-3:]
    body, out = body[:-3], out[:-3]
    assert sum(arith_ops(s.value) for s in out) <= sum(arith_ops(s.value) for s in body) - 2
    text = {s.name: s.value for s in out}
    assert [s.name for s in out] == ["twice_r", "p", "q", "half_d", "g"]
    assert not any(isinstance(x, N.Const) and x.value == 2.0 for name in ("p", "q", "half_d")
                   for x in iter_expr(text[name]))
    consts = {x.value for x in iter_expr(text["g"]) if isinstance(x, N.Const)}
    assert consts == {0.4, 1.5}, text["g"]
    env = dict(zip("abtswvxy", np.random.default_rng(1).standard_normal(8)))
    want, got = _run(body, env), _run(out, env)
    assert got["p"] == want["p"] and got["q"] == want["q"]  # bit for bit: only exact scalings moved
    assert abs(got["g"] - want["g"]) <= 4e-16 * abs(want["g"])  # its product is written in another order
    # a factor that is not a power of two stays where it is
    three = (N.Assign("r", B.mul(a, b)), N.Assign("p", B.mul(B.mul(t, _v("r")), B.const(3.0, "f64"))),
             _store(_v("p")))
    assert rescale_locals(three, lambda f: True) == three
    # so does a local that a store (or a condition, an index) reads
    stored = body[:3] + (_store(_v("r")), _store(_v("p")), _store(_v("q")))
    assert rescale_locals(stored, lambda f: True)[:3] == body[:3]


def test_operation_counts_include_indices_and_repeats_and_deep_sums():
    """arith_ops (kept on each node once counted) counts what the expression evaluates: the
    arithmetic in a load's index, a shared subexpression once per use, and a sum of thousands of
    terms without recursion."""
    from kerndiff.opt.algebra import arith_ops
    a, b = _v("a"), _v("b")
    ref = FieldRef(object(), (), "g", "f64", (4,))
    i = B.var("i", "i32")
    load = B.load(ref, (B.add(i, B.const(1, "i32")),))
    ab = B.mul(a, b)
    e = B.mul(B.add(ab, load), ab)
    assert arith_ops(load) == 1 and arith_ops(e) == 5 and arith_ops(e) == 5  # the kept count
    assert arith_ops(B.sub(e, a)) == 6  # a parent reuses its child's count
    deep = a
    for k in range(5000):
        deep = N.Call("f64", "add", (deep, _v(f"x{k}")))
    assert arith_ops(deep) == 5000


def test_a_reciprocal_local_is_a_power_minus_one_and_cancels():
    """After `r_inv = 1.0 / r`, opt.algebra reads r_inv as r**-1: `r * r_inv * r_inv * a + r_inv * b`
    is r**-1 * (a + b), written through r_inv (r * r_inv is 1 to within an ulp, which derivative
    code allows). Where no local holds the reciprocal any more (r assigned again), nothing cancels."""
    r, r_inv, a, b = _v("r"), _v("r_inv"), _v("a"), _v("b")
    recip = N.Assign("r_inv", B.div(B.const(1.0, "f64"), r))
    value = B.add(B.mul(B.mul(B.mul(r, r_inv), r_inv), a), B.mul(r_inv, b))
    out = collect_terms((recip, _store(value)), lambda f: True)
    assert out[1].value == B.mul(r_inv, B.add(a, b)), out[1].value
    env = dict(r=1.7, a=0.3, b=-2.1)
    env["r_inv"] = 1.0 / env["r"]
    got, want = _run([N.Assign("x", out[1].value)], env)["x"], _run([N.Assign("x", value)], env)["x"]
    assert abs(got - want) <= 4e-16 * abs(want)
    # once r is assigned again, r_inv no longer holds its reciprocal: nothing cancels (the value
    # is the same for any r_inv, not only for 1 / r)
    moved = (recip, N.Assign("r", a), _store(value))
    rewritten = collect_terms(moved, lambda f: True)[2].value
    env = dict(r_inv=0.4, a=0.3, b=-2.1, r=0.3)
    got, want = _run([N.Assign("x", rewritten)], env)["x"], _run([N.Assign("x", value)], env)["x"]
    assert abs(got - want) <= 4e-16 * abs(want), rewritten


def test_a_sum_of_products_is_distributed_where_its_terms_then_merge():
    """m * (a*b*3 + c*d) + m*a*b is m*a*b*4 + m*c*d once m goes inside (the HVP of a
    Lennard-Jones potential: the product rule's terms meet terms of the same monomial outside the
    sum); collected both ways, the cheaper is kept. A sum with an exact term (x - c) is not
    distributed over, even where the terms would then merge."""
    m, a, b, c, d, x = (_v(n) for n in "mabcdx")
    three = B.const(3.0, "f64")
    inner = B.add(B.mul(B.mul(a, b), three), B.mul(c, d))
    value = B.add(B.mul(m, inner), B.mul(m, B.mul(a, b)))
    spread = Terms("f64", {}, distribute=True).of(value)
    assert spread == {((a, 1), (b, 1), (m, 1)): 4.0, ((c, 1), (d, 1), (m, 1)): 1.0}, spread
    assert ((m, 1), (a, 1), (b, 1)) not in _terms(value)  # kept whole, nothing met
    out = collect_terms((_store(value),), lambda f: True)[0].value
    assert _ops(out) == 5, out  # m * (a * b * 4.0 + c * d), against 8 as written (7 kept whole)
    rng = np.random.default_rng(1)
    for _ in range(5):
        env = dict(zip("mabcdx", rng.standard_normal(6)))
        assert np.isclose(_eval(out, env), _eval(value, env))
    # m * (x - c) + m * x: distributing would give 2*m*x - m*c (x - c loses its exactness)
    exact = B.add(B.mul(m, B.sub(x, c)), B.mul(m, x))
    assert len(Terms("f64", {}, distribute=True).of(exact)) == 2
    assert any(k[0] == "sum" for mono in Terms("f64", {}, distribute=True).of(exact)
               for k, _ in mono if isinstance(k, tuple))


def _ops(e):
    return sum(1 for y in iter_expr(e) if isinstance(y, N.Call))


def test_substitution_replaces_only_the_vars_an_expression_has():
    """opt.scales maps x to x * -1.0 (a sign moving into x's definition): in `-x` that is
    `-(-x)`, which the rebuild simplifies to the Var x; replacing that x again gave `-x` back,
    and a wrong HVP (the corpus's ti.math kernel, found by its finite-difference check)."""
    from kerndiff.ir.walk import substitute
    from kerndiff.opt.scales import rescale_locals
    x, y = _v("x"), _v("y")
    assert substitute(B.neg(x), {"x": B.neg(x)}) == x
    # t1 = y * 3.0; t2 = -t1; t3 = -t1; g = t2 * t3 + t2: the sign may move into t1 (t2 and t3
    # then read it as it is; temporaries and derivative locals only, a user's local keeps its
    # sign), but what is stored must not change
    t1, t2, t3 = _v("t1"), _v("t2"), _v("t3")
    body = (N.Assign("t1", B.mul(y, B.const(3.0, "f64"))), N.Assign("t2", B.neg(t1)), N.Assign("t3", B.neg(t1)),
            _store(B.add(B.mul(t2, t3), t2)))

    def stored(stmts):
        env = {"y": 0.7}
        for s in stmts[:-1]:
            env[s.name] = _eval(s.value, env)
        return _eval(stmts[-1].value, env)

    out = rescale_locals(body, lambda f: True)
    assert out != body and np.isclose(stored(out), stored(body)), out
    z, w = _v("z"), _v("w")
    named = (N.Assign("x", B.mul(y, B.const(3.0, "f64"))), N.Assign("z", B.neg(x)), N.Assign("w", B.neg(x)),
             _store(B.add(B.mul(z, w), z)))
    assert rescale_locals(named, lambda f: True) == named  # x = y * 3.0 stays as written


_SCALE_WORDS = {"twice": 2.0, "half": 0.5, "four_times": 4.0, "quarter": 0.25}


def _scale_of(name):
    """(k, the name it scales) for a name opt.scales gave a local holding k times a value:
    minus_twice_x_adj -> (-2.0, "x_adj")."""
    k = 1.0
    if name.startswith("minus_"):
        k, name = -1.0, name[len("minus_"):]
    for word, factor in _SCALE_WORDS.items():
        if name.startswith(word + "_"):
            return k * factor, name[len(word) + 1:]
    return k, name


def test_a_local_holding_a_multiple_is_named_for_it():
    """opt.scales lets a derivative local hold k times its value where that saves products at its
    uses; the local is then named for it (`twice_r2_adj`, `half_d_dual`, `minus_twice_u_adj`), so
    that generated source never calls a multiple by the value's name. Checked by evaluating both
    blocks: every local of the rewritten block holds exactly k times the value of the local its
    name scales (k = 1 for a name without a scale), and what is stored is unchanged."""
    from kerndiff.opt.scales import rescale_locals
    two, a, b, e, x, y, w, v, t1, t2 = B.const(2.0, "f64"), *map(_v, ["a", "b", "e", "x", "y", "w", "v", "t1", "t2"])
    body = (N.Assign("r2_adj", B.mul(B.mul(a, b), e)),
            N.Assign("t1_adj", B.mul(B.mul(t1, _v("r2_adj")), two)),
            N.Assign("t2_adj", B.mul(B.mul(t2, _v("r2_adj")), two)),
            N.Assign("d_dual", B.mul(B.add(B.mul(a, x), B.mul(b, y)), two)),
            N.Assign("g_dual", B.mul(_v("d_dual"),
                                     B.mul(w, B.add(B.mul(v, B.const(0.2, "f64")), B.const(0.75, "f64"))))),
            # u_adj is only ever used negated and doubled: -2 goes into it
            N.Assign("u_adj", B.mul(B.add(a, e), x)),
            N.Assign("p_adj", B.mul(B.neg(_v("u_adj")), B.mul(y, two))),
            N.Assign("q_adj", B.mul(B.neg(_v("u_adj")), B.mul(w, two))),
            *(_store(_v(name)) for name in ("t1_adj", "t2_adj", "g_dual", "p_adj", "q_adj")))
    out = rescale_locals(body, lambda f: True)
    assert out[-5:] == body[-5:]
    renamed = {s.name for s in out[:-5]} - {s.name for s in body[:-5]}
    assert {"twice_r2_adj", "half_d_dual"} <= renamed, [s.name for s in out[:-5]]
    assert any(name.startswith("minus_") for name in renamed), [s.name for s in out[:-5]]
    env = dict(zip("abexywv", np.random.default_rng(3).standard_normal(7)), t1=0.3, t2=-1.7)
    _assert_named_for_what_they_hold(body[:-5], out[:-5], env)


def _assert_named_for_what_they_hold(body, out, env):
    """Every local of `out` holds what its name says, over the same local of `body`: k times it
    for a name that scales it by k; and a name derived from a temporary (t3_dual, t3_adj, t3_inv)
    follows t3 as it is now written (the tangent of t3 holding k times its former value is k times
    the former tangent; its adjoint and reciprocal 1 / k times)."""
    want, got = _run(body, dict(env)), _run(out, dict(env))
    factor = {}

    def implied(name):  # what the name says its value is, over its former value
        m = re.fullmatch(r"(.+)_(dual\d*|adj\d*|inv)", name)
        if m is None:
            return factor.get(name, 1.0) if re.fullmatch(r"t\d+", name) else 1.0  # (inputs: as they were)
        base = implied(m.group(1))
        return base if m.group(2).startswith("dual") else 1.0 / base

    for s in out:
        k, name = _scale_of(s.name)
        assert name in want, s.name
        factor[name] = got[s.name] / want[name]
    for s in out:
        k, name = _scale_of(s.name)
        assert factor[name] == k * implied(name), (s.name, factor[name], k, implied(name))


def test_a_temporarys_derivatives_follow_it_as_it_is_written():
    """A temporary holding twice its former value keeps its name (t3 says nothing but its
    definition); its tangent, also holding twice its former value, is still t3's tangent and keeps
    its name (t3_dual), while t4's tangent, left as it was when t4 took a factor 2, is half of
    t4's tangent now (`half_t4_dual`)."""
    from kerndiff.opt.scales import rescale_locals
    inputs = ["a", "b", "e", "x", "y", "v", "a_dual", "b_dual"]
    two, a, b, e, x, y, v, a_dual, b_dual = B.const(2.0, "f64"), *map(_v, inputs)
    t3, t3_dual, t4, t4_dual = _v("t3"), _v("t3_dual"), _v("t4"), _v("t4_dual")
    body = (N.Assign("t3", B.mul(a, b)),
            N.Assign("t3_dual", B.add(B.mul(a_dual, b), B.mul(a, b_dual))),
            N.Assign("p_adj", B.mul(B.mul(t3, x), two)), N.Assign("q_adj", B.mul(B.mul(t3, y), two)),
            N.Assign("p_adj_dual", B.mul(B.mul(t3_dual, x), two)),
            N.Assign("q_adj_dual", B.mul(B.mul(t3_dual, y), two)),
            N.Assign("t4", B.mul(a, e)),
            N.Assign("t4_dual", B.add(B.mul(a_dual, e), B.mul(a, v))),
            N.Assign("u_adj", B.mul(B.mul(t4, x), two)), N.Assign("w_adj", B.mul(B.mul(t4, y), two)),
            N.Assign("g_dual", B.add(B.mul(t4_dual, v), B.mul(t4, b))),
            *(_store(_v(name)) for name in ("p_adj", "q_adj", "p_adj_dual", "q_adj_dual", "u_adj", "w_adj", "g_dual")))
    out = rescale_locals(body, lambda f: True)
    assert out[-7:] == body[-7:]
    names = [s.name for s in out[:-7]]
    assert "t3" in names and "t3_dual" in names and "t4" in names and "half_t4_dual" in names, names
    env = dict(zip(inputs, np.random.default_rng(4).standard_normal(8)))
    got, want = _run(out[:-7], dict(env)), _run(body[:-7], dict(env))
    assert got["t3"] == 2 * want["t3"] and got["t3_dual"] == 2 * want["t3_dual"] and got["t4"] == 2 * want["t4"]
    _assert_named_for_what_they_hold(body[:-7], out[:-7], env)


def _divisions(e):
    return len({x for x in iter_expr(e) if isinstance(x, N.Call) and x.op == "div"})


def test_a_quotient_is_a_product_by_a_negative_power():
    """`(t1 - r) * (0.5 / t1) * g * 2.0` (the adjoint of a norm's square, the chain rule's 0.5 of
    the root meeting the square's 2) is `(t1 - r) * g / t1`: a / b is a * b**-1, so constants meet
    across the division; written back as one division, with the multiplications before it."""
    t1, r, g = _v("t1"), _v("r"), _v("g")
    value = B.mul(B.mul(B.mul(B.sub(t1, r), B.div(B.const(0.5, "f64"), t1)), g), B.const(2.0, "f64"))
    out = collect_terms((_store(value),), lambda f: True)[0].value
    assert out == B.div(B.mul(B.sub(t1, r), g), t1), out
    env = dict(t1=1.3, r=0.4, g=-0.7)
    got, want = _run([N.Assign("x", out)], env)["x"], _run([N.Assign("x", value)], env)["x"]
    assert abs(got - want) <= 4e-16 * abs(want)
    # nothing but a division: a constant over it (`2.0 / r`, not `1.0 / r * 2.0`)
    lone = B.neg(B.mul(B.mul(B.div(B.const(0.5, "f64"), r), g), B.div(B.const(4.0, "f64"), g)))
    assert collect_terms((_store(lone),), lambda f: True)[0].value == B.div(B.const(-2.0, "f64"), r)
    # a divisor whose constant has no exact reciprocal keeps the division whole
    third = B.div(g, B.mul(r, B.const(3.0, "f64")))
    assert _terms(third) == {((third, 1),): 1.0}


def test_a_local_holding_a_quotient_is_not_divided_again():
    """After `t9 = 0.5 / t1`, `a * t9 * 2.0 + b * t9 * 2.0` reads t9 (as an atom): looking
    through it would write a division of its own, which t9 already holds."""
    t1, a, b, t9 = _v("t1"), _v("a"), _v("b"), _v("t9")
    two = B.const(2.0, "f64")
    value = B.add(B.mul(B.mul(a, t9), two), B.mul(B.mul(b, t9), two))
    body = (N.Assign("t9", B.div(B.const(0.5, "f64"), t1)), _store(value))
    out = collect_terms(body, lambda f: True)[1].value
    assert "t9" in {v.name for v in vars_in(out)} and _divisions(out) == 0, out
    env = dict(t1=1.3, a=0.4, b=-0.7)
    env["t9"] = 0.5 / env["t1"]
    got, want = _run([N.Assign("x", out)], env)["x"], _run([N.Assign("x", value)], env)["x"]
    assert abs(got - want) <= 4e-16 * abs(want)
    # a statement that divides by t1 in two terms divides once
    twice = B.add(B.mul(a, B.div(B.const(0.5, "f64"), t1)), B.mul(b, B.div(B.const(0.5, "f64"), t1)))
    spread = B.add(twice, B.mul(B.mul(a, b), B.div(B.const(0.25, "f64"), t1)))
    out = collect_terms((_store(spread),), lambda f: True)[0].value
    assert _divisions(out) == 1, out
    # t7 = r_inv * r_inv is r**-2 while r_inv holds 1 / r; once r_inv is assigned again no local
    # holds the reciprocal, and writing t7's uses through r would divide where t7 did not
    r, r_inv, t7 = _v("r"), _v("r_inv"), _v("t7")
    value = B.add(B.mul(B.mul(a, t7), two), B.mul(B.mul(b, t7), two))
    body = (N.Assign("r_inv", B.div(B.const(1.0, "f64"), r)), N.Assign("t7", B.mul(r_inv, r_inv)),
            N.Assign("r_inv", a), _store(value))
    out = collect_terms(body, lambda f: True)[-1].value
    assert _divisions(out) == 0, out


def test_a_division_two_statements_would_take_over_stays_in_its_local():
    """After `t3 = 0.5 / t1 * g`, one use `d0 * t3 * 2.0 + c` is `d0 * g / t1 + c` (t3 and its
    division go); two uses each writing `/ t1` would divide twice where t3 divides once, so both
    keep reading t3 (opt.scales then moves the 2 into it: the mass-spring reverse through a
    helper function, `t3 = t2 / t1; d_0_adj = d_0 * t3`)."""
    t1, g, c, d0, d1, t3 = _v("t1"), _v("g"), _v("c"), _v("d0"), _v("d1"), _v("t3")
    two = B.const(2.0, "f64")
    define = N.Assign("t3", B.mul(B.div(B.const(0.5, "f64"), t1), g))

    def use(d):
        return _store(B.add(B.mul(B.mul(d, t3), two), c))

    one = collect_terms((define, use(d0)), lambda f: True)
    assert "t3" not in {v.name for v in vars_in(one[1].value)} and _divisions(one[1].value) == 1, one[1].value
    for s in collect_terms((define, use(d0), use(d1)), lambda f: True)[1:]:
        assert "t3" in {v.name for v in vars_in(s.value)} and _divisions(s.value) == 0, s.value


def test_a_factor_is_pulled_out_only_where_all_its_terms_multiply_or_all_divide():
    """`r * a * 2.0 + b * (0.5 / r) * 4.0` is `(r * a + b / r) * 2.0`: r multiplies one term and
    divides the other, and pulling it out would compute r * r besides ((r * r * a + b) / r)."""
    r, a, b = _v("r"), _v("a"), _v("b")
    value = B.add(B.mul(B.mul(r, a), B.const(2.0, "f64")),
                  B.mul(B.mul(b, B.div(B.const(0.5, "f64"), r)), B.const(4.0, "f64")))
    out = collect_terms((_store(value),), lambda f: True)[0].value
    assert out in (B.mul(B.add(B.mul(r, a), B.div(b, r)), B.const(2.0, "f64")),
                   B.mul(B.add(B.mul(a, r), B.div(b, r)), B.const(2.0, "f64"))), out
    env = dict(r=1.3, a=0.4, b=0.7)
    got, want = _run([N.Assign("x", out)], env)["x"], _run([N.Assign("x", value)], env)["x"]
    assert abs(got - want) <= 4e-16 * abs(want)


def test_a_quotient_the_statement_has_stays_whole_where_it_is_a_factor():
    """`d0 * (t2 / t1) * 4.0 * 0.25` is `d0 * (t2 / t1)`, not `d0 * t2 / t1`: beside
    `d1 * (t2 / t1)` CSE then computes t2 / t1 once; written `d0 * t2 / t1` and `d1 * t2 / t1`,
    each statement would divide."""
    d0, d1, t1, t2 = _v("d0"), _v("d1"), _v("t1"), _v("t2")
    quotient = B.div(t2, t1)
    stmts = tuple(_store(B.mul(B.mul(B.mul(d, quotient), B.const(4.0, "f64")), B.const(0.25, "f64")))
                  for d in (d0, d1))
    for s, d in zip(collect_terms(stmts, lambda f: True), (d0, d1)):
        assert s.value in (B.mul(d, quotient), B.mul(quotient, d)), s.value


def test_a_statement_keeps_reading_its_locals_where_looking_through_them_costs_more():
    """x1 = -r_inv and x1d = a * r_inv**3 multiplied are a * r**-4, four products through r_inv;
    where another statement reads x1 and x1d too (they stay), `x1 * x1d * -2.0 * -0.81` still
    merges its constants: `x1 * x1d * 1.62`. Where it is their one reader, they die with the
    rewrite, and their four operations count for it: a * r_inv**4 * -1.62."""
    r, r_inv, a, x1, x1d = _v("r"), _v("r_inv"), _v("a"), _v("x1"), _v("x1d")
    defs = (N.Assign("r_inv", B.div(B.const(1.0, "f64"), r)), N.Assign("x1", B.neg(r_inv)),
            N.Assign("x1d", B.mul(B.mul(B.mul(a, r_inv), r_inv), r_inv)))
    product = _store(B.mul(B.mul(B.mul(x1, x1d), B.const(-2.0, "f64")), B.const(-0.81, "f64")))
    out = collect_terms(defs + (product, _store(B.add(x1, x1d))), lambda f: True)[-2].value
    assert out == B.mul(B.mul(x1, x1d), B.const(1.62, "f64")), out
    out = collect_terms(defs + (product,), lambda f: True)[-1].value
    square = B.mul(r_inv, r_inv)
    assert out == B.mul(B.mul(a, B.mul(square, square)), B.const(-1.62, "f64")), out


def test_whole_powers_up_to_16_are_products_and_cost_their_squarings():
    """x ** 6 is six factors x (it was an atom above x ** 4, so a Lennard-Jones HVP's s⁶ and s⁵ and
    their products by s² never met), and costs the three products Taichi computes it with."""
    from kerndiff.opt.algebra import arith_ops
    x = _v("x")
    power = lambda p: N.Call("f64", "pow", (x, B.const(p, "i32")))
    assert _terms(power(6)) == {((x, 6),): 1.0}
    assert _terms(B.mul(power(5), B.mul(x, x))) == {((x, 7),): 1.0}
    assert len(next(iter(_terms(power(17))))) == 1 and next(iter(_terms(power(17))))[0][1] == 1
    assert [arith_ops(power(p)) for p in (2, 3, 4, 5, 6, 8, 16, 17)] == [1, 2, 2, 3, 3, 3, 4, 1]


def test_a_sum_one_statement_reads_is_read_through_where_its_terms_meet():
    """u = x*y*3 + z*w, read once by `u - x*y*3`: its terms cancel the reader's, which becomes
    z*w (u then dies, its own operations counting for the rewrite). d = p - q read once by
    `(d*x + e*y) * 2.5` meets nothing there: the reader keeps reading d (inlining its difference
    would take as many operations, and read worse)."""
    x, y, z, w, p, q, e = (_v(n) for n in "xyzwpqe")
    three = B.const(3.0, "f64")
    body = (N.Assign("u", B.add(B.mul(B.mul(x, y), three), B.mul(z, w))),
            _store(B.sub(_v("u"), B.mul(B.mul(x, y), three))))
    assert collect_terms(body, lambda f: True)[-1].value in (B.mul(z, w), B.mul(w, z))
    body = (N.Assign("d", B.sub(p, q)),
            _store(B.mul(B.add(B.mul(_v("d"), x), B.mul(e, y)), B.const(2.5, "f64"))))
    out = collect_terms(body, lambda f: True)[-1].value
    assert "d" in {v.name for v in vars_in(out)} and "p" not in {v.name for v in vars_in(out)}, out
    # with two readers, u stays: it is not read through
    body = (N.Assign("u", B.add(B.mul(B.mul(x, y), three), B.mul(z, w))),
            _store(B.sub(_v("u"), B.mul(B.mul(x, y), three))), _store(B.mul(_v("u"), e)))
    assert "u" in {v.name for v in vars_in(collect_terms(body, lambda f: True)[1].value)}


def test_integer_offsets_gather_into_one_and_floats_keep_their_order():
    """`i - 1 + 1` is i and `s - -1` is s + 1 for integers (wrapping arithmetic is associative:
    a stepped range's trip count `(i - 1 + 1 + 1) // 2` reads `(i + 1) // 2`); a float sum keeps
    its order, which rounding depends on."""
    i, x = B.var("i", "i32"), B.var("x", "f64")
    one, two = B.const(1, "i32"), B.const(2, "i32")
    assert B.add(B.sub(i, one), one) == i
    assert B.add(B.sub(i, one), two) == B.add(i, one)
    assert B.sub(B.add(i, one), two) == B.sub(i, one)
    assert B.sub(i, B.const(-1, "i32")) == B.add(i, one)
    assert B.add(i, B.const(-3, "i32")) == B.sub(i, B.const(3, "i32"))
    assert B.sub(B.sub(i, one), one) == B.sub(i, two)
    assert B.add(B.add(i, one), B.const(2 ** 31 - 1, "i32")) == N.Call("i32", "add", (B.add(i, one),
                                                                                  B.const(2 ** 31 - 1, "i32")))
    fone = B.const(1.0, "f64")
    assert B.add(B.sub(x, fone), fone) == N.Call("f64", "add", (N.Call("f64", "sub", (x, fone)), fone))
