"""kerndiff's offline cache (runtime/offline_cache.py): generated source read back from disk.

A hit must give what a miss gives: the same source and, bound to this runtime's fields, the same
numbers to the last bit (the corpus' loops are too short for Taichi to split among threads). The
tests make their kernels in one Taichi runtime with an empty cache (every kernel a miss), then in
a new runtime again (every kernel a hit, with fields of its own), and compare; a kernel whose
scattered adds take private copies and whose HVP gathers from a packed record checks that the hit
asks the registry for those helper fields again. The runtimes here run without Taichi's own
offline cache (which can serve a kernel compiled under one ti.init to the next in one process,
conftest.py), with kerndiff's cache folder set by hand; one test runs two processes with both
caches on, as a user would.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import TEST_ARCH, check, derivatives, equal_directions_against_generated, springs
from kerndiff.runtime import offline_cache
from test_corpus import CORPUS_NAMES, build_corpus


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """kerndiff's cache on, in a folder of the test's own, with counts from zero."""
    monkeypatch.setattr(offline_cache, "directory", lambda: str(tmp_path))
    monkeypatch.setattr(offline_cache, "COUNTS", dict.fromkeys(offline_cache.COUNTS, 0))
    yield tmp_path
    ti.reset()


def new_runtime():
    ti.init(arch=getattr(ti, TEST_ARCH), default_fp=ti.f64, random_seed=0)  # (TI_OFFLINE_CACHE=0: conftest)
    offline_cache.COUNTS.update(dict.fromkeys(offline_cache.COUNTS, 0))


def corpus_run():
    """harness.derivatives of every corpus kernel, with its equal-directions variant's outputs,
    and the sources of the kernels they ran."""
    corpus = build_corpus()
    numbers, sources = {}, {}
    for name in CORPUS_NAMES:
        k, args = corpus[name]
        numbers[name] = derivatives(k, args)
        if name != "walks_and_their_maximum":  # (no variant: an atomic max)
            got, _ = equal_directions_against_generated(k, args)
            numbers[name + " equal directions"] = got
        sources[name] = [k.source, k.forward.source, k.reverse.forward.source]
    return numbers, sources


def assert_identical(a, b, rtol=0.0):
    """Equal to the last bit (rtol 0), or to rtol where the sums' order varies by run."""
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=0.0, err_msg=name)


def test_the_corpus_from_the_cache_gives_the_same_sources_and_numbers(folder):
    new_runtime()
    numbers, sources = corpus_run()
    filled = dict(offline_cache.COUNTS)
    # (some kernels are made twice in one runtime: the second time is a hit already)
    assert filled["miss"] > 4 * len(CORPUS_NAMES) and filled["uncached"] == 0
    assert len(list(folder.glob("*/*.json"))) == filled["miss"]
    new_runtime()
    numbers_again, sources_again = corpus_run()
    assert offline_cache.COUNTS == {"hit": filled["hit"] + filled["miss"], "miss": 0, "uncached": 0}
    assert sources_again == sources
    assert_identical(numbers, numbers_again)


P, S = 300, 2048  # particles, springs: long enough for the reverse's adds to take private copies


def springs_run():
    """Gradient (twice: the private copies must be zero again after each launch) and HVP."""
    pos, E, fn = springs(P, S, 3, needs_grad=True, needs_dual=True)
    energy = kd.kernel(fn)
    energy()
    pos.grad.fill(0)
    E.grad[None] = 1.0
    energy.reverse()
    once = pos.grad.to_numpy()
    energy.reverse()
    twice = pos.grad.to_numpy()
    pos.grad.fill(0)
    pos.dual.from_numpy(np.linspace(-1.0, 1.0, 2 * P).reshape(P, 2))
    kd.dual(kd.adjoint(E))[None] = 0.0
    kd.dual(kd.adjoint(pos)).fill(0)
    energy.reverse.forward()
    hvp = kd.dual(kd.adjoint(pos)).to_numpy()
    return (once, twice, hvp), energy.reverse.source + energy.reverse.forward.source, (pos, E, energy)


