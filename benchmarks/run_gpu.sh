#!/usr/bin/env bash
# Everything a GPU machine is for, in one call: build the CUDA extension, run the GPU tests, the
# benchmark report (benchmarks/run_gpu.py) and the demo on the GPU. Results go to $OUT (default
# benchmarks/results/latest), flat, so that they can be committed under benchmarks/results/.
#
#   OUT=/tmp/out bash benchmarks/run_gpu.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
log="$OUT/session.log"
step() { echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$log"; }

step "build the CUDA extension"
if ! REGAP_FAST_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install -e . --no-build-isolation --no-deps \
        >>"$log" 2>&1; then
    tail -40 "$log"; exit 1
fi
$PY -m regap_fast info 2>&1 | tee -a "$log"

step "benchmark report"
$PY benchmarks/run_gpu.py --out "$OUT" "$@" 2>&1 | tee -a "$log" | grep -v "^|" || true

step "GPU tests (kernels, projector, model)"
timeout ${TEST_TIMEOUT:-240} $PY -m pytest -q -x -p no:cacheprovider tests/test_gap_loss.py tests/test_projector.py \
    2>&1 | tail -15 | tee -a "$log"

step "demo on the GPU"
timeout ${DEMO_TIMEOUT:-120} $PY -m regap_fast demo --out /tmp/regap-demo 2>&1 | tail -20 | tee -a "$log"
cp /tmp/regap-demo/summary.json "$OUT/demo-summary.json" 2>/dev/null || true
step "done"
