"""Fuzzing stores into the components of local vectors and matrices: a drawn sequence of
statements updates a local 3-vector `v` and 3x3 matrix `A` (read from field elements) through
component stores (`v[1] = ...`, `A[2, 0] = ...`), rows, columns and slices (`A[1] = ...`, `A[:, 2]
= ...`, `v[0:2] = ...`), swizzles (`v.xy = v.yx`), tuple swaps (`A[0, 1], A[1, 0] = A[1, 0],
A[0, 1]`), augmented stores, whole reassignments (`A = A @ A.transpose()`), runtime indices in
an inner loop (`for j in range(2): v[j + 1] = ...`) and stores under an `if`; each value read
from the components it replaces. The kernel's value is checked against numpy running the same
statements (with value semantics: every right side read whole before its first component is
stored, as in Taichi), and its derivatives with kd.check_grad (k.forward, k.reverse and H·v by
k.reverse.forward against f64 central differences). test_component_stores_of_field_elements
runs the same programs with the state in field elements (`zv[i]`, `zA[i]`) instead of locals:
there each store goes to memory at once and a value reading the element it replaces is read
before the first store.

Session 46 found with this class of statement that `A[1] = ti.Vector([A[1, 1], A[1, 0], ...])`
stored A[1, 0] first and read the new value for the second component (a wrong value and
gradient, no error), and on field elements that `m[i][1] = v` failed in the frontend; this
module keeps the class covered. Profiles as in test_fuzz.py: short by
default (derandomized under CI=true), KERNDIFF_FUZZ=long for KERNDIFF_FUZZ_N draws.
"""
import os
import random
import re

import numpy as np
import pytest
import taichi as ti
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kerndiff as kd
from harness import load_elementwise

N = 2
LONG = os.environ.get("KERNDIFF_FUZZ") == "long"
PROFILE = settings(max_examples=int(os.environ.get("KERNDIFF_FUZZ_N", 10000)) if LONG else 12, deadline=None,
                   derandomize=os.environ.get("CI") == "true" and not LONG, suppress_health_check=list(HealthCheck))
pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)
SWIZZLE = "xyz"


@pytest.fixture(scope="module")
def fields(runtime):
    x = ti.Vector.field(3, ti.f64, shape=N, needs_grad=True, needs_dual=True)
    M = ti.Matrix.field(3, 3, ti.f64, shape=N, needs_grad=True, needs_dual=True)
    s = ti.field(ti.f64, shape=N, needs_grad=True, needs_dual=True)
    y = ti.field(ti.f64, shape=(), needs_grad=True, needs_dual=True)
    zv = ti.Vector.field(3, ti.f64, shape=N, needs_grad=True, needs_dual=True)
    zA = ti.Matrix.field(3, 3, ti.f64, shape=N, needs_grad=True, needs_dual=True)
    return {"x": x, "M": M, "s": s, "y": y, "zv": zv, "zA": zA}


