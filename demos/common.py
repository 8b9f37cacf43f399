"""Shared by the demos: Taichi start-up with a GPU fallback, and a progress bar."""
import taichi as ti


def init(arch="cpu", default_fp=ti.f64, f64_math=False):
    """ti.init on the GPU when asked and available, else on the CPU (with a one-line notice).

    f64_math: the demo calls transcendental functions on default_fp values; Taichi's SPIR-V
    backends (Vulkan, Metal) have none in f64, so there it runs in f32 instead (with a notice)."""
    if arch == "gpu":
        try:
            ti.init(arch=ti.gpu, default_fp=default_fp)
            from taichi.lang import impl
            got = impl.current_cfg().arch
            if got in (ti.vulkan, ti.metal, ti.opengl) and default_fp == ti.f64 and f64_math:
                print(f"{got.name}: no f64 transcendental functions there, running in f32")
                ti.init(arch=got, default_fp=ti.f32)
                return
            if got not in (ti.x64, ti.arm64):
                return
        except Exception:  # noqa: BLE001 — any failure means: no usable GPU
            pass
        print("no GPU found: running on the CPU instead")
    ti.init(arch=ti.cpu, default_fp=default_fp)


def progress(iterable, verbose=True, desc=""):
    if not verbose:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, leave=False)
