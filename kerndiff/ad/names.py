"""Every generated name is decided here: x_dual, x_adj, x_dual2, t3 ..."""
from __future__ import annotations

SUFFIX = {"dual": "dual", "adjoint": "adj"}


def derivative_name(base: str, kind: str, level: int) -> str:
    s = SUFFIX[kind]
    return f"{base}_{s}" if level == 1 else f"{base}_{s}{level}"


def tangent_var(name: str, level: int) -> str:
    return derivative_name(name, "dual", level)


def adjoint_var(name: str, level: int) -> str:
    return derivative_name(name, "adjoint", level)


class NameAllocator:
    """Hands out fresh local names: the base itself if free, else base_1, base_2, ..."""

    def __init__(self, taken=()):
        self.taken = set(taken)

    def fresh(self, base: str) -> str:
        base = base or "t"
        if base not in self.taken:
            self.taken.add(base)
            return base
        k = 1
        while f"{base}_{k}" in self.taken:
            k += 1
        name = f"{base}_{k}"
        self.taken.add(name)
        return name
