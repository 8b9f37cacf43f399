"""Fuzzing whole programs: hypothesis draws kernels of one to three parallel loops over fields —
stores, `+=`, `-=` and `*=` at the loop's own index, scattered adds (`z[idx[i]] += ...`), sums into
a 0-d field, atomic max/min, vector fields and their methods, a `ti.func` with a branch and one
with a loop of its own, inner loops, `if`/`else`, `continue`, 2-D `ti.ndrange` loops and
struct-fors, a kernel argument as a value and as a loop bound, and (since session 32) locals
carried through inner `for` and `while` loops (adding into the loop's element or the sum, with a
`break`), locals reassigned in branches and inner loops, vector locals, `ti.select` and
ternaries, serialized loops reading the trip before (`y[i - 1]`), a kernel-scope local the loops
read, and a kernel-scope local the loops sum into (`total += ...`, then `s[None] = total * ...`;
since session 46 also `ti.atomic_max(total, ...)` / `ti.atomic_min`)
— race-free by construction (a loop reads what it scatters into nowhere, what it writes at
its own index only there), and a field a loop has read or written is only read by later loops
(fewer refusals). Each kernel is checked: its primal against Taichi's own kernel, then k.forward,
k.reverse, k.reverse.forward, k.forward.reverse and k.forward.forward against f64 finite
differences (harness.check), and k.forward.forward's equal-directions variant, where the program
has one, against the kernel as generated.
A path's refusal (KernDiffError) is accepted; the module checks that at least a third of the draws
had k.forward and k.reverse checked. test_random_programs_under_a_tape runs two or three drawn
kernels and a nonlinear measure of every field under kd.Tape, and checks the gradient with respect
to the fields' values before the Tape against finite differences of the whole sequence: kernels
overwriting and updating in place what earlier ones read (the Tape's snapshots and restores);
and, since session 49, the same program's H·v (kd.hvp of a program: kd.Tape over its forward
kernels) against differences of that gradient.

test_fuzz.py fuzzes expressions and control flow inside one elementwise statement; this module
fuzzes how statements over fields meet. It found, in session 31, adds into one element merged
across a read of it (opt.finalize) and atomic max/min results updated by a later loop
(ad/hazards.py); their regression tests are in test_programs.py and test_minmax.py. In session 32
it found two refusals of kernels kerndiff can differentiate: a kernel-scope local summed by two
loops, and an element its own iteration builds in a loop with a `continue` (test_programs.py,
test_owned.py).

Inner loops here do not store whole vectors, and a loop stores a whole v[i] at most once: Taichi
1.7.4's optimizer miscompiles a vector field element stored and read back (`for j in range(2):
v[i] = ti.Vector([...]) * (0.5 + v[i][1])` reads the old v[i][1] on the second trip; two
statements `v[i] += ti.Vector([...]) * ti.tan(v[i][1])` in a row, the second reads the old v[i][1]
too, seed 40910 of a long run in session 34; right with advanced_optimization=False, which in turn
aborts the process on `(m[None] ** 3) ** 3`), and the primal comparison would report it against
kerndiff, whose generated kernels store components one by one and compute it right. Nor is a
v[i] the loop stored whole read again: after `v[i] += ti.Vector([..., v[i][1]]) * s`, Taichi
reads v[i][1] inside `for j in range(1):` as it was before the add (seed 3617 of a long run in
session 54), and in the statement right after it too (`y[i] *= v[i][1]`, seed 65596 of a long run
in session 55); tests/test_programs.py keeps both against numpy.

Profiles as in test_fuzz.py: short by default (derandomized under CI=true), KERNDIFF_FUZZ=long.
Each drawn kernel keeps its helper fields (sums, winner counts, private copies) for the life of
the Taichi runtime, so a long run stops at Taichi's 512 SNode trees (kerndiff refuses at 500):
run one test per process (`-k`), KERNDIFF_FUZZ_N=300 rather than longer. The 0-d ones share
trees since session 52, private copies and checkpoint fields are shared by shape since
session 54 and packed records since session 55 (test_random_programs_with_private_copies, which
forces copies and records onto every loop, had reached 500 trees within 300 draws).
"""
import os
import random
import tempfile

