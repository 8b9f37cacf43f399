#!/bin/bash
# The checks a session with a lent GPU machine runs, in one call (session 39 ran these on an H200):
# every bench workload with --arch gpu, one JSON line per row kept as it comes (a run cut short
# keeps what it has); the CUDA corpus test beside the demos with --arch gpu; then the suite's
# modules on CUDA with whatever time is left. Everything lands in $OUT:
#   rows.jsonl    -> python -m bench --arch gpu --from-rows rows.jsonl --json bench/results_gpu.json
#   log.txt, bench_err.txt, test_cuda.txt, demos.txt, warp_sums.txt, suite_cuda.txt
#
#   BUDGET=530 bash bench/device_checks.sh        (from the repository root; BUDGET in seconds)
#
# The machine has Python 3.12 with numpy, pytest, pytest-xdist, hypothesis, tqdm, matplotlib, JAX
# and PyTorch, but not Taichi: carry Taichi 1.7.4's cp312 wheel and dill in .whl/ (ignored by
# git; `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
# manylinux_2_27_x86_64 -d .whl taichi==1.7.4 dill`), about 56 MB. The same plumbing runs here
# with SKIP_INSTALL=1 ARCH=cpu QUICK=--quick OUT=/tmp/out PY=python.
set -u
ARCH=${ARCH:-gpu}; QUICK=${QUICK:-}; BUDGET=${BUDGET:-520}; PY=${PY:-python3}
export PYTHONUNBUFFERED=1
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
cap() { local want=$1 l; l=$(left); [ "$l" -lt "$want" ] && want=$l; [ "$want" -lt 1 ] && want=1; echo "$want"; }
log=$OUT/log.txt
rows=$OUT/rows.jsonl
if [ -z "${SKIP_INSTALL:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$log" 2>&1 || { echo "install failed" >>"$log"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY -c "import numpy, taichi; print('numpy', numpy.__version__, 'taichi', taichi.__version__)"
  echo "[t=$(elapsed)] ready"; } >>"$log" 2>&1
$PY -c "import json; from bench.run import machine; print(json.dumps({'machine': machine('$ARCH')}))" >>"$rows"

bench() {  # bench NAME CAP_SECONDS [ARGS...]: one workload's rows into rows.jsonl
  local name=$1 c; c=$(cap "$2"); shift 2
  echo "[t=$(elapsed)] bench $name (cap $c s)" >>"$log"
  timeout "$c" $PY -m bench.workloads "$name" --arch "$ARCH" $QUICK "$@" >>"$rows" 2>>"$OUT/bench_err.txt"
  echo "[t=$(elapsed)] bench $name rc=$?" >>"$log"
}

for w in W1 W2 W3; do bench $w 80; done
# correctness, side by side: the CUDA corpus and the demos
if [ "$ARCH" = gpu ]; then
  (timeout "$(cap 150)" $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py >"$OUT/test_cuda.txt" 2>&1
   echo "rc=$?" >>"$OUT/test_cuda.txt") &
fi
{ for d in "quickstart.py" "newton_mass_spring.py --out /tmp/n.png" "diff_sim_control.py --out /tmp/b.png" \
           "pinn_poisson.py --steps 300 --out /tmp/p.png" "mpm_elastic_3d.py --iters 10 --out /tmp/m.png"; do
    echo "== $d [t=$(elapsed)]"
    timeout "$(cap 60)" $PY demos/$d --arch "$ARCH" 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/it\]" | tail -25
    echo "rc=${PIPESTATUS[0]}"
  done; } >"$OUT/demos.txt" 2>&1
wait
echo "[t=$(elapsed)] correctness done" >>"$log"
for w in W4 W5 W6; do bench $w 90; done
cache=$(mktemp -d)  # compile latency as bench.run measures it: both caches cold, both warm, Taichi's alone
KERNDIFF_OFFLINE_CACHE=1 bench compile 40 --cache-dir "$cache" --cache-label cold
KERNDIFF_OFFLINE_CACHE=1 bench compile 40 --cache-dir "$cache" --cache-label warm
KERNDIFF_OFFLINE_CACHE=0 bench compile 40 --cache-dir "$cache" --cache-label "Taichi's warm, kerndiff's off"
bench variants 90
if [ "$ARCH" = gpu ]; then  # W3's reverse with its j-scatter summed across the warp (docs/design.md)
  timeout "$(cap 60)" $PY -m bench.warp_sums >"$OUT/warp_sums.txt" 2>&1
fi
# what is left: the module-level tests on CUDA (-v under xdist prints each result as it comes)
if [ "$ARCH" = gpu ] && [ "$(left)" -gt 40 ]; then
  echo "[t=$(elapsed)] suite on cuda (cap $(cap 400) s)" >>"$log"
  KERNDIFF_TEST_ARCH=cuda timeout "$(cap 400)" $PY -m pytest -v -p no:cacheprovider -n 12 tests \
     --ignore=tests/test_fuzz.py --ignore=tests/test_fuzz_programs.py --ignore=tests/test_fuzz_races.py \
     --ignore=tests/test_fuzz_funcs.py --ignore=tests/test_vulkan.py --ignore=tests/test_cuda.py \
     --ignore=tests/test_bench.py --ignore=tests/test_demos.py >"$OUT/suite_cuda.txt" 2>&1
  echo "[t=$(elapsed)] suite rc=$?" >>"$log"
fi
echo "[t=$(elapsed)] end" >>"$log"
