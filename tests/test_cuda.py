"""Taichi's CUDA backend: the whole corpus in f64 on an NVIDIA GPU, against the f64 CPU derivatives
(which test_corpus checks against finite differences). GPU threads run the parallel loops and
their atomic adds in another order than the CPU's, so values agree to rounding, not bit for bit.

Skipped where Taichi finds no CUDA device (CI has none). To run the rest of the suite's
module-level runtime on CUDA too: `KERNDIFF_TEST_ARCH=cuda pytest` (see conftest.py).
"""
import numpy as np
import pytest
import taichi as ti

from harness import derivatives
from test_corpus import CORPUS_NAMES, build_corpus


@pytest.fixture(scope="module")
def references():
    ti.init(arch=ti.cpu, default_fp=ti.f64)
    corpus = build_corpus(ti.f64)
    refs = {name: derivatives(*corpus[name]) for name in CORPUS_NAMES}
    ti.reset()
    return refs


@pytest.fixture(scope="module")
def cuda_corpus(references):
    ti.init(arch=ti.cuda, default_fp=ti.f64)
    from taichi.lang import impl
    if impl.current_cfg().arch != ti.cuda:  # Taichi fell back to the CPU: no CUDA device here
        ti.reset()
        pytest.skip("no CUDA device")
    yield build_corpus(ti.f64)
    ti.reset()


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_f64_corpus_on_cuda_matches_cpu(cuda_corpus, references, name):
    got = derivatives(*cuda_corpus[name])
    ref = references[name]
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-9 * max(1.0, float(np.max(np.abs(r)))))
