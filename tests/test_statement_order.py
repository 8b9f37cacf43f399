"""The order of generated statements, for the reader: a vector statement's adjoints come component
0 first (ad.reverse.independent_runs), and a local's value comes before its tangent
(opt.tangent_order), wherever the statements touch nothing the other writes; where they do, the
order that computes the right numbers stays. The orderings are checked on IR built by hand, on sources, and on kernels
whose components read each other, against f64 finite differences on every transform path."""
import dataclasses

import re

import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import PATH_IDS, PATHS, check_path
from kerndiff.ad.names import tangent_levels, tangent_var
from kerndiff.ad.reverse import independent_runs
from kerndiff.errors import SrcLoc
from kerndiff.ir import build as B
from kerndiff.ir import nodes as N
from kerndiff.ir.nodes import FieldRef
from kerndiff.opt.cse import cse
from kerndiff.opt.tangent_order import values_first

pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)

LINE = SrcLoc("k.py", 3, 4, None, "d = a - b")
OTHER = SrcLoc("k.py", 4, 4, None, "e = d * d")


def _v(name):
    return B.var(name, "f64")


def _assign(name, value, src=LINE, tag=""):
    return N.Assign(name, value, src=src, tag=tag)


def _from(s, src):
    return dataclasses.replace(s, src=src)


def _names(stmts):
    return [s.name for s in stmts]


def test_runs_hold_the_independent_statements_of_one_source_statement():
    d0, d1 = _assign("d_0", B.sub(_v("a_0"), _v("b_0"))), _assign("d_1", B.sub(_v("a_1"), _v("b_1")))
    e = _assign("e", B.mul(_v("d_0"), _v("d_1")), src=OTHER)
    assert [_names(r) for r in independent_runs((d0, d1, e))] == [["d_0", "d_1"], ["e"]]
    # a component that reads another (v = ti.Vector([v[1], v[0] * x]), in SSA form or not)
    swap0, swap1 = _assign("v_0", _v("v_1")), _assign("v_1", B.mul(_v("v_0"), _v("x")))
    assert [_names(r) for r in independent_runs((swap0, swap1))] == [["v_0"], ["v_1"]]
    # the same statements from two source lines
    assert [_names(r) for r in independent_runs((d0, _from(d1, OTHER)))] == [["d_0"], ["d_1"]]


def test_values_go_before_their_tangents_where_independent():
    value, tangent = _assign("d", B.sub(_v("a"), _v("b"))), _assign("d_dual", _v("a_dual"), tag="tangent")
    assert _names(values_first((tangent, value))) == ["d", "d_dual"]
    # the tangent reads the value's old v: it stays first
    update = _assign("v", B.mul(_v("v"), _v("x")))
    update_dual = _assign("v_dual", B.mul(_v("v_dual"), _v("v")), tag="tangent")
    assert _names(values_first((update_dual, update))) == ["v_dual", "v"]
    # statements of another source line keep their places
    assert _names(values_first((tangent, _from(value, OTHER)))) == ["d_dual", "d"]
    # a tangent moves past one statement at most; pairs further on swap as well
    d1, d1_dual = _assign("d_1", _v("a_1")), _assign("d_1_dual", _v("a_1_dual"), tag="tangent")
    assert _names(values_first((tangent, value, d1_dual, d1))) == ["d", "d_dual", "d_1", "d_1_dual"]
    assert _names(values_first((tangent, value, d1))) == ["d", "d_dual", "d_1"]
    # inside nested blocks too
    loop = N.For(("k",), ((B.const(0, "i32"), B.const(3, "i32")),), (tangent, value))
    (out,) = values_first((loop,))
    assert _names(out.body) == ["d", "d_dual"]


def _sum(name, term, tag="tangent"):
    return _assign(name, B.add(_v(name), _v(term)), tag=tag)


