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

    @classmethod
    def for_kernel(cls, ir):
        """An allocator for new locals of kernel `ir`, clear of its locals and parameters and of
        the names its fields have in generated source: a user's field `k` keeps its name beside
        a loop of kerndiff's over `k_1` (codegen renames a field that a local shadows)."""
        from ..codegen.load import field_names
        from ..ir.walk import assigned_names, used_names

        taken = assigned_names(ir.body) | used_names(ir.body) | {p.name for p in ir.params}
        return cls(taken | set(field_names(ir, set()).values()))

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
