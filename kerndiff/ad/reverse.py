"""Reverse mode: IR -> IR that accumulates adjoints of inputs from adjoints of outputs.

The code is first put in SSA form (ssa.py). A block then reverses as
    zero the adjoints of the locals it defines
    recompute its primal statements (no stores, no atomics)
    sweep backward over its statements, applying the rule table's partials.
An `if` reverses branch by branch under the same condition. A serial loop reverses by running its
trip range backward; each backward iteration recomputes its body's primal values. Loop-carried
values the backward sweep needs are restored by recomputation: a short loop from its entry; a
long one from two levels of 16 checkpoints kept in locals (segments, then the sub-segments of the
segment being reversed), so the whole sweep costs a few forward passes plus trips²/512 body steps
instead of trips²/2, or, in a kernel that no reverse transform takes as input, on the CPU, from
helper fields with a row per parallel iteration (checkpoint_rows: every step's values where they
fit, one forward pass; else segments, two). The run that stores the checkpoints also stands in for the loop's plain forward run
where the statements after it need its values; loops whose carried values are only accumulated
need nothing. A
parallel (outermost) loop keeps its header and reverses its body per iteration. Adjoints of
outer locals that parallel iterations contribute to go through a 0-d scratch field atomically.
"""
from __future__ import annotations

import dataclasses
import math

from ..errors import KernDiffError
from ..ir import build as B
from ..ir import nodes as N
from ..ir.ops import RANDOM
from ..ir.types import bits, is_float
from ..ir.walk import assigned_names, independent, iter_expr, iter_stmts, map_expr, map_stmt_exprs, map_stmts, \
    substitute, substitute_block
from ..opt.dce import live_names, remove_dead
from .activity import check_function_body, field_activity, varied_vars
from .jumps import eliminate_jumps
from .names import adjoint_var
from .piecewise_zeros import PIECEWISE, is_steep, steep_inputs
from .rules import NO_DERIVATIVE, count_derivative, guards_a_singularity, partials, zero_safe_vjp
from .ssa import to_ssa
from .zero_adjoints import guarded_locals


# Checkpoints kept per long serial loop whose carried values the backward sweep needs.
CHECKPOINTS = 16
# Memory for checkpoints in helper fields (Reverse.checkpoint_rows), per reverse kernel (a
# forward transform of it adds their duals): every step's values where they fit (W6: 8192
# pendulums x 1000 steps x the angle, 33 MB), else sqrt(trips) segments.
CHECKPOINT_FIELD_BYTES = 64 << 20


