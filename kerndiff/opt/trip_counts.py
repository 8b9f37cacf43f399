"""How many times loops and statements run, for cost models (opt.scatter's choice of private copies).

Each estimate is a number where the loops' bounds are constants, and an IR expression of the names
known at launch (kernel arguments, locals assigned before the loop) where they read those: the
caller then computes the same estimate in the kernel, before the loop, and decides there. An inner
loop whose bounds read outer loop variables counts the difference of its bounds' midpoints over the
outer loops' ranges (`range(i + 1, n)`: n / 2); one whose bounds read anything else (a field's
value) counts once.
"""
from __future__ import annotations

from ..ir import build as B
from ..ir import nodes as N
from ..ir.types import default_fp
from ..ir.walk import blocks_of


def trip_count(loop):
    """The loop's iteration count when its bounds are constants, else None."""
    n = 1
    for lo, hi in loop.bounds:
        if not (isinstance(lo, N.Const) and isinstance(hi, N.Const)):
            return None
        n *= max(0, int(hi.value) - int(lo.value))
    return n


def interval(e, ranges, launch=frozenset()):
    """(least, greatest) value of an integer expression: from ranges (loop variable -> its
    interval) and launch (names whose values are known before the loop runs: the kernel's scalar
    arguments and what it assigns before the loop). Numbers where e reads constants and loop
    variables of constant ranges alone, else expressions of the launch names; None where e reads
    anything else."""
    if isinstance(e, N.Const):
        return (int(e.value), int(e.value)) if isinstance(e.value, (int, float)) else None
    if isinstance(e, N.Var):
        return ranges.get(e.name, (e, e) if e.name in launch else None)
    if not (isinstance(e, N.Call) and e.op in ("add", "sub", "mul", "neg")):
        return None
    args = [interval(a, ranges, launch) for a in e.args]
    if None in args:
        return None
    if e.op == "neg":
        (lo, hi), = args
        return apply_op("neg", hi), apply_op("neg", lo)
    (a, b), (c, d) = args
    if e.op == "add":
        return apply_op("add", a, c), apply_op("add", b, d)
    if e.op == "sub":
        return apply_op("sub", a, d), apply_op("sub", b, c)
    products = [apply_op("mul", x, y) for x, y in ((a, c), (a, d), (b, c), (b, d))]
    return fold("min", products), fold("max", products)


# Each step below works on numbers, or on expressions where an argument is one.
ARITH = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
         "neg": lambda a: -a, "min": min, "max": max}


def apply_op(op, *args):
    """op on numbers, or the expression of it where an argument is one."""
    if all(isinstance(a, (int, float)) for a in args):
        return ARITH[op](*args)
    return B.call(op, *(as_expr(a) for a in args))


def as_expr(x):
    """A number of the estimates as a constant: integers as i32 (the index arithmetic of
    intervals), the rest in the kernel's default float (as counts are computed at launch, where
    products of arguments would overflow integers)."""
    if isinstance(x, N.Expr):
        return x
    return B.const(x, "i32" if isinstance(x, int) else default_fp())


def fold(op, values):
    out = values[0]
    for v in values[1:]:
        out = apply_op(op, out, v)
    return out


def as_count(x):
    """x as a count: numbers as they are, an (integer) expression cast to the default float."""
    return x if isinstance(x, (int, float)) else B.cast(x, default_fp())


def _midpoint(bounds):
    lo, hi = bounds
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
        return (lo + hi) / 2
    if lo == hi:
        return as_count(lo)
    return apply_op("mul", as_count(apply_op("add", lo, hi)), 0.5)


def estimated_trips(loop, ranges, launch=frozenset()):
    """A loop's iterations (a number where its bounds are constants, else a float expression): its
    trip count where its bounds are fixed, else the difference of its bounds' midpoints over the
    ranges of the loop variables they read (`range(i + 1, n)` and its reverse `range(n - (i + 1))`:
    half the pairs, n / 2); 1 where a bound reads anything else."""
    n = 1
    for lo, hi in loop.bounds:
        a, b = interval(lo, ranges, launch), interval(hi, ranges, launch)
        if a is None or b is None:
            continue
        d = apply_op("sub", _midpoint(b), _midpoint(a))
        if isinstance(d, (int, float)):
            d = max(0, round(d))
        elif a[0] != a[1] or b[0] != b[1]:
            d = apply_op("max", d, 0.0)
        n = apply_op("mul", n, d)
    return n


def with_ranges(loop, ranges, launch=frozenset()):
    """ranges with the loop's variables added (least and greatest value each takes)."""
    out = dict(ranges)
    for v, (lo, hi) in zip(loop.vars, loop.bounds):
        a, b = interval(lo, ranges, launch), interval(hi, ranges, launch)
        if a is not None and b is not None:
            out[v] = (a[0], apply_op("sub", b[1], 1))
        else:
            out.pop(v, None)
    return out


def inner_trips(body, ranges, launch=frozenset()):
    """Iterations of the deepest nest of loops in body, per run of body."""
    most = None
    for s in body:
        inner, inside = 1, ranges
        if isinstance(s, N.For):
            inner, inside = estimated_trips(s, ranges, launch), with_ranges(s, ranges, launch)
        for b in blocks_of(s):
            here = apply_op("mul", inner, inner_trips(b, inside, launch))
            most = here if most is None else apply_op("max", most, here)
    return 1 if most is None else most


def work(loop, launch=frozenset(), trips=None):
    """The loop's iterations with those of its inner loops (trips: its own, where the caller holds
    them in a local)."""
    trips = estimated_trips(loop, {}, launch) if trips is None else trips
    return apply_op("mul", trips, inner_trips(loop.body, with_ranges(loop, {}, launch), launch))


def atomic_weights(body, ranges, launch=frozenset(), weight=1):
    """(Atomic stmt, times it runs per iteration of the enclosing loop), through inner loops (their
    iterations estimated by estimated_trips; ranges: the enclosing loops' variables)."""
    for s in body:
        if isinstance(s, N.Atomic):
            yield s, weight
        inner, inside = weight, ranges
        if isinstance(s, N.For):
            inner = apply_op("mul", weight, estimated_trips(s, ranges, launch))
            inside = with_ranges(s, ranges, launch)
        for b in blocks_of(s):
            yield from atomic_weights(b, inside, launch, inner)
