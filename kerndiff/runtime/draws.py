"""The seeds of the random numbers kd.kernels draw (ti.random, ti.randn; codegen/draws.py).

A kernel that draws takes its launch's seed as a u32 parameter (KernelIR.seed). A launch that runs
the program, the primal's or a forward kernel's (k, k.forward, k.forward.forward), takes a new
seed, as Taichi's kernels draw new numbers at every launch; a kernel with a reverse step in its
path (k.reverse, k.reverse.forward, k.forward.reverse) takes the seed of the latest such launch in
its family, as it reads that launch's results from the fields, and so draws the very numbers that
launch drew. kd.Tape and ti.ad.Tape keep each launch's seed for its reverse (runtime.kernel's
`launch(..., seed=)`).

New seeds come from a generator seeded by Taichi's `ti.init(random_seed=...)` (0 by default) when
the first is needed after ti.init, so a program draws the same numbers each time it runs, on every
arch. kd.check_grad fixes them (`fixed_seeds`): its finite differences run the program again,
which must draw what it drew the first time.
"""
from __future__ import annotations

import contextlib

import numpy as np

_state = {"runtime": None, "rng": None, "fixed": None}


def _generator():
    from taichi.lang import impl
    runtime = impl.get_runtime().prog
    if _state["runtime"] is not runtime:
        _state["runtime"] = runtime
        _state["rng"] = np.random.default_rng(int(impl.current_cfg().random_seed))
    return _state["rng"]


def new_seed() -> int:
    """The seed for a launch that draws new numbers: the next of the generator's, or, inside
    fixed_seeds, the next of its sequence (which each of its runs starts again)."""
    fixed = _state["fixed"]
    if fixed is not None:
        fixed.count += 0 if fixed.constant else 1
        return (fixed.base + 0x9E3779B9 * fixed.count) & 0xFFFFFFFF
    return int(_generator().integers(0, 2 ** 32))


@contextlib.contextmanager
def seed_draws(seed):
    """`with kd.seed_draws(seed):` the launches inside take their seeds from a generator seeded by
    `seed` instead of the program's (which ti.init seeded): code run in two such blocks with the
    same seed draws the same numbers (common random numbers: the gradient of one sample at two
    parameter values, or of one noisy simulation in two settings; JAX's explicit keys do this).
    Afterwards the program's generator goes on where it was, as if the block had drawn nothing.
    Inside kd.check_grad, whose seeds are fixed, the block changes nothing."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        from ..errors import KernDiffError
        raise KernDiffError(f"kd.seed_draws takes a non-negative integer seed, not {seed!r}",
                            remedy="pass an int, e.g. kd.seed_draws(7)")
    outer = _generator()
    runtime = _state["runtime"]
    _state["rng"] = np.random.default_rng(int(seed))
    try:
        yield
    finally:
        if _state["runtime"] is runtime:  # (a ti.init inside started a generator of its own)
            _state["rng"] = outer


class _Fixed:
    def __init__(self, base, constant):
        self.base, self.count, self.constant = base, 0, constant
        self.kept = {}  # id(root kernel) -> (root, its draw_seed before), put back on leaving

    def restart(self):
        """The next run launches the same kernels in the same order, and draws what this one did."""
        self.count = 0


@contextlib.contextmanager
def fixed_seeds(constant=False):
    """Inside, the n-th new seed after each restart() is the same (kd.check_grad of a program:
    every run of it, the finite differences' too, draws the same numbers); constant: every new
    seed is the same (kd.check_grad of one kernel, whose runs each launch it once)."""
    outer = _state["fixed"]
    fixed = _Fixed(new_seed(), constant)
    _state["fixed"] = fixed
    try:
        yield fixed
    finally:
        _state["fixed"] = outer
        for root, seed in fixed.kept.values():  # a reverse launched afterwards belongs to the launch before
            root.draw_seed = seed


def note_seed(root, seed):
    """A launch of root's family took `seed`: it is the root's draw_seed from now on (inside
    fixed_seeds, only until it ends)."""
    fixed = _state["fixed"]
    if fixed is not None and id(root) not in fixed.kept:
        fixed.kept[id(root)] = (root, root.draw_seed)
    root.draw_seed = seed


def restart_fixed():
    """Inside fixed_seeds: a run of the program starts, which draws what the first run drew."""
    if _state["fixed"] is not None:
        _state["fixed"].restart()