def test_second_derivatives_go_value_then_tangents_by_level_then_mixed():
    """k.forward.forward writes a sum's four statements tangent first at each level; a run of
    independent statements of one source statement is put in the order a person writes."""
    # the order is read from the names ad.names gives (tangent_levels inverts tangent_var)
    assert tangent_levels(tangent_var(tangent_var("s", 1), 2)) == ("s", (1, 2))
    assert tangent_levels("d_0") == ("d_0", ())
    run = (_sum("s_dual_dual2", "a"), _sum("s_dual", "b"), _sum("s", "c", tag=""), _sum("s_dual2", "d"))
    assert _names(values_first(run)) == ["s", "s_dual", "s_dual2", "s_dual_dual2"]
    # two locals' runs: each local's statements together, in the order the locals first appear
    both = run + (_sum("d_0_dual", "e"), _sum("d_0", "f", tag=""))
    assert _names(values_first(both)) == ["s", "s_dual", "s_dual2", "s_dual_dual2", "d_0", "d_0_dual"]
    # one reads what another writes: no run, the pairs rule (one swap) as before
    reads = (_assign("s_dual", _v("s"), tag="tangent"), _sum("s", "c", tag=""), _sum("s_dual2", "d"))
    assert _names(values_first(reads)) == ["s_dual", "s", "s_dual2"]
    # stores into fields take part, adds into fields do not (opt.tangent_order says why)
    f = ti.field(ti.f64, shape=3)
    refs = {name: N.FieldRef(f, (), name, "f64", (3,)) for name in ("h", "h_dual", "h_dual2", "h_dual_dual2")}
    i = (B.const(0, "i32"),)
    stores = tuple(N.Store(refs[n], i, _v("a"), src=LINE, tag="" if n == "h" else "tangent")
                   for n in ("h_dual_dual2", "h_dual", "h_dual2", "h"))
    assert [t.ref.name for t in values_first(stores)] == ["h", "h_dual", "h_dual2", "h_dual_dual2"]
    adds = tuple(N.Atomic("add", t.ref, t.index, t.value, src=LINE, tag=t.tag) for t in stores)
    assert [t.ref.name for t in values_first(adds)] == ["h_dual_dual2", "h_dual", "h_dual2", "h"]


N_P = 6


@pytest.fixture(scope="module")
def kernels(runtime):
    pos = ti.Vector.field(2, ti.f64, shape=N_P)
    ends = ti.Vector.field(2, ti.i32, shape=4)
    E = ti.field(ti.f64, shape=())
    x = ti.field(ti.f64, shape=N_P)
    y = ti.Vector.field(2, ti.f64, shape=N_P)
    z = ti.field(ti.f64, shape=N_P)
    rng = np.random.default_rng(3)
    pos.from_numpy(rng.standard_normal((N_P, 2)))
    ends.from_numpy(np.array([[0, 1], [1, 2], [3, 5], [4, 0]], dtype=np.int32))
    x.from_numpy(rng.uniform(0.5, 1.5, N_P))
    for f in (pos, x):
        kd.adjoint(f)
        kd.dual(f)
    kd.dual(x, 2)  # the layer's second direction

    @kd.kernel
    def springs():
        for s in ends:
            d = pos[ends[s][0]] - pos[ends[s][1]]
            E[None] += 0.5 * (d.norm() - 1.0) ** 2

    @kd.kernel
    def rotate():  # the components of v read each other: v's statements run in one order only
        for i in x:
            v = pos[i]
            for k in range(3):
                v = ti.Vector([v[1] * x[i], ti.sin(v[0]) + x[i]])
            v.xy = v.yx
            y[i] = v * v[0]

    @kd.kernel
    def in_place():  # a carried value updated in place: its tangent must read the old value
        for i in x:
            v = x[i]
            for k in range(4):
                v = v * ti.cos(v) + x[(i + k) % N_P]
            E[None] += v * v

    @kd.kernel
    def layer():  # a tanh layer: k.forward.forward holds four sums, and four stores per element
        for i in x:
            s = 0.1
            for k in range(N_P):
                s += x[k] * x[i] * 0.3
            z[i] = ti.tanh(s)
            E[None] += z[i] * x[i]

    @kd.kernel
    def direct():  # tanh of an expression, no local: a first layer's neurons
        for i in x:
            z[i] = ti.tanh(x[i] * 0.7 + x[(i + 1) % N_P])

    return {"springs": springs, "rotate": rotate, "in_place": in_place, "layer": layer, "direct": direct}


@pytest.mark.parametrize("name", ["springs", "rotate", "in_place", "layer", "direct"])
@pytest.mark.parametrize("prefix, mode", PATHS + [("forward", "forward")], ids=PATH_IDS + ["forward.forward"])
def test_derivatives_match_finite_differences(kernels, name, prefix, mode):
    check_path(kernels[name], prefix, mode)


def _before(src, first, second):
    assert first in src and second in src, src
    return src.index(first) < src.index(second)


