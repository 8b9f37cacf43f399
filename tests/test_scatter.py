"""Scattered adds through per-thread private copies (opt.scatter), on the CPU.

Loops of >= 1024 iterations whose derivative kernels scatter get private copies; these tests use
such sizes and check the numbers against Taichi's own AD and finite differences, that the
copies are back to zero after every launch (a second launch accumulates exactly once more), and
that the primal kernel is left as the user wrote it.
"""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd
from harness import check, cpu_only
from harness import springs as make_springs

pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)

P, S = 300, 2048  # particles, springs: the spring loop is long enough to be chunked


@pytest.fixture(scope="module")
def springs(runtime):
    pos, E, energy = make_springs(P, S, 3, needs_grad=True)
    return pos, E, ti.kernel(energy), kd.kernel(energy)


def _grad(pos, E, run):
    pos.grad.fill(0)
    E.grad[None] = 1.0
    run()
    return pos.grad.to_numpy()


@cpu_only("private copies are made on Taichi's CPU backends only")
def test_reverse_uses_private_copies_and_matches_taichi_grad(springs):
    pos, E, tk, kk = springs
    src = kk.reverse.source
    assert "claim_slot(" in src and "pos_adj_private[slot, ends[s][0]][0]" in src
    assert "pos_adj[ends" not in src  # no atomic scatter into the real field is left
    assert "claim_slot" not in kk.source  # the primal stays as written
    E[None] = 0
    tk()
    expected = _grad(pos, E, tk.grad)
    got = _grad(pos, E, kk.reverse)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert np.abs(got).max() > 1.0


def test_private_copies_are_zero_after_each_launch(springs):
    pos, E, tk, kk = springs
    once = _grad(pos, E, kk.reverse)
    kk.reverse()  # accumulates once more: exactly twice, if no copy kept a stale sum
    np.testing.assert_allclose(pos.grad.to_numpy(), 2 * once, rtol=1e-12, atol=1e-12)


@cpu_only("private copies are made on Taichi's CPU backends only")
def test_every_copy_is_summed_and_zeroed(springs):
    """Which copies a launch uses depends on the schedule, so plant a value in each copy by hand:
    the launch must add all of them into pos_adj and leave them zero."""
    from kerndiff.runtime.registry import REGISTRY
    pos, E, tk, kk = springs
    once = _grad(pos, E, kk.reverse)
    from kerndiff.runtime.registry import element_shape, field_dtype
    # (dtype, element shape, (shape of its copies, their offset)) of each field added into
    key = ((field_dtype(pos.grad), element_shape(pos.grad), ((P,), (0,))),)
    (copies, busy), = [v for k, v in REGISTRY.derived.items() if k[0] == "private" and k[1] == key]
    private, = copies
    threads = private.shape[0]
    planted = np.random.default_rng(1).standard_normal((threads, P, 2))
    private.from_numpy(planted)
    busy.fill(1)  # a stale claim from an interrupted launch must not block the next one
    got = _grad(pos, E, kk.reverse)
    np.testing.assert_allclose(got, once + planted.sum(axis=0), rtol=1e-12, atol=1e-12)
    assert not private.to_numpy().any() and not busy.to_numpy().any()


@cpu_only("private copies are made on Taichi's CPU backends only")
def test_hessian_vector_product_with_private_copies(springs):
    pos, E, tk, kk = springs
    hvp = kk.reverse.forward
    kd.dual(pos)  # the direction v lives here; without it H·v is structurally zero
    assert "pos_adj_dual_private[slot" in hvp.source
    # one comment per source line, not one per alternation of value, tangent and adjoint
    assert "# adjoint of: E[None] += 0.5 * (d.norm() - rest[s]) ** 2, and its tangent" in hvp.source
    assert sum("# adjoint of: d = pos" in line for line in hvp.source.splitlines()) == 1
    # <u, H v> == <v, H u> (the tangents of the other inputs, rest and the seed E_adj, are zero)
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal((P, 2)), rng.standard_normal((P, 2))

    def h_times(t):
        kd.dual(pos).from_numpy(t)
        kd.dual(pos.grad).fill(0)
        pos.grad.fill(0)
        E.grad[None] = 1.0
        hvp()
        return kd.dual(pos.grad).to_numpy()

    np.testing.assert_allclose(np.sum(u * h_times(v)), np.sum(v * h_times(u)), rtol=1e-10)
    check(kk.reverse, "forward", rtol=1e-5, atol=1e-7)  # H·v against finite differences of the gradient


