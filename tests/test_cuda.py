"""Taichi's CUDA backend: the whole corpus in f64 on an NVIDIA GPU, against the f64 CPU derivatives
(which test_corpus checks against finite differences). GPU threads run the parallel loops and
their atomic adds in another order than the CPU's, so values agree to rounding, not bit for bit.

Skipped where Taichi finds no CUDA device (CI has none). To run the rest of the suite's
module-level runtime on CUDA too: `KERNDIFF_TEST_ARCH=cuda pytest` (see conftest.py).
"""
import pytest
import taichi as ti

from harness import derivatives
from test_corpus import CORPUS_NAMES, assert_same_derivatives, build_corpus, cpu_derivatives, start_backend


@pytest.fixture(scope="module")
def references():
    if not start_backend(ti.cuda, ti.f64):  # (asked first: the references took half a minute for nothing)
        pytest.skip("no CUDA device")
    ti.reset()
    return cpu_derivatives(CORPUS_NAMES)


@pytest.fixture(scope="module")
def cuda_corpus(references):
    if not start_backend(ti.cuda, ti.f64):  # Taichi fell back to the CPU: no CUDA device here
        pytest.skip("no CUDA device")
    yield build_corpus(ti.f64)
    ti.reset()


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_f64_corpus_on_cuda_matches_cpu(cuda_corpus, references, name):
    assert_same_derivatives(derivatives(*cuda_corpus[name]), references[name], 1e-9)
