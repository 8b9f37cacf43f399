"""The passes that tidy derived kernels for the reader, on IR built by hand: zeroed accumulators
started at their first contribution (opt.zero_start: what folds, and what must stay), copies
forwarded within a block (opt.copies: how far, and where they stop) and ifs on one condition
fused (opt.fuse_ifs). On real kernels the golden
sources and every derivative test cover them."""
from kerndiff.ir import build as B
from kerndiff.ir import nodes as N
from kerndiff.opt.copies import coalesce_copies, forward_copies
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


def test_values_overwritten_before_any_read_go():
    first, again = N.Assign("t", _v("a")), N.Assign("t", B.add(_v("a"), E))
    between = N.Assign("u", B.mul(_v("a"), E))
    assert fold_zero_starts((first, between, again)) == (between, again)
    read = N.Assign("u", B.mul(_v("t"), E))
    assert fold_zero_starts((first, read, again)) == (first, read, again)


def test_zeros_that_are_read_or_written_elsewhere_first_stay():
    """The zero start stays where another path may read it; an accumulation that still sees the
    zero starts at its contribution all the same."""
    read = N.Assign("t", B.mul(_v("x"), E))
    assert fold_zero_starts((ZERO, read, N.Assign("x", B.add(_v("x"), E)))) == (ZERO, read, N.Assign("x", E))
    c = _v("c", "i32")
    in_branch = fold_zero_starts((ZERO, N.If(c, (N.Assign("x", B.add(_v("x"), E)),), ())))
    assert in_branch == (ZERO, N.If(c, (N.Assign("x", E),), ()))
    # in a loop, a later iteration sees what the body added: the zero is not known inside
    loop = _loop(N.Assign("x", B.add(_v("x"), E)))
    assert fold_zero_starts((ZERO, loop)) == (ZERO, loop)
    # nor after a branch that assigns it
    bump = N.If(c, (N.Assign("x", _v("a")),), ())
    after = N.Assign("x", B.add(_v("x"), E))
    assert fold_zero_starts((ZERO, bump, after)) == (ZERO, bump, after)
    # a zero start inside the loop body is known below it, in that iteration
    inner = _loop(ZERO, N.If(c, (N.Assign("x", B.add(_v("x"), E)),), ()))
    (out,) = fold_zero_starts((inner,))
    assert out.body == (ZERO, N.If(c, (N.Assign("x", E),), ()))
    cases = [
        (ZERO, N.Assign("x", B.add(_v("x"), B.mul(_v("x"), E)))),                  # reads itself again
        (ZERO, N.Assign("x", N.Call(dtype="f64", op="add", args=(_v("x"), _v("h", "f32"))))),  # another dtype
        (ZERO, N.Assign("x", B.sub(E, _v("x")))),                                   # e - x is not e
    ]
    for body in cases:
        assert fold_zero_starts(body) == body, body


def _loop(*body):
    return N.For(("k",), ((B.const(0, "i32"), B.const(3, "i32")),), tuple(body))


def test_circular_copies_in_a_loop_vanish():
    """The reversed loop head `a = b; b = a; use(a)`: the copy-back goes and `a` is read as `b`."""
    use = N.Assign("t", B.mul(_v("a"), _v("w")))
    (loop,) = forward_copies((_loop(N.Assign("a", _v("b")), N.Assign("b", _v("a")), use),))
    assert loop.body == (N.Assign("a", _v("b")), N.Assign("t", B.mul(_v("b"), _v("w"))))
    # chains resolve: c = a after a = b reads b
    out = forward_copies((N.Assign("a", _v("b")), N.Assign("c", _v("a")), N.Assign("t", _v("c"))))
    assert out[1:] == (N.Assign("c", _v("b")), N.Assign("t", _v("b")))


def test_copies_stop_where_either_side_changes():
    a_is_b = N.Assign("a", _v("b"))
    b_changes = N.Assign("b", B.mul(_v("b"), _v("w")))
    read_a = N.Assign("t", _v("a"))
    # the source changes: later reads of a keep a
    assert forward_copies((a_is_b, b_changes, read_a)) == (a_is_b, b_changes, read_a)
    # a nested block that assigns the source anywhere inside is left alone, and ends the copy
    nested = _loop(b_changes, N.Assign("u", B.mul(_v("a"), _v("w"))))
    assert forward_copies((a_is_b, nested, read_a)) == (a_is_b, nested, read_a)
    # one that does not is rewritten
    reads = _loop(N.Assign("u", B.mul(_v("a"), _v("w"))))
    out = forward_copies((a_is_b, reads, read_a))
    assert out[1].body == (N.Assign("u", B.mul(_v("b"), _v("w"))),) and out[2] == N.Assign("t", _v("b"))