import numpy as np
import pytest
import taichi as ti
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import kerndiff as kd
from harness import check, equal_directions_against_generated, load_elementwise, signature
from test_fuzz import BINARY, UNARY

N = 4
LONG = os.environ.get("KERNDIFF_FUZZ") == "long"
settings.register_profile("programs_short", max_examples=12, deadline=None,
                          derandomize=os.environ.get("CI") == "true", suppress_health_check=list(HealthCheck))
settings.register_profile("programs_long", max_examples=int(os.environ.get("KERNDIFF_FUZZ_N", 10000)),
                          deadline=None, suppress_health_check=list(HealthCheck))
PROFILE = settings.get_profile("programs_long" if LONG else "programs_short")


@ti.func
def helper(a, b):
    t = a * b
    if t > 0.2:
        t = ti.sin(t) + a
    return t * 0.5 + b


walked = None  # the field walk() reads: the fixture's x


@ti.func
def walk(a, i):
    """A function with a loop of its own, carrying a local and reading a field."""
    t = a
    for j in range(2):
        t = ti.sin(t) * walked[(i + j) % 4] + a
    return t


@pytest.fixture(scope="module")
def fields():
    ti.init(arch=ti.cpu, default_fp=ti.f64)
    yield make_fields(ti.f64)
    ti.reset()


def make_fields(dt):
    """The fields drawn programs use, of float dtype dt (f64 here; f32 on Vulkan: test_vulkan)."""
    global walked
    f = {
        "x": ti.field(dt, shape=N), "w": ti.field(dt, shape=N),
        "y": ti.field(dt, shape=N), "z": ti.field(dt, shape=N),
        "s": ti.field(dt, shape=()), "m": ti.field(dt, shape=()),
        "v": ti.Vector.field(2, dt, shape=N), "u": ti.Vector.field(2, dt, shape=N),
        "g": ti.field(dt, shape=(N, 3)),
        "idx": ti.field(ti.i32, shape=N),
        "loss": ti.field(dt, shape=()),
    }
    walked = f["x"]
    return f


def drawn_kernel(fields, seed, dt_name="f64"):
    """Drawn program `seed` as a Python function over `fields` (the kernel's body, kd.kernel or
    ti.kernel to make of it), its arguments, and its source."""
    body, with_argument = program(seed)
    head = f"def kernel(c: ti.{dt_name}, n: ti.i32):\n    if True:" if with_argument else "def kernel():\n    if True:"
    fn, src = load_elementwise(body, {**fields, "helper": helper, "walk": walk}, _tmp, head=head)
    return fn, (0.45, N) if with_argument else (), src


def starting_values(fields):
    """The same values before every kernel (idx repeats an element: scattered adds collide)."""
    rng = np.random.default_rng(5)
    for name in ("x", "w", "y", "z"):
        fields[name].from_numpy(rng.uniform(-1, 1, N))
    for name in ("v", "u"):
        fields[name].from_numpy(rng.uniform(-1, 1, (N, 2)))
    fields["g"].from_numpy(rng.uniform(-1, 1, (N, 3)))
    fields["s"][None] = 0.37  # (away from the comparisons with 0.1, 0.2, 0.3 and 0.4 below)
    fields["m"][None] = -0.61
    fields["idx"].from_numpy(np.array([2, 0, 0, 3], dtype=np.int32))


