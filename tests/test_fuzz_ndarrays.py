"""The programs fuzzer's drawn kernels (test_fuzz_programs) over ndarrays instead of fields: every
scalar field with elements becomes a ti.ndarray of its shape and dtype (x, w, y, z, g and the
index idx), the 0-d and vector fields stay fields, and the two kernels must give the same
primal outputs, J·v, Jᵀ·w and H·v (harness.derivatives, from the same values and directions) or
be refused alike. The field version is checked against finite differences in
test_fuzz_programs; this checks that nothing on the way (activity, hazards, private copies,
checkpoints, the generated signatures) treats an ndarray differently. Programs of two or three
such kernels run under kd.Tape over the arrays too, checked against finite differences as
test_fuzz_programs checks them over fields. In session 50, with v and u as ndarrays of vectors,
the Tape programs found Taichi 1.7.4 miscompiling such arrays' components (a wrong gradient where
fields gave the right one), and ndarrays of vectors are refused since (test_ndarrays).

Profiles as in test_fuzz_programs: short by default (derandomized under CI=true),
KERNDIFF_FUZZ=long; as there, a long run stops at Taichi's 512 SNode trees after about 500 draws
in one process (session 51: a KernDiffError saying so), so run KERNDIFF_FUZZ_N=300 per test.
"""
import numpy as np
import pytest
import taichi as ti
from hypothesis import example, given
from hypothesis import strategies as st

import kerndiff as kd
import test_fuzz_programs as programs
from harness import derivatives, runs_recorder, skip_unless_all_ran_before

OUTCOMES = []


@pytest.fixture(scope="module")
def both():
    ti.init(arch=ti.cpu, default_fp=ti.f64)
    fields = programs.make_fields(ti.f64)
    arrays = dict(fields)
    for name, f in fields.items():
        # (vector fields stay fields: ndarrays of vectors are refused. idx, an ndarray, made
        # Taichi 1.7.4 abort the process compiling an atomic on a vector field's component at an
        # index read from it, seed 16539706: codegen.components.fields_apart since session 51)
        if f.shape and not hasattr(f, "n"):
            arrays[name] = ti.ndarray(f.dtype, f.shape)
    yield fields, arrays
    programs.walked = None
    ti.reset()


def derivatives_over(fields, seed):
    """harness.derivatives of drawn program `seed` over `fields` (walk() reads their x), or the
    reason kerndiff refused it."""
    fn, args, _ = programs.drawn_kernel(fields, seed)
    programs.starting_values(fields)
    programs.walked = fields["x"]
    try:
        return derivatives(kd.kernel(fn), args)
    except kd.KernDiffError as e:
        return e.reason


@programs.PROFILE
@given(seed=st.integers(0, 2 ** 32 - 1))
@example(seed=3)
@example(seed=7)
@example(seed=16539706)
def test_drawn_programs_over_ndarrays_match_fields(both, seed):
    fields, arrays = both
    expected = derivatives_over(fields, seed)
    got = derivatives_over(arrays, seed)
    if isinstance(expected, str):
        assert got == expected
        OUTCOMES.append("refused")
        return
    assert not isinstance(got, str), got
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    OUTCOMES.append("compared")


@programs.PROFILE
@given(seed=st.integers(0, 2 ** 32 - 1))
@example(seed=5588194)
def test_drawn_programs_over_ndarrays_with_private_copies(both, seed, monkeypatch):
    """The same with opt.scatter and opt.packed_gathers forced on for these small loops: the
    private copies of an array's adjoint and the packed records of gathered arrays are fields
    beside the arrays."""
    from kerndiff.opt import packed_gathers, scatter, split_ranges, transposed_gathers
    monkeypatch.setattr(scatter, "MIN_TRIPS", 2)
    monkeypatch.setattr(scatter, "MIN_WORK", 2)
    monkeypatch.setattr(scatter, "MIN_ADDS_PER_ELEMENT", 0)
    monkeypatch.setattr(packed_gathers, "MIN_BYTES", 0)
    monkeypatch.setattr(transposed_gathers, "MIN_TRIPS", 0)
    monkeypatch.setattr(split_ranges, "MIN_TRIPS", 0)
    test_drawn_programs_over_ndarrays_match_fields.hypothesis.inner_test(both, seed)


@pytest.fixture(scope="module")
def measure_arrays(both):
    _, arrays = both
    for n in programs.INPUTS:  # (adjoints before the kernels compile: each input is one of the Tape's)
        kd.adjoint(arrays[n])
    return programs.measure_kernel(arrays, arrays["loss"])


@programs.TAPE_PROFILE
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_drawn_programs_over_ndarrays_under_a_tape(both, measure_arrays, seed):
    """Two or three drawn kernels over the arrays under kd.Tape (snapshots and restores of arrays
    the kernels overwrite), the gradient against central differences of the whole sequence and
    its H·v against differences of the gradient (test_fuzz_programs.check_tape)."""
    _, arrays = both
    programs.walked = arrays["x"]
    before = len(programs.TAPE_OUTCOMES)
    programs.check_tape(arrays, arrays["loss"], measure_arrays, seed)
    OUTCOMES.append("taped" if len(programs.TAPE_OUTCOMES) > before else "refused under a Tape")


RAN = set()
record_run = runs_recorder(RAN)


def test_most_drawn_programs_were_compared(request):
    skip_unless_all_ran_before(request, RAN)
    compared = [o for o in OUTCOMES if o in ("compared", "refused")]
    taped = [o for o in OUTCOMES if o not in compared]
    assert compared.count("compared") >= len(compared) // 3, OUTCOMES
    assert "taped" in taped or len(taped) < 4, OUTCOMES


def teardown_module():
    print(f"\nfuzz ndarrays: {len(OUTCOMES)} drawn, {OUTCOMES.count('compared')} compared with fields, "
          f"{OUTCOMES.count('taped')} programs checked under a Tape")
