#!/usr/bin/env bash
# Everything a GPU machine is for, in one call of at most 8 minutes: build the CUDA extension, run
# the GPU test selection (`pytest -m gpu`), the benchmark report (benchmarks/run_gpu.py: ceilings,
# gap loss, projectors with their per-kernel profile, training step) and the demo on the GPU.
# Writes at most 8 small files into $OUT (default benchmarks/results/latest), flat, ready to be
# committed under benchmarks/results/, and the summary line of each step to stdout.
#
#   OUT=/tmp/out bash benchmarks/run_gpu.sh [--quick] [--sections gap,projector,train]
#
# Files (8): session.log (everything), <gpu>-<date>.json / .md / -gap-sweep.png (the report),
# history.csv (benchmarks/results/history.csv with this run's summary appended), gpu-tests.txt
# (pytest's output), demo-summary.json, info.txt (versions and the extension's architectures).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
log="$OUT/session.log"
step() { echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$log"; }
start=$(date +%s)

step "build the CUDA extension (archs of this GPU)"
if ! REGAP_FAST_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install -e . --no-build-isolation --no-deps \
        >>"$log" 2>&1; then
    tail -40 "$log"; exit 1
fi
$PY -m regap_fast info 2>&1 | tee "$OUT/info.txt" >>"$log"
grep -iE "GPU|_C|cuda" "$OUT/info.txt" | head -5

step "GPU tests: pytest -m gpu"
timeout "${TEST_TIMEOUT:-180}" $PY -m pytest -q -m gpu -p no:cacheprovider tests/ >"$OUT/gpu-tests.txt" 2>&1
echo "pytest -m gpu exit status $?" >>"$OUT/gpu-tests.txt"
tail -3 "$OUT/gpu-tests.txt" | tee -a "$log"

step "benchmark report"
cp -n benchmarks/results/history.csv "$OUT/history.csv" 2>/dev/null  # appended to, then committed back
$PY benchmarks/run_gpu.py --out "$OUT" "$@" >>"$log" 2>&1
grep -E "_ratio|_fraction|_speedup|_backend" "$OUT"/*.md 2>/dev/null | head -20

step "demo on the GPU"
timeout "${DEMO_TIMEOUT:-120}" $PY -m regap_fast demo --out /tmp/regap-demo >>"$log" 2>&1
cp /tmp/regap-demo/summary.json "$OUT/demo-summary.json" 2>/dev/null && tail -c 400 "$OUT/demo-summary.json"
step "done in $(( $(date +%s) - start )) s; files: $(ls "$OUT" | tr '\n' ' ')"