def expression(rand, depth, leaves):
    if depth == 0 or rand.random() < 0.3:
        return rand.choice(leaves)
    pick = rand.random()
    if pick < 0.4:
        return UNARY[rand.choice(sorted(UNARY))].format(expression(rand, depth - 1, leaves))
    if pick < 0.47:
        return f"helper({expression(rand, depth - 1, leaves)}, {expression(rand, depth - 1, leaves)})"
    if pick < 0.5:
        return f"walk({expression(rand, depth - 1, leaves)}, i)"
    if pick < 0.54:
        a, b, c = (expression(rand, depth - 1, leaves) for _ in range(3))
        return rand.choice([f"ti.select({a} > 0.2, {b}, {c})", f"({b} if {a} < 0.3 else {c})"])
    if pick < 0.58:  # a matrix built in the kernel, times a vector, or its determinant
        a, b, c = (expression(rand, depth - 1, leaves) for _ in range(3))
        m = f"ti.Matrix([[{a}, {b}], [0.3, {c}]])"
        return rand.choice([f"({m} @ u[i]).norm()", f"{m}.determinant()", f"({m} @ ti.Vector([{a}, 0.5]))[1]"])
    return BINARY[rand.choice(sorted(BINARY))].format(expression(rand, depth - 1, leaves),
                                                      expression(rand, depth - 1, leaves))


WRITABLE = ("y", "z", "v", "s", "m", "g")


