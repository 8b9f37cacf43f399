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
from .tape import FwdMode as FwdMode
from .tape import Tape as Tape
from .testing import check_grad as check_grad

__version__ = "0.1.0"
