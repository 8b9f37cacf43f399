"""Static single assignment for reverse mode.

Reverse mode reads, in its backward sweep, the values every statement saw; with mutable locals
those are gone. After this pass each local version is assigned once per path, except:
  * merge locals of an `if` (assigned at the end of both branches), and
  * loop-carried locals: assigned once before the loop (the init copy) and at the end of the
    body (the update copy); `Loop.carried` lists them as (carried name, init name, update name).
Multi-dimensional serial loops are split into nested 1-d loops here.
"""
from __future__ import annotations

import dataclasses

from ..errors import KernDiffError

from ..ir import build as B
from ..ir import nodes as N
from ..ir.walk import assigned_names, substitute


@dataclasses.dataclass
class LoopInfo:
    carried: list  # [(carried name, dtype, init expression)]


class SSA:
    def __init__(self, names, fixed=()):
        self.names = names
        self.loops = {}  # id(new loop stmt) -> LoopInfo
        self.keep = []
        self.dtypes = {}
        self.fixed = set(fixed)  # names that must keep their meaning (parameters, outer locals)
        self.claimed = set()
        self.read_after = {}  # id(if statement) -> the locals read outside it (_read_outside)

    def version(self, name, dtype):
        v = self.names.fresh(name)
        self.dtypes[v] = dtype
        return v

    def block(self, stmts, env):
        out = []
        for s in stmts:
            out.extend(self.stmt(s, env))
        return out

    def _ren(self, e, env):
        # env maps original names -> versions; substitute keeps dtypes of the Var nodes
        mapping = {}
        from ..ir.walk import vars_in
        for v in vars_in(e):
            if v.name in env and env[v.name] != v.name:
                mapping[v.name] = B.var(env[v.name], v.dtype)
        return substitute(e, mapping)

    def stmt(self, s, env):
        if isinstance(s, N.Assign):
            value = self._ren(s.value, env)
            if s.name not in env and s.name not in self.fixed and s.name not in self.claimed:
                # The first version keeps the user's name: v, then v_1, v_2, ...
                v = s.name
                self.claimed.add(v)
                self.dtypes[v] = s.value.dtype
            else:
                v = self.version(s.name, s.value.dtype)
            env[s.name] = v
            return [dataclasses.replace(s, name=v, value=value)]
        if isinstance(s, N.Store) or isinstance(s, N.Atomic):
            return [dataclasses.replace(s, index=tuple(self._ren(i, env) for i in s.index),
                                        value=self._ren(s.value, env))]
        if isinstance(s, N.Return):
            return [dataclasses.replace(s, values=tuple(self._ren(v, env) for v in s.values))]
        if isinstance(s, N.If):
            cond = self._ren(s.cond, env)
            env_t, env_e = dict(env), dict(env)
            then = self.block(s.then, env_t)
            orelse = self.block(s.orelse, env_e)
            both = (set(env_t) & set(env_e)) - set(env)
            # a local only one branch defines and code after the `if` reads: transforms write
            # such code (a reverse sweep's recompute `if`, then its adjoint `if` on the same
            # condition reading what the first computed); merged with 0 from the other branch,
            # where it is never read (unmerged, the later reads kept the first version's name,
            # which a loop's init copy holds: the value from before the loop)
            one_sided = ((set(env_t) | set(env_e)) - set(env) - both) & self.read_after.get(id(s), set())
            for name in sorted(set(env) | both | one_sided):
                if name in env and env_t[name] == env[name] and env_e[name] == env[name]:
                    continue
                dt = self.dtypes[(env_t if name in env_t else env_e)[name]]
                m = self.version(name, dt)
                then.append(N.Assign(m, B.var(env_t[name], dt) if name in env_t else B.const(0, dt), src=s.src))
                orelse.append(N.Assign(m, B.var(env_e[name], dt) if name in env_e else B.const(0, dt), src=s.src))
                env[name] = m
            return [dataclasses.replace(s, cond=cond, then=tuple(then), orelse=tuple(orelse))]
        if isinstance(s, N.For) and s.parallel:
            outer = set(env) & assigned_names(s.body)
            if outer:
                raise KernDiffError(f"the parallel loop assigns the outer local(s) {sorted(outer)}",
                                    s.src, "accumulate into a field instead (Taichi runs this loop in parallel)")
            bounds = tuple((self._ren(a, env), self._ren(b, env)) for a, b in s.bounds)
            body = self.block(s.body, dict(env))
            return [dataclasses.replace(s, bounds=bounds, body=tuple(body))]
        if isinstance(s, N.For):
            if len(s.vars) > 1:  # serial ndrange: nest
                inner = dataclasses.replace(s, vars=s.vars[1:], bounds=s.bounds[1:])
                outer = dataclasses.replace(s, vars=s.vars[:1], bounds=s.bounds[:1], body=(inner,))
                return self.stmt(outer, env)
            return self.loop(s, env)
        if isinstance(s, N.While):
            return self.loop(s, env)
        if isinstance(s, (N.Break, N.Continue)):
            raise AssertionError("break/continue must be eliminated (jumps.py) before SSA")
        raise TypeError(s)

    def loop(self, s, env):
        if isinstance(s, N.For):
            bounds = tuple((self._ren(a, env), self._ren(b, env)) for a, b in s.bounds)
        written = assigned_names(s.body)
        carried = [n for n in sorted(env) if n in written]
        pre, info = [], LoopInfo([])
        body_env = dict(env)
        for n in carried:
            dt = self.dtypes.get(env[n])
            c = self.version(n, dt)
            init = B.var(env[n], dt)
            pre.append(N.Assign(c, init, src=s.src))
            body_env[n] = c
            info.carried.append((c, dt, init))
        head_env = dict(body_env)
        body = self.block(s.body, body_env)
        for n, (c, dt, _) in zip(carried, info.carried):
            if body_env[n] != c:
                body.append(N.Assign(c, B.var(body_env[n], dt), src=s.src, tag="update"))
        if isinstance(s, N.For):
            loop = dataclasses.replace(s, bounds=bounds, body=tuple(body))
        else:  # the condition is evaluated at the loop head, on the carried values
            loop = dataclasses.replace(s, cond=self._ren(s.cond, head_env), body=tuple(body))
        self.loops[id(loop)] = info
        self.keep.append(loop)
        for n, (c, _, _) in zip(carried, info.carried):
            env[n] = c
        return pre + [loop]


def _read_outside(stmts):
    """id(if statement) -> the locals read outside it (before it, after it, or around it)."""
    from ..ir.walk import iter_stmts, read_counts

    total = read_counts(stmts)
    return {id(st): {n for n, k in total.items() if k > own.get(n, 0)}
            for st in iter_stmts(stmts) if isinstance(st, N.If) for own in [read_counts([st])]}


def to_ssa(stmts, names, env=None, dtypes=None, fixed=()):
    ssa = SSA(names, fixed)
    ssa.read_after = _read_outside(stmts)
    ssa.dtypes.update(dtypes or {})
    env = dict(env or {})
    return tuple(ssa.block(stmts, env)), ssa, env