class Loop:
    """One parallel loop being drawn: what each field is to it (written at the loop's own index,
    scattered into, reduced into, or read), and the locals it has bound so far."""

    def __init__(self, rand, with_argument, touched, kernel_locals=(), reduction=None):
        self.rand = rand
        self.two_d = rand.random() < 0.2
        self.serial = not self.two_d and rand.random() < 0.12  # ti.loop_config(serialize=True)
        self.with_argument = with_argument
        self.kernel_locals = list(kernel_locals)  # bound before the loops, read inside them
        # a kernel-scope local this loop may reduce into, (name, "+=", "max" or "min"); s is then stored from it
        self.reduction = reduction
        self.role = {f: rand.choice(["own", "own", "scatter", "none", "read"]) for f in ("y", "z", "v")}
        self.role["g"] = rand.choice(["own", "none", "read"])
        self.role["s"] = rand.choice(["sum", "none", "read"])
        self.role["m"] = rand.choice(["max", "min", "none", "read"])
        if self.two_d:  # y[i] is not the loop's own element in `for i, r in ti.ndrange(4, 3)`
            self.role.update({f: "scatter" for f in ("y", "z", "v") if self.role[f] == "own"})
        if reduction:
            self.role["s"] = "none"
        for f in touched:  # what an earlier loop read or wrote, this one only reads
            if self.role[f] != "none":
                self.role[f] = "read"
        self.locals = []
        self.vectors = []  # vector locals
        self.stored_vector = False  # a whole v[i] stored already (at most one: see the top)
        self.in_inner = False  # drawing an inner loop's body

    def leaves(self):
        out = ["x[i]", "w[i]", "x[idx[i]]", "w[(i + 1) % 4]", "0.7", "u[i][0]", "u[idx[i]].norm_sqr()",
               "(float(i) + 0.5) * 0.3", "x[(i * 3) // 2 % 4]"]
        out += self.locals + self.kernel_locals + (["c"] if self.with_argument else []) + \
            (["x[r]"] if self.two_d else [])
        # (a norm of a vector shifted off zero: gates make vectors exactly zero, where the norm
        # has no derivative and kerndiff's is NaN, as Taichi's and JAX's are: README)
        out += [f"{p}{m}" for p in self.vectors for m in ("[0]", "[1]", ".dot(u[i])")]
        out += [f"({p} + 0.25).norm()" for p in self.vectors]
        for f in ("y", "z"):
            out += {"read": [f"{f}[i]", f"{f}[idx[i]]", f"{f}[(i + 3) % 4]"],
                    "own": [f"{f}[i]"] + ([f"{f}[i - 1]"] if self.serial else [])}.get(self.role[f], [])
        out += {"read": ["v[i][0]", "v[idx[i]][1]", "(v[i] + 0.25).norm()", "v[i].dot(u[i])"],
                "own": [] if self.stored_vector else ["v[i][1]", "v[i].dot(u[i])"]
                }.get(self.role["v"], [])
        out += {"read": ["g[i, 1]", "g[idx[i], 2]"], "own": ["g[i, r]"] if self.two_d else []}.get(self.role["g"], [])
        out += [f"{f}[None]" for f in ("s", "m") if self.role[f] == "read"]
        return out

    def expr(self, depth=2):
        return expression(self.rand, depth, self.leaves())

    def statement(self, indent, nested=True, vectors=True):
        """Lines of one statement (an if or inner loop holds one of its own; an inner loop's stores
        no whole vector: see the top)."""
        rand, pad = self.rand, "    " * indent
        kinds = ["local", "own", "scatter", "sum", "extremum", "reassign", "vector local", "unrolled"] + \
            (["vector"] if vectors else []) + (["if", "inner", "continue", "carry"] if nested else []) + \
            (["reduce"] if self.reduction else [])
        kind = rand.choice(kinds)
        role = self.role
        if kind == "local":
            name = f"a{len(self.locals)}"
            line = f"{pad}{name} = {self.expr()}"
            if indent == 0:  # (a name bound in a block ends with it)
                self.locals.append(name)
            return [line]
        if kind == "own" and any(role[f] == "own" for f in ("y", "z", "g")):
            f = rand.choice([f for f in ("y", "z", "g") if role[f] == "own"])
            target = f"{f}[i]" if f != "g" else "g[i, r]" if self.two_d else f"g[i, {rand.randint(0, 2)}]"
            return [f"{pad}{target} {rand.choice(['=', '+=', '-=', '*='])} {self.expr()}"]
        if kind == "scatter" and any(role[f] == "scatter" for f in ("y", "z")):
            f = rand.choice([f for f in ("y", "z") if role[f] == "scatter"])
            return [f"{pad}{f}[{rand.choice(['idx[i]', '(i + 1) % 4', 'i'])}] += {self.expr()}"]
        if kind == "vector" and role["v"] == "own" and not self.stored_vector:
            self.stored_vector = True
            return [f"{pad}v[i] {rand.choice(['=', '+='])} ti.Vector([{self.expr(1)}, {self.expr(1)}]) * {self.expr(1)}"]
        if kind == "vector" and role["v"] == "scatter":
            return [f"{pad}v[idx[i]] += u[i] * {self.expr(1)}"]
        if kind == "sum" and role["s"] == "sum":
            return [f"{pad}s[None] += {self.expr()}"]
        if kind == "extremum" and role["m"] in ("max", "min"):
            return [f"{pad}ti.atomic_{role['m']}(m[None], {self.expr()})"]
        if kind == "reassign" and self.locals + self.vectors:
            name = rand.choice(self.locals + self.vectors)
            if name in self.vectors:
                return [rand.choice([f"{pad}{name}[{rand.randint(0, 1)}] {rand.choice(['=', '+='])} {self.expr(1)}",
                                     f"{pad}{name} = {name} * {self.expr(1)} + u[i]"])]
            return [f"{pad}{name} {rand.choice(['=', '+=', '*='])} {self.expr()}"]
        if kind == "vector local":
            name = f"p{len(self.vectors)}"
            line = f"{pad}{name} = " + rand.choice([f"ti.Vector([{self.expr(1)}, {self.expr(1)}])",
                                                   f"u[i] * {self.expr(1)}"])
            if indent == 0:
                self.vectors.append(name)
            return [line]
        if kind == "unrolled" and self.locals:  # a ti.static loop over a vector's components
            name = rand.choice(self.locals)
            return [f"{pad}for d in ti.static(range(2)):", f"{pad}    {name} = {name} * 0.5 + u[i][d] * {self.expr(1)}"]
        if kind == "reduce":
            name, op = self.reduction
            return [f"{pad}{name} += {self.expr()}" if op == "+=" else f"{pad}ti.atomic_{op}({name}, {self.expr()})"]
        if kind == "carry":
            return self.carried(indent)
        if kind == "if":
            lines = [f"{pad}if {self.expr(1)} > 0.1:"] + self.statement(indent + 1, False)
            if rand.random() < 0.5:
                lines += [f"{pad}else:"] + self.statement(indent + 1, False)
            return lines
        if kind == "continue":
            return [f"{pad}if {self.expr(1)} > 0.4:", f"{pad}    continue"]
        if kind == "inner":
            self.in_inner, outer = True, self.in_inner
            body = self.statement(indent + 1, False, vectors=False)
            self.in_inner = outer
            trips = rand.randint(1, 3)
            # (two trips read x[j]: the inner loop's own index, whose adjoint adds a pair loop's
            # reverse may gather in a second loop, opt.transposed_gathers; chosen by the count
            # already drawn, so every seed draws the program it drew before)
            at = "x[j]" if trips == 2 else "x[(i + j) % 4]"
            return [f"{pad}for j in range({trips}):"] + [line.replace("x[idx[i]]", at) for line in body]
        return self.statement(indent, nested, vectors)  # that kind has nothing to do in this loop: another

    def carried(self, indent):
        """A local carried from trip to trip of an inner `for` or `while` loop (which may also add
        into the loop's own element or the sum with it, and break), read after the loop."""
        rand, pad = self.rand, "    " * indent
        name = f"a{len(self.locals)}"
        lines = [f"{pad}{name} = {self.expr(1)}"]
        if rand.random() < 0.3:
            count = f"trips{len(self.locals)}"
            lines += [f"{pad}{count} = 0", f"{pad}while {count} < {rand.randint(1, 3)} and {name} < 1.5:",
                      f"{pad}    {count} += 1"]
        else:
            lines += [f"{pad}for j in range({rand.randint(1, 3)}):"]
        step = rand.choice(["ti.sin({})", "ti.tanh({})", "{}", "0.5 * ({}) ** 2"])
        self.in_inner, outer = True, self.in_inner
        lines += [f"{pad}    {name} = " + step.format(f"{name} * {self.expr(1)} + {self.expr(1)}")]
        owned = [f for f in ("y", "z") if self.role[f] == "own"]
        if owned and rand.random() < 0.5:
            lines += [f"{pad}    {rand.choice(owned)}[i] += {name} * {self.expr(1)}"]
        elif self.role["s"] == "sum" and rand.random() < 0.5:
            lines += [f"{pad}    s[None] += {name}"]
        if rand.random() < 0.3:
            lines += [f"{pad}    if {name} > 0.6:", f"{pad}        break"]
        self.in_inner = outer
        if indent == 0:
            self.locals.append(name)
        return lines

    def header(self):
        if self.two_d:
            return ["for i, r in ti.ndrange(4, 3):"]
        if self.serial:  # its trips in order: a trip reads what the one before stored (y[i - 1])
            return ["ti.loop_config(serialize=True)", "for i in range(1, 4):"]
        if self.rand.random() < 0.2:
            return ["for i in x:"]
        return ["for i in range(n):" if self.with_argument and self.rand.random() < 0.5 else "for i in range(4):"]


