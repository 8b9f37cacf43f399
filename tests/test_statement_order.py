"""The order of generated statements, for the reader: a vector statement's adjoints come component
0 first (ad.reverse.independent_runs), and a local's value comes before its tangent
(opt.tangent_order), wherever the statements touch nothing the other writes; where they do, the
order that computes the right numbers stays. The orderings are checked on IR built by hand, on sources, and on kernels
whose components read each other, against f64 finite differences on every transform path."""
import dataclasses

import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import PATH_IDS, PATHS, check_path
from kerndiff.ad.reverse import independent_runs
from kerndiff.errors import SrcLoc
from kerndiff.ir import build as B
from kerndiff.ir import nodes as N
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


N_P = 6


@pytest.fixture(scope="module")
def kernels(runtime):
    pos = ti.Vector.field(2, ti.f64, shape=N_P)
    ends = ti.Vector.field(2, ti.i32, shape=4)
    E = ti.field(ti.f64, shape=())
    x = ti.field(ti.f64, shape=N_P)
    y = ti.Vector.field(2, ti.f64, shape=N_P)
    rng = np.random.default_rng(3)
    pos.from_numpy(rng.standard_normal((N_P, 2)))
    ends.from_numpy(np.array([[0, 1], [1, 2], [3, 5], [4, 0]], dtype=np.int32))
    x.from_numpy(rng.uniform(0.5, 1.5, N_P))
    for f in (pos, x):
        kd.adjoint(f)
        kd.dual(f)

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

    return {"springs": springs, "rotate": rotate, "in_place": in_place}


@pytest.mark.parametrize("name", ["springs", "rotate", "in_place"])
@pytest.mark.parametrize("prefix, mode", PATHS, ids=PATH_IDS)
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
    assert _before(k.forward.source, "E_dual[None] += (", "E[None] += t")
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