def test_copies_reach_into_branches_and_copy_backs_there_go():
    """The reverse of `if c: e += v` inside a loop: `e3 = e1`, then `e1 = e3` in both branches. The
    copy-backs go and the branches read e1; a branch that really changes e1 ends the copy after
    the if, not before it."""
    c = _v("c", "i32")
    save = N.Assign("e3", _v("e1"))
    use = N.Assign("u", B.mul(_v("e3"), _v("w")))
    branchy = N.If(c, (N.Assign("e1", _v("e3")), use), (N.Assign("e1", _v("e3")),))
    assert forward_copies((save, branchy)) == (save, N.If(c, (N.Assign("u", B.mul(_v("e1"), _v("w"))),), ()))
    changes = N.If(c, (N.Assign("e1", B.mul(_v("e3"), _v("w"))),), ())
    later = N.Assign("t", _v("e3"))
    assert forward_copies((save, changes, later)) == \
        (save, N.If(c, (N.Assign("e1", B.mul(_v("e1"), _v("w"))),), ()), later)
    # a branch reads the copy's source before changing it: the read is rewritten, the change stays
    first_read = N.If(c, (N.Assign("u", _v("e3")), N.Assign("e1", _v("w"))), ())
    out = forward_copies((save, first_read, later))
    assert out == (save, N.If(c, (N.Assign("u", _v("e1")), N.Assign("e1", _v("w"))), ()), later)


def test_ifs_on_one_condition_fuse():
    """opt.fuse_ifs: a recomputation's if and its adjoint's if on the same condition become one,
    with plain assignments between them moved above; anything that could change what the
    second if sees keeps them apart."""
    from kerndiff.opt.fuse_ifs import fuse_ifs
    c = B.call("ne", _v("i", "i32"), _v("j", "i32"))
    first = N.If(c, (N.Assign("r", B.mul(_v("a"), _v("a"))),), (N.Assign("r", _v("a")),))
    between = N.Assign("e3", _v("e1"))
    second = N.If(c, (N.Assign("g", B.mul(_v("r"), _v("e3"))),), (N.Assign("e1", _v("e3")),))
    fused = N.If(c, first.then + second.then, first.orelse + second.orelse)
    assert fuse_ifs((first, between, second)) == (between, fused)
    # inside a loop, and three in a row
    assert fuse_ifs((_loop(first, second, first),)) == (_loop(N.If(c, fused.then + first.then,
                                                                   fused.orelse + first.orelse)),)
    # a statement between that reads what the first if assigns stays between them
    reads_r = N.Assign("s", B.mul(_v("r"), _v("w")))
    assert fuse_ifs((first, reads_r, second)) == (first, reads_r, second)
    # one that the first if reads, or that assigns a name of the condition
    assert fuse_ifs((first, N.Assign("a", _v("w")), second)) == (first, N.Assign("a", _v("w")), second)
    moves_j = N.Assign("j", B.const(3, "i32"))
    assert fuse_ifs((first, moves_j, second)) == (first, moves_j, second)
    # a first if that can leave the iteration: the statement between would run where it did not
    leaves = N.If(c, (N.Continue(),), ())
    assert fuse_ifs((_loop(leaves, between, second),)) == (_loop(leaves, between, second),)
    # a first if that assigns a name of the condition, or ifs on different conditions
    sets_i = N.If(c, (N.Assign("i", B.const(0, "i32")),), ())
    assert fuse_ifs((sets_i, second)) == (sets_i, second)
    other = N.If(B.call("eq", _v("i", "i32"), _v("j", "i32")), second.then, second.orelse)
    assert fuse_ifs((first, other)) == (first, other)