def program(seed):
    """(kernel body, whether the kernel takes the arguments c: ti.f64, n: ti.i32)."""
    rand = random.Random(seed)
    with_argument = rand.random() < 0.3
    lines, touched, kernel_locals = [], set(), []
    if rand.random() < 0.3:  # a kernel-scope local the loops read
        lines.append(f"k0 = x[0] * {rand.choice(['0.5', 'w[1]', 'ti.sin(w[2])'])} + w[3]")
        kernel_locals.append("k0")
    reduction = ("total", rand.choice(["+=", "+=", "max", "min"])) if rand.random() < 0.25 else None
    if reduction:  # a kernel-scope local the loops add into (or take the maximum into), stored into s after them
        lines.append(f"total = {dict(zip(['+=', 'max', 'min'], ['0.0', '-5.0', '5.0']))[reduction[1]]}")
    for _ in range(rand.randint(1, 3)):
        loop = Loop(rand, with_argument, touched, kernel_locals, reduction)
        # mostly a store first into what the loop writes at its own index: an update of the value
        # from before the kernel (`y[i] *= ...`) is refused alone (ad/owned.py; kd.Tape's case)
        body = [f"{f}[i] = {loop.expr()}" for f in ("y", "z") if loop.role[f] == "own" and rand.random() < 0.8]
        body += [line for _ in range(rand.randint(1, 4)) for line in loop.statement(0)]
        touched |= {f for f in WRITABLE if any(f"{f}[" in line for line in body)}
        lines += loop.header() + ["    " + line for line in body]
    if reduction:
        lines.append(f"s[None] = total * {rand.choice(['0.5', 'total', 'k0' if kernel_locals else 'x[1]'])}")
    return "\n".join(lines), with_argument


