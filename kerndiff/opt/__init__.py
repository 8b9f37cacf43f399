"""Simplification after every transform: folding (in the smart constructors), constant and copy
propagation (also of the values an `if j == 0:` fixes, opt.branch_facts), dead-code elimination
(by marking, then flow-sensitive dead stores) and CSE, iterated until the IR (not its text) stops
changing."""
from __future__ import annotations

import dataclasses

from .branch_facts import use_branch_facts
from .cse import cse
from .dce import dce
from .liveness import remove_dead_stores
from .propagate import propagate

MAX_ROUNDS = 6


def optimize(ir):
    for _ in range(MAX_ROUNDS):
        before = ir
        ir = propagate(ir)
        ir = dataclasses.replace(ir, body=dce(use_branch_facts(ir.body)))
        ir = remove_dead_stores(ir)
        if ir == before:
            break
    return cse(ir)