class Reverse:
    def __init__(self, names, adj_of_field, varied, loops, scratch, rows=None, level=1):
        self.names = names
        self.level = level          # of the adjoints: locals' are named as fields' (t_adj, t_adj2)
        self.adj_of_field = adj_of_field
        self.varied = varied
        self.loops = loops          # id(loop) -> LoopInfo from SSA
        self.scratch = scratch      # (var name, dtype) -> 0-d FieldRef
        self.rows = rows            # CheckpointFields for checkpoint_rows, or None (locals only)
        self.adj = {}
        self.dtypes = {}
        self.outer_stack = []       # per enclosing parallel loop: the loop, {adj name: scratch ref}
        self.counters = {}          # id(while loop) -> local holding its recorded trip count
        self.recomputed = {}        # id(serial for loop) -> its latest copy made by recompute()
        self.checkpoint_runs = {}   # id(serial for loop) -> (its checkpoint run, its backward loop)

    # ------------------------------------------------------------ names
    def adj_name(self, v):
        a = self.adj.get(v)
        if a is None:
            a = self.names.fresh(adjoint_var(v, self.level))
            self.adj[v] = a
        return a

    def adj_var(self, v, dtype):
        self.dtypes[v] = dtype
        return B.var(self.adj_name(v), dtype)

    # ------------------------------------------------------------ expressions
    def is_varied(self, e):
        if not is_float(e.dtype):
            return False
        for x in iter_expr(e):
            if isinstance(x, N.Var) and x.name in self.varied:
                return True
            if isinstance(x, N.Load) and self.adj_of_field(x.ref) is not None:
                return True
        return False

    def vjp(self, e, g, acc, unbounded=False):
        """Add g·∂e/∂leaf to acc[leaf] for every varied leaf of e (acc: key -> [Expr, ...]).
        unbounded: g may be infinite (e is inside a steep op's argument, or the value of a local
        that reaches one): a piecewise op's zero partial then multiplies it with
        mul_or_zero (piecewise_zeros.py)."""
        if not self.is_varied(e):
            return
        if isinstance(e, N.Var):
            acc.setdefault(("var", e.name, e.dtype), []).append(g)
        elif isinstance(e, N.Load):
            acc.setdefault(("field", e.ref, e.index), []).append(g)
        elif isinstance(e, N.Call):
            if e.op in NO_DERIVATIVE:
                return
            if e.op == "cast":
                self.vjp(e.args[0], B.cast(g, e.args[0].dtype), acc, unbounded)
                return
            if e.op == "mul_or_zero":
                for a, ct in zip(e.args, zero_safe_vjp(*e.args, g)):
                    self.vjp(a, ct, acc, unbounded)
                return
            if guards_a_singularity(e):
                self.guarded_vjp(e, g, acc, unbounded)
                return
            ps = partials(e.op, e.args, e)
            zero_safe = unbounded and e.op in PIECEWISE
            unbounded = unbounded or is_steep(e)
            for a, p in zip(e.args, ps):
                if p is not None and self.is_varied(a):
                    self.vjp(a, B.call("mul_or_zero", p, g) if zero_safe else B.mul(p, g), acc, unbounded)

    def guarded_vjp(self, e, g, acc, unbounded=False):
        """vjp of a select guarding a singularity (rules.SINGULAR): each branch's contributions
        taken under the condition, select(c, contribution, 0), not multiplied by select(c, 1, 0)
        on the way in, which at the guard multiplied zero by the branch's infinite partials."""
        c, a, b = e.args
        for branch, taken in ((a, True), (b, False)):
            if self.is_varied(branch):
                sub = {}
                self.vjp(branch, g, sub, unbounded)
                for key, terms in sub.items():
                    acc.setdefault(key, []).extend(
                        B.select(c, t, B.const(0, t.dtype)) if taken else B.select(c, B.const(0, t.dtype), t)
                        for t in terms)

    def accumulate(self, acc, src):
        out = []
        for key, terms in acc.items():
            if key[0] == "var":
                _, name, dtype = key
                total = B.sum_of(terms, dtype)
                scratch = self.outer_scratch(name, dtype)
                if scratch is not None:
                    out.append(N.Atomic("add", scratch, (), total, src=src, tag="adjoint"))
                else:
                    a = self.adj_var(name, dtype)
                    out.append(N.Assign(a.name, B.add(a, total), src=src, tag="adjoint"))
            else:
                _, ref, index = key
                aref = self.adj_of_field(ref)
                out.append(N.Atomic("add", aref, index, B.sum_of(terms, aref.dtype), src=src, tag="adjoint"))
        return out

    def outer_scratch(self, name, dtype):
        """Inside a parallel loop, a local defined outside it gets its adjoint via a scratch field."""
        if not self.outer_stack:
            return None
        frame = self.outer_stack[-1]
        if name in frame["inner"]:
            return None
        ref = frame["scratch"].get(name)
        if ref is None:
            ref = self.scratch(self.adj_name(name), dtype)
            frame["scratch"][name] = (ref, dtype)
            return ref
        return ref[0]

    # ------------------------------------------------------------ recompute
    def recompute(self, stmts, with_updates=True):
        out = []
        for s in stmts:
            if isinstance(s, N.Assign):
                if with_updates or s.tag != "update":
                    out.append(s)
            elif isinstance(s, N.If):
                then, orelse = self.recompute(s.then), self.recompute(s.orelse)
                if then or orelse:
                    out.append(dataclasses.replace(s, then=then, orelse=orelse, tag="recompute"))
            elif isinstance(s, N.For) and not s.parallel:
                body = self.recompute(s.body)
                if body:
                    out.append(dataclasses.replace(s, body=body, tag="recompute"))
                    self.recomputed[id(s)] = out[-1]
            elif isinstance(s, N.While):
                # Record the trip count: the backward sweep replays exactly that many iterations.
                cnt = self.trip_counter(s)
                one = B.const(1, "i32")
                body = (N.Assign(cnt, B.add(B.var(cnt, "i32"), one), src=s.src),) + self.recompute(s.body)
                out.append(N.Assign(cnt, B.const(0, "i32"), src=s.src, tag="recompute"))
                out.append(dataclasses.replace(s, body=body, tag="recompute"))
        return tuple(out)

    def trip_counter(self, s):
        name = self.counters.get(id(s))
        if name is None:
            name = self.names.fresh("trips")
            self.counters[id(s)] = name
        return name

    counters = None

    # ------------------------------------------------------------ backward sweep
    def zero_inits(self, stmts, exclude=()):
        """Zero the adjoints of varied locals this block defines (not inside nested loops)."""
        out, seen = [], set()

        def walk(block):
            for s in block:
                if isinstance(s, N.Assign) and s.name in self.varied and s.name not in exclude \
                        and s.name not in seen:
                    seen.add(s.name)
                    out.append(N.Assign(self.adj_name(s.name), B.const(0, s.value.dtype), tag="adjoint"))
                    self.dtypes[s.name] = s.value.dtype
                elif isinstance(s, N.If):
                    walk(s.then)
                    walk(s.orelse)
        walk(stmts)
        return out

    def backward(self, stmts):
        out = []
        for run in reversed(independent_runs(stmts)):
            for s in run:
                out.extend(self.back(s))
        return out

    def back(self, s):
        tag = dict(src=s.src, tag="adjoint")
        if isinstance(s, N.Assign):
            if s.name not in self.varied:
                return []
            acc = {}
            adj = self.adj_var(s.name, s.value.dtype)
            if s.name in self.zero_guarded:  # zero_adjoints.py: each leaf's partial, times adj or 0
                self.vjp(s.value, B.const(1, s.value.dtype), acc, s.name in self.steep_inputs)
                acc = {key: [B.call("mul_or_zero", adj, t) for t in terms] for key, terms in acc.items()}
            else:
                self.vjp(s.value, adj, acc, s.name in self.steep_inputs)
            out = self.accumulate(acc, s.src)
            if s.tag == "update" or self.is_carried(s.name):
                out.append(N.Assign(self.adj_name(s.name), B.const(0, s.value.dtype), **tag))
            return out
        if isinstance(s, N.Store):
            aref = self.adj_of_field(s.ref)
            if aref is None:
                return []
            out = []
            if self.is_varied(s.value):
                t = self.names.fresh(f"{s.ref.name}_adj_t")
                out.append(N.Assign(t, B.load(aref, s.index), **tag))
                acc = {}
                self.vjp(s.value, B.var(t, aref.dtype), acc)
                out.append(N.Store(aref, s.index, B.const(0, aref.dtype), **tag))
                out.extend(self.accumulate(acc, s.src))
            else:
                out.append(N.Store(aref, s.index, B.const(0, aref.dtype), **tag))
            return out
        if isinstance(s, N.Atomic):
            aref = self.adj_of_field(s.ref)
            if aref is None or not self.is_varied(s.value):
                return []
            if s.op != "add":
                from .minmax import reverse_atomic_minmax, serial_minmax_error
                if not self.outer_stack:  # the winner count needs the loop's passes (minmax.py)
                    raise serial_minmax_error(s)
                return reverse_atomic_minmax(self, s, aref)
            acc = {}
            self.vjp(s.value, B.load(aref, s.index), acc)
            return self.accumulate(acc, s.src)
        if isinstance(s, N.Return):
            acc = {}
            for v, ct in zip(s.values, self.cotangents):
                self.vjp(v, ct, acc)
            return self.accumulate(acc, s.src)
        if isinstance(s, N.If):
            then, orelse = self.backward(s.then), self.backward(s.orelse)
            if not then and not orelse:
                return []
            return [dataclasses.replace(s, then=tuple(then), orelse=tuple(orelse), tag="adjoint")]
        if isinstance(s, N.For) and s.parallel:
            return self.back_parallel(s)
        if isinstance(s, (N.For, N.While)):
            return self.back_loop(s)
        raise KernDiffError(f"cannot reverse {type(s).__name__}", s.src, "restructure the code")

    zero_guarded = frozenset()  # zero_adjoints.guarded_locals of the body being reversed
    steep_inputs = frozenset()  # piecewise_zeros.steep_inputs of it

    def is_carried(self, name):
        return name in self.carried_names

    carried_names = frozenset()
    every_step = True  # checkpoint_rows may keep every step's values (tests turn it off)

    def back_parallel(self, s):
        from .minmax import minmax_atomics, reverse_loop
        targets = minmax_atomics(s.body, lambda ref: self.adj_of_field(ref) is not None)
        out = self._back_parallel(s)
        return reverse_loop(self, s, targets, out) if targets else out

    def _back_parallel(self, s):
        inner = assigned_names(s.body) | set(s.vars)
        frame = {"inner": inner, "scratch": {}, "loop": s}
        self.outer_stack.append(frame)
        recomputed = list(self.recompute(s.body))
        backward = self.backward(s.body)
        recomputed, backward = self.fuse_checkpoint_runs(s.body, recomputed, backward)
        body = self.zero_inits(s.body) + recomputed + backward
        self.outer_stack.pop()
        if s.serialize:
            # ti.loop_config(serialize=True): trips may depend on earlier ones (y[i] = f(y[i - 1])),
            # so their adjoints run last trip first
            rev = [self.names.fresh(f"{v}_rev") for v in s.vars]
            index = [N.Assign(v, B.sub(B.add(B.sub(hi, B.const(1, "i32")), lo), B.var(r, "i32")), src=s.src)
                     for v, r, (lo, hi) in zip(s.vars, rev, s.bounds)]
            s = dataclasses.replace(s, vars=tuple(rev))
            body = index + body
        before, out = [], [dataclasses.replace(s, body=tuple(body), tag="adjoint")]
        for name, (ref, dtype) in frame["scratch"].items():
            a = self.adj_var(name, dtype)
            if self.outer_stack:
                out.append(N.Atomic("add", self.outer_scratch(name, dtype), (), B.load(ref, ()), tag="adjoint"))
                out.append(N.Store(ref, (), B.const(0, dtype), src=s.src, tag="adjoint"))
            else:
                # cleared before the loop, not after the read: this kernel then destroys no value
                # it read, and a reverse pass over it (k.reverse.reverse) can read the sum back
                before.append(N.Store(ref, (), B.const(0, dtype), src=s.src, tag="adjoint"))
                out.append(N.Assign(a.name, B.add(a, B.load(ref, ())), src=s.src, tag="adjoint"))
        return before + out

    def fuse_checkpoint_runs(self, body, recomputed, backward):
        """A long loop at the top of a parallel body (or of the kernel: a serialized outermost
        loop carrying locals) runs forward twice: once in the recompute sweep, for the statements
        after it, and once more in its backward sweep's prologue, which stores checkpoints on the
        way. Both start from the same entry values and end on the same carried values, so the
        checkpointing run can take the plain run's place (W6: a 1000-step integration, one
        forward pass fewer of the 4.6 its reverse made). Only where nothing outside the loop
        reads a value the body computes that is not carried: the checkpointing run computes
        those under names of its own."""
        from ..ir.walk import used_names
        for t in body:
            got = self.checkpoint_runs.get(id(t))
            copy = self.recomputed.get(id(t))
            if got is None or copy is None:
                continue
            prologue, loop = got
            at = [i for i, x in enumerate(recomputed) if x is copy]
            if len(at) != 1 or not all(any(x is p for x in backward) for p in prologue):
                continue
            carried = {c for c, _, _ in self.loops[id(t)].carried}
            internal = assigned_names(t.body) - carried
            rest = [x for x in recomputed if x is not copy] + \
                [x for x in backward if x is not loop and not any(x is p for p in prologue)]
            if internal & used_names(rest):
                continue
            recomputed = recomputed[:at[0]] + list(prologue) + recomputed[at[0] + 1:]
            backward = [x for x in backward if not any(x is p for p in prologue)]
        return recomputed, backward

    def back_loop(self, s):
        info = self.loops[id(s)]
        carried = [c for c, _, _ in info.carried]
        self.carried_names = self.carried_names | set(carried)
        if isinstance(s, N.For):
            (lo, hi), = s.bounds
            var = s.vars[0]
        else:  # a while loop: replay the recorded trip count
            lo, hi = B.const(0, "i32"), B.var(self.trip_counter(s), "i32")
            var = self.names.fresh("it")
        k = self.names.fresh(f"{var}_rev")
        trips = B.sub(hi, lo)
        index = N.Assign(var, B.sub(B.sub(hi, B.const(1, "i32")), B.var(k, "i32")), src=s.src)
        recompute = list(self.recompute(s.body, with_updates=False))
        backward = self.backward(s.body)
        inits = self.zero_inits(s.body, exclude=set(carried))
        iteration = inits + recompute + backward
        internal = (assigned_names(s.body) - set(carried)) | {self.adj[v] for v in assigned_names(s.body)
                                                             if v in self.adj and v not in carried}
        _, dead = live_names(iteration, candidates=internal)
        iteration = list(remove_dead(iteration, dead))
        from ..ir.walk import used_names
        used = used_names(iteration)
        prologue, fusable = [], False
        closed = steps_of_inductions(s, info)
        if any(c in used for c in carried) and all(c in closed for c in carried if c in used):
            # every carried value the sweep needs counts trips: set from the trip's number
            iteration = self.counted(s, info, {c: closed[c] for c in closed if c in used}, B.var(var, "i32"), lo) \
                + iteration
            used.add(var)
        elif any(c in used for c in carried):
            if isinstance(trips, N.Const):
                rows = self.checkpoint_rows(s, info, var, lo, hi, used, closed) \
                    if self.worth_checkpoints(trips) else None
                if rows is not None:
                    prologue, restore = rows
                    fusable = True
                elif self.worth_checkpoints(trips):
                    prologue, restore = self.checkpoints(s, info, var, lo, hi, closed)
                    fusable = True
                else:
                    restore = self.restore(s, info, var, lo)
            else:  # decided at run time: a short loop is cheaper to recompute from its entry
                prologue, long_restore = self.checkpoints(s, info, var, lo, hi, closed)
                is_long = B.call("gt", trips, B.const(2 * CHECKPOINTS, "i32"))
                tag = dict(src=s.src, tag="checkpoint")
                prologue = [N.If(is_long, tuple(prologue), (), **tag)]
                short_restore = self.own_names(self.restore(s, info, var, lo), info)
                restore = [N.If(is_long, tuple(long_restore), short_restore, **tag)]
            iteration = restore + iteration
            used.add(var)
        # Kill the body's own primal values at the start of each backward iteration: they are
        # recomputed under the same conditions they are read, and saying so lets dead-store
        # elimination drop the forward sweep's copy of a loop whose values only the backward needs.
        kills = []
        for a in iter_stmts(s.body):
            if isinstance(a, N.Assign) and a.name in used and a.name not in carried and a.name != var \
                    and a.name not in {x.name for x in kills}:
                kills.append(N.Assign(a.name, B.const(0, a.value.dtype), src=s.src, tag="recompute"))
        iteration = kills + iteration
        if var in used:
            iteration = [index] + iteration
        loop = N.For((k,), ((B.const(0, "i32"), trips),), tuple(iteration), src=s.src, tag="adjoint")
        if fusable:
            self.checkpoint_runs[id(s)] = (prologue, loop)
        return prologue + [loop]

    @staticmethod
    def counted(s, info, closed, trip, lo):
        """The carried induction variables in `closed` ({name: step}, steps_of_inductions) set
        to their values on entry to trip `trip` of loop s (lo: its first): `k = k0 + d * (t - lo)`,
        which neither checkpoints nor replays need to keep."""
        offset = B.sub(trip, lo)
        return [N.Assign(c, B.add(init, B.mul(closed[c], B.cast(offset, dt))), src=s.src, tag="recompute")
                for c, dt, init in info.carried if c in closed]

    def carried_step(self, s, info, j):
        """The loop body recomputed for iteration `j`, reduced to what updates the carried locals."""
        body = self.recompute(s.body)
        if isinstance(s, N.For):
            body = substitute_block(body, {s.vars[0]: B.var(j, "i32")})
        carried = {c for c, _, _ in info.carried}
        internal = assigned_names(s.body) - carried
        _, dead = live_names(body, candidates=internal)
        return remove_dead(body, dead)

    def restore(self, s, info, var, lo):
        """Set the carried locals to their values on entry to iteration `var` by recomputation
        from the loop's entry (quadratic in the trip count: for short loops)."""
        j = self.names.fresh(f"{var}_re")
        out = [N.Assign(c, init, src=s.src, tag="recompute") for c, _, init in info.carried]
        out.append(N.For((j,), ((lo, B.var(var, "i32")),), self.carried_step(s, info, j), src=s.src, tag="recompute"))
        return out

    def own_names(self, body, info):
        """body with the values it computes (not the carried ones) under fresh names: a second
        copy of a loop body keeps each name assigned once, so the tidy passes can coalesce
        `s_2 = s_1 + e; s_1 = s_2` in each copy."""
        carried = {c for c, _, _ in info.carried}
        values = {t.name for t in iter_stmts(body) if isinstance(t, N.Assign)}
        fresh = {n: self.names.fresh(n) for n in sorted(values - carried)}

        def read(e):
            return map_expr(e, lambda x: B.var(fresh[x.name], x.dtype) if isinstance(x, N.Var) and x.name in fresh
                            else x)

        def rename(t):
            t = map_stmt_exprs(t, read)
            if isinstance(t, N.Assign) and t.name in fresh:
                return dataclasses.replace(t, name=fresh[t.name])
            return t
        return map_stmts(body, rename)

    @staticmethod
    def when(cond, stmts, tag):
        """`if cond: stmts`, or just stmts where cond folded to true (a sub-segment of one step)."""
        return tuple(stmts) if B.is_const(cond, 1) else (N.If(cond, tuple(stmts), (), **tag),)

    @staticmethod
    def worth_checkpoints(trips):
        """Checkpoints pay off for a loop of more than 2 x CHECKPOINTS trips (a constant here;
        back_loop decides at run time where the trip count is not)."""
        return trips.value > 2 * CHECKPOINTS

    def row(self):
        """(this parallel iteration's row, the number of rows): its loop indices flattened, for
        helper fields with one row per iteration; None where the loop's bounds are not constants
        or the body reassigns an index. Outside any parallel loop, the one row 0."""
        if not self.outer_stack:
            return B.const(0, "i32"), 1
        loop = self.outer_stack[-1]["loop"]
        if any(not (isinstance(a, N.Const) and isinstance(b, N.Const)) for a, b in loop.bounds) \
                or set(loop.vars) & assigned_names(loop.body):
            return None
        row, rows = B.const(0, "i32"), 1
        for v, (a, b) in zip(loop.vars, loop.bounds):
            n = int(b.value) - int(a.value)
            row = B.add(B.mul(row, B.const(n, "i32")), B.sub(B.var(v, "i32"), a))
            rows *= n
        return (row, rows) if rows > 0 else None

    def checkpoint_rows(self, s, info, var, lo, hi, used, closed=None):
        """(prologue, restore) for a long loop of constant trips with its carried values kept in
        helper fields with one row per parallel iteration (self.rows; None where there are none or
        they would not fit: the locals of `checkpoints` then hold them). Where every step fits,
        the prologue stores the values the backward sweep reads (`used`) at each step and every
        backward iteration reads its step's back: one forward pass (W6: 8192 x 1000 angles,
        33 MB). Otherwise the prologue stores all carried values at the start of each of about
        sqrt(trips) segments, and the backward sweep, on reaching a segment's last step, runs
        through the segment once storing the values at the start of each of its steps: two
        forward passes, for rows x 2 sqrt(trips) values per carried local. (The locals' two levels
        of 16 checkpoints, shifted like a stack, cost about 3.5 at a thousand steps.) Induction
        variables (`closed`) are kept nowhere: set from the step's number where needed."""
        closed = closed or {}
        trips = int(hi.value) - int(lo.value)
        where = self.row() if self.rows is not None and trips > 0 else None
        if where is None:
            return None
        row, rows = where
        i32 = "i32"
        # every step's values of the carried locals the backward sweep reads, where they fit:
        # nothing to run through again
        kept = [(c, dt) for c, dt, _ in info.carried if c in used and c not in closed]
        if self.every_step and self.rows.fits(rows * sum(bits(dt) // 8 for _, dt in kept) * trips):
            seg = 1
        else:  # the segments are run through again: all carried locals are needed
            seg = max(1, math.isqrt(trips - 1) + 1)
            kept = [(c, dt) for c, dt, _ in info.carried if c not in closed]
        count = -(-trips // seg)
        if not self.rows.fits(rows * sum(bits(dt) // 8 for _, dt in kept) * (count + (seg if seg > 1 else 0))):
            return None
        fields = {}
        for c, dt in kept:
            # fresh names: nested loops may carry the same local, and each loop needs fields of its own
            starts = self.rows.make(self.names.fresh(f"{c}_ck"), dt, (rows, count))
            steps = self.rows.make(self.names.fresh(f"{c}_seg"), dt, (rows, seg)) if seg > 1 else None
            fields[c] = (dt, starts, steps)
        tag = dict(src=s.src, tag="checkpoint")
        seg_c = B.const(seg, i32)

        def store(ref, at, c, dt):
            return N.Store(ref, (row, at), B.var(c, dt), **tag)

        j = self.names.fresh(f"{var}_ck")
        off = B.sub(B.var(j, i32), lo)
        keep = tuple(store(starts, B.call("floordiv", off, seg_c), c, dt) for c, (dt, starts, _) in fields.items())
        # every step's values kept (seg 1): stored at each step, no test
        kept_here = keep if seg == 1 else (N.If(B.call("eq", B.call("mod", off, seg_c), B.const(0, i32)), keep, (),
                                                **tag),)
        body = kept_here + tuple(self.own_names(self.carried_step(s, info, j), info))
        prologue = [N.Assign(c, init, **tag) for c, _, init in info.carried]
        prologue.append(N.For((j,), ((lo, hi),), body, **tag))
        if seg == 1:
            return prologue, [N.Assign(c, B.load(starts, (row, B.sub(B.var(var, i32), lo))), **tag)
                              for c, (dt, starts, _) in fields.items()] + \
                self.counted(s, info, {c: d for c, d in closed.items() if c in used}, B.var(var, i32), lo)
        # Backward, at var: entering a segment from above -> run through it from its checkpoint,
        # storing the values at each step's start; then read var's.
        v = B.var(var, i32)
        seg_start = self.names.fresh(f"{var}_start")
        start_v = B.var(seg_start, i32)
        last = B.call("or", B.call("eq", B.call("mod", B.add(B.sub(v, lo), B.const(1, i32)), seg_c),
                                   B.const(0, i32)), B.call("eq", B.add(v, B.const(1, i32)), hi))
        u = self.names.fresh(f"{var}_seg")
        run = tuple(store(steps, B.sub(B.var(u, i32), start_v), c, dt) for c, (dt, _, steps) in fields.items()) + \
            tuple(self.own_names(self.carried_step(s, info, u), info))
        rebuild = tuple(N.Assign(c, B.load(starts, (row, B.call("floordiv", B.sub(v, lo), seg_c))), **tag)
                        for c, (dt, starts, _) in fields.items()) + \
            tuple(self.counted(s, info, closed, start_v, lo)) + \
            (N.For((u,), ((start_v, v),), run, **tag),) + \
            tuple(store(steps, B.sub(v, start_v), c, dt) for c, (dt, _, steps) in fields.items())
        restore = [N.Assign(seg_start, B.add(lo, B.mul(B.call("floordiv", B.sub(v, lo), seg_c), seg_c)), **tag),
                   N.If(last, rebuild, (), **tag)]
        restore += [N.Assign(c, B.load(steps, (row, B.sub(v, start_v))), **tag)
                    for c, (dt, _, steps) in fields.items()]
        restore += self.counted(s, info, {c: d for c, d in closed.items() if c in used}, v, lo)
        return prologue, restore

    def checkpoints(self, s, info, var, lo, hi, closed=None):
        """(prologue, restore) for a long loop, with two levels of checkpoints held in locals.

        The prologue runs the loop once and pushes the carried values at the start of each of
        (at most) CHECKPOINTS equal segments onto a stack. The backward sweep, on reaching a
        segment's last step, pops down to that segment and runs through it once, pushing the
        values at the start of each of its (at most CHECKPOINTS) sub-segments onto a second
        stack; every backward iteration restores from the top of that stack (popping a
        sub-segment when it moves below it) and recomputes at most one sub-segment to reach
        `var`. About 3 + trips/(2·CHECKPOINTS²) body steps per iteration instead of trips/2;
        no memory beyond 2·CHECKPOINTS locals per carried value, none for induction variables
        (`closed`: set from the step's number where a segment or sub-segment starts)."""
        closed = closed or {}
        stacked = [(c, dt, init) for c, dt, init in info.carried if c not in closed]
        i32 = "i32"
        one, zero = B.const(1, i32), B.const(0, i32)
        tag = dict(src=s.src, tag="checkpoint")
        slots = B.const(CHECKPOINTS, i32)

        def ceil_div(a, b):
            return B.call("max", B.call("floordiv", B.add(a, B.sub(b, one)), b), one)

        def at_multiple(offset, length):
            return B.call("eq", B.call("mod", offset, length), zero)

        def floor_to(offset, length):
            return B.mul(B.call("floordiv", offset, length), length)

        def shift(pairs):
            return tuple(N.Assign(dst, B.var(src, dt), tag="checkpoint") for dt, dst, src in pairs)

        prologue = []

        def length(name, value):
            """A segment length: a constant where the trip count is, else a local."""
            if isinstance(value, N.Const):
                return value
            name = self.names.fresh(name)
            prologue.append(N.Assign(name, value, **tag))
            return B.var(name, i32)

        seg_v = length(f"{var}_segment", ceil_div(B.sub(hi, lo), slots))
        sub_v = length(f"{var}_subsegment", ceil_div(seg_v, slots))
        outer, inner = {}, {}
        prologue += [N.Assign(c, init, **tag) for c, _, init in info.carried]
        for c, dt, init in stacked:
            outer[c] = [self.names.fresh(f"{c}_ck{k}") for k in range(CHECKPOINTS)]
            inner[c] = [self.names.fresh(f"{c}_sub{k}") for k in range(CHECKPOINTS)]
            prologue += [N.Assign(n, B.var(c, dt), **tag) for n in outer[c] + inner[c]]

        def push(stack):
            return shift([(dt, stack[c][k], stack[c][k - 1]) for c, dt, _ in stacked
                          for k in range(CHECKPOINTS - 1, 0, -1)] + [(dt, stack[c][0], c) for c, dt, _ in stacked])

        def pop(stack):
            return shift([(dt, stack[c][k], stack[c][k + 1]) for c, dt, _ in stacked
                          for k in range(CHECKPOINTS - 1)])

        def run(start, stop, stack, length, counter):
            """for counter in range(start, stop): push at each `length`-th step, then step."""
            j = self.names.fresh(counter)
            due = at_multiple(B.sub(B.var(j, i32), start), length)
            pushing = self.when(due, push(stack), tag)
            body = pushing + self.own_names(self.carried_step(s, info, j), info)
            return N.For((j,), ((start, stop),), body, **tag)

        prologue.append(run(lo, hi, outer, seg_v, f"{var}_ck"))
        # Backward, at var: entering a segment from above -> pop to it and rebuild its sub-stack;
        # entering a sub-segment from above -> pop the sub-stack; then restore and step to var.
        v = B.var(var, i32)
        after = B.add(v, one)
        seg_start = self.names.fresh(f"{var}_start")
        seg_start_v = B.var(seg_start, i32)
        last_of_segment = B.call("or", at_multiple(B.sub(after, lo), seg_v), B.call("eq", after, hi))
        within_loop = B.call("lt", after, hi)
        rebuild = (N.If(within_loop, pop(outer), (), **tag),) + tuple(
            N.Assign(c, B.var(outer[c][0], dt), **tag) for c, dt, _ in stacked) + \
            tuple(self.counted(s, info, closed, seg_start_v, lo)) + \
            (run(seg_start_v, after, inner, sub_v, f"{var}_sub"),)
        restore = [N.Assign(seg_start, B.add(lo, floor_to(B.sub(v, lo), seg_v)), **tag),
                   N.If(last_of_segment, rebuild,
                        self.when(at_multiple(B.sub(after, seg_start_v), sub_v), pop(inner), tag), **tag)]
        restore += [N.Assign(c, B.var(inner[c][0], dt), **tag) for c, dt, _ in stacked]
        start = B.add(seg_start_v, floor_to(B.sub(v, seg_start_v), sub_v))  # the sub-segment's
        restore += self.counted(s, info, closed, start, lo)
        if not B.is_const(sub_v, 1):  # sub-segments of one step hold every step: nothing to recompute
            r = self.names.fresh(f"{var}_re")
            restore.append(N.For((r,), ((start, v),), self.carried_step(s, info, r), src=s.src, tag="recompute"))
        return prologue, restore


def steps_of_inductions(s, info):
    """{carried integer local: its step} for the induction variables of loop `s` (in SSA form):
    those every trip steps by the same amount, `k_1 = k + d; ...; k = k_1` at the body's top
    level with d a constant or a local the loop does not assign. On entry to trip t (counted
    from 0) such a local holds `init + d * t` (exactly: integer arithmetic wraps alike), so the
    backward sweep sets it so instead of replaying the loop or checkpointing it (a while loop's
    trip counter, a counter stepped beside a float state)."""
    written = assigned_names(s.body) | set(getattr(s, "vars", ()))
    assigns = [t for t in iter_stmts(s.body) if isinstance(t, N.Assign)]
    count = {}
    for t in assigns:
        count[t.name] = count.get(t.name, 0) + 1
    top = {t.name: t.value for t in s.body if isinstance(t, N.Assign) and count[t.name] == 1}
    steps = {}
    for c, dt, _ in info.carried:
        update = top.get(c)
        if is_float(dt) or not isinstance(update, N.Var) or not isinstance(top.get(update.name), N.Call):
            continue
        value = top[update.name]
        if value.op not in ("add", "sub") or value.dtype != dt:
            continue
        a, b = value.args
        if isinstance(b, N.Var) and b.name == c and value.op == "add":
            a, b = b, a
        if not (isinstance(a, N.Var) and a.name == c) or not _invariant(b, written):
            continue
        steps[c] = B.cast(b, dt) if value.op == "add" else B.neg(B.cast(b, dt))
    return steps


def _invariant(e, written):
    """Is e the same on every trip: built of constants and locals the loop does not assign (its
    own index included), no field reads, no draws?"""
    return all(not isinstance(x, N.Load) and not (isinstance(x, N.Var) and x.name in written)
               and not (isinstance(x, N.Call) and x.op in RANDOM) for x in iter_expr(e))


def independent_runs(stmts):
    """stmts cut into runs, in order: consecutive statements compiled from one source statement
    that touch nothing another of them writes (a vector statement's components, `d_0 = a_0 - b_0;
    d_1 = a_1 - b_1`) share a run; every other statement is a run of its own. The adjoints of a
    run's statements commute (each reads its own target's adjoint and adds into its operands'), so
    the backward sweep takes runs last first but each run's statements in the order written:
    component 0's adjoint before component 1's, as a person writes them."""
    runs = []
    for s in stmts:
        if runs and _joins(runs[-1], s):
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


def _joins(run, s):
    """Whether s extends the run: a run grows by simple statements only, so its first one is the
    only one to check for that."""
    if s.src is None or s.src != run[0].src or not (_simple(s) and _simple(run[0])):
        return False
    return all(independent(r, s) for r in run)


def _simple(s):
    return isinstance(s, (N.Assign, N.Store)) or (isinstance(s, N.Atomic) and s.op == "add")


def local_dtypes(stmts, params=()):
    out = {p.name: p.dtype for p in params}
    from ..ir.walk import expr_children_of_stmt, vars_in
    for s in iter_stmts(stmts):
        if isinstance(s, N.Assign):
            out.setdefault(s.name, s.value.dtype)
        for e in expr_children_of_stmt(s):
            for v in vars_in(e):
                out.setdefault(v.name, v.dtype)
        if isinstance(s, N.For):
            for v in s.vars:
                out.setdefault(v, "i32")
    return out


def reverse_kernel(ir: N.KernelIR, level: int, inputs_restored=False, checkpoint_fields=False) -> N.KernelIR:
    """The reverse-mode (VJP) kernel of `ir` at derivative level `level`. inputs_restored: the
    caller restores the fields of owned.restorable_fields(ir) to their values from before the
    launch (kd.Tape does), so the kernel may have overwritten them. checkpoint_fields: long loops
    may keep their checkpoints in helper fields (Reverse.checkpoint_rows), which a reverse pass
    over this kernel could not read back (each segment's values overwrite the last's): only for
    a kernel no reverse transform will take as its input."""
    from ..runtime.registry import REGISTRY
    from .names import NameAllocator
    from .owned import checked_for_reverse

    ir = checked_for_reverse(dataclasses.replace(ir, body=count_derivative(ir.body)), inputs_restored)
    adj_of_field = field_activity(ir, "adjoint", level)
    names = NameAllocator.for_kernel(ir)
    body, ssa, _ = to_ssa(eliminate_jumps(ir.body, names), names, dtypes=local_dtypes(ir.body, ir.params),
                          fixed={p.name for p in ir.params})
    varied = varied_vars(body, lambda ref: adj_of_field(ref) is not None)

    def scratch(name, dtype):
        f = REGISTRY.scratch(("scratch", ir.name, name, dtype, level), dtype)
        return REGISTRY.ref(f, (), name + "_acc")

    rows = CheckpointFields() if checkpoint_fields else None
    rev = Reverse(names, adj_of_field, varied, ssa.loops, scratch, rows, level)
    rev.zero_guarded, rev.steep_inputs = guarded_locals(body), steep_inputs(body)
    cot_params = []
    for d in ir.returns:
        cot_params.append(N.Param(names.fresh("ret_adj"), d))
    rev.cotangents = [B.var(p.name, p.dtype) for p in cot_params]
    recomputed, backward = rev.fuse_checkpoint_runs(body, list(rev.recompute(body)), rev.backward(body))
    out = rev.zero_inits(body) + recomputed + backward
    return dataclasses.replace(ir, name=f"{ir.name}_rev", body=tuple(out),
                               params=tuple(ir.params) + tuple(cot_params), returns=(),
                               field_aliases=ir.field_aliases + (rows.aliases if rows else ()))


class CheckpointFields:
    """Helper fields for one kernel's checkpoints (Reverse.checkpoint_rows), within a memory budget
    of CHECKPOINT_FIELD_BYTES. Their values live within one launch (written by the forward pass,
    read back by the backward sweep), so kernels share them: the n-th field of a dtype and shape
    that a kernel asks for is every kernel's n-th (a program's memory and SNode trees grow with
    the most any one kernel needs, not with the number of kernels: Taichi allows 512 trees)."""

    def __init__(self):
        self.left = CHECKPOINT_FIELD_BYTES
        self.made = {}  # (dtype, shape) -> how many this kernel has
        self.aliases = ()  # (id(field), the name this kernel gives it): KernelIR.field_aliases

    def fits(self, nbytes):
        return nbytes <= self.left

    def make(self, name, dtype, shape):
        from ..runtime.registry import REGISTRY
        self.left -= math.prod(shape) * bits(dtype) // 8
        nth = self.made[dtype, shape] = self.made.get((dtype, shape), -1) + 1
        f = REGISTRY.scratch(("checkpoints", dtype, shape, nth), dtype, shape)
        self.aliases += ((id(f), name),)
        return REGISTRY.ref(f, (), name)


def reverse_block(stmts, names, out_values, cotangents, wrt, dtypes, level=1):
    """Reverse local code (a device function's body): adjoints of `wrt` locals.

    out_values: result expressions; cotangents: their adjoint expressions; level: which reverse
    transform of a chain this is (the adjoints' names: t_adj, t_adj2). Returns (statements,
    {name: adjoint expression}).
    """
    check_function_body(stmts)
    stmts = count_derivative(stmts)
    body, ssa, env = to_ssa(eliminate_jumps(stmts, names), names, dtypes=dtypes, fixed=set(wrt))
    outs = [_rename(v, env, ssa.dtypes) for v in out_values]
    varied = varied_vars(body, lambda ref: False, seeds=tuple(wrt))
    rev = Reverse(names, lambda ref: None, varied, ssa.loops, None, level=level)
    rev.zero_guarded, rev.steep_inputs = guarded_locals(body), steep_inputs(body)
    rev.cotangents = list(cotangents)
    ret = N.Return(tuple(outs))
    # Adjoint locals of the arguments start at zero; they are read back after the sweep.
    out = [N.Assign(rev.adj_name(w), B.const(0, dtypes[w]), tag="adjoint") for w in wrt]
    for w in wrt:
        rev.dtypes[w] = dtypes[w]
    # the forward sweep as kernels have it (Reverse.recompute): a while loop records its trips,
    # which the backward sweep replays (run as written, the sweep replayed none)
    out += rev.zero_inits(body) + list(rev.recompute(body)) + rev.backward(list(body) + [ret])
    grads = {w: B.var(rev.adj_name(w), dtypes[w]) for w in wrt}
    return tuple(out), grads


def _rename(e, env, dtypes):
    from ..ir.walk import vars_in
    mapping = {}
    for v in vars_in(e):
        if v.name in env:
            mapping[v.name] = B.var(env[v.name], v.dtype)
    return substitute(e, mapping)
