"""kerndiff: differentiate Taichi kernels to any order (forward, reverse, and compositions)."""
from .errors import KernDiffError as KernDiffError
from .runtime.kernel import kernel as kernel
