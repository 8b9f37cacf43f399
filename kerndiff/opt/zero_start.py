"""Accumulators that start at zero start at their first contribution instead.

Reverse mode zeroes each adjoint where its primal is defined and then accumulates into it:

    d_0_adj = 0.0
    ...                                    # nothing reads or writes d_0_adj here
    d_0_adj = d_0_adj - t1 * t6

Where, in one block, the next statement that mentions the local is such an accumulation (or a
plain overwrite), the zero is folded in: `d_0_adj = -(t1 * t6)`, and the `= 0.0` goes. Any other
value overwritten, in the same block, before anything reads it goes too. An accumulation in a
branch or loop after the zero start, with nothing assigning the local in between (nor, for a loop,
anywhere in its body), starts at its contribution as well; the zero start then stays for the
other paths, and goes where dead-store elimination finds none reads it. This is for the reader
(Taichi's compiler removes dead stores anyway), so the rule is deliberately narrow: an
accumulation written `x = x + e`, `x = e + x` or `x = x - e` with `e` not reading x and of x's
dtype (x keeps the type Taichi gave it at its first assignment). 0 + e is e exactly, except that
-0.0 becomes +0.0, which no derivative can tell apart.
"""
from __future__ import annotations

import dataclasses

from ..ir import build as B
from ..ir import nodes as N
from ..ir.types import is_float
from ..ir.walk import assigned_names, blocks_of, mentioned_names, rebuild_stmt, vars_in


def fold_zero_starts(body):
    return tuple(_block(body))


def _block(stmts, zero=None):
    """zero: {local: dtype} of the locals known to hold a zero start where the block begins."""
    stmts = _start_known_zeros(stmts, dict(zero or {}))
    dropped = set()
    named = [mentioned_names(s) for s in stmts]  # a rewrite below keeps each statement's names
    for i, s in enumerate(stmts):
        if not isinstance(s, N.Assign):
            continue
        for j in range(i + 1, len(stmts)):
            if s.name in named[j]:
                if _is_zero_start(s):
                    first = _started(stmts[j], s.name, s.value.dtype)
                else:  # a value overwritten before anything reads it
                    first = stmts[j] if _overwrites(stmts[j], s.name, s.value.dtype) else None
                if first is not None:
                    stmts[j] = first
                    dropped.add(i)
                break
    return [s for k, s in enumerate(stmts) if k not in dropped]


def _start_known_zeros(stmts, zero):
    """Accumulations into a local that still holds its zero start, in this block or in the
    branches and loops after it, start at their contribution; the zero start itself stays (other
    paths may read it) unless the rule of the block drops it, or dead-store elimination does."""
    out = []
    for s in stmts:
        if isinstance(s, N.If):
            s = rebuild_stmt(s, [tuple(_block(b, zero)) for b in blocks_of(s)])
        elif isinstance(s, (N.For, N.While)):  # a later iteration sees what the body assigned
            inside = assigned_names(s.body) | set(getattr(s, "vars", ()))
            s = rebuild_stmt(s, [tuple(_block(s.body, {k: t for k, t in zero.items() if k not in inside}))])
        elif isinstance(s, N.Assign) and s.name in zero:
            s = _started(s, s.name, zero[s.name]) or s
        for name in assigned_names((s,)):
            zero.pop(name, None)
        if _is_zero_start(s):
            zero[s.name] = s.value.dtype
        out.append(s)
    return out


def _is_zero_start(s):
    return isinstance(s, N.Assign) and isinstance(s.value, N.Const) and is_float(s.value.dtype) \
        and s.value.value == 0


def _reads(e, name):
    return any(v.name == name for v in vars_in(e))


def _overwrites(s, name, dtype):
    return isinstance(s, N.Assign) and s.name == name and not _reads(s.value, name) and s.value.dtype == dtype


def _started(s, name, dtype):
    """s with the zero folded in, if s is an accumulation into (or overwrite of) `name`, else None."""
    if _overwrites(s, name, dtype):
        return s
    if not (isinstance(s, N.Assign) and s.name == name):
        return None
    value = s.value
    if not (isinstance(value, N.Call) and value.op in ("add", "sub") and len(value.args) == 2):
        return None
    a, b = value.args
    if isinstance(a, N.Var) and a.name == name:
        rest, start = b, (lambda e: e) if value.op == "add" else B.neg
    elif value.op == "add" and isinstance(b, N.Var) and b.name == name:
        rest, start = a, (lambda e: e)
    else:
        return None
    if _reads(rest, name) or rest.dtype != dtype:
        return None
    return dataclasses.replace(s, value=start(rest))
