import os
import sys

# Taichi 1.7's offline kernel cache can hand a kernel compiled for one ti.init's field layout to a
# later ti.init in the same process (seen as NaNs and segfaults when test modules re-init). Tests
# re-init per module, so they run without it.
os.environ.setdefault("TI_OFFLINE_CACHE", "0")
sys.path.insert(0, os.path.dirname(__file__))
# The repository root, for `bench` (python -m pytest adds it, the pytest script does not).
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def runtime():
    """One Taichi runtime per test module (f64 on the CPU): Taichi compiles each kernel once.
    KERNDIFF_TEST_ARCH=cuda (or vulkan, ...) runs these modules on another Taichi backend."""
    import taichi as ti
    from harness import TEST_ARCH
    arch = getattr(ti, TEST_ARCH)
    ti.init(arch=arch, default_fp=ti.f64, random_seed=0)
    yield
    ti.reset()


@pytest.fixture
def variant_runs(monkeypatch):
    """The kernels that ran their equal-directions variant during the test."""
    import kerndiff.runtime.kernel as kernel_module
    ran = []
    original = kernel_module.Kernel._equal_directions

    def spy(self, entry, templates):
        variant = original(self, entry, templates)
        if variant is None:
            return None
        compiled, pairs, src, params = variant

        def run(*args):
            ran.append(self)
            return compiled(*args)
        return run, pairs, src, params
    monkeypatch.setattr(kernel_module.Kernel, "_equal_directions", spy)
    return ran


def pytest_collection_modifyitems(config, items):
    """KERNDIFF_TEST_ORDER=reverse runs each module's tests in reverse order (modules keep theirs):
    a test that passes only after another test of its module made something for it (derivative
    fields, a runtime) fails there. Session 39 found three such tests (besides the fuzz modules'
    summaries, which now skip out of order) and one that left its module's fields dead for the
    tests after it."""
    if os.environ.get("KERNDIFF_TEST_ORDER") != "reverse":
        return
    from itertools import groupby
    items[:] = [item for _, group in groupby(items, key=lambda item: str(item.fspath))
                for item in list(group)[::-1]]

