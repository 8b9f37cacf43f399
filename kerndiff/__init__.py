"""kerndiff: differentiate Taichi kernels to any order (forward, reverse, and their compositions).

Only the names of the public API (API.md) are exported here.
"""
from .api import adjoint as adjoint
from .api import backward as backward
from .api import dual as dual
from .api import forward as forward
from .api import func as func
from .api import grad as grad
from .api import hvp as hvp
from .api import jvp as jvp
from .api import kernel as kernel
from .api import reverse as reverse
from .api import vjp as vjp
from .errors import KernDiffError as KernDiffError
from .runtime.draws import seed_draws as seed_draws
from .tape import FwdMode as FwdMode
from .tape import Tape as Tape
from .testing import check_grad as check_grad

__version__ = "0.1.0"


def _load_pipeline():
    """Import every stage of the pipeline and build the frontend's builtin table now, at `import
    kerndiff`: the stages import each other lazily (to keep the import graph acyclic), which
    would otherwise land ~10-50 ms of one-time module loading on the first kernel call."""
    import importlib

    for stage in ("frontend.lower", "frontend.calls", "frontend.loops", "ad.forward", "ad.reverse",
                  "ad.owned", "ad.minmax", "ad.hazards", "opt", "opt.finalize", "opt.scatter",
                  "opt.reciprocal", "opt.algebra", "opt.zero_start", "opt.copies", "codegen.load",
                  "codegen.backend", "codegen.scopes", "codegen.slots", "codegen.emit", "pipeline"):
        importlib.import_module(f"{__name__}.{stage}")
    from .frontend import builtins
    builtins.lookup(abs)


_load_pipeline()