@cpu_only("private copies are made on Taichi's CPU backends only")
def test_forward_of_a_user_scatter(runtime):
    """The user's own scatter `y[idx[i]] += ...` stays atomic in the primal; its forward kernel
    (primal result and tangent both scattered) gets private copies."""
    rng = np.random.default_rng(5)
    n, m = 4096, 64
    x = ti.field(ti.f64, shape=n)
    idx = ti.field(ti.i32, shape=n)
    y = ti.field(ti.f64, shape=m)
    x.from_numpy(rng.uniform(0.5, 1.5, n))
    idx.from_numpy(rng.integers(0, m, n).astype(np.int32))

    @kd.kernel
    def scatter():
        for i in range(n):
            y[idx[i]] += x[i] ** 3

    assert "claim_slot" not in scatter.source
    kd.dual(x)
    assert "y_private" in scatter.forward.source and "y_dual_private" in scatter.forward.source
    y.fill(0)
    check(scatter, "forward", rtol=1e-6)
    check(scatter, "reverse", rtol=1e-6)
    # the forward kernel's primal result equals the primal kernel's
    y.fill(0)
    scatter()
    expected = y.to_numpy()
    y.fill(0)
    scatter.forward()
    np.testing.assert_allclose(y.to_numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(expected, np.bincount(idx.to_numpy(), x.to_numpy() ** 3, m), rtol=1e-12)


@cpu_only("private copies are made on Taichi's CPU backends only")
def test_loop_invariant_and_two_dimensional_targets(runtime):
    """Weights indexed by an inner loop (every point adds into all of them) and a 2-D grid gathered
    at data-dependent cells: both adjoints are scattered; checked against Taichi's kernel.grad()."""
    rng = np.random.default_rng(6)
    n, k, g = 2048, 8, 16
    w = ti.field(ti.f64, shape=k, needs_grad=True)
    x = ti.field(ti.f64, shape=(n, k))
    grid = ti.field(ti.f64, shape=(g, g), needs_grad=True)
    cell = ti.Vector.field(2, ti.i32, shape=n)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    w.from_numpy(rng.standard_normal(k))
    x.from_numpy(rng.standard_normal((n, k)))
    grid.from_numpy(rng.standard_normal((g, g)))
    cell.from_numpy(rng.integers(0, g, (n, 2)).astype(np.int32))

    def fit():
        for i in range(n):
            z = 0.0
            for j in range(k):
                z += w[j] * x[i, j]
            loss[None] += ti.tanh(z) * grid[cell[i][0], cell[i][1]]

    tk, kk = ti.kernel(fit), kd.kernel(fit)
    src = kk.reverse.source
    assert "w_adj_private" in src and "grid_adj_private" in src and "ti.ndrange(16, 16)" in src
    expected = []
    for run in (tk.grad, kk.reverse):
        w.grad.fill(0)
        grid.grad.fill(0)
        loss.grad[None] = 1.0
        run()
        expected.append((w.grad.to_numpy(), grid.grad.to_numpy()))
    (tw, tg), (kw, kg) = expected
    np.testing.assert_allclose(kw, tw, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(kg, tg, rtol=1e-10, atol=1e-12)
    assert np.abs(kw).max() > 1 and np.count_nonzero(kg) > g * g // 2


@cpu_only("private copies are made on Taichi's CPU backends only")
def test_time_step_slices_get_private_copies_of_one_step(runtime):
    """A time-stepped simulation's `x[t, a]` (t a kernel argument): the reverse adds into one step's
    slice of x's adjoint, so the copies are that slice (`x_adj_private[slot, a]`, not one per step)
    and the sum adds them into `x_adj[t, i]`, leaving the other steps' adjoints as they were.
    A slice chosen by the loop (`x[s % 3, a]`) or differing between adds keeps whole copies."""
    rng = np.random.default_rng(8)
    steps, n = 3, 40
    x = ti.Vector.field(2, ti.f64, shape=(steps, n), needs_grad=True)
    f = ti.Vector.field(2, ti.f64, shape=(steps, n), needs_grad=True)
    ends = ti.Vector.field(2, ti.i32, shape=S)
    k = ti.field(ti.f64, shape=(), needs_grad=True)  # a shared parameter: one element, every spring
    k[None] = 0.7
    x.from_numpy(rng.standard_normal((steps, n, 2)))
    e = rng.integers(0, n, (S, 2))
    e[:, 1] = np.where(e[:, 1] == e[:, 0], (e[:, 0] + 1) % n, e[:, 1])
    ends.from_numpy(e.astype(np.int32))

    def forces(t: ti.i32):
        for s in range(S):
            a, b = ends[s][0], ends[s][1]
            d = x[t, a] - x[t, b]
            g = d * ti.sin(k[None] * d.norm())
            f[t, a] += g
            f[t, b] -= g

    def mixed(t: ti.i32):
        for s in range(S):
            a, b = ends[s][0], ends[s][1]
            f[t, a] += ti.sin(x[s % steps, a] - x[t, b])

    def slices(src):
        return [line.strip() for line in src.splitlines() if "x_adj" in line and "=" in line]

    for fn, sliced in ((forces, True), (mixed, False)):
        tk, kk = ti.kernel(fn), kd.kernel(fn)
        src = kk.reverse.source
        assert "claim_slot(" in src
        if sliced:
            # components through scalar fields: the loop also sums k_adj (codegen/components.py)
            assert any(line.startswith("x_adj_private_0[slot, a] =") for line in slices(src)), src
            assert any(line.startswith("x_adj[t, i0][0] = x_adj[t, i0][0] +") for line in slices(src)), src
        else:
            assert not any(line.startswith(("x_adj_private[slot, a]", "x_adj_private_0[slot, a]"))
                           for line in slices(src)), src
            assert any(line.startswith("x_adj_private[slot, s % 3, a][0] =") for line in slices(src)), src
        planted = rng.standard_normal((steps, n, 2))
        f.grad.from_numpy(rng.standard_normal((steps, n, 2)))
        results = []
        for run in (tk.grad, kk.reverse):
            x.grad.from_numpy(planted)
            k.grad[None] = 0.5
            run(1)
            results.append(x.grad.to_numpy())
            results.append(k.grad[None])
        expected, k_expected, got, k_got = results
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(k_got, k_expected, rtol=1e-12)
        if sliced:
            # the shared parameter's adjoint adds up in a local per chunk, one atomic per chunk
            assert "k_adj_chunk = k_adj_chunk +" in src and "k_adj[None] += k_adj_chunk" in src, src
            assert abs(k_got - 0.5) > 1e-3
        if sliced:  # only step 1's adjoints changed
            np.testing.assert_array_equal(got[[0, 2]], planted[[0, 2]])
        assert np.abs(got[1] - planted[1]).max() > 1.0


def test_rows_owned_by_the_loop_index_need_no_atomics(runtime):
    """In a loop over points p, h[p, k] belongs to iteration p alone: its adjoint adds are plain
    read-modify-writes (no `+=`, which Taichi makes atomic), the shared weights' are not."""
    rng = np.random.default_rng(7)
    n, k = 64, 5
    h = ti.field(ti.f64, shape=(n, k), needs_grad=True)
    w = ti.field(ti.f64, shape=k, needs_grad=True)
    out = ti.field(ti.f64, shape=n, needs_grad=True)
    h.from_numpy(rng.standard_normal((n, k)))
    w.from_numpy(rng.standard_normal(k))

    def layer():
        for p in range(n):
            s = 0.0
            for j in range(k):
                s += ti.sin(w[j] * h[p, j])
            out[p] = s * h[p, 0]

    tk, kk = ti.kernel(layer), kd.kernel(layer)
    src = kk.reverse.source
    lines = src.splitlines()
    assert any("h_adj[p, j] = h_adj[p, j] +" in line for line in lines)
    assert not any("h_adj[" in line and "+=" in line for line in lines)
    assert any("w_adj[j] +=" in line for line in lines)
    results = []
    for run in (tk.grad, kk.reverse):
        h.grad.fill(0)
        w.grad.fill(0)
        out.grad.from_numpy(np.linspace(-1, 1, n))
        run()
        results.append((h.grad.to_numpy(), w.grad.to_numpy()))
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
    check(kk, "reverse", rtol=1e-6)


THREADS_SCRIPT = r"""
import sys
import numpy as np
import taichi as ti
import kerndiff as kd

for threads in (1, 4):
    ti.init(arch=ti.cpu, default_fp=ti.f64, cpu_max_num_threads=threads)
    rng = np.random.default_rng(threads)
    n, m = 8192, 50
    x = ti.field(ti.f64, shape=m, needs_grad=True)
    idx = ti.field(ti.i32, shape=n)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    x.from_numpy(rng.standard_normal(m))
    idx.from_numpy(rng.integers(0, m, n).astype(np.int32))

    def f():
        for i in range(n):
            loss[None] += ti.sin(x[idx[i]]) * (i % 7)

    tk, kk = ti.kernel(f), kd.kernel(f)
    src = kk.reverse.source
    assert "claim_slot(" in src and ("x_adj_private[3, i0]" in src) == (threads == 4), src
    grads = []
    for run in (tk.grad, kk.reverse):
        x.grad.fill(0)
        loss.grad[None] = 1.0
        run()
        grads.append(x.grad.to_numpy())
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-12, atol=1e-12)
    print("ok", threads, flush=True)
"""


def test_any_number_of_threads(tmp_path):
    """One private copy per Taichi CPU thread: 1 (a single copy) and 4 (more threads than cores)."""
    import subprocess
    import sys
    script = tmp_path / "threads.py"  # kernels must live in a file (Taichi and kerndiff read source)
    script.write_text(THREADS_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok 1" in out.stdout and "ok 4" in out.stdout


def test_adds_into_one_element_are_merged_only_where_that_is_safe(runtime):
    """Several adds into the same element within a block become one; not across a read of the
    field, a write of a field the moved value reads, or a reassigned index. Same results as Taichi
    running the kernel as written (serial loops, so the reads are deterministic)."""
    n = 6
    x = ti.field(ti.f64, shape=n)
    w = ti.field(ti.f64, shape=n)
    y = ti.field(ti.f64, shape=n)
    seen = ti.field(ti.f64, shape=n)
    idx = ti.field(ti.i32, shape=n)

    def program():
        ti.loop_config(serialize=True)
        for i in range(n):
            y[i] += x[i]
            y[(i + 1) % n] += 0.5  # another element of y in between: still mergeable
            y[i] += x[i] ** 2
            y[idx[i]] += 1.0
            seen[i] = y[idx[0]]  # a read of y: the adds on either side stay apart
            y[idx[i]] += 2.0
            y[i] += w[i]
            w[i] = 10.0  # the value w[i] read above must be added before this write
            y[i] += w[i]
            j = idx[i]
            y[j] += 3.0
            j = idx[(i + 2) % n]
            y[j] += 4.0  # same spelling, another element

    rng = np.random.default_rng(8)
    xv, wv, iv = rng.standard_normal(n), rng.standard_normal(n), rng.integers(0, n, n).astype(np.int32)
    results = []
    for k in (ti.kernel(program), kd.kernel(program)):
        x.from_numpy(xv)
        w.from_numpy(wv)
        idx.from_numpy(iv)
        y.fill(0)
        seen.fill(0)
        k()
        results.append((y.to_numpy(), seen.to_numpy(), w.to_numpy()))
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
    src = kd.kernel(program).source
    assert "y[i] += x[i] + x[i] ** 2" in src, src


def _gradients(fields, loss, run, zero_first=True):
    """The gradients of `fields` after `run` with loss's adjoint seeded to 1; zero_first=False
    adds into what they hold (a second launch must add exactly the same again)."""
    if zero_first:
        for f in fields:
            f.grad.fill(0)
    loss.grad[None] = 1.0
    run()
    return tuple(f.grad.to_numpy() for f in fields)


@cpu_only("private copies are made on Taichi's CPU backends only")
def test_a_loop_over_two_indices_is_chunked_by_its_first(runtime):
    """`for p, j in ti.ndrange(B, H)` (a dense layer): every (p, j) adds into the weights' and the
    inputs' adjoints, which the chunks (rows p, each with all its j) add into private copies;
    checked against Taichi's kernel.grad(), finite differences (through the harness), and twice
    in a row (the copies are zero again after a launch)."""
    rng = np.random.default_rng(8)
    b, h = 1031, 4  # more than 1024 rows: the loop is chunked; a last, shorter chunk
    W = ti.field(ti.f64, shape=(h, h), needs_grad=True)
    X = ti.field(ti.f64, shape=(b, h), needs_grad=True)
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    W.from_numpy(rng.standard_normal((h, h)) / 2)
    X.from_numpy(rng.standard_normal((b, h)))

    def layer():
        for p, j in ti.ndrange(b, h):
            s = 0.0
            for k in range(h):
                s += W[j, k] * X[p, k]
            loss[None] += ti.tanh(s) ** 2

    tk, kk = ti.kernel(layer), kd.kernel(layer)
    src = kk.reverse.source
    assert "for p, j in ti.ndrange((chunk * 2, ti.min(chunk * 2 + 2, 1031)), 4):" in src
    assert "W_adj_private[slot, j, k]" in src and "X_adj_private[slot, p, k]" in src

    tw, tx = _gradients((W, X), loss, tk.grad)
    kw, kx = _gradients((W, X), loss, kk.reverse)
    kw2, kx2 = _gradients((W, X), loss, kk.reverse, zero_first=False)  # adds the same again
    np.testing.assert_allclose(kw, tw, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(kx, tx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(kw2, 2 * kw, rtol=1e-12)
    np.testing.assert_allclose(kx2, 2 * kx, rtol=1e-12)
    assert np.abs(kw).max() > 1
    check(kk, "reverse", rtol=1e-6, atol=1e-8)


@cpu_only("private copies are made on Taichi's CPU backends only")
def test_a_short_first_index_is_chunked_by_its_second(runtime):
    """`for b, j in ti.ndrange(3, N)`: too few values of b for the chunks, so a chunk is one b
    and a run of j (b assigned from the chunk number, no division per iteration), each adding into
    a private copy; every (b, j) runs exactly once: checked against Taichi's kernel.grad() (random
    gather indices, so different chunks add into the same elements), twice in a row (the copies
    are zero again), and against finite differences (harness)."""
    rng = np.random.default_rng(9)
    nb, n = 3, 1100  # 3 * 1100 iterations; 1100 is not a multiple of the run length
    x = ti.field(ti.f64, shape=n, needs_grad=True)
    w = ti.field(ti.f64, shape=(nb, n), needs_grad=True)
    idx = ti.field(ti.i32, shape=(nb, n))
    loss = ti.field(ti.f64, shape=(), needs_grad=True)
    x.from_numpy(rng.standard_normal(n))
    w.from_numpy(rng.standard_normal((nb, n)))
    idx.from_numpy(rng.integers(0, n, (nb, n)).astype(np.int32))

    def gathered():
        for b, j in ti.ndrange(nb, n):
            loss[None] += w[b, j] * ti.sin(x[idx[b, j]]) * (b + 1)

    tk, kk = ti.kernel(gathered), kd.kernel(gathered)
    src = kk.reverse.source
    threads = ti.lang.impl.current_cfg().cpu_max_num_threads
    per = -(-n // -(-512 * threads // nb))  # 4 with 2 threads: 275 runs of j per b
    runs = -(-n // per)
    assert f"b = chunk // {runs}" in src, src
    assert f"for j in range(chunk % {runs} * {per}, ti.min(chunk % {runs} * {per} + {per}, {n})):" in src, src
    assert "x_adj_private[slot, idx[b, j]]" in src and "ti.atomic_add(x_adj" not in src

    tx, tw = _gradients((x, w), loss, tk.grad)
    kx, kw = _gradients((x, w), loss, kk.reverse)
    kx2, _ = _gradients((x, w), loss, kk.reverse, zero_first=False)
    np.testing.assert_allclose(kx, tx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(kw, tw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(kx2, 2 * kx, rtol=1e-12)
    assert np.abs(kx).max() > 1
    check(kk, "reverse", rtol=1e-6, atol=1e-8)


@cpu_only("private copies are made on Taichi's CPU backends only")
def test_fields_keep_their_names_beside_the_locals_kerndiff_adds(runtime):
    """Fields named like the locals the private copies bring (`k`, `slot`, `chunk`): the generated
    source calls the user's fields by their names and gives its own locals others."""
    rng = np.random.default_rng(5)
    pos = ti.field(ti.f64, shape=P, needs_grad=True)
    k = ti.field(ti.f64, shape=S, needs_grad=True)
    slot = ti.field(ti.i32, shape=S)
    chunk = ti.field(ti.i32, shape=S)
    E = ti.field(ti.f64, shape=(), needs_grad=True)
    pos.from_numpy(rng.standard_normal(P))
    k.from_numpy(rng.uniform(0.5, 1.5, S))
    slot.from_numpy(rng.integers(0, P, S).astype(np.int32))
    chunk.from_numpy(rng.integers(0, P, S).astype(np.int32))

    @kd.kernel
    def springs_1d():
        for s in range(S):
            E[None] += 0.5 * k[s] * (pos[slot[s]] - pos[chunk[s]]) ** 2

    src = springs_1d.reverse.source
    assert "claim_slot(" in src
    for name in ("k[s]", "k_adj[s]", "pos[slot[s]]", "pos[chunk[s]]"):
        assert name in src, name
    assert "k_1[" not in src and "slot_1[" not in src and "chunk_1[" not in src
    pv, kv, a, b = pos.to_numpy(), k.to_numpy(), slot.to_numpy(), chunk.to_numpy()
    d = pv[a] - pv[b]
    g_pos = np.zeros(P)
    np.add.at(g_pos, a, kv * d)
    np.add.at(g_pos, b, -kv * d)
    g_pos_got, g_k_got = kd.backward(springs_1d, inputs=[pos, k], output=E)([pv, kv])
    np.testing.assert_allclose(g_pos_got, g_pos, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g_k_got, 0.5 * d * d, rtol=1e-12, atol=1e-12)


def _particles(n, dim, seed):
    """(positions, energy field, the positions' values): n particles in [0, 4)^dim, in f64."""
    pos = ti.Vector.field(dim, ti.f64, shape=n, needs_grad=True)
    E = ti.field(ti.f64, shape=(), needs_grad=True)
    pv = np.random.default_rng(seed).uniform(0, 4, (n, dim))
    pos.from_numpy(pv)
    return pos, E, pv


@cpu_only("private copies are made on Taichi's CPU backends only")
@pytest.mark.parametrize("pairs", ["all", "half"])
def test_a_pair_loop_over_few_particles_is_chunked(runtime, pairs):
    """A pair loop over 200 particles: its outer loop is short, but with the inner loop it runs
    40,000 (or 20,000, over half the pairs) iterations, and Taichi spreads it over its threads,
    so the scatter into pos_adj[j] goes through private copies (atomic adds there made the
    reverse 6x slower than the same gradient written by hand): one i per chunk. Checked against
    the analytic gradient, twice in a row, and the HVP against finite differences."""
    n = 200
    pos, E, pv = _particles(n, 3, seed=11)
    half = pairs == "half"

    @kd.kernel
    def energy():
        for i in range(n):
            e = 0.0
            for j in range(i + 1 if ti.static(half) else 0, n):
                if i != j:
                    r2 = (pos[i] - pos[j]).norm_sqr() + 0.01
                    e += 1.0 / ti.sqrt(r2)
            E[None] += e

    src = energy.reverse.source
    assert "# chunks of one iteration, each adding into one thread's private copy of pos_adj" in src, src
    assert "for i in range(chunk, chunk + 1):" in src and "pos_adj_private[slot, j][0]" in src
    assert "atomic_add" not in src and "pos_adj[j]" not in src
    d = pv[:, None, :] - pv[None, :, :]
    r2 = (d * d).sum(-1) + 0.01
    np.fill_diagonal(r2, np.inf)
    # each unordered pair once (half) or twice (all): dE/dp_i = -k sum_j r2^-3/2 d_ij, k = 1 or 2
    expected = -(1 if half else 2) * np.einsum("ij,ijk->ik", r2 ** -1.5, d)
    got = _grad(pos, E, energy.reverse)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    energy.reverse()  # adds the same again: the copies were zero after the first launch
    np.testing.assert_allclose(pos.grad.to_numpy(), 2 * expected, rtol=1e-10, atol=1e-10)
    kd.dual(pos)
    assert "pos_adj_dual_private[slot, j]" in energy.reverse.forward.source
    check(energy.reverse, "forward", rtol=1e-5, atol=1e-6)


@cpu_only("private copies are made on Taichi's CPU backends only")
def test_a_loop_bounded_by_a_kernel_argument_chooses_at_launch(runtime, monkeypatch):
    """A pair loop over the first m of 200 particles, m a kernel argument: whether private copies
    pay is known only at launch, so the reverse holds the chunks and the loop with atomic adds,
    and a condition on m * m leaves one of them empty. m = 200 (40,000 pair iterations) takes the
    copies, m = 12 (144) the atomics; both against the analytic gradient, twice in a row (the
    copies are zero again after a launch), and the HVP against finite differences. (Such a square
    has its adds at [j] gathered by opt.transposed_gathers since session 56: that pass is off
    here, as for any pair loop it does not take.)"""
    from kerndiff.opt import transposed_gathers
    monkeypatch.setattr(transposed_gathers, "gather_pair_adds", lambda ir, *args: ir)
    n = 200
    pos, E, pv = _particles(n, 2, seed=12)

    @kd.kernel
    def energy(m: ti.i32):
        for i in range(m):
            for j in range(m):
                if i != j:
                    E[None] += 1.0 / ti.sqrt((pos[i] - pos[j]).norm_sqr() + 0.01)

    src = energy.reverse.source
    assert "use_copies = iterations >= 2.0 and iterations * ti.cast(m, ti.f64) >= 1024.0" in src, src
    assert "for chunk in range(ti.select(use_copies, 1024, 0)):" in src
    assert "for i_1 in range(ti.select(use_copies, m, 0), m):" in src and "pos_adj[j_1][0] -= " in src
    assert "for i0 in range(ti.select(use_copies, 200, 0)):" in src
    for m in (200, 12, 200):
        d = pv[:m, None, :] - pv[None, :m, :]
        r2 = (d * d).sum(-1) + 0.01
        np.fill_diagonal(r2, np.inf)
        expected = np.zeros((n, 2))
        expected[:m] = -2 * np.einsum("ij,ijk->ik", r2 ** -1.5, d)
        got = _grad(pos, E, lambda: energy.reverse(m))
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
        energy.reverse(m)
        np.testing.assert_allclose(pos.grad.to_numpy(), 2 * expected, rtol=1e-10, atol=1e-10)
    kd.dual(pos)
    for m in (200, 12):
        check(energy.reverse, "forward", args=(m,), rtol=1e-5, atol=1e-6)
    # pos_adj and pos_adj_dual pay alike: their test once, its estimate's like terms collected
    (condition,) = [line for line in energy.reverse.forward.source.splitlines() if "use_copies =" in line]
    tests = condition.split(" = ", 1)[1].split(" and ")
    assert len(tests) == len(set(tests)) == 3 and "iterations + iterations" not in condition, condition


@cpu_only("private copies are made on Taichi's CPU backends only")
def test_kernels_share_private_copies_by_shape(runtime):
    """Private copies live within a launch, so loops adding into fields of the same types and
    shapes share them, in any kernel: a second kernel scattering into other fields makes no SNode
    tree, names the copies after its own fields, and both gradients agree with Taichi's own AD
    (the first again after the second ran, and a kernel adding into both at once in between)."""
    from taichi.lang import impl
    n, m = 300, 2048
    idx = ti.field(ti.i32, m)
    a, b = (ti.field(ti.f64, n, needs_grad=True) for _ in range(2))
    loss = ti.field(ti.f64, (), needs_grad=True)
    idx.from_numpy(np.random.default_rng(2).integers(0, n, m).astype(np.int32))
    a.from_numpy(np.linspace(-1.0, 1.0, n))
    b.from_numpy(np.linspace(0.5, 1.5, n))

    def on_a():
        for s in range(m):
            loss[None] += ti.sin(a[idx[s]]) * (s % 7)

    def on_b():
        for s in range(m):
            loss[None] += b[idx[s]] ** 3 * (s % 5)

    def on_both():
        for s in range(m):
            loss[None] += a[idx[s]] * b[idx[(s + 1) % m]]

    def grads(fn):
        out = []
        for make in (ti.kernel, kd.kernel):
            k = make(fn)
            a.grad.fill(0)
            b.grad.fill(0)
            loss.grad[None] = 1.0
            (k.grad if make is ti.kernel else k.reverse)()
            out.append(np.concatenate([a.grad.to_numpy(), b.grad.to_numpy()]))
        np.testing.assert_allclose(out[1], out[0], rtol=1e-12, atol=1e-12)
        return k

    ka = grads(on_a)
    trees = impl.get_runtime().prog.get_snode_tree_size()
    kb = grads(on_b)
    assert impl.get_runtime().prog.get_snode_tree_size() == trees
    assert "a_adj_private[slot" in ka.reverse.source and "b_adj_private[slot" in kb.reverse.source
    assert "a_adj_private" not in kb.reverse.source
    grads(on_both)
    grads(on_a)