class Draw:
    """Random statements, each rendered twice from the same choices: as Taichi source and as
    numpy source (reads copied, so numpy's views cannot alias what a statement stores)."""

    def __init__(self, rng):
        self.rng = rng

    def pick(self, *options):
        return self.rng.choice(options)

    def k(self):
        return self.rng.randrange(3)

    # -- expressions: (taichi text, numpy text)
    def scalar(self, depth=0, j=None):
        r = self.rng.random()
        if depth >= 2 or r < 0.45:
            a, b = self.k(), self.k()
            return self.pick((f"v[{a}]", f"v[{a}]"), (f"A[{a}, {b}]", f"A[{a}, {b}]"), ("s[i]", "s[i]"),
                             ("v[j]", "v[j]") if j else (f"v[{a}]", f"v[{a}]"),
                             (f"A[j, {b}]", f"A[j, {b}]") if j else ("0.7", "0.7"))
        (t1, n1), (t2, n2) = self.scalar(depth + 1, j), self.scalar(depth + 1, j)
        return self.pick((f"ti.sin({t1}) * {t2}", f"np.sin({n1}) * {n2}"),
                         (f"({t1} + {t2} * 0.5)", f"({n1} + {n2} * 0.5)"),
                         (f"ti.tanh({t1} * {t2})", f"np.tanh({n1} * {n2})"),
                         (f"ti.cos({t1})", f"np.cos({n1})"))

    def vector(self, depth=0):
        r, c = self.k(), self.k()
        p = "".join(self.rng.sample(SWIZZLE, 3))
        idx = [SWIZZLE.index(ch) for ch in p]
        options = [("v", "v.copy()"), (f"A[{r}, :]", f"A[{r}, :].copy()"), (f"A[:, {c}]", f"A[:, {c}].copy()"),
                   (f"A[{r}]", f"A[{r}].copy()"), (f"v.{p}", f"v[{idx}].copy()")]
        if depth < 1:
            (tv, nv), (ts, ns) = self.vector(depth + 1), self.scalar(1)
            options += [(f"A @ {tv}", f"A @ {nv}"), (f"{tv} * {ts}", f"{nv} * {ns}"),
                        (f"ti.sin({tv})", f"np.sin({nv})")]
            parts = [self.scalar(1) for _ in range(3)]
            options.append((f"ti.Vector([{', '.join(t for t, _ in parts)}])",
                            f"np.array([{', '.join(n for _, n in parts)}])"))
        return self.pick(*options)

    def pair(self):
        a = self.rng.randrange(2)
        r = self.k()
        parts = [self.scalar(1) for _ in range(2)]
        return self.pick((f"v[{a}:{a + 2}]", f"v[{a}:{a + 2}].copy()"), (f"A[{r}, {a}:{a + 2}]", f"A[{r}, {a}:{a + 2}].copy()"),
                         (f"ti.Vector([{parts[0][0]}, {parts[1][0]}])", f"np.array([{parts[0][1]}, {parts[1][1]}])"))

    def matrix(self):
        tv, nv = self.vector(1)
        return self.pick(("A @ A.transpose()", "A @ A.transpose()"), ("A.transpose()", "A.transpose().copy()"),
                         (f"A + {tv}.outer_product(v)", f"A + np.outer({nv}, v)"))

    # -- statements: [(taichi line, numpy line)], values bounded by tanh
    def statement(self, depth=0):
        r, c, a = self.k(), self.k(), self.rng.randrange(2)
        kind = self.rng.randrange(13 if depth == 0 else 11)
        if kind == 0:
            return bounded(f"v[{r}]", self.scalar())
        if kind == 1:
            return bounded(f"A[{r}, {c}]", self.scalar())
        if kind == 2:
            value = self.vector()  # (drawn before the target)
            return bounded(self.pick(f"A[{r}, :]", f"A[:, {c}]", f"A[{r}]"), value)
        if kind == 3:
            value = self.pair()
            return bounded(self.pick(f"v[{a}:{a + 2}]", f"A[{r}, {a}:{a + 2}]", f"A[{a}:{a + 2}, {c}]"), value)
        if kind == 4:
            return bounded("v", self.vector())
        if kind == 5:
            return bounded("A", self.matrix())
        if kind == 6:
            t, n = self.vector()
            target = self.pick("v", f"A[{r}, :]", f"A[:, {c}]")
            return [(f"{target} += ti.tanh({t}) * 0.5", f"{target} += np.tanh({n}) * 0.5")]
        if kind == 7:
            p = "".join(self.rng.sample(SWIZZLE, 2))
            q = "".join(self.rng.sample(SWIZZLE, 2))
            return [(f"v.{p} = v.{q} * 0.9", f"v[{[SWIZZLE.index(ch) for ch in p]}] = "
                                            f"v[{[SWIZZLE.index(ch) for ch in q]}].copy() * 0.9")]
        if kind == 8:
            (r2, c2) = (self.k(), self.k())
            return [(f"A[{r}, {c}], A[{r2}, {c2}] = A[{r2}, {c2}], A[{r}, {c}] * 0.8",
                     f"A[{r}, {c}], A[{r2}, {c2}] = A[{r2}, {c2}], A[{r}, {c}] * 0.8")]
        if kind == 9:
            return [(f"A[{r}, :], A[{c}, :] = A[{c}, :], A[{r}, :] * 0.8",
                     f"A[{r}, :], A[{c}, :] = A[{c}, :].copy(), A[{r}, :].copy() * 0.8")]
        if kind == 10:
            t, n = self.scalar()
            return [(f"v[{a}:{a + 2}] += v[{1 - a}:{3 - a}] * ti.tanh({t})",
                     f"v[{a}:{a + 2}] += v[{1 - a}:{3 - a}].copy() * np.tanh({n})")]
        if kind == 11:  # runtime indices: an inner loop
            t, n = self.scalar(1, j=True)
            body = self.pick(
                (f"v[j + 1] = ti.tanh(v[j] * 0.5 + {t})", f"v[j + 1] = np.tanh(v[j] * 0.5 + {n})"),
                (f"A[j + 1, :] = ti.tanh(A[j, :] * {t})", f"A[j + 1, :] = np.tanh(A[j, :].copy() * {n})"),
                (f"A[j, j + 1], A[j + 1, j] = A[j + 1, j], ti.tanh({t})",
                 f"A[j, j + 1], A[j + 1, j] = A[j + 1, j], np.tanh({n})"))
            return [("for j in range(2):", "for j in range(2):"), ("    " + body[0], "    " + body[1])]
        # an if around one statement (compared on data, so both branches run across elements)
        t, n = self.scalar(1)
        inner = self.statement(depth + 1)
        return [(f"if {t} > 0.4:", f"if {n} > 0.4:")] + [("    " + a_, "    " + b_) for a_, b_ in inner]


