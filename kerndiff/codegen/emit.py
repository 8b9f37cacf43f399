"""IR -> Taichi source that reads like code a person wrote.

Locals are declared where Taichi's block scoping needs them (at the start of the innermost block
holding every use), constants print as plain literals where Taichi types them the same way, and a
comment names the source line each run of generated statements comes from.
"""
from __future__ import annotations

import math

import numpy as np

from ..ir import nodes as N
from ..ir.ops import BITWISE, COMPARE
from ..ir.types import default_fp, from_taichi, is_float
from ..ir.walk import guarded_select
from ..runtime.registry import is_ndarray
from .components import component_refs, fields_apart, scalar_sums

BINARY = {"add": ("+", 11), "sub": ("-", 11), "mul": ("*", 12), "div": ("/", 12), "floordiv": ("//", 12),
          "mod": ("%", 12), "lt": ("<", 6), "le": ("<=", 6), "gt": (">", 6), "ge": (">=", 6),
          "eq": ("==", 6), "ne": ("!=", 6), "and": ("and", 4), "or": ("or", 3),
          "bit_or": ("|", 7), "bit_xor": ("^", 8), "bit_and": ("&", 9), "shl": ("<<", 10), "shr": (">>", 10)}
FUNCS = {"sin": "ti.sin", "cos": "ti.cos", "tan": "ti.tan", "asin": "ti.asin", "acos": "ti.acos",
         "atan": "ti.atan2", "exp": "ti.exp", "log": "ti.log", "sqrt": "ti.sqrt", "rsqrt": "ti.rsqrt",
         "tanh": "ti.tanh", "abs": "ti.abs", "floor": "ti.floor", "ceil": "ti.ceil", "round": "ti.round",
         "min": "ti.min", "max": "ti.max", "atan2": "ti.atan2", "select": "ti.select",
         "isnan": "ti.math.isnan", "isinf": "ti.math.isinf", "popcnt": "ti.math.popcnt", "clz": "ti.math.clz",
         "tanh_via_exp": "tanh_via_exp",  # codegen.cpu_math's (opt.cpu_math)
         "mul_or_zero": "mul_or_zero"}  # codegen.products' (ad.zero_adjoints, ad.piecewise_zeros)
# opt.element_groups' calls of four elements: first op -> (codegen.cpu_math's helper, ops of its results per element)
GROUPED_CALLS = {"sincos4_sin": ("sincos4", ("sincos4_sin", "sincos4_cos")), "exp4": ("exp4", ("exp4",))}
TAG_WORDS = {"tangent": "tangent of", "adjoint": "adjoint of", "recompute": "recompute",
             "hoist": "read once, before", "checkpoint": "checkpoints of"}


# A run of statements from one source line that mixes its value, tangent and adjoint (forward
# over reverse interleaves them statement by statement) gets one comment, not one per change.
MIXED_RUNS = {frozenset({"", "tangent"}): "{}, and its tangent",
              frozenset({"adjoint", "tangent"}): "adjoint of: {}, and its tangent",
              frozenset({"", "adjoint"}): "{}, and its adjoint",
              frozenset({"", "tangent", "adjoint"}): "{}, its tangent and adjoint",
              frozenset({"recompute", "tangent"}): "recompute: {}, and its tangent",
              frozenset({"checkpoint", "tangent"}): "checkpoints of: {}, and its tangent"}


def _float_literal(value, dtype):
    """The shortest literal that Taichi turns back into this value: an f32 constant is written as
    f32 prints it (`0.004`, not `0.004000000189989805`), where the literal, read as a Python float
    and rounded to f32 as Taichi does, gives the same f32 back."""
    if not math.isfinite(value):  # `-ti.math.inf` starts a running maximum
        return "ti.math.nan" if math.isnan(value) else ("-" if value < 0 else "") + "ti.math.inf"
    text = repr(value)
    if dtype == "f32":
        v = np.float32(value)
        short = np.format_float_positional(v, unique=True, trim="0") if value == 0 or 1e-4 <= abs(value) < 1e16 \
            else np.format_float_scientific(v, unique=True, trim="-")
        if np.float32(float(short)) == np.float32(value):
            return short
    return text