_tmp = tempfile.mkdtemp(prefix="kerndiff_fuzz_programs_")
OUTCOMES = []
VARIANTS = []  # per program with k.forward.forward checked: whether it had an equal-directions variant
REFUSALS = []


def check_program(fields, seed):
    fn, args, src = drawn_kernel(fields, seed)
    names = [n for n in fields if n != "idx"]
    starting_values(fields)
    ti.kernel(fn)(*args)
    expected = {n: fields[n].to_numpy() for n in names}
    starting_values(fields)
    k = kd.kernel(fn)
    k(*args)
    for n in names:
        np.testing.assert_allclose(fields[n].to_numpy(), expected[n], rtol=1e-10, atol=1e-12,
                                   err_msg=f"the primal's {n}\n{src}")
    if not signature(k, args)[1]:
        OUTCOMES.append("nothing written")
        return
    checked = []
    for path, mode in (("", "forward"), ("", "reverse"), ("reverse", "forward"), ("forward", "reverse"),
                       ("forward", "forward")):
        kernel = getattr(k, path) if path else k
        starting_values(fields)
        try:
            try:
                check(kernel, mode, args=args, rtol=1e-5, atol=1e-7, may_be_zero=True)
            except AssertionError:
                # finite differences of outputs in the thousands (cubes of sums) lose digits at
                # the usual step: a wider one before calling it a failure
                starting_values(fields)
                check(kernel, mode, args=args, eps=1e-4, rtol=1e-4, atol=1e-6, may_be_zero=True)
            checked.append(".".join(filter(None, (path, mode))))
        except kd.KernDiffError as e:  # (each path on its own: k.forward.reverse refuses more)
            REFUSALS.append(f"{'.'.join(filter(None, (path, mode)))}: {e.reason}\n{src}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{src}") from None
    if "forward.forward" in checked:
        # both levels seeded alike: the equal-directions variant, where there is one, gives the
        # numbers of the kernel as generated (ad/equal_directions.py)
        starting_values(fields)
        variant, generated = equal_directions_against_generated(k, args)
        for a, b in zip(variant, generated):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * max(1.0, float(np.max(np.abs(b)))),
                                       err_msg=f"the equal-directions variant\n{src}")
        VARIANTS.append(k.forward.forward.equal_directions_source is not None)
    OUTCOMES.append("checked" if {"forward", "reverse"} <= set(checked) else "refused")


@settings(PROFILE)
@given(seed=st.integers(0, 2 ** 32 - 1))
# an atomic min whose winning contribution is a difference of terms ten times its size, which
# LLVM's fast math rounded differently in the pass that finds the winners (ad.minmax.magnitude)
@example(seed=124956839)
def test_random_programs(fields, seed):
    check_program(fields, seed)


@settings(PROFILE)
@given(seed=st.integers(0, 2 ** 32 - 1))
# a 10240-character line in k.reverse.forward, which Taichi's source reader broke in two
# (codegen.emit.wrapped)
@example(seed=5588194)
def test_random_programs_with_private_copies(fields, seed, monkeypatch):
    """The same programs with opt.scatter forced on for their 4-iteration loops: scattered adjoint
    adds go through per-thread private copies; and opt.packed_gathers on for fields of any size."""
    from kerndiff.opt import packed_gathers, scatter, split_ranges, transposed_gathers
    monkeypatch.setattr(scatter, "MIN_TRIPS", 2)
    monkeypatch.setattr(scatter, "MIN_WORK", 2)
    monkeypatch.setattr(scatter, "MIN_ADDS_PER_ELEMENT", 0)
    monkeypatch.setattr(packed_gathers, "MIN_BYTES", 0)
    monkeypatch.setattr(transposed_gathers, "MIN_TRIPS", 0)
    monkeypatch.setattr(split_ranges, "MIN_TRIPS", 0)
    check_program(fields, seed)


