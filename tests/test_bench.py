"""The benchmark's spellings of W1-W3 (bench/variants.py) at quick sizes: every value kerndiff
computes agrees with Taichi's own AD, or, where Taichi's grad is wrong (W3's Gaussians summed in
a local), with the same quantity computed in f64. No timing is asserted: speed is measured by
`python -m bench`, not by tests."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_variants_agree_with_taichi_or_with_f64():
    out = subprocess.run([sys.executable, "-m", "bench.workloads", "variants", "--quick", "--systems", "kerndiff,taichi"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    checks = [r for r in rows if "check" in r]
    timed = {(r["workload"], r["op"]) for r in rows if r.get("system") == "kerndiff" and r.get("median")}
    assert len(checks) == 24 and len(timed) == 24
    for r in checks:
        assert "kerndiff" not in r["disagree"], r
        expected = ["taichi"] if (r["workload"], r["op"]) == ("W3 Gaussians", "grad") else []
        assert r["disagree"] == expected, r
