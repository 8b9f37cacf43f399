"""The helper function generated kernels call to claim a private copy (see opt.scatter).

(No `from __future__ import annotations` here: Taichi reads ti.template() annotations as objects.)
"""

import taichi as ti


@ti.func
def claim_slot(busy: ti.template()) -> ti.i32:
    """Index of a free private copy, marked busy. Atomic test-and-set on each flag in turn, so two
    chunks never hold the same copy; spins only if more chunks run at once than there are copies
    (more threads than Taichi's cpu_max_num_threads, which Taichi does not start)."""
    slot = -1
    while slot < 0:
        for k in range(busy.shape[0]):
            if slot < 0:
                if ti.atomic_or(busy[k], 1) == 0:
                    slot = k
    return slot