TAPE_PROFILE = settings(PROFILE, max_examples=6) if not LONG else PROFILE
INPUTS = ("x", "w", "u", "y", "z", "v", "g", "s", "m")


def measure_kernel(fields, loss):
    """loss = a sum of nonlinear terms of everything the drawn kernels may write (nonlinear, so
    that the Tape's reverse of it reads the values it restored: a wrong restore shows)."""
    y, z, v, g, s, m = (fields[n] for n in ("y", "z", "v", "g", "s", "m"))

    @kd.kernel
    def measure():
        for i in range(4):
            loss[None] += 0.3 * y[i] ** 2 + ti.sin(z[i]) + 0.2 * v[i].norm_sqr() + v[i][0] * g[i, 0] \
                + ti.tanh(g[i, 1]) * g[i, 2]
        loss[None] += s[None] ** 2 + ti.cos(m[None])

    return measure


def check_tape(fields, loss, measure, seed):
    """Two or three drawn kernels and measure() run under kd.Tape(loss): the gradient with respect
    to every field's value from before the Tape, along random directions, against central finite
    differences of the whole sequence (kernels overwriting and updating in place what earlier
    ones read: the Tape's snapshots and restores)."""
    rand = random.Random(seed)
    launches, sources = [], []
    for _ in range(rand.randint(2, 3)):
        fn, args, src = drawn_kernel(fields, rand.randrange(2 ** 32))
        launches.append((kd.kernel(fn), args))
        sources.append(src)
    program_text = "\n".join(sources)
    starting_values(fields)
    start = {n: fields[n].to_numpy() for n in INPUTS}

    def put(values):
        for n in INPUTS:
            if fields[n].shape:
                fields[n].from_numpy(values[n])
            else:
                fields[n][None] = float(values[n])

    def run(values):
        put(values)
        loss[None] = 0.0
        for k, args in launches:
            k(*args)
        measure()
        return loss[None]

    try:
        run(start)  # (the primal of each, once, before the Tape: a refusal there is the kernel's)
        put(start)
        with kd.Tape(loss):
            for k, args in launches:
                k(*args)
            measure()
    except kd.KernDiffError as e:
        TAPE_REFUSALS.append(f"{e.reason}\n{program_text}")
        return
    grads = {n: kd.adjoint(fields[n]).to_numpy() for n in INPUTS}
    rng = np.random.default_rng(seed % 2 ** 32)
    for _ in range(2):
        direction = {n: rng.uniform(-1, 1, np.shape(start[n])) for n in INPUTS}
        along = sum(float(np.sum(grads[n] * direction[n])) for n in INPUTS)
        agrees, fd = _agrees_at_a_step(along, lambda eps: (run({n: start[n] + eps * direction[n] for n in INPUTS}) -
                                                           run({n: start[n] - eps * direction[n] for n in INPUTS}))
                                       / (2 * eps), ((1e-6, 1e-5, 1e-7), (1e-4, 1e-4, 1e-6)))
        if not agrees:
            raise AssertionError(f"the Tape's gradient along a direction {along} against finite differences "
                                 f"{fd}\n{program_text}")
    TAPE_OUTCOMES.append("checked")
    check_program_hvp(fields, loss, launches, measure, start, put, program_text, rng)


