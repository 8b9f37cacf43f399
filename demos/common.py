"""Shared by the demos: Taichi start-up with a GPU fallback, and a progress bar."""
import taichi as ti


def init(arch="cpu", default_fp=ti.f64):
    """ti.init on the GPU when asked and available, else on the CPU (with a one-line notice)."""
    if arch == "gpu":
        try:
            ti.init(arch=ti.gpu, default_fp=default_fp)
            from taichi.lang import impl
            if impl.current_cfg().arch != ti.x64 and impl.current_cfg().arch != ti.arm64:
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
