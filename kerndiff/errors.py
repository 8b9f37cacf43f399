"""The one exception kerndiff raises for programs it cannot differentiate correctly.

Every message has the same shape so users learn to read it once: where (file:line), the source
line with a caret under the offending columns, why kerndiff refuses, and what to do instead.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SrcLoc:
    """A position in the user's source: file, 1-based line, 0-based columns, and the line text."""

    file: str
    line: int
    col: int = 0
    end_col: int | None = None
    text: str = ""

    def caret(self) -> str:
        stripped = self.text.rstrip("\n")
        width = max(1, (self.end_col if self.end_col is not None else len(stripped)) - self.col)
        return f"    {stripped}\n    {' ' * self.col}{'^' * width}"


class KernDiffError(Exception):
    """kerndiff cannot (correctly) compile or differentiate this construct."""

    def __init__(self, reason: str, loc: SrcLoc | None = None, remedy: str | None = None):
        self.reason = reason
        self.loc = loc
        self.remedy = remedy
        parts = []
        if loc is not None:
            parts.append(f'File "{loc.file}", line {loc.line}:')
            if loc.text:
                parts.append(loc.caret())
        parts.append(f"Reason: {reason}")
        if remedy:
            parts.append(f"Remedy: {remedy}")
        super().__init__("\n".join(parts))