def test_helper_fields_are_asked_for_again_on_a_hit(folder, monkeypatch):
    """Private copies (opt.scatter) and, at any size here, the record of positions and tangents
    the HVP gathers from (opt.packed_gathers)."""
    from kerndiff.opt import packed_gathers
    monkeypatch.setattr(packed_gathers, "MIN_BYTES", 0)
    new_runtime()
    numbers, source, _ = springs_run()
    new_runtime()
    numbers_again, source_again, (pos, E, energy) = springs_run()
    assert offline_cache.COUNTS["hit"] >= 3 and offline_cache.COUNTS["miss"] == 0
    assert source_again == source
    if TEST_ARCH in ("cpu", "x64", "arm64"):
        assert "pos_adj_private[slot, ends[s][0]][0]" in source and "pos_packed[ends[s][0], 0]" in source
    once, twice, hvp = numbers_again
    np.testing.assert_allclose(twice, 2 * once, rtol=1e-12)  # copies zero after each launch
    # (which thread's copy takes which adds varies by run: sums agree to rounding)
    assert_identical({"springs": numbers}, {"springs": numbers_again}, rtol=1e-12)
    assert np.abs(hvp).max() > 1.0
    # and the hit's gradient against finite differences
    check(energy, "reverse", rtol=1e-6, atol=1e-8)


def array_springs_run():
    """The springs over ndarrays (positions (P, 2), ends (S, 2) of i32) passed as parameters: the
    gradient and the HVP, and the sources."""
    pos, E, _ = springs(P, S, 3, needs_grad=True)
    x, ends = ti.ndarray(ti.f64, (P, 2), needs_grad=True), ti.ndarray(ti.i32, (S, 2))
    x.from_numpy(pos.to_numpy())
    rng = np.random.default_rng(3)
    pairs = rng.integers(0, P, (S, 2))
    pairs[:, 1] = np.where(pairs[:, 1] == pairs[:, 0], (pairs[:, 0] + 1) % P, pairs[:, 1])
    ends.from_numpy(pairs.astype(np.int32))

    @kd.kernel
    def energy(x: ti.types.ndarray(), ends: ti.types.ndarray()):
        for s in range(ends.shape[0]):
            a, b = ends[s, 0], ends[s, 1]
            d = ti.Vector([x[a, 0] - x[b, 0], x[a, 1] - x[b, 1]])
            E[None] += 0.5 * (d.norm() - 0.3) ** 2

    energy(x, ends)
    E.grad[None] = 1.0
    energy.reverse(x, ends)
    grad = x.grad.to_numpy()
    x.grad.fill(0)
    kd.dual(x).from_numpy(np.linspace(-1.0, 1.0, 2 * P).reshape(P, 2))
    energy.forward(x, ends)
    energy.reverse.forward(x, ends)
    return (grad, kd.dual(x.grad).to_numpy()), energy.reverse.source + energy.reverse.forward.source


def test_kernels_over_ndarrays_from_the_cache(folder):
    """The generated kernels take the arrays as parameters; a hit binds the names of this
    runtime's arrays (and asks again for the private copies beside them)."""
    new_runtime()
    numbers, source = array_springs_run()
    assert offline_cache.COUNTS["miss"] >= 3
    new_runtime()
    numbers_again, source_again = array_springs_run()
    assert offline_cache.COUNTS["hit"] >= 3 and offline_cache.COUNTS["miss"] == 0
    assert source_again == source
    assert "x: ti.types.ndarray(dtype=ti.f64, ndim=2)" in source
    if TEST_ARCH in ("cpu", "x64", "arm64"):
        assert "x_adj_private[slot, " in source
    assert np.abs(numbers[1]).max() > 1.0
    assert_identical({"springs": numbers}, {"springs": numbers_again}, rtol=1e-12)


def test_a_shape_or_a_derivative_field_changes_the_key(folder):
    new_runtime()

    def elementwise(n, dual):
        x = ti.field(ti.f64, shape=n, needs_dual=dual)
        y = ti.field(ti.f64, shape=n, needs_dual=dual)
        x.from_numpy(np.linspace(0.1, 0.9, n))

        @kd.kernel
        def k():
            for i in x:
                y[i] = ti.sin(x[i]) * x[i]

        return x, y, k

    # (without x.dual, x is no input of k.forward: y's tangent is zero, another kernel)
    for n, dual in ((8, True), (9, True), (8, False)):
        x, y, k = elementwise(n, dual)
        k.forward()
    assert offline_cache.COUNTS == {"hit": 0, "miss": 3, "uncached": 0}
    x, y, k = elementwise(8, True)
    k.forward()
    assert offline_cache.COUNTS == {"hit": 1, "miss": 3, "uncached": 0}
    check(k, "forward")


