"""Fuzzing races: hypothesis draws one parallel loop whose statements store, add and read one field
at indices other iterations may share — `z[i]`, `z[(i + 1) % 6]`, `z[5 - i]`, `z[i // 2]`,
`z[i % 3]`, `z[perm[i]]`, `z[0]`, `z[ti.min(i + 1, 5)]` — under conditions on the data, in an
inner loop of run-time bounds, beside reads into other outputs. Many such kernels compute
something that depends on the order Taichi runs the iterations in. The module runs Taichi on one
CPU thread, so that the order is fixed and central finite differences of the primal are a
reference: every drawn kernel's k.reverse and k.forward are either refused with a KernDiffError
or agree with them (harness.check). A reverse that ran and disagreed is a silently wrong number:
session 35 found five kinds by hand (docs/design.md "Stores several iterations reach") and wrote
this module so that their neighbours are drawn too.

Since session 36 it also draws what only a run-time check decides (ad/claims.py): a store at an
index read from an array with repeats (`z[rep[i]] = ...`, rep = [1, 1, 3, 0, 4, 4]), at one
mixing the loop variable with a local counted in a while loop (`j = 0; while j < 2: z[(i + j) %
6] = ...`), whose counter has no range for ad.races to evaluate, and in an inner loop of run-time
bounds run three times (`m[None]` is 3), where ad.races evaluates two trips. Before, README.md
documented the first as taken to come from one iteration, and the other two as not decided.
A second generator draws the same rows in a two-dimensional loop (`for i, j in ti.ndrange(6,
2)`, columns `j`, `0` or `1 - j`), where ad.claims numbers iterations row-major.
Profiles as in test_fuzz.py: short by default (derandomized under CI=true),
KERNDIFF_FUZZ=long (KERNDIFF_FUZZ_N examples).
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
from harness import check, load_module, runs_recorder, signature, skip_unless_all_ran_before

N = 6
LONG = os.environ.get("KERNDIFF_FUZZ") == "long"
PROFILE = settings(max_examples=int(os.environ.get("KERNDIFF_FUZZ_N", 10000)) if LONG else 40, deadline=None,
                   derandomize=os.environ.get("CI") == "true" and not LONG, suppress_health_check=list(HealthCheck))
_tmp = tempfile.mkdtemp(prefix="kerndiff_fuzz_races_")

SHARED = ["i", "i", "(i + 1) % 6", "5 - i", "i // 2", "i % 3", "perm[i]", "rep[i]", "0", "ti.min(i + 1, 5)"]
VALUES = ["ti.sin(x[i])", "x[i] * x[i]", "x[i] * 2.0 + 0.5", "ti.exp(0.5 * x[i])"]


@pytest.fixture(scope="module")
def fields():
    ti.init(arch=ti.cpu, default_fp=ti.f64, cpu_max_num_threads=1)
    made = {name: ti.field(ti.f64, shape=N) for name in ("x", "z", "y", "w")}
    made["perm"] = ti.field(ti.i32, shape=N)
    made["rep"] = ti.field(ti.i32, shape=N)
    made["m"] = ti.field(ti.i32, shape=())
    made.update({name: ti.field(ti.f64, shape=(N, 2)) for name in ("x2", "z2", "y2")})
    yield made
    ti.reset()


def starting_values(fields):
    fields["x"].from_numpy(np.linspace(0.2, 0.7, N))
    fields["z"].from_numpy(np.linspace(0.5, 1.0, N))
    fields["y"].fill(0)
    fields["w"].fill(0)
    fields["perm"].from_numpy(np.array([2, 0, 5, 1, 3, 4], dtype=np.int32))
    fields["rep"].from_numpy(np.array([1, 1, 3, 0, 4, 4], dtype=np.int32))
    fields["m"][None] = 3  # (one trip more than ad.races assumes for run-time bounds: see the docstring)
    fields["x2"].from_numpy(np.linspace(0.2, 0.7, 2 * N).reshape(N, 2))
    fields["z2"].from_numpy(np.linspace(0.5, 1.0, 2 * N).reshape(N, 2))
    fields["y2"].fill(0)


def statement(rand):
    """Lines of one statement of the loop body (indented by four under the loop)."""
    kind = rand.choice(["store", "store", "add", "read", "read", "other read", "guarded", "inner", "self",
                        "skip", "while"])
    if kind == "store":
        return [f"z[{rand.choice(SHARED)}] = {rand.choice(VALUES)}"]
    if kind == "add":
        return [f"z[{rand.choice(SHARED)}] += {rand.choice(VALUES)}"]
    if kind == "read":
        return [f"y[i] = z[{rand.choice(SHARED)}] * x[i]"]
    if kind == "other read":
        return [f"w[i] = ti.sin(z[{rand.choice(SHARED)}]) + x[i]"]
    if kind == "guarded":
        inner = statement(rand)
        return [rand.choice(["if x[i] > 0.45:", "if i == 2:", "if i % 2 == 0:"])] + ["    " + line for line in inner]
    if kind == "self":
        return [f"z[{rand.choice(SHARED)}] = z[{rand.choice(SHARED)}] * x[i] + 0.1"]
    if kind == "skip":
        return ["if x[i] < 0.35:", "    continue"]
    if kind == "while":
        index = rand.choice(["j", "i", "(i + j) % 6"])
        return ["j = 0", "while j < 2:", f"    z[{index}] = x[i] * x[j] + {rand.choice(VALUES)}", "    j += 1"]
    index = rand.choice(["j", "i", "(i + j) % 6"])
    add = f"z[{index}] = x[i] * x[j] + {rand.choice(VALUES)}"
    if index == "(i + j) % 6":  # (the pair of i with itself skipped: opt.split_ranges' two loops)
        return ["for j in range(m[None]):", "    if j != i:", f"        {add}"]
    return ["for j in range(m[None]):", f"    {add}"]


def draw_kernel(seed, statement_of=statement, head="for i in range(6):"):
    rand = random.Random(seed)
    body = [line for _ in range(rand.randint(2, 3)) for line in statement_of(rand)]
    return f"import taichi as ti\n\n\ndef kernel():\n    {head}\n" + "".join(f"        {line}\n" for line in body)


def statement_2d(rand):
    """Lines of one statement of a two-dimensional loop's body over `for i, j in ti.ndrange(6,
    2)`: rows shared as above, columns the iteration's own or not (`0`, `1 - j`)."""
    kind = rand.choice(["store", "store", "add", "read", "guarded"])
    at = f"z2[{rand.choice(SHARED)}, {rand.choice(['j', 'j', '0', '1 - j'])}]"
    value = rand.choice(["ti.sin(x2[i, j])", "x2[i, j] * x2[i, j]", "x2[i, j] * 2.0 + 0.5"])
    if kind == "store":
        return [f"{at} = {value}"]
    if kind == "add":
        return [f"{at} += {value}"]
    if kind == "read":
        return [f"y2[i, j] = {at} * x2[i, j]"]
    return [rand.choice(["if x2[i, j] > 0.45:", "if j == 0:", "if i % 2 == 0:"])] + \
        ["    " + line for line in statement_2d(rand)]


def draw_kernel_2d(seed):
    return draw_kernel(seed, statement_2d, "for i, j in ti.ndrange(6, 2):")


def check_races(fields, seed, draw=draw_kernel):
    src = draw(seed)
    k = kd.kernel(load_module(src, fields, _tmp, "race_kernel").kernel)
    starting_values(fields)
    k()
    if not signature(k)[1]:
        OUTCOMES.append("nothing written")
        return
    for mode in ("reverse", "forward"):
        starting_values(fields)
        try:
            check(k, mode, rtol=1e-6, atol=1e-8, may_be_zero=True)
            OUTCOMES.append(f"{mode} checked")
        except kd.KernDiffError:
            OUTCOMES.append(f"{mode} refused")
        except AssertionError as e:
            raise AssertionError(f"k.{mode} ran and disagrees with finite differences of the one-thread "
                                 f"primal: {e}\n{src}") from None


OUTCOMES = []


@PROFILE
@given(seed=st.integers(0, 2 ** 32 - 1))
@example(seed=0)  # (refused: reads z[rep[i]] beside a store into z[i // 2])
@example(seed=20)  # (checked) these two make the module's summary independent of the draws
def test_random_races(fields, seed):
    check_races(fields, seed)


@PROFILE
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_random_races_in_two_dimensions(fields, seed):
    """ad.claims numbers an ndrange's iterations row-major and decodes the elements it names."""
    check_races(fields, seed, draw_kernel_2d)


RAN = set()
record_run = runs_recorder(RAN)


def test_both_outcomes_were_drawn(request):
    """Some drawn kernels were refused and some checked, in reverse mode (a fuzzer whose every
    kernel is refused, or none, tests nothing of the boundary)."""
    skip_unless_all_ran_before(request, RAN)
    assert {"reverse checked", "reverse refused"} <= set(OUTCOMES), OUTCOMES


def teardown_module():
    print(f"\nfuzz races: { {o: OUTCOMES.count(o) for o in sorted(set(OUTCOMES))} }")
