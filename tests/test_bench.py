"""The benchmark's workloads at quick sizes. W1-W3: kerndiff's values agree with Taichi's own AD
and with the derivatives written by hand (bench/by_hand.py, worked out on paper: an independent
reference for the HVPs, which Taichi cannot compute). Their spellings (bench/variants.py): every
value kerndiff computes agrees with Taichi's own AD, or, where Taichi's grad is wrong (W3's
Gaussians summed in a local), with the same quantity computed in f64. No timing is asserted:
speed is measured by `python -m bench`, not by tests."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_rows(*args):
    out = subprocess.run([sys.executable, "-m", "bench.workloads", *args, "--quick"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("workload, ops", [("W1", {"grad", "jvp"}), ("W2", {"grad", "hvp"}), ("W3", {"grad", "hvp"})])
def test_kerndiff_agrees_with_taichi_and_with_derivatives_by_hand(workload, ops):
    rows = bench_rows(workload, "--systems", "kerndiff,taichi,hand")
    checks = [r for r in rows if "check" in r]  # (W1's JVP twice: Taichi's FwdMode runs apart)
    assert {r["op"] for r in checks} == {"primal"} | ops
    for r in checks:
        assert r["check"] == "agree" and r["disagree"] == [], r
    values = {(r["op"], r["system"]): r["value"] for r in rows if r.get("median")}
    for op in ops:  # the check above compared these; here: each was computed and is not trivial
        assert values[(op, "kerndiff")] != 0 and (op, "hand") in values


def test_variants_agree_with_taichi_or_with_f64():
    rows = bench_rows("variants", "--systems", "kerndiff,taichi")
    checks = [r for r in rows if "check" in r]
    timed = {(r["workload"], r["op"]) for r in rows if r.get("system") == "kerndiff" and r.get("median")}
    assert len(checks) == 38 and len(timed) == 38
    for r in checks:
        assert "kerndiff" not in r["disagree"], r
        expected = ["taichi"] if (r["workload"], r["op"]) == ("W3 Gaussians", "grad") else []
        assert r["disagree"] == expected, r


def test_timed_calls_start_on_an_idle_process():
    """bench.workloads.quiesce waits while a thread of this process is still busy (as JAX's CPU
    runtime is for tens of milliseconds after a call returns) and returns at once when none is."""
    import threading
    import time

    from bench.workloads import quiesce

    t0 = time.perf_counter()
    quiesce()
    assert time.perf_counter() - t0 < 0.5  # idle: a window or a few

    def spin(seconds=0.3):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    busy = threading.Thread(target=spin)
    busy.start()
    t0 = time.perf_counter()
    quiesce()
    waited = time.perf_counter() - t0
    busy.join()
    assert waited >= 0.2, waited


def test_a_report_from_rows_made_elsewhere(tmp_path):
    """`python -m bench --from-rows` (bench/device_checks.sh's rows from a GPU machine): the
    machine the rows name, their medians, the targets' ratios from them, and the JSON."""
    rows = [{"machine": "a lent machine, GPU: NVIDIA H200"},
            {"workload": "W2", "op": "grad", "system": "kerndiff", "median": 0.002, "min": 0.0019,
             "max": 0.0021, "value": -1.5},
            {"workload": "W2", "op": "grad", "system": "taichi", "median": 0.008, "min": 0.0075,
             "max": 0.009, "value": -1.5},
            {"workload": "W2", "op": "hvp", "system": "kerndiff", "median": 0.005, "min": 0.005,
             "max": 0.006, "value": 3.0}]
    path = tmp_path / "rows.jsonl"
    path.write_text("[Taichi] version 1.7.4 (a line that is not a row)\n"
                    + "\n".join(json.dumps(r) for r in rows) + "\n")
    out = subprocess.run([sys.executable, "-m", "bench", "--arch", "gpu", "--from-rows", str(path),
                          "--json", str(tmp_path / "out.json")], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert text.startswith("machine: a lent machine, GPU: NVIDIA H200; arch=gpu"), text
    assert "| W2 | grad | kerndiff | 2.00 ms | 1.90 ms–2.10 ms | -1.5 |" in text, text
    assert "| W2 kerndiff reverse / Taichi grad | 0.25 | ≤ 0.8 | yes |" in text, text
    assert "| W2 HVP / kerndiff reverse | 2.50 | ≤ 2 | no |" in text, text
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["machine"] == rows[0]["machine"] and saved["rows"] == rows[1:]


def test_back_to_back_timing_runs_and_reports_every_kernel():
    """bench.back_to_back (W2's kernels timed back to back, the random-gather curve that shows the
    cache this process has, and with --touched W2's kernels on springs folded into fewer particles)
    runs at quick sizes and reports a time for each kernel and size."""
    out = subprocess.run([sys.executable, "-m", "bench.back_to_back", "--quick", "--reps", "3", "--touched"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| ") and " ms |" in line and line.count(" | ") == 1]
    assert [r.split(" | ")[0][2:] for r in rows] == ["kerndiff primal", "kerndiff forward", "kerndiff reverse",
                                                      "kerndiff HVP", "Taichi primal", "Taichi grad"]
    assert all(float(r.split(" | ")[1].split()[0]) > 0 for r in rows)
    gathers = [line for line in lines if line.startswith("random gathers by working set:")]
    assert "reverse / primal" in out.stdout and len(gathers) == 1 and gathers[0].count(" MB ") == 8
    folded = [line.split(" | ") for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert [int(r[0][2:]) for r in folded] == [10**4 * k // 16 for k in (1, 2, 3, 4, 6, 8, 12, 16)]
    assert all(float(r[c].split()[0]) > 0 for r in folded for c in (3, 4, 5))
