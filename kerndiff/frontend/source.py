"""Getting a function's source and AST, and pointing back into it (SrcLoc) for errors."""
from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass

from ..errors import KernDiffError, SrcLoc


@dataclass(frozen=True)
class Source:
    """A parsed function: its AST plus what is needed to map AST positions to file lines."""

    fn: object
    tree: ast.FunctionDef
    file: str
    first_line: int
    lines: tuple
    indent: int

    def loc(self, node) -> SrcLoc | None:
        lineno = getattr(node, "lineno", None)
        if lineno is None:
            return None
        text = self.lines[lineno - 1] if 0 < lineno <= len(self.lines) else ""
        end = getattr(node, "end_col_offset", None)
        if getattr(node, "end_lineno", lineno) != lineno:
            end = None
        return SrcLoc(self.file, self.first_line + lineno - 1, node.col_offset + self.indent,
                      None if end is None else end + self.indent, text)

    def error(self, node, reason, remedy=None):
        return KernDiffError(reason, self.loc(node), remedy)


_CACHE = {}


def assigned_names(tree, sums=True):
    """Names the code assigns, whole (`v = ...`, `v += ...`) or in part (`v[0] = ...`,
    `v.x += ...`). sums=False leaves out the targets of `+=` and `-=` (which a parallel loop
    reduces atomically into a local bound before it)."""
    skip = set() if sums else {id(n.target) for n in ast.walk(tree)
                               if isinstance(n, ast.AugAssign) and isinstance(n.op, (ast.Add, ast.Sub))}
    out = set()
    for n in ast.walk(tree):
        if id(n) in skip:
            continue
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.add(n.id)
        elif isinstance(n, (ast.Subscript, ast.Attribute)) and isinstance(n.ctx, ast.Store):
            base = n.value
            while isinstance(base, (ast.Subscript, ast.Attribute)):
                base = base.value
            if isinstance(base, ast.Name):
                out.add(base.id)
    return out


def parse_function(fn) -> Source:
    got = _CACHE.get(fn)
    if got is not None:
        return got
    try:
        lines, first = inspect.getsourcelines(fn)
        file = inspect.getsourcefile(fn) or "<unknown>"
    except (OSError, TypeError) as e:
        raise KernDiffError(f"cannot read the source of {getattr(fn, '__name__', fn)!r}: {e}",
                            remedy="define kernels and functions in a file (not in an interactive session)")
    raw = "".join(lines)
    dedented = textwrap.dedent(raw)
    indent = len(lines[0]) - len(lines[0].lstrip()) if lines else 0
    mod = ast.parse(dedented)
    tree = mod.body[0]
    if not isinstance(tree, ast.FunctionDef):
        raise KernDiffError(f"{fn!r} is not a plain function definition", remedy="decorate a `def` function")
    src = Source(fn, tree, file, first, tuple(raw.splitlines(True)), indent)
    _CACHE[fn] = src
    return src
