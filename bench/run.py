"""Run the benchmark suite: each workload in its own process, then a table and the ratios.

    python -m bench [--quick] [--arch cpu|gpu] [--json PATH] [--only W1,W2] [--systems kerndiff,taichi]
                    [--reps N] [--markdown PATH]
    python -m bench --arch gpu --from-rows rows.jsonl [--json PATH] [--markdown PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

WORKLOADS = ["W1", "W2", "W3", "W4", "W5", "W6"]
TARGETS = [  # (description, numerator, denominator, limit)
    ("W1 kerndiff reverse / Taichi grad", ("W1", "grad", "kerndiff"), ("W1", "grad", "taichi"), 0.8),
    ("W2 kerndiff reverse / Taichi grad", ("W2", "grad", "kerndiff"), ("W2", "grad", "taichi"), 0.8),
    ("W3 kerndiff reverse / Taichi grad", ("W3", "grad", "kerndiff"), ("W3", "grad", "taichi"), 0.8),
    ("W1 kerndiff reverse / kerndiff primal", ("W1", "grad", "kerndiff"), ("W1", "primal", "kerndiff"), 3),
    ("W2 kerndiff reverse / kerndiff primal", ("W2", "grad", "kerndiff"), ("W2", "primal", "kerndiff"), 3),
    ("W3 kerndiff reverse / kerndiff primal", ("W3", "grad", "kerndiff"), ("W3", "primal", "kerndiff"), 25),
    ("W2 HVP / kerndiff reverse", ("W2", "hvp", "kerndiff"), ("W2", "grad", "kerndiff"), 2),
    ("W3 HVP / kerndiff reverse", ("W3", "hvp", "kerndiff"), ("W3", "grad", "kerndiff"), 2),
    ("W2 kerndiff grad / JAX grad", ("W2", "grad", "kerndiff"), ("W2", "grad", "jax"), 1),
    ("W2 kerndiff HVP / JAX HVP", ("W2", "hvp", "kerndiff"), ("W2", "hvp", "jax"), 1),
    ("W3 kerndiff grad / JAX grad", ("W3", "grad", "kerndiff"), ("W3", "grad", "jax"), 1),
    ("W3 kerndiff HVP / JAX HVP", ("W3", "hvp", "kerndiff"), ("W3", "hvp", "jax"), 1),
    ("W2 kerndiff grad / PyTorch grad", ("W2", "grad", "kerndiff"), ("W2", "grad", "torch"), 1),
    ("W2 kerndiff HVP / PyTorch HVP", ("W2", "hvp", "kerndiff"), ("W2", "hvp", "torch"), 1),
    ("W3 kerndiff grad / PyTorch grad", ("W3", "grad", "kerndiff"), ("W3", "grad", "torch"), 1),
    ("W3 kerndiff HVP / PyTorch HVP", ("W3", "hvp", "kerndiff"), ("W3", "hvp", "torch"), 1),
    ("W2 kerndiff grad / torch.compile grad", ("W2", "grad", "kerndiff"), ("W2", "grad", "torch.compile"), 1),
    ("W2 kerndiff HVP / torch.compile HVP", ("W2", "hvp", "kerndiff"), ("W2", "hvp", "torch.compile"), 1),
    ("W3 kerndiff grad / torch.compile grad", ("W3", "grad", "kerndiff"), ("W3", "grad", "torch.compile"), 1),
    ("W3 kerndiff HVP / torch.compile HVP", ("W3", "hvp", "kerndiff"), ("W3", "hvp", "torch.compile"), 1),
    ("W4 Laplacian / kerndiff primal", ("W4", "laplacian", "kerndiff"), ("W4", "primal", "kerndiff"), 3),
]


def run_workload(name, args, extra=(), env_extra=None):
    cmd = [sys.executable, "-m", "bench.workloads", name, "--arch", args.arch] + (["--quick"] if args.quick else [])
    cmd += list(extra) + (["--systems", args.systems] if args.systems else []) + ["--reps", str(args.reps)]
    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        rows.append({"workload": name, "error": " | ".join(tail)})
    return rows


def machine(arch="cpu"):
    import multiprocessing
    text = f"{platform.processor() or platform.machine()}, {multiprocessing.cpu_count()} cores, " \
           f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    return text + (f", GPU: {gpu_name()}" if arch == "gpu" else "")


def gpu_name():
    """The GPU's name and driver as nvidia-smi reports them ("unknown" without an NVIDIA GPU)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out.replace(", ", " driver ") or "unknown"


def fmt(t):
    if t is None:
        return "n/a"
    return f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"


HAND = [("W1", "grad"), ("W1", "jvp"), ("W2", "grad"), ("W2", "hvp"), ("W3", "grad"), ("W3", "hvp")]


def hand_ratios(times):
    """Table rows: kerndiff's kernel against the same derivative written by hand in Taichi
    (bench.by_hand), where both were timed."""
    out = []
    for workload, op in HAND:
        a, b = times.get((workload, op, "kerndiff")), times.get((workload, op, "hand"))
        if a is not None and b is not None:
            out.append(f"| {workload} | {op} | {fmt(a)} | {fmt(b)} | {a / b:.2f} |")
    return out


