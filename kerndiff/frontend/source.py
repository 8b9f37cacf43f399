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
