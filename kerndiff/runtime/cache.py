"""Caches that live as long as one Taichi runtime (cleared by the registry on ti.init/ti.reset)."""
from __future__ import annotations


class Cache(dict):
    """key -> value; keys are tuples that start with the owner's id and a purpose."""


CACHE = Cache()
