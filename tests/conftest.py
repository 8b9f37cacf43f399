import os
import sys

# Taichi 1.7's offline kernel cache can hand a kernel compiled for one ti.init's field layout to a
# later ti.init in the same process (seen as NaNs and segfaults when test modules re-init). Tests
# re-init per module, so they run without it.
os.environ.setdefault("TI_OFFLINE_CACHE", "0")
sys.path.insert(0, os.path.dirname(__file__))


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