def test_sources_read_component_by_component_value_before_tangent(kernels):
    k = kernels["springs"]
    k()
    k.forward()
    assert _before(k.forward.source, "d_0 = ", "d_0_dual = ")
    # adds into fields keep the tangent's first (opt.tangent_order says why)
    assert _before(k.forward.source, "E_dual[None] += ", "E[None] += t")
    rev, hvp = k.reverse.source, k.reverse.forward.source
    assert _before(rev, "pos_adj[ends[s][0]][0] += d_0_adj", "pos_adj[ends[s][0]][1] += d_1_adj")
    assert _before(hvp, "d_0 = ", "d_0_dual = ") and _before(hvp, "d_0_dual = ", "d_1 = ")
    assert _before(hvp, "d_0_adj = ", "d_0_adj_dual = ")
    assert _before(hvp, "pos_adj_dual[ends[s][0]][0] += d_0_adj_dual", "pos_adj[ends[s][0]][0] += d_0_adj")
    assert _before(hvp, "pos_adj[ends[s][0]][0] += d_0_adj", "pos_adj_dual[ends[s][0]][1] += d_1_adj_dual")
    # the update in place keeps its tangent first (it reads the old v); the loop's carried copies
    # and their tangents, in that order, share one comment
    k = kernels["in_place"]
    k()
    k.forward()
    assert _before(k.forward.source, "v_dual = x_dual[(i + k) % 6] + ", "v = v * t1 + ")
    hvp = k.reverse.forward.source
    assert "# for k in range(4):, and its tangent\n            v_1 = v_2\n            v_1_dual = v_2_dual\n" in hvp, hvp


def test_second_derivatives_read_as_written_by_hand(kernels):
    """k.forward.forward of a tanh layer: each sum's value, tangent, second tangent and mixed one
    in that order, the stores likewise (adds into fields keep the transform's order), and
    1 - tanh^2 computed once: the local that holds it goes before the first statement that
    computed it again (opt.reuse)."""
    k = kernels["layer"]
    k()
    k.forward()
    src = k.forward.forward.source
    for written in (["s = s + ", "s_dual = s_dual + ", "s_dual2 = s_dual2 + ", "s_dual_dual2 = s_dual_dual2 + "],
                    ["z[i] = t", "z_dual[i] = ", "z_dual2[i] = ", "z_dual_dual2[i] = "]):
        assert all(_before(src, a, b) for a, b in zip(written, written[1:])), src
    assert _before(src, "E_dual_dual2[None] += ", "E[None] += z[i] * x_i")
    assert src.count("1.0 - t") == 1, src
    # no local held it in the first layer's form: finalize's last CSE gives it one (opt.cse, late)
    k = kernels["direct"]
    k()
    k.forward()
    src = k.forward.forward.source
    assert src.count("1.0 - t") == 1 and re.search(r"\n +t\d+ = 1\.0 - t", src), src


OUT = FieldRef(object(), (), "out", "f64", (4,))


def test_the_late_cse_adds_no_copy_and_no_temporary_named_as_another_names_stem():
    """opt.cse at the end of finalize (late), on IR built by hand: a value a local holds whole
    stays as it is (a temporary would make `t1_adj = t1` a copy), so does one operation on names
    (`a * b`); a temporary it does add skips `t1` while `t1_dual` (or `twice_t1_adj`) names
    another value. The pass right after a transform does all three."""
    f64 = "f64"
    a, b = B.var("a", f64), B.var("b", f64)
    ab, one = B.mul(a, b), B.const(1.0, f64)
    rest = B.sub(one, ab)  # two operations

    def store(k, e):
        return N.Store(OUT, (B.const(k, "i32"),), e)

    held = (N.Assign("t1_adj", rest), store(0, B.mul(rest, B.const(3.0, f64))))
    assert cse(N.KernelIR("k", (), held), late=True).body == held
    early = cse(N.KernelIR("k", (), held)).body
    assert early[0] == N.Assign("t1", rest) and early[1] == N.Assign("t1_adj", B.var("t1", f64)), early
    small = (store(0, B.mul(ab, B.const(3.0, f64))), store(1, B.add(ab, one)))
    assert cse(N.KernelIR("k", (), small), late=True).body == small
    assert cse(N.KernelIR("k", (), small)).body[0] == N.Assign("t1", ab)
    repeated = (N.Assign("t1_dual", B.mul(a, a)), store(0, B.mul(rest, B.const(3.0, f64))), store(1, B.add(rest, b)))
    late = cse(N.KernelIR("k", (), repeated), late=True).body
    assert late[1] == N.Assign("t2", rest) and late[2] == store(0, B.mul(B.var("t2", f64), B.const(3.0, f64))), late
    assert cse(N.KernelIR("k", (), repeated)).body[1] == N.Assign("t1", rest)
    # nor while a name says it holds a multiple of t1's adjoint (opt.scales: twice_t1_adj)
    scaled = (N.Assign("twice_t1_adj", B.mul(a, a)),) + repeated[1:]
    assert cse(N.KernelIR("k", (), scaled), late=True).body[1] == N.Assign("t2", rest)
