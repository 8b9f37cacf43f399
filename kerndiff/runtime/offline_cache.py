"""kerndiff's offline cache: generated kernel source kept on disk, beside Taichi's offline cache.

A derived kernel's last stage, opt.finalize and codegen, is about three quarters of kerndiff's
transform time (7 of W2's 9.5 ms for k.reverse.forward), and its output, the source text, is a
function of the transformed IR and a few facts about the fields and the Taichi configuration
alone (docs/design.md: no pass orders anything by a set or a hash). A later process that
reaches the same transformed IR reads the source back instead of making it again, as Taichi
then reads back what it compiled from that source.

The key is a digest of
  * the transformed IR, written out node by node with every field replaced by its position in
    order of first appearance (so the key names no object of this process);
  * per field: its class, vector/matrix dimensions, dtype, shape, offset, the name generated code
    gives it, and whether it is a derivative field (opt.finalize treats those apart);
  * the options finalize runs with (derived or helper kernel, kerndiff's CPU math, the thread
    count of private scatter copies), the Taichi arch, default_fp and default_ip;
  * the versions of Python, numpy and Taichi, and a digest of kerndiff's own source files, read
    once at import.
An entry holds the source, what each of its global names stands for (a field by its position, a
component of one, a helper function), and the helper fields finalize asked the registry for
(opt.scatter's private copies, opt.packed_gathers' records), which a hit asks for again. Anything the key cannot write out,
or a global the entry could not describe, makes the kernel go uncached: a miss costs the time
the cache would have saved, a wrong hit a wrong derivative.

It is on where Taichi's offline cache is (`ti.init(offline_cache=...)`, TI_OFFLINE_CACHE; files
under its offline_cache_file_path, in kerndiff/); KERNDIFF_OFFLINE_CACHE=0 turns it off and
KERNDIFF_OFFLINE_CACHE=<folder> on, in that folder.
Unreadable entries, and entries whose bytes no longer match the digest stored in them, count as
misses; entries are written whole (a temporary file renamed).

Size: as Taichi's own cache, at most `offline_cache_max_size_of_files` bytes (ti.init; 100 MB by
default), least recently used first out: a hit touches its entry's time, and the first entry a
process stores, and every 256th after it, totals the folder and, where it is over the limit,
deletes the oldest entries until it is `offline_cache_cleaning_factor` (0.25) below. Entries made
by another version of kerndiff (their digest holds its sources) are never hit again and so age
out. An entry is 2-30 KB.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile

import numpy as np
import taichi as ti
from taichi.lang import impl

from ..ir import nodes as N

ENV = "KERNDIFF_OFFLINE_CACHE"
FORMAT = 2  # bump when the entry layout changes
# kernels read back, made and stored, and made but not stored (the key or the entry could not be
# written out), since the process started
COUNTS = {"hit": 0, "miss": 0, "uncached": 0}


def _package_digest() -> str:
    """A digest of kerndiff's source files (about 1 ms, once per process): any change to the
    compiler makes every earlier entry a miss."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        paths.extend(os.path.join(folder, f) for f in files if f.endswith(".py"))
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(os.path.relpath(p, root).encode() + b"\0")
        with open(p, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


PACKAGE = _package_digest()
VERSIONS = f"{FORMAT} py{sys.version_info[0]}.{sys.version_info[1]} numpy{np.__version__} taichi{ti.__version__}"


def directory():
    """Where entries go, or None when the cache is off. KERNDIFF_OFFLINE_CACHE: 0 off; unset or 1
    as Taichi's offline cache; any other value the folder to use, whatever Taichi's setting."""
    chosen = os.environ.get(ENV, "1")
    if chosen == "0":
        return None
    if chosen not in ("", "1"):
        return chosen
    cfg = impl.current_cfg()
    if not cfg.offline_cache or not cfg.offline_cache_file_path:
        return None
    return os.path.join(cfg.offline_cache_file_path, "kerndiff")


class Unkeyable(Exception):
    """The IR holds something the key cannot write out: the kernel goes uncached."""


_FIELD_NAMES = {}  # dataclass -> the names of its fields, in order


def _names(cls):
    got = _FIELD_NAMES.get(cls)
    if got is None:
        got = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return got


class _Writer:
    """Writes IR out as text: every dataclass field of every node (also those equality ignores:
    source positions and tags reach comments), fields by position of first appearance."""

    def __init__(self):
        self.fields = []   # field objects, in order of first appearance
        self.position = {}  # id(field) -> its position in self.fields
        self.memo = {}     # id(node) -> (node, its text): subexpressions are shared (the node is
        # held so that its id is not reused by another while the writer lives)

    def field(self, f) -> int:
        k = self.position.get(id(f))
        if k is None:
            k = self.position[id(f)] = len(self.fields)
            self.fields.append(f)
        return k

    def text(self, x) -> str:
        t = type(x)
        if t is str:
            return repr(x)
        if t is tuple:
            return "(" + ",".join([self.text(y) for y in x]) + ")"
        if x is None or t in (int, float, bool) or isinstance(x, np.generic):
            return f"{t.__name__}:{x!r}"
        if t is N.FieldRef:
            return f"R{self.field(x.field)}:{x.component!r}:{x.name!r}:{x.dtype}:{x.shape!r}:{x.offset!r}"
        if dataclasses.is_dataclass(t):
            got = self.memo.get(id(x))
            if got is None:
                inner = ",".join([self.text(getattr(x, n)) for n in _names(t)])
                got = self.memo[id(x)] = (x, f"{t.__name__}({inner})")
            return got[1]
        raise Unkeyable(t.__name__)


def _field_facts(f, aliases, registry) -> str:
    parent = registry.parents.get(id(f))
    return repr((type(f).__name__, getattr(f, "n", None), getattr(f, "m", None), str(f.dtype),
                 tuple(f.shape), registry.display_name(f, aliases), registry.name_of(f),
                 None if parent is None else parent[1:]))


def key_of(ir: N.KernelIR, options: dict, registry):
    """(hex digest, the fields in the order the digest numbers them)."""
    w = _Writer()
    # every field of the kernel's IR but the aliases, whose keys are ids (written by position below)
    body = w.text(tuple(getattr(ir, n) for n in _names(type(ir)) if n != "field_aliases"))
    aliases = dict(ir.field_aliases)
    kept_aliases = tuple((w.position[fid], name) for fid, name in ir.field_aliases if fid in w.position)
    cfg = impl.current_cfg()
    h = hashlib.sha256()
    for part in (PACKAGE, VERSIONS, str(cfg.arch), str(cfg.default_fp), str(cfg.default_ip),
                 repr(sorted(options.items())), body, repr(kept_aliases)):
        h.update(part.encode())
        h.update(b"\0")
    for f in w.fields:
        h.update(_field_facts(f, aliases, registry).encode())
    return h.hexdigest(), w.fields


class Recorder:
    """Stands in for the registry's helper-field makers (private_copies for opt.scatter, packed
    for opt.packed_gathers) while finalize runs, noting each request by field position and the
    fields it returned, so that a hit can ask again (replay)."""

    def __init__(self, registry, fields):
        self.registry = registry
        self.position = {id(f): k for k, f in enumerate(fields)}
        self.requests = []  # ["private_copies", [[position, shape, offset], ...], threads] or
        #                     ["packed", [position, ...], dtype, shape, offset]
        self.made = []      # fields the requests returned, in order
        self.keyable = True

    def _known(self, fields):
        self.keyable = self.keyable and all(id(f) in self.position for f in fields)
        return self.keyable

    def private_copies(self, specs, threads):
        specs = list(specs)
        copies, busy = self.registry.private_copies(specs, threads)
        if self._known([f for f, _, _ in specs]):
            self.requests.append(["private_copies", [[self.position[id(f)], list(shape), list(offset)]
                                                     for f, shape, offset in specs], threads])
            self.made.extend([copies[id(f)] for f, _, _ in specs] + [busy])
        return copies, busy

    def packed(self, fields, dtype, shape, offset):
        got = self.registry.packed(fields, dtype, shape, offset)
        if self._known(fields):
            self.requests.append(["packed", [self.position[id(f)] for f in fields], dtype, list(shape), list(offset)])
            self.made.append(got)
        return got


def _replay(requests, fields, registry):
    """The helper fields of an entry's requests, asked of the registry again (those a kernel made
    earlier in this process are the same fields)."""
    made = []
    for kind, *args in requests:
        if kind == "private_copies":
            specs, threads = args
            asked = [(fields[k], tuple(shape), tuple(offset)) for k, shape, offset in specs]
            copies, busy = registry.private_copies(asked, threads)
            made.extend([copies[id(f)] for f, _, _ in asked] + [busy])
        elif kind == "packed":
            positions, dtype, shape, offset = args
            made.append(registry.packed([fields[k] for k in positions], dtype, tuple(shape), tuple(offset)))
        else:
            raise ValueError(kind)
    return made


TRIM_EVERY = 256  # stores between two totals of the folder (the first store of a process totals it)
_STORES = [0]


def _limits():
    """(bytes allowed, fraction below it a trim leaves) from Taichi's settings for its own cache."""
    cfg = impl.current_cfg()
    return int(cfg.offline_cache_max_size_of_files), float(cfg.offline_cache_cleaning_factor)


def trim(folder, limit, factor):
    """Delete the least recently used entries (oldest modification time; load() touches a hit's)
    until the folder's entries take at most limit * (1 - factor) bytes, if they take more than
    limit; returns how many were deleted. Entries another process deletes meanwhile are skipped."""
    entries = []
    for sub, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".json"):
                path = os.path.join(sub, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                entries.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    if total <= limit:
        return 0
    deleted = 0
    for _, size, path in sorted(entries):
        if total <= limit * (1.0 - factor):
            break
        try:
            os.unlink(path)
            deleted += 1
        except OSError:
            pass
        total -= size
    return deleted


def _path(folder, digest):
    return os.path.join(folder, digest[:2], digest + ".json")


def _check(entry) -> str:
    """A digest of what an entry says (its source and the meanings of its names): a changed byte
    makes the entry a miss rather than another kernel."""
    said = [entry["source"], entry["requests"], entry["fields"], entry["components"]]
    return hashlib.sha256(json.dumps(said).encode()).hexdigest()[:32]


def load(folder, digest, fields, registry):
    """(source, {name: field}, {name: (field, component)}) of a stored entry, or None."""
    try:
        with open(_path(folder, digest), encoding="utf-8") as fh:
            entry = json.load(fh)
        if entry.get("format") != FORMAT or entry.get("check") != _check(entry) or \
                not isinstance(entry["source"], str):
            return None
        made = _replay(entry["requests"], fields, registry)
        known = list(fields) + made
        bound = {name: known[k] for name, k in entry["fields"]}
        components = {name: (known[k], tuple(c)) for name, k, c in entry["components"]}
        try:
            os.utime(_path(folder, digest))  # recently used: the last a trim deletes
        except OSError:
            pass
        return entry["source"], bound, components
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def store(folder, digest, fields, recorder, src, bound, components) -> bool:
    """Write the entry for a miss; False (nothing written) where a global is not one of the
    known fields."""
    if not recorder.keyable:
        return False
    position = {}
    for k, f in enumerate(list(fields) + recorder.made):
        position.setdefault(id(f), k)
    if any(id(f) not in position for f in bound.values()) or \
            any(id(f) not in position for f, _ in components.values()):
        return False
    entry = {"format": FORMAT, "source": src, "requests": recorder.requests,
             "fields": [[name, position[id(f)]] for name, f in bound.items()],
             "components": [[name, position[id(f)], list(c)] for name, (f, c) in components.items()]}
    entry["check"] = _check(entry)
    path = _path(folder, digest)
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(entry, fh)
        os.replace(tmp, path)
    except OSError:  # a read-only or full disk: the kernel is simply not cached
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        return False
    if _STORES[0] % TRIM_EVERY == 0:
        trim(folder, *_limits())
    _STORES[0] += 1
    return True


def generated(ir: N.KernelIR, fn_name: str, options: dict, make, registry):
    """(source, {name: field}, {name: (field, component)}) for ir: read from the cache where an
    entry exists, else made by make(helpers) (finalize and codegen, asking helpers for their
    helper fields: the registry, or a Recorder of what they asked) and stored."""
    folder = directory()
    if folder is None:
        return make(registry)
    try:
        digest, fields = key_of(ir, options, registry)
    except Unkeyable:
        COUNTS["uncached"] += 1
        return make(registry)
    got = load(folder, digest, fields, registry)
    if got is not None:
        COUNTS["hit"] += 1
        return got
    recorder = Recorder(registry, fields)
    src, bound, components = make(recorder)
    COUNTS["miss" if store(folder, digest, fields, recorder, src, bound, components) else "uncached"] += 1
    return src, bound, components
