#!/usr/bin/env bash
# Everything a GPU window is for, in one call: build the CUDA extension for the visible GPU (if the
# build fails, go on without it: the torch and Triton paths still get measured), the GPU test selection
# (`pytest -m gpu`, timed), the benchmark report (benchmarks/run_gpu.py: ceilings, gap loss, projectors
# with their per-kernel profile, the 7B-shaped training step, Liger), and the demo on the GPU.
# Writes at most 8 small files into $OUT, flat, ready to be committed under benchmarks/results/, and
# each step's summary line to stdout. Rehearse first on the CPU: python benchmarks/run_gpu.py --rehearse
#
#   OUT=/tmp/out bash benchmarks/run_gpu.sh [--quick] [--sections gap,projector,train,liger]
#   OUT=/tmp/out TESTS=short DEMO=0 bash benchmarks/run_gpu.sh --quick --sections projector   # decide, ~3 min
#
# Timeouts (seconds, each overridable): BUILD_TIMEOUT 300, TEST_TIMEOUT 240, REPORT_TIMEOUT 420, DEMO_TIMEOUT 120.
# Files (8): session.log (everything), <gpu>-<date>.json / .md / -gap-sweep.png (the report),
# history.csv (benchmarks/results/history.csv with this run's rows appended), gpu-tests.txt (pytest's
# output), demo-summary.json, info.txt (versions and the extension's architectures).
# Optional wheels (e.g. liger-kernel, which the GPU machine cannot download) are installed from .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
log="$OUT/session.log"
step() { echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$log"; }
start=$(date +%s)

if compgen -G ".whl/*.whl" >/dev/null; then
    step "optional wheels from .whl/"
    $PY -m pip install --no-index --no-deps .whl/*.whl >>"$log" 2>&1 || echo "wheel install failed (see session.log)"
fi

step "build the CUDA extension (archs of this GPU; at most ${BUILD_TIMEOUT:-300} s)"
if ! REGAP_FAST_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} timeout "${BUILD_TIMEOUT:-300}" \
        $PY -m pip install -e . --no-build-isolation --no-deps >>"$log" 2>&1; then
    tail -30 "$log"
    echo "the CUDA build FAILED or timed out: going on without regap_fast._C (the cuda backend is measured as unavailable)"
    REGAP_FAST_BUILD_CUDA=0 $PY -m pip install -e . --no-build-isolation --no-deps >>"$log" 2>&1
fi
$PY -m regap_fast info 2>&1 | tee "$OUT/info.txt" >>"$log"
grep -iE "GPU|_C|cuda" "$OUT/info.txt" | head -5

if [ "${TESTS:-full}" != "0" ]; then
    step "GPU tests: pytest -m gpu"
    sel=(-m gpu tests/)
    [ "${TESTS:-full}" = "short" ] && sel=(-m gpu tests/ops/test_gpu_pass.py tests/ops/test_projector_gpu_paths.py
                                          -k "projector or gap_loss")
    t0=$(date +%s)
    timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -q -p no:cacheprovider "${sel[@]}" >"$OUT/gpu-tests.txt" 2>&1
    echo "pytest ${sel[*]}: exit status $?, $(( $(date +%s) - t0 )) s" | tee -a "$OUT/gpu-tests.txt" "$log"
    tail -3 "$OUT/gpu-tests.txt" | head -2
fi

step "benchmark report"
cp -n benchmarks/results/history.csv "$OUT/history.csv" 2>/dev/null  # appended to, then committed back
timeout "${REPORT_TIMEOUT:-420}" $PY benchmarks/run_gpu.py --out "$OUT" "$@" >>"$log" 2>&1
echo "run_gpu.py exit status $?" | tee -a "$log"
grep -E "MISSED|\| met|not measured" "$OUT"/*.md 2>/dev/null | head -20

if [ "${DEMO:-1}" != "0" ]; then
    step "demo on the GPU"
    timeout "${DEMO_TIMEOUT:-120}" $PY -m regap_fast demo --out /tmp/regap-demo --overwrite >>"$log" 2>&1
    cp /tmp/regap-demo/summary.json "$OUT/demo-summary.json" 2>/dev/null && tail -c 400 "$OUT/demo-summary.json"
fi
step "done in $(( $(date +%s) - start )) s; files: $(ls "$OUT" | tr '\n' ' ')"