def test_loop_carried_sums_are_written_in_place():
    """`s_2 = s_1 + w * h; s_1 = s_2` -> `s_1 = s_1 + w * h`, unless s_1 is read in between or
    s_2 is read anywhere else."""
    step = N.Assign("s2", B.add(_v("s1"), E))
    back = N.Assign("s1", _v("s2"))
    other = N.Assign("u", B.mul(_v("a"), _v("w")))
    (loop,) = coalesce_copies((_loop(step, other, back),))
    assert loop.body == (N.Assign("s1", B.add(_v("s1"), E)), other)
    reads_s1 = N.Assign("u", B.mul(_v("s1"), _v("w")))
    assert coalesce_copies((_loop(step, reads_s1, back),)) == (_loop(step, reads_s1, back),)
    later = N.Assign("v", _v("s2"))
    assert coalesce_copies((_loop(step, back, later),)) == (_loop(step, back, later),)


def test_merges_of_an_if_are_written_in_place():
    """`if c: s3 = s1 + e  else: s3 = s1`, then `s1 = s3` (a conditional sum recomputed in a
    reverse kernel) is `if c: s1 = s1 + e`; not where a branch reads s1 after its merge value is
    set, or where one branch leaves s3 alone."""
    c = _v("c", "i32")
    step = N.Assign("s3", B.add(_v("s1"), E))
    keep = N.Assign("s3", _v("s1"))
    back = N.Assign("s1", _v("s3"))
    (loop,) = coalesce_copies((_loop(N.If(c, (step,), (keep,)), back),))
    assert loop.body == (N.If(c, (N.Assign("s1", B.add(_v("s1"), E)),), ()),)
    late_read = N.If(c, (step, N.Assign("u", B.mul(_v("s1"), _v("w")))), (keep,))
    assert coalesce_copies((_loop(late_read, back),)) == (_loop(late_read, back),)
    one_sided = N.If(c, (step,), ())
    assert coalesce_copies((_loop(one_sided, back),)) == (_loop(one_sided, back),)


def test_loads_an_inner_loop_repeats_are_read_before_it_where_always_in_range():
    """opt.invariant_loads: `f[i]` in a loop over j is read once before it, when nothing writes f
    and i's loop keeps it inside f's range (the read now runs even where the loop body would
    not have); anything else stays where it is."""
    from kerndiff.ad.names import NameAllocator
    from kerndiff.ir.nodes import FieldRef
    from kerndiff.ir.walk import iter_stmts, loads_in
    from kerndiff.opt.invariant_loads import hoist_invariant_loads

    f = FieldRef(object(), (), "f", "f64", (8,))
    i, j = B.var("i", "i32"), B.var("j", "i32")

    def load(index):
        return N.Load("f64", f, (index,))

    def kernel(index, n=B.const(8, "i32"), extra=()):
        inner = N.For(("j",), ((B.const(0, "i32"), B.const(4, "i32")),),
                      extra + (N.Assign("x", B.add(_v("x"), B.mul(load(index), _v("w")))),))
        return N.For(("i",), ((B.const(0, "i32"), n),), (inner,), parallel=True)

    def hoisted(loop, written=frozenset()):
        out = hoist_invariant_loads(loop, set(written), NameAllocator({"i", "j", "x", "w"}))
        inner = next(s for s in out.body if isinstance(s, N.For))
        in_loop = [x for s in iter_stmts(inner.body) if isinstance(s, N.Assign) for x in loads_in(s.value)]
        return [s for s in out.body if isinstance(s, N.Assign)], in_loop

    before, in_loop = hoisted(kernel(i))
    assert before == [N.Assign("f_i", load(i))] and not in_loop
    assert hoisted(kernel(B.const(7, "i32")))[0] == [N.Assign("f_7", load(B.const(7, "i32")))]
    for index, n in ((B.const(8, "i32"), B.const(8, "i32")),  # past the end
                     (B.sub(i, B.const(1, "i32")), B.const(8, "i32")),  # f[-1] at i = 0
                     (i, B.const(9, "i32")),  # i runs past f
                     (i, B.var("n", "i32")),  # a range known only at run time
                     (j, B.const(8, "i32"))):  # changes every trip
        assert hoisted(kernel(index, n)) == ([], [load(index)])
    assert hoisted(kernel(i), written={id(f.field)}) == ([], [load(i)])  # the kernel writes f
    moved = (N.Assign("i", B.add(i, B.const(1, "i32"))),)  # i is not its loop's i any more
    assert hoisted(kernel(i, extra=moved))[0] == []
    # a field indexed from -2 (ti.field(..., offset=(-2,))): x[-2] is in range, and its local is
    # a name Python accepts
    g = FieldRef(object(), (), "g", "f64", (8,), offset=(-2,))
    at = N.Load("f64", g, (B.const(-2, "i32"),))
    inner = N.For(("j",), ((B.const(0, "i32"), B.const(4, "i32")),), (N.Assign("x", B.mul(at, _v("w"))),))
    out = hoist_invariant_loads(N.For(("i",), ((B.const(-2, "i32"), B.const(6, "i32")),), (inner,), parallel=True),
                                set(), NameAllocator({"i", "j", "x", "w"}))
    assert out.body[0] == N.Assign("g_m2", at)


