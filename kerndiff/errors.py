"""The one exception kerndiff raises for programs it cannot differentiate correctly.

Every message has the same shape so users learn to read it once: where (file:line), the source
line with a caret under the offending columns, why kerndiff refuses, and what to do instead.
An error raised without a place in a kernel's source (a host-side call given the wrong fields,
a nested kd.Tape) names the user's line that called into kerndiff: the innermost frame outside
kerndiff and Taichi.
"""
from __future__ import annotations

import linecache
import os
import sys
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
        loc = loc if loc is not None else user_site()
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


def user_site() -> SrcLoc | None:
    """The line of the user's code that called into kerndiff (or Taichi, which calls back into
    kerndiff when a kernel launches): the innermost frame outside both packages; None if every
    frame is inside them."""
    packages = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                     for m in (sys.modules[__package__], sys.modules.get("taichi")) if m is not None)
    frame = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(packages):
        frame = frame.f_back
    if frame is None:
        return None
    text = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    indent = len(text) - len(text.lstrip())
    return SrcLoc(frame.f_code.co_filename, frame.f_lineno, indent, len(text.rstrip()), text)