def _text(s):
    return s.src.text.strip() if s.src is not None and s.src.text else None


def _note(s):
    text = _text(s)
    word = TAG_WORDS.get(s.tag)
    return f"{word}: {text}" if word and text else text


def _kind(s):
    """What of its source line s computes, as the comments name it ("" for the value itself)."""
    return s.tag if s.tag in TAG_WORDS else ""


def _mixable(tags):
    return any(tags <= kinds for kinds in MIXED_RUNS)


def _run_notes(stmts):
    """The comment each statement falls under: its source line and what of it the statement
    computes; consecutive statements from one line with value/tangent/adjoint tags share one."""
    notes = [_note(s) for s in stmts]
    i = 0
    while i < len(stmts):
        text, j, tags = _text(stmts[i]), i, set()
        while j < len(stmts) and text and _text(stmts[j]) == text and _mixable(tags | {_kind(stmts[j])}):
            tags.add(_kind(stmts[j]))
            j += 1
        if j - i > 1 and frozenset(tags) in MIXED_RUNS:
            notes[i:j] = [MIXED_RUNS[frozenset(tags)].format(text)] * (j - i)
        i = max(j, i + 1)
    return notes


def _copy_runs(stmts, notes, shortest=4):
    """{start: end} for runs of `shortest` or more consecutive plain copies (`a = b`) under one
    comment that mean the same done at once: no copy reads a name an earlier one in the run set.
    Loop reversal keeps checkpoints in shift registers of locals; one line per shift step would
    bury the kernel, so such a run is written as one assignment."""
    runs, i = {}, 0
    while i < len(stmts):
        j, assigned = i, set()
        while (j < len(stmts) and isinstance(stmts[j], N.Assign) and isinstance(stmts[j].value, N.Var)
               and notes[j] == notes[i] and stmts[j].name not in assigned and stmts[j].value.name not in assigned):
            assigned.add(stmts[j].name)
            j += 1
        if j - i >= shortest:
            runs[i] = j
        i = max(j, i + 1)
    return runs


def _wrapped(pad, items, sep, width=100, cont=None):
    """items joined by sep, in lines of about `width` characters continued with backslashes (the
    continuation lines at `cont`, by default indented once more than `pad`)."""
    cont = pad + "    " if cont is None else cont
    lines, cur = [], ""
    for k, item in enumerate(items):
        piece = item + (sep if k < len(items) - 1 else "")
        if cur and len(pad) + len(cur) + len(piece.rstrip()) > width:
            lines.append(cur.rstrip())
            cur = ""
        cur += piece
    lines.append(cur.rstrip())
    more = " \\"
    return [(pad if k == 0 else cont) + line + (more if k < len(lines) - 1 else "")
            for k, line in enumerate(lines)]


def _polar_rotations_together(stmts):
    """stmts with the entries of each polar_rotation moved up to its first entry, where nothing
    between writes what they read or touches the locals they assign (derivative code puts
    tangents between them), so that one call computes all nine (Emitter.polar_rotation); else
    as they were. Each entry is Taichi's whole 3x3 SVD when emitted alone."""
    if all(_rotation_entry(s) is None for s in stmts):
        return stmts
    from ..ir.walk import assigned_names, mentioned_names, vars_in
    out = list(stmts)
    i = 0
    while i < len(out):
        first = out[i]
        if _rotation_entry(first) == 0:
            args = first.value.args[:9]
            reads = {v.name for a in args for v in vars_in(a)}
            group, between = [first], []
            for t in out[i + 1:]:
                if len(group) == 9:
                    break
                if _rotation_entry(t) == len(group) and t.value.args[:9] == args \
                        and not any(t.name in mentioned_names(b) for b in between):
                    group.append(t)
                elif assigned_names([t]) & reads or any(g.name in mentioned_names(t) for g in group[1:]):
                    break
                else:
                    between.append(t)
            if len(group) == 9:
                rest = [t for t in out[i + 1:] if not any(t is g for g in group)]
                out = out[:i] + group + rest
                i += 8
        i += 1
    return out