def check_program_hvp(fields, loss, launches, measure, start, put, program_text, rng):
    """The same program's H·v (kd.hvp of a program: kd.Tape over its forward kernels), uᵀ H v
    against central differences of the Tape's gradient along v (since session 49)."""
    inputs = [fields[n] for n in INPUTS]

    def program():
        for k, args in launches:
            k(*args)
        measure()

    def gradient(values):
        put(values)
        with kd.Tape(loss):
            program()
        return {n: kd.adjoint(fields[n]).to_numpy() for n in INPUTS}

    v = {n: rng.uniform(-1, 1, np.shape(start[n])) for n in INPUTS}
    u = {n: rng.uniform(-1, 1, np.shape(start[n])) for n in INPUTS}
    try:
        hv = kd.hvp(program, inputs=inputs, output=loss)([start[n] for n in INPUTS], [v[n] for n in INPUTS])
    except kd.KernDiffError as e:
        HVP_REFUSALS.append(f"{e.reason}\n{program_text}")
        return
    along = sum(float(np.sum(np.asarray(h) * u[n])) for n, h in zip(INPUTS, hv))

    def differences(eps):
        plus = gradient({n: start[n] + eps * v[n] for n in INPUTS})
        minus = gradient({n: start[n] - eps * v[n] for n in INPUTS})
        return sum(float(np.sum((plus[n] - minus[n]) * u[n])) for n in INPUTS) / (2 * eps)

    agrees, fd = _agrees_at_a_step(along, differences, ((1e-5, 1e-4, 1e-6), (1e-3, 1e-3, 1e-5)))
    if not agrees:
        raise AssertionError(f"the program's H·v along a direction {along} against differences of its gradient "
                             f"{fd}\n{program_text}")
    HVP_OUTCOMES.append("checked")


def _agrees_at_a_step(along, differences, steps):
    """(whether `along` matches differences(eps) within (rtol, atol) at one of the (eps, rtol,
    atol) steps, the last difference): outputs in the thousands lose digits at the first step,
    a wider one comes before calling it a failure."""
    for eps, rtol, atol in steps:
        fd = differences(eps)
        if abs(fd - along) <= atol + rtol * abs(fd):
            return True, fd
    return False, fd


TAPE_OUTCOMES, TAPE_REFUSALS = [], []
HVP_OUTCOMES, HVP_REFUSALS = [], []


@pytest.fixture(scope="module")
def measure(fields):
    for n in INPUTS:  # (adjoints before the kernels compile: each input is one of the Tape's)
        kd.adjoint(fields[n])
    return measure_kernel(fields, fields["loss"])


@TAPE_PROFILE
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_random_programs_under_a_tape(fields, measure, seed):
    check_tape(fields, fields["loss"], measure, seed)


def test_most_programs_were_checked():
    """Refusals pass the tests above; they must not be what the fuzzing mostly saw."""
    checked = OUTCOMES.count("checked")
    assert checked >= len(OUTCOMES) // 3, ({o: OUTCOMES.count(o) for o in set(OUTCOMES)}, REFUSALS[:5])
    drawn = len(TAPE_OUTCOMES) + len(TAPE_REFUSALS)
    assert len(TAPE_OUTCOMES) >= drawn // 3, TAPE_REFUSALS[:5]
    assert len(HVP_OUTCOMES) >= len(TAPE_OUTCOMES) // 2, HVP_REFUSALS[:5]


def teardown_module():
    print(f"\nfuzz programs: {len(OUTCOMES)} drawn, {OUTCOMES.count('checked')} checked in both modes; "
          f"{len(REFUSALS)} paths refused; under a Tape {len(TAPE_OUTCOMES)} checked, {len(TAPE_REFUSALS)} refused "
          f"(H·v: {len(HVP_OUTCOMES)} checked, {len(HVP_REFUSALS)} refused); "
          f"{sum(VARIANTS)} of {len(VARIANTS)} with k.forward.forward checked had an equal-directions variant")
    if os.environ.get("KERNDIFF_FUZZ_SHOW"):
        reasons = {}
        for r in REFUSALS:
            head = r.split("\n")[0]
            reasons[head[:150]] = reasons.get(head[:150], 0) + 1
        for head, count in sorted(reasons.items(), key=lambda t: -t[1]):
            print(count, head)
        for r in TAPE_REFUSALS:
            print("Tape:", r.split("\n")[0][:200])
        for r in HVP_REFUSALS:
            print("H·v:", r.split("\n")[0][:200])