def bounded(target, value):
    """`target = ti.tanh(value)`: a store of a drawn value (taichi text, numpy text), bounded."""
    taichi_text, numpy_text = value
    return [(f"{target} = ti.tanh({taichi_text})", f"{target} = np.tanh({numpy_text})")]


def program(seed):
    draw = Draw(random.Random(seed))
    lines = [("v = x[i]", "v = x[i].copy()"), ("A = M[i]", "A = M[i].copy()")]
    for _ in range(draw.rng.randint(2, 6)):
        lines += draw.statement()
    tail = ("y[None] += v[0] + 2.0 * v[1] + 3.0 * v[2] + (A * ti.Matrix([[1.0, 0.5, 0.25], [2.0, 3.0, 1.5], "
            "[0.75, 1.25, 2.5]])).sum()",
            "y += v[0] + 2.0 * v[1] + 3.0 * v[2] + (A * np.array([[1.0, 0.5, 0.25], [2.0, 3.0, 1.5], "
            "[0.75, 1.25, 2.5]])).sum()")
    lines.append(tail)
    taichi_body = "\n".join(t for t, _ in lines)
    numpy_src = "def reference(x, M, s):\n    y = 0.0\n    for i in range(len(x)):\n" + \
        "".join(f"        {n}\n" for _, n in lines) + "    return y\n"
    return taichi_body, numpy_src


def on_field_elements(taichi_body, numpy_src):
    """The same program with the state in field elements zv[i] and zA[i] instead of locals:
    component, row, slice and swizzle stores into a field element, each value read from what
    it replaces."""
    def moved(text):
        return re.sub(r"\bA\b", "zA[i]", re.sub(r"\bv\b", "zv[i]", text))
    taichi_body = moved(taichi_body)
    numpy_src = moved(numpy_src).replace("def reference(x, M, s):\n",
                                         "def reference(x, M, s):\n    zv, zA = np.zeros((len(x), 3)), "
                                         "np.zeros((len(x), 3, 3))\n")
    return taichi_body, numpy_src


def set_inputs(fields, seed):
    rng = np.random.default_rng(seed)
    values = {"x": rng.uniform(-1, 1, (N, 3)), "M": rng.uniform(-1, 1, (N, 3, 3)), "s": rng.uniform(-1, 1, N)}
    for name, value in values.items():
        fields[name].from_numpy(value)
    return values


@settings(PROFILE)
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_component_stores_of_local_vectors_and_matrices(fields, seed, tmp_path):
    check(fields, seed, tmp_path, *program(seed))


@settings(PROFILE)
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_component_stores_of_field_elements(fields, seed, tmp_path):
    check(fields, seed, tmp_path, *on_field_elements(*program(seed)))


def check(fields, seed, tmp_path, body, numpy_src):
    fn, src = load_elementwise(body, fields, tmp_path, head="def kernel():\n    for i in x:")
    scope = {"np": np}
    exec(numpy_src, scope)
    values = set_inputs(fields, seed)
    expected = scope["reference"](values["x"], values["M"], values["s"])
    k = kd.kernel(fn)
    fields["y"][None] = 0
    k()
    np.testing.assert_allclose(fields["y"][None], expected, rtol=1e-12, atol=1e-12,
                               err_msg=f"the primal against numpy\n{src}\n{numpy_src}")
    try:
        kd.check_grad(k, [fields["x"], fields["M"], fields["s"]], fields["y"], order=2, rtol=1e-5, atol=1e-7)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{src}") from None


def test_the_statements_drawn_cover_every_kind():
    """The drawing itself: over a few hundred programs every statement form appears (a form the
    generator cannot produce is a form never checked)."""
    texts = "\n".join(program(seed)[0] for seed in range(300))
    for form in ("A[1] = ", "A[:, ", "v[0:2] = ", "A[0:2, ", "v.", "A = ti.tanh(A @ A.transpose())",
                 "for j in range(2):", "if ", "+= ", "], A["):
        assert form in texts, form
