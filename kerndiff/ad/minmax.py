"""Derivatives of atomic max/min reductions (ti.atomic_max / ti.atomic_min)."""
from __future__ import annotations

from ..errors import KernDiffError


def forward_atomic_minmax(fwd, s, dual_ref):
    raise KernDiffError(f"differentiating ti.atomic_{s.op} is not supported yet", s.src,
                        "compute the reduction in a separate kernel that is not differentiated")


def reverse_atomic_minmax(rev, s, adj_ref):
    raise KernDiffError(f"differentiating ti.atomic_{s.op} is not supported yet", s.src,
                        "compute the reduction in a separate kernel that is not differentiated")