def test_unreadable_or_altered_entries_are_misses_and_are_written_again(folder):
    new_runtime()
    numbers, source, _ = springs_run()
    entries = sorted(folder.glob("*/*.json"))
    assert len(entries) >= 3
    for k, path in enumerate(entries):
        if k % 2:
            path.write_text('{"format": ' + str(offline_cache.FORMAT) + ', "source": "broken"')  # cut short
        else:  # whole, but one character of its source changed
            entry = json.loads(path.read_text())
            altered = entry["source"].replace(" + ", " - ", 1)
            assert altered != entry["source"]
            path.write_text(json.dumps(dict(entry, source=altered)))
    new_runtime()
    numbers_again, source_again, _ = springs_run()
    assert offline_cache.COUNTS["hit"] == 0 and offline_cache.COUNTS["miss"] == len(entries)
    assert source_again == source
    assert_identical({"springs": numbers}, {"springs": numbers_again}, rtol=1e-12)
    assert all(json.loads(p.read_text())["source"].startswith("@ti.kernel") for p in entries)


SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import taichi as ti
    ti.init(arch=ti.cpu, default_fp=ti.f64, offline_cache=True, offline_cache_file_path=sys.argv[1])
    import kerndiff as kd
    from kerndiff.runtime import offline_cache
    x = ti.field(ti.f64, shape=16, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    x.from_numpy(np.linspace(0.1, 1.6, 16))

    @kd.kernel
    def k():
        for i in x:
            loss[None] += ti.exp(0.5 * x[i]) * ti.sin(x[i])

    k()
    loss.grad[None] = 1.0
    k.reverse()
    print(repr(float(x.grad.to_numpy().sum())), offline_cache.COUNTS["hit"], offline_cache.COUNTS["miss"])
""")


def test_two_processes_with_taichi_s_offline_cache_on(tmp_path):
    """The second process reads both kernels back from <Taichi's cache folder>/kerndiff; with
    KERNDIFF_OFFLINE_CACHE=0 neither is read."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, TI_OFFLINE_CACHE="1")
    env.pop(offline_cache.ENV, None)  # (as Taichi's cache, whatever the caller's setting)

    def run(**extra):
        out = subprocess.run([sys.executable, str(script), str(tmp_path / "ticache")], env=dict(env, **extra),
                             capture_output=True, text=True, check=True).stdout.split("\n")
        grad, hits, misses = out[-2].split()
        return float(grad), int(hits), int(misses)

    grad, hits, misses = run()
    assert (hits, misses) == (0, 2)
    assert len(list((tmp_path / "ticache" / "kerndiff").glob("*/*.json"))) == 2
    assert run() == (grad, 2, 0)
    assert run(KERNDIFF_OFFLINE_CACHE="0") == (grad, 0, 0)
    x = np.linspace(0.1, 1.6, 16)
    expected = np.exp(0.5 * x) * (0.5 * np.sin(x) + np.cos(x))
    assert grad == pytest.approx(expected.sum(), rel=1e-12)


def test_trim_deletes_least_recently_used_entries_down_to_the_cleaning_factor(tmp_path):
    """Taichi's own settings bound the folder: over offline_cache_max_size_of_files, the oldest
    entries go until the rest is the cleaning factor below it; other files stay."""
    for k in range(10):
        path = tmp_path / f"{k:02x}" / f"{k:064x}.json"
        path.parent.mkdir()
        path.write_text("x" * 1000)
        os.utime(path, (1000 + k, 1000 + k))
    (tmp_path / "00" / "note.txt").write_text("y" * 5000)
    assert offline_cache.trim(str(tmp_path), 10_000, 0.25) == 0  # at the limit: nothing goes
    assert offline_cache.trim(str(tmp_path), 9_000, 0.25) == 4  # down to 6,750 bytes: six stay
    left = sorted(p.name for p in tmp_path.glob("*/*.json"))
    assert left == [f"{k:064x}.json" for k in range(4, 10)]
    assert (tmp_path / "00" / "note.txt").exists()


def test_a_hit_is_recently_used_and_stores_keep_the_folder_under_the_limit(folder, monkeypatch):
    new_runtime()
    springs_run()
    entries = sorted(folder.glob("*/*.json"))
    for path in entries:
        os.utime(path, (1000, 1000))
    new_runtime()
    springs_run()
    assert offline_cache.COUNTS["hit"] >= 3 and offline_cache.COUNTS["miss"] == 0
    assert all(path.stat().st_mtime > 1000 for path in entries)  # touched by the hits
    # a limit below what is there: the next store trims to 75% of it
    size = sum(path.stat().st_size for path in entries)
    monkeypatch.setattr(offline_cache, "_limits", lambda: (size // 2, 0.25))
    monkeypatch.setattr(offline_cache, "_STORES", [0])
    new_runtime()
    x = ti.field(ti.f64, shape=4, needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)

    @kd.kernel
    def fresh():
        for i in x:
            loss[None] += ti.cos(x[i]) ** 3

    fresh.reverse()
    assert offline_cache.COUNTS["miss"] == 1
    assert sum(path.stat().st_size for path in folder.glob("*/*.json")) <= size // 2 * 0.75