def test_a_term_a_sum_takes_twice_is_taken_once_with_its_count():
    """opt.repeated_terms: `-t7 - t7` is `t7 * -2.0`; terms counted with their signs and integer
    factors, in the order they first appear; a term whose count comes to zero stays as written."""
    from kerndiff.ir.nodes import FieldRef
    from kerndiff.opt.repeated_terms import merge_repeated_terms, merged
    a, b, c = _v("a"), _v("b"), _v("c")
    ab = B.mul(a, b)

    def times(x, k):
        return N.Call("f64", "mul", (x, B.const(k, "f64")))

    def call(op, *args):
        return N.Call("f64", op, args)
    assert merged(call("sub", call("neg", ab), ab)) == times(ab, -2.0)
    # ab + c - a * (b + b) + ab * 2.0: ab three times, first; the inner sum b + b too
    got = merged(call("add", call("sub", call("add", ab, c), call("mul", a, call("add", b, b))), times(ab, 2.0)))
    assert got == call("sub", call("add", times(ab, 3.0), c), call("mul", a, times(b, 2.0))), got
    # ab + c - ab + c: c twice; ab's count comes to zero, and both stay where they were
    zero_count = call("add", call("sub", call("add", ab, c), ab), c)
    assert merged(zero_count) == call("sub", call("add", ab, times(c, 2.0)), ab)
    # a factor that is not an integer is part of the term (its counts would not add exactly)
    tenth = call("add", call("mul", ab, B.const(0.1, "f64")), call("mul", ab, B.const(0.2, "f64")))
    assert merged(tenth) == tenth
    plain = call("sub", call("add", ab, c), a)  # no repeats: as written
    assert merged(plain) == plain
    one = B.const(1.0, "f64")  # constants stay as written: (y - 1) - 1 rounds otherwise than y - 2
    plain = call("add", call("sub", call("sub", c, one), one), call("add", ab, ab))
    assert merged(plain) == call("add", call("sub", call("sub", c, one), one), times(ab, 2.0)), merged(plain)
    plain = call("sub", call("sub", c, one), one)
    assert merged(plain) == plain
    # only values that feed derivatives alone: a primal store keeps its sum
    out = FieldRef(object(), (), "out", "f64", ())
    dual = FieldRef(object(), (), "out_dual", "f64", ())
    twice = call("add", call("add", ab, c), ab)
    new = merge_repeated_terms((N.Store(out, (), twice), N.Store(dual, (), twice)), lambda f: f is dual.field)
    assert new[0].value == twice and new[1].value == call("add", times(ab, 2.0), c)


def test_lines_past_taichis_limit_are_broken_inside_their_brackets():
    """Taichi 1.7 reads kernel source through textwrap.fill(width=9999), which broke a
    10240-character line in two and failed the compile (programs fuzzer seed 5588194): emit's
    `wrapped` breaks such lines inside brackets, at spaces outside strings, into lines of about
    120 characters; the statement parses to the same tree."""
    import ast

    from kerndiff.codegen.emit import LONG_LINE, wrapped

    terms = " + ".join(f"ti.sqrt(a[{k}] * b[{k}] + 0.5)" for k in range(300))
    line = f'        y[i] = ({terms}) * f(", (", "x")'
    assert len(line) > LONG_LINE
    broken = wrapped(line)
    assert broken.count("\n") > 50 and max(len(part) for part in broken.split("\n")) < 200
    assert ast.dump(ast.parse(broken.strip())) == ast.dump(ast.parse(line.strip()))
    assert '", ("' in broken  # the string literal is left whole
    short = "        y[i] = a[i] + b[i]"
    assert wrapped(short) == short