def _rotation_entry(s):
    """Which entry of a polar_rotation s assigns, or None."""
    if isinstance(s, N.Assign) and isinstance(s.value, N.Call) and s.value.op == "polar_rotation":
        return s.value.args[9].value
    return None


def _polar_rotation_run(run):
    """The nine statements assign the entries 0..8 of one polar_rotation, in order."""
    return len(run) == 9 and all(_rotation_entry(t) == k and t.value.args[:9] == run[0].value.args[:9]
                                 for k, t in enumerate(run))


class Emitter:
    def __init__(self, field_names: dict, taken=()):
        self.field_names = field_names  # id(taichi field) -> global name in generated module
        self.fp = default_fp()
        self.lines = []
        self.taken = set(taken) | set(field_names.values())  # names a new global must not shadow
        self.component_fields = {}  # (id(field), component) -> global name of its scalar field
        self.component_globals = {}  # that name -> (field, component), for the generated module
        self.split_components = False  # inside a loop that sums into a 0-D field (components.py)
        # ids of fields whose components are accessed through their scalar fields everywhere in the
        # kernel (components.fields_apart)
        self.fields_apart = set()

    # ---------------------------------------------------------- expressions
    def expr(self, e: N.Expr, prec: int = 0) -> str:
        text, p = self._expr(e)
        return f"({text})" if p < prec else text

    def _expr(self, e):
        if isinstance(e, N.Const):
            return self.const(e)
        if isinstance(e, N.Var):
            return e.name, 100
        if isinstance(e, N.Load):
            return self.load(e), 100
        op, args = e.op, e.args
        if op in ("add", "sub") and isinstance(args[1], N.Const) and args[1].value < 0 \
                and args[1].value != -2 ** 31:  # `i + -1` reads as `i - 1`, and is the same value
            flipped = N.Const(args[1].dtype, -args[1].value)
            op, args = ("sub" if op == "add" else "add"), (args[0], flipped)
        if op in BINARY:
            sym, p = BINARY[op]
            if op in BITWISE:  # few readers know these precedences: parenthesize any compound operand
                return f"{self.expr(args[0], 13)} {sym} {self.expr(args[1], 13)}", p
            if op in COMPARE:  # Python chains comparisons: (a < b) != c must keep its parentheses
                return f"{self.expr(args[0], p + 1)} {sym} {self.expr(args[1], p + 1)}", p
            return f"{self.expr(args[0], p)} {sym} {self.expr(args[1], p + 1)}", p
        if op == "pow":
            return f"{self.expr(args[0], 15)} ** {self.expr(args[1], 14)}", 14
        if op == "neg":
            return f"-{self.expr(args[0], 13)}", 13
        if op == "bit_not":
            return f"~{self.expr(args[0], 13)}", 13
        if op == "not":
            return f"not {self.expr(args[0], 5)}", 5
        if op == "cast":
            return f"ti.cast({self.expr(args[0])}, ti.{e.dtype})", 100
        if op == "polar_rotation":  # one entry alone (the nine in a row: Emitter.polar_rotation)
            entries = ", ".join(self.expr(a) for a in args[:9])
            return f"polar_rotation_entry(ti.{e.dtype}, {args[9].value}, {entries})", 100
        if op == "random":  # random(number, seed, *indexes): ir.ops.RANDOM
            indexes = ", ".join(self.expr(a) for a in args[2:]) or "0"
            return f"keyed_random(ti.{e.dtype}, {self.expr(args[1])}, {int(args[0].value)}, ti.Vector([{indexes}]))", 100
        if op == "claim_slot":  # opt.scatter: args[0] loads the busy flags, which the helper takes whole
            return f"claim_slot({self.field(args[0].ref)})", 100
        if guarded_select(e):
            # Taichi's `a if c else b` runs only the chosen branch; ti.select runs both, and a
            # branch that reads a field where c guards the index (`o[i - 1] if i > 0 else 0.0`)
            # or divides integers where c guards the divisor would read out of range (an illegal
            # address on a GPU) or trap (SIGFPE on the CPU) when it is not chosen.
            return f"{self.expr(args[1], 3)} if {self.expr(args[0], 3)} else {self.expr(args[2], 2)}", 2
        if op == "atan":
            one = N.Const(args[0].dtype, 1.0)
            return f"ti.atan2({self.expr(args[0])}, {self.expr(one)})", 100
        return f"{FUNCS[op]}({', '.join(self.expr(a) for a in args)})", 100

    def const(self, e: N.Const):
        if is_float(e.dtype):
            text = _float_literal(float(e.value), e.dtype)
            if e.dtype != self.fp:
                as_f32 = _float_literal(float(e.value), "f32")
                if e.dtype == "f64" and as_f32 != text and float(np.float32(float(as_f32))) == e.value:
                    # An f32 literal widened (`d * 0.3` in an f32 kernel): say so, not 0.30000001192092896.
                    return f"ti.f64(ti.f32({as_f32}))", 100
                return f"ti.{e.dtype}({text})", 100
        else:
            text = str(int(e.value))
            if e.dtype != "i32":
                return f"ti.{e.dtype}({text})", 100
        return text, (13 if text.startswith("-") else 100)

    def printed(self, e: N.Expr):
        """A value to print, a folded constant typed (Taichi prints a Python 1.5 as `1.5` and a
        kernel's f32 1.5 as `1.500000`)."""
        if isinstance(e, N.Const):
            return f"ti.{e.dtype}({self.const(e)[0]})"
        return self.expr(e)

    def fstring(self, f: N.FString):
        """The user's f-string again; its texts hold no braces (Taichi's print cannot show them)."""
        text = f.texts[0]
        for value, spec, after in zip(f.values, f.specs, f.texts[1:]):
            text += "{" + self.printed(value) + (":" + spec if spec else "") + "}" + after
        return "f" + repr(text)

    def field(self, ref):
        return self.field_names[id(ref.field)]

    def load(self, e: N.Load):
        return self.lvalue(e.ref, e.index)

    def lvalue(self, ref, index):
        idx = ", ".join(self.expr(i) for i in index) if index else "None"
        if ref.component and (self.split_components or id(ref.field) in self.fields_apart) and \
                not is_ndarray(ref.field):
            return f"{self.component_field(ref)}[{idx}]"
        comp = ""
        if ref.component:
            comp = "[" + ", ".join(map(str, ref.component)) + "]"
        return f"{self.field(ref)}[{idx}]{comp}"

    def component_field(self, ref):
        """The global name of ref's component as a scalar field: `pos_0` for pos[...][0]."""
        key = (id(ref.field), ref.component)
        if key not in self.component_fields:
            base = self.field(ref) + "_" + "".join(map(str, ref.component))
            name, k = base, 1
            while name in self.taken:
                name, k = f"{base}_{k}", k + 1
            self.taken.add(name)
            self.component_fields[key] = name
            self.component_globals[name] = (ref.field, ref.component)
        return self.component_fields[key]

    def summing_loop(self, s, refs, sums, indent, path, i):
        """A parallel loop that sums into the 0-D fields `sums`, the components `refs` read through
        scalar fields (see components.py), with a comment that says why."""
        first = self.component_field(refs[0])
        comp = "][".join(map(str, refs[0].component))
        summed = ", ".join(f"{self.field(r)}{''.join(f'[{c}]' for c in r.component)}" for r in sums)
        self.lines.append(f"{'    ' * indent}# {first} is {self.field(refs[0])}[...][{comp}], etc.: "
                          f"scalar fields let Taichi sum {summed} per thread")
        self.split_components = True
        try:
            self.stmt(s, indent, path, i)
        finally:
            self.split_components = False

    # ---------------------------------------------------------- statements
    def block(self, stmts, indent, path, enclosing=None):
        """stmts at `indent`; `enclosing`: the comment already written for the statement that
        holds this block, which its first statements need not repeat."""
        pad = "    " * indent
        decls = self.decls.get(path, ())
        by_dtype = {}
        for name, dtype in decls:
            by_dtype.setdefault(dtype, []).append(name)
        for dtype, names in by_dtype.items():  # locals a branch assigns and code after it reads
            zero = self.const(N.Const(dtype, 0))[0]  # `0.0` in the kernel's own float type, else typed
            if len(names) < 4:
                self.lines.extend(f"{pad}{name} = {zero}" for name in names)
            else:
                self.lines.extend(_wrapped(pad, names + [zero], " = "))
        stmts = _polar_rotations_together(stmts)
        notes = _run_notes(stmts)
        runs = _copy_runs(stmts, notes)
        last_note, skip_to = enclosing, 0
        for i, s in enumerate(stmts):
            if i < skip_to:
                continue
            note = notes[i]
            if note and note != last_note:
                self.lines.append(f"{pad}# {note}")
                last_note = note
            if i in runs:
                self.copies(stmts[i:runs[i]], pad)
                skip_to = runs[i]
                continue
            if isinstance(s, N.Assign) and isinstance(s.value, N.Call) and s.value.op == "sincos_sin":
                self.sincos(s, stmts[i + 1], pad)  # opt.cpu_math puts the cosine right after
                skip_to = i + 2
                continue
            if _polar_rotation_run(stmts[i:i + 9]):
                self.polar_rotation(stmts[i:i + 9], pad)
                skip_to = i + 9
                continue
            if isinstance(s, N.Assign) and isinstance(s.value, N.Call) and s.value.op in GROUPED_CALLS:
                skip_to = i + self.grouped_call(stmts[i:], pad)  # opt.element_groups: in a row
                continue
            if not path and isinstance(s, N.For):  # a parallel loop
                refs, sums = component_refs(s), scalar_sums(s)
                if refs and sums:
                    self.summing_loop(s, refs, sums, indent, path, i)
                    continue
            self.stmt(s, indent, path, i)
        if not stmts and not decls:
            self.lines.append(f"{pad}pass")

    def copies(self, run, pad):
        """A run of copies done at once: `a = b = c = v` when all copy one value, else
        `a, b, c = b, c, v` (Taichi evaluates the right side first, as Python does)."""
        sources = {s.value.name for s in run}
        if len(sources) == 1:
            self.lines.extend(_wrapped(pad, [s.name for s in run] + [run[0].value.name], " = "))
            return
        line = f"{pad}{', '.join(s.name for s in run)} = {', '.join(s.value.name for s in run)}"
        if len(line) <= 100:
            self.lines.append(line)
            return
        targets = _wrapped(pad, [s.name for s in run], ", ")
        values = _wrapped(pad + "    ", [s.value.name for s in run], ", ", cont=pad + "    ")
        self.lines.extend(targets[:-1] + [targets[-1] + " = \\"] + values)

    def sincos(self, sin_stmt, cos_stmt, pad):
        """`s, c = sincos(e)`: the sine and cosine of e from one call (opt.cpu_math)."""
        assert cos_stmt.value.op == "sincos_cos" and cos_stmt.value.args == sin_stmt.value.args
        self.lines.append(f"{pad}{sin_stmt.name}, {cos_stmt.name} = sincos({self.expr(sin_stmt.value.args[0])})")

    def grouped_call(self, stmts, pad):
        """`s, c, s_1, c_1, ... = sincos4(e, e_1, ...)` or `v, v_1, ... = exp4(e, e_1, ...)`: a
        function of four elements from one call (opt.element_groups), whose statements come in a
        row; returns how many statements that took."""
        helper, ops = GROUPED_CALLS[stmts[0].value.op]
        count = len(ops) * (len(stmts[0].value.args) - 1)
        group = stmts[:count]
        assert all(t.value.op == ops[k % len(ops)] and t.value.args[:-1] == group[0].value.args[:-1]
                   and t.value.args[-1].value == k // len(ops) for k, t in enumerate(group))
        args = ", ".join(self.expr(a) for a in group[0].value.args[:-1])
        self.lines.extend(_wrapped(pad, [", ".join(t.name for t in group) + f" = {helper}({args})"], ""))
        return count

    def polar_rotation(self, run, pad):
        """`r_0_0, r_0_1, ..., r_2_2 = polar_rotation(ti.f32, a...)`: the nine entries of a 3x3
        rotation from one decomposition (frontend.polar assigns them in a row)."""
        entries = ", ".join(self.expr(a) for a in run[0].value.args[:9])
        call = f"polar_rotation(ti.{run[0].value.dtype}, {entries})"
        self.lines.extend(_wrapped(pad, [", ".join(t.name for t in run) + f" = {call}"], ""))

    def stmt(self, s, indent, path, i):
        pad = "    " * indent
        out = self.lines.append
        if isinstance(s, N.Assign):
            out(f"{pad}{s.name} = {self.expr(s.value)}")
        elif isinstance(s, N.Store):
            out(f"{pad}{self.lvalue(s.ref, s.index)} = {self.expr(s.value)}")
        elif isinstance(s, N.Atomic):
            target = self.lvalue(s.ref, s.index)
            if s.result:  # (ti.atomic_sub is an add of the negated value here: spelled as written)
                op, value = s.op, s.value
                if op == "add" and isinstance(value, N.Call) and value.op == "neg":
                    op, value = "sub", value.args[0]
                elif op == "add" and isinstance(value, N.Const) and value.value < 0 and value.value != -2 ** 31:
                    op, value = "sub", N.Const(value.dtype, -value.value)
                out(f"{pad}{s.result} = ti.atomic_{op}({target}, {self.expr(value)})")
            elif s.op == "add":
                if isinstance(s.value, N.Call) and s.value.op == "neg":
                    out(f"{pad}{target} -= {self.expr(s.value.args[0])}")
                else:
                    out(f"{pad}{target} += {self.expr(s.value)}")
            else:
                out(f"{pad}ti.atomic_{s.op}({target}, {self.expr(s.value)})")
        elif isinstance(s, N.If):
            if not s.then and s.orelse and not self.decls.get(path + ((i, 0),)):
                # nothing to do when cond holds (a recompute pass that needs one branch only)
                out(f"{pad}if not ({self.expr(s.cond)}):")
                self.block(s.orelse, indent + 1, path + ((i, 1),), _note(s))
                return
            out(f"{pad}if {self.expr(s.cond)}:")
            self.block(s.then, indent + 1, path + ((i, 0),), _note(s))
            orelse, else_path = s.orelse, path + ((i, 1),)
            while len(orelse) == 1 and isinstance(orelse[0], N.If) and not self.decls.get(else_path):
                inner = orelse[0]
                out(f"{pad}elif {self.expr(inner.cond)}:")
                self.block(inner.then, indent + 1, else_path + ((0, 0),))
                orelse, else_path = inner.orelse, else_path + ((0, 1),)
            if orelse:
                out(f"{pad}else:")
                self.block(orelse, indent + 1, else_path, _note(s))
        elif isinstance(s, N.For):
            # a serial loop at the kernel's top level needs serialize=True: Taichi would run it in parallel
            serialize = s.serialize or (not s.parallel and not path)
            options = ((("serialize", True),) if serialize else ()) + tuple(s.config)
            if options:
                out(f"{pad}ti.loop_config({', '.join(f'{k}={v!r}' for k, v in options)})")
            out(f"{pad}for {', '.join(s.vars)} in {self.iter(s)}:")
            self.block(s.body, indent + 1, path + ((i, 0),), _note(s))
        elif isinstance(s, N.While):
            out(f"{pad}while {self.expr(s.cond)}:")
            self.block(s.body, indent + 1, path + ((i, 0),), _note(s))
        elif isinstance(s, N.Break):
            out(f"{pad}break")
        elif isinstance(s, N.Continue):
            out(f"{pad}continue")
        elif isinstance(s, N.Print):
            parts = []
            for a in s.args:
                if isinstance(a, str):
                    parts.append(repr(a))
                elif isinstance(a, tuple):
                    parts.append('f"[' + ", ".join("{" + self.printed(e) + "}" for e in a) + ']"')
                elif isinstance(a, N.FString):
                    parts.append(self.fstring(a))
                else:
                    parts.append(self.printed(a))
            out(f"{pad}print({', '.join(parts)})")
        elif isinstance(s, N.Return):
            out(f"{pad}return {', '.join(self.expr(v) for v in s.values)}")
        else:
            raise TypeError(s)

    def iter(self, s: N.For):
        def rng(lo, hi):
            if isinstance(lo, N.Const) and lo.value == 0:
                return self.expr(hi)
            return f"{self.expr(lo)}, {self.expr(hi)}"
        if len(s.bounds) == 1:
            return f"range({rng(*s.bounds[0])})"
        parts = []
        for lo, hi in s.bounds:
            parts.append(self.expr(hi) if isinstance(lo, N.Const) and lo.value == 0 else f"({rng(lo, hi)})")
        return f"ti.ndrange({', '.join(parts)})"


def array_element(a):
    """How a kernel parameter's annotation spells the element type of ndarray a."""
    from ..runtime.registry import element_shape
    shape, scalar = element_shape(a), f"ti.{from_taichi(a.dtype)}"
    if not shape:
        return scalar
    return f"ti.types.vector({shape[0]}, {scalar})" if len(shape) == 1 else \
        f"ti.types.matrix({shape[0]}, {shape[1]}, {scalar})"


def emit_kernel(ir: N.KernelIR, field_names: dict, fn_name: str, taken=(), arrays=()):
    """(source text, {global name: (field, component)} of the scalar component fields it reads).
    arrays: [(name, ndarray)] the kernel takes as parameters after its scalars."""
    from .scopes import declarations

    em = Emitter(field_names, taken)
    em.decls = declarations(ir)
    summed, added = fields_apart(ir, bool(arrays))
    em.fields_apart = summed | added
    params = ", ".join([f"{p.name}: ti.{p.dtype}" for p in ir.params]
                       + [f"{name}: ti.types.ndarray(dtype={array_element(a)}, ndim={len(a.shape)})"
                          for name, a in arrays])
    ret = ""
    if len(ir.returns) == 1:
        ret = f" -> ti.{ir.returns[0]}"
    elif ir.returns:
        ret = " -> (" + ", ".join(f"ti.{d}" for d in ir.returns) + ")"
    em.lines.append("@ti.kernel")
    em.lines.append(f"def {fn_name}({params}){ret}:")
    if ir.note:
        em.lines.append(f"    # {ir.note}")
    em.block(ir.body, 1, ())
    apart = [(key, name) for key, name in em.component_fields.items() if key[0] in added]
    if apart:  # (why, once, after the signature)
        (field_id, component), name = apart[0]
        entry, more = "][".join(map(str, component)), ", etc." if len(apart) > 1 else ""
        em.lines.insert(2 + bool(ir.note), f"    # {name} is {em.field_names[field_id]}[...][{entry}]{more}: "
                        "Taichi 1.7.4 cannot compile atomics on components beside ndarray parameters")
    return "\n".join(wrapped(line) for line in em.lines) + "\n", em.component_globals


# Taichi 1.7 reads a kernel's source through textwrap.fill(line, width=9999) (kernel_impl.
# _get_tree_and_ctx), which breaks a longer line in two: the parsed tree then has a line more
# than the source Taichi holds, and compiling fails with an IndexError (the programs fuzzer's
# seed 5588194 made a 10240-character tangent inside an atomic max's winner test). Lines past
# LONG_LINE are broken inside their brackets, where Python continues a statement.
LONG_LINE, WRAP_AT = 4000, 120


def wrapped(line):
    """line, broken into lines of about WRAP_AT characters at spaces inside brackets (outside
    string literals) where it is longer than LONG_LINE, the continuations indented 8 past it."""
    if len(line) <= LONG_LINE or line.lstrip().startswith("#"):
        return line
    indent = " " * (len(line) - len(line.lstrip()) + 8)
    out, start, depth, quote = [], 0, 0, None
    for at, c in enumerate(line):
        if quote:
            quote = None if c == quote and line[at - 1] != "\\" else quote
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == " " and depth > 0 and at - start >= WRAP_AT:
            out.append(line[start:at])
            start = at + 1
    out.append(line[start:])
    return ("\n" + indent).join(out)