def variant_ratios(times):
    """Table rows for bench.variants' workloads ("W2 3-D, ..."): the targets' ratios for the
    workload each is a spelling of, with the limit beside each."""
    limits = {"W1": (0.8, 3, None), "W2": (0.8, 3, 2), "W3": (0.8, 25, 2)}
    out = []
    for name in dict.fromkeys(w for w, _, _ in times):
        family = name.split(" ")[0]
        if family not in limits or name == family:
            continue

        def ratio(num, den, limit):
            a, b = times.get((name,) + num), times.get((name,) + den)
            if limit is None or a is None or b is None:
                return "–"
            return f"{a / b:.2f} (≤ {limit}{'' if a / b <= limit else ', not met'})"
        vs_taichi, vs_primal, hvp = limits[family]
        out.append(f"| {name} | {ratio(('grad', 'kerndiff'), ('grad', 'taichi'), vs_taichi)} | "
                   f"{ratio(('grad', 'kerndiff'), ('primal', 'kerndiff'), vs_primal)} | "
                   f"{ratio(('hvp', 'kerndiff'), ('grad', 'kerndiff'), hvp)} |")
    return out


def optional_table(header, rows):
    """A Markdown table after a blank line, or nothing where there are no rows (workloads not run)."""
    if not rows:
        return []
    return ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + rows


def report(rows, args, machine_text=None):
    machine_text = machine_text or machine(args.arch)
    lines = [f"machine: {machine_text}; arch={args.arch}; {'quick' if args.quick else 'full'} sizes", ""]
    lines.append("| workload | op | system | median | min–max | value |")
    lines.append("|---|---|---|---|---|---|")
    times = {}
    for r in rows:
        if "system" in r and "median" in r:
            times[(r["workload"], r["op"], r["system"])] = r["median"]
            rng = "n/a" if r["min"] is None else f"{fmt(r['min'])}–{fmt(r['max'])}"
            val = "n/a" if r["value"] is None else f"{r['value']:.6g}"
            lines.append(f"| {r['workload']} | {r['op']} | {r['system']} | {fmt(r['median'])} | {rng} | {val} |")
    lines.append("")
    lines.append("| compile latency (W2) | cache | total | kerndiff transform | Taichi (compile + 1 run) | transform share |")
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        if r.get("workload") == "compile" and "total" in r:
            share = r["transform"] / max(r["taichi"], 1e-12)
            lines.append(f"| {r['op']} | {r['cache']} | {fmt(r['total'])} | {fmt(r['transform'])} | "
                         f"{fmt(r['taichi'])} | {share:.0%} |")
    lines.append("")
    lines.append("| target | ratio | limit | met |")
    lines.append("|---|---|---|---|")
    for desc, num, den, limit in TARGETS:
        a, b = times.get(num), times.get(den)
        if a is None or b is None:
            lines.append(f"| {desc} | n/a | ≤ {limit} | – |")
            continue
        ratio = a / b
        lines.append(f"| {desc} | {ratio:.2f} | ≤ {limit} | {'yes' if ratio <= limit else 'no'} |")
    lines += optional_table(["by hand (not a target)", "op", "kerndiff", "written by hand in Taichi",
                             "kerndiff / by hand"], hand_ratios(times))
    lines += optional_table(["other spellings (`--only variants`)", "reverse / Taichi grad", "reverse / primal",
                             "HVP / reverse"], variant_ratios(times))
    checks = [r for r in rows if "check" in r]
    bad = [r for r in checks if r["check"] != "agree"]
    lines.append("")
    lines.append(f"value checks: {len(checks) - len(bad)} of {len(checks)} rows agree across systems"
                 + ("" if not bad else "; " + "; ".join(f"{r['workload']} {r['op']}: {r['check']}" for r in bad)))
    errors = [r for r in rows if "error" in r]
    for r in errors:
        lines.append(f"error in {r['workload']}: {r['error']}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes: a sub-minute smoke run")
    p.add_argument("--arch", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--json", help="write all rows as JSON here")
    p.add_argument("--markdown", help="write the report as Markdown here")
    p.add_argument("--only", help="comma-separated workloads (W1..W6, compile, variants)")
    p.add_argument("--systems", help="comma-separated systems (kerndiff, taichi, hand, jax, torch, torch.compile; "
                                     "default all): kerndiff,taichi times the kernels alone, as the "
                                     "targets are checked, without importing JAX or PyTorch")
    p.add_argument("--reps", type=int, default=7, help="timed rounds per workload (at least 7; this shared "
                                                       "machine's noise moves 7-round medians by 10-30%%)")
    p.add_argument("--from-rows", help="make the report from the JSON lines of a run made elsewhere "
                                        "(bench/device_checks.sh) instead of running the workloads")
    args = p.parse_args()
    names = args.only.split(",") if args.only else WORKLOADS + ["compile", "variants"]
    rows, machine_text = [], None
    if args.from_rows:
        names = []
        with open(args.from_rows) as f:
            for line in f:
                if line.startswith("{"):
                    row = json.loads(line)
                    if "machine" in row:
                        machine_text = row["machine"]
                    else:
                        rows.append(row)
    for name in names:
        if name == "compile":
            cache = tempfile.mkdtemp(prefix="kerndiff_ticache_")
            # both offline caches (Taichi's compiled kernels, kerndiff's generated source, in one
            # folder) empty, then warm; then Taichi's warm and kerndiff's off: all of the transform
            on = {"KERNDIFF_OFFLINE_CACHE": "1"}
            rows += run_workload("compile", args, ["--cache-dir", cache, "--cache-label", "cold"], on)
            rows += run_workload("compile", args, ["--cache-dir", cache, "--cache-label", "warm"], on)
            rows += run_workload("compile", args, ["--cache-dir", cache, "--cache-label", "Taichi's warm, kerndiff's off"],
                                 {"KERNDIFF_OFFLINE_CACHE": "0"})
        else:
            rows += run_workload(name, args)
        print(f"[bench] {name} done", file=sys.stderr, flush=True)
    text = report(rows, args, machine_text)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_text or machine(args.arch), "arch": args.arch, "quick": args.quick,
                       "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
