"""Every generated name is decided here: x_dual, x_adj, x_dual2, t3 ..."""
from __future__ import annotations

import re

SUFFIX = {"dual": "dual", "adjoint": "adj"}


def derivative_name(base: str, kind: str, level: int) -> str:
    s = SUFFIX[kind]
    return f"{base}_{s}" if level == 1 else f"{base}_{s}{level}"


def tangent_var(name: str, level: int) -> str:
    return derivative_name(name, "dual", level)


def adjoint_var(name: str, level: int) -> str:
    return derivative_name(name, "adjoint", level)


_TANGENT_SUFFIX = re.compile(r"dual(\d*)")


_SCALE_WORDS = {2.0: "twice", 4.0: "four_times", 8.0: "eight_times", 0.5: "half", 0.25: "quarter",
                0.125: "eighth"}
_SCALED = re.compile(r"(minus_)?((%s|scaled)_)?" % "|".join(_SCALE_WORDS.values()))


def scaled_name(name: str, k: float) -> str:
    """The name of a local holding k times what `name` says (opt.scales): twice_r2_adj,
    half_r2_dual, minus_twice_t1_dual2 (scaled_x_adj where k is no power of two it has a word for)."""
    words = ["minus"] if k < 0 else []
    if abs(k) != 1.0:
        words.append(_SCALE_WORDS.get(abs(k), "scaled"))
    return "_".join(words + [name])


def unscaled_name(name: str) -> str:
    """The inverse of scaled_name: minus_twice_t1_dual2 -> t1_dual2."""
    scale = _SCALED.match(name).end()
    return name[scale:] if scale < len(name) else name


def tangent_levels(name: str):
    """The inverse of tangent_var, applied as often as it was: (the name the tangents were
    taken of, their levels, innermost first): s_dual_dual2 -> ("s", (1, 2)); d_0 -> ("d_0", ()).
    A scaled_name is read as the name it scales: minus_twice_t1_dual2 -> ("t1", (2,))."""
    parts = unscaled_name(name).split("_")
    levels = []
    while len(parts) > 1 and _TANGENT_SUFFIX.fullmatch(parts[-1]):
        levels.append(int(_TANGENT_SUFFIX.fullmatch(parts.pop()).group(1) or 1))
    return "_".join(parts), tuple(reversed(levels))


class NameAllocator:
    """Hands out fresh local names: the base itself if free, else base_1, base_2, ..."""

    @classmethod
    def for_kernel(cls, ir, reserved=()):
        """An allocator for new locals of kernel `ir`, clear of its locals, its parameters and
        the reserved names. opt.finalize, which adds kerndiff's own helper locals, reserves the
        names the kernel's fields will have in generated source: a user's field `k` then keeps
        its name beside the private copies' loop over `k_1` (codegen renames a field that a local
        shadows)."""
        from ..ir.walk import assigned_names, used_names

        return cls(assigned_names(ir.body) | used_names(ir.body) | {p.name for p in ir.params} | set(reserved))

    def __init__(self, taken=()):
        self.taken = set(taken)
        self.draws = 0  # the ti.random calls of the kernel lowered so far (ir.ops.RANDOM numbers them)
        self.seed = ""  # the name of the kernel's draw-seed parameter, once a draw needs it

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
