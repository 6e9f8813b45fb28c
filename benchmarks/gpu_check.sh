#!/usr/bin/env bash
# The benchmark suite on a CUDA GPU, as one prepared run (expected 4-6 minutes on an H200; every
# step has its own time limit so the whole stays under 10 minutes: 210 + 240 + 120 s).
#
#   bash benchmarks/gpu_check.sh            # results under $OUT, or reports/gpu-check/ if OUT is unset
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# 1. bundle_scan.py: engine throughput for bundles of K = 1 ... 1024 jobs of the target shape
#    (depth 6, width 64, batch 128, 300 steps, probes every 10 steps), then the classic loop on
#    the GPU (48 jobs one at a time) and the speed-up.
# 2. The pytest-benchmark suite with --bench-device cuda --bench-full: throughput on the
#    canonical shapes, the speed-up over the classic loop, probe overhead, FLOP/s vs matmul.
#    (Dispatch and the end-to-end process benchmarks are CPU-side: not run here.)
# 3. test_anymodule.py with --bench-device cuda: any-module bundles (residual MLP, CNN, transformer;
#    K = 1, 8, 32) through functional.train vs the same jobs one at a time in the classic loop on
#    the GPU; the table of it in anymodule_cuda.md.
#
# Needs: a python with CUDA torch, pandas, pyarrow, joblib, scikit-learn, pytest, pytest-benchmark
# (initbench itself is imported from this checkout through PYTHONPATH; nothing is installed;
# -o addopts="" drops the root pyproject's xdist options, so pytest-xdist is not needed).
# Exit: 0 all steps ran, 3 no CUDA device, else the number of steps that failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/reports/gpu-check}"
mkdir -p "$OUT"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        PYTHON=.venv/bin/python
    else
        PYTHON=python3
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export INITBENCH_BENCH_THREADS="${INITBENCH_BENCH_THREADS:-2}"
LOG="$OUT/gpu_check.log"
: >"$LOG"

say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname)"
    echo "python: $PYTHON"
    "$PYTHON" -c 'import torch, platform; print("python", platform.python_version(), "torch", torch.__version__,
"cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt" | tee -a "$LOG"

if ! "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    say "no CUDA device visible to $PYTHON: nothing measured"
    exit 3
fi

failed=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, count failures
    local name=$1 limit=$2
    shift 2
    say "start $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    say "end $name: rc=$rc after $((SECONDS - start))s"
    if [[ $rc -ne 0 ]]; then failed=$((failed + 1)); fi
}

step bundle_scan 210 "$PYTHON" benchmarks/bundle_scan.py --device cuda --steps 300 --repeat 2 --out "$OUT"
step pytest_cuda 240 "$PYTHON" -m pytest benchmarks -o addopts="" -p no:cacheprovider -q \
    --bench-device cuda --bench-full -k "(throughput or speedup or probe or flops) and not end_to_end" \
    --benchmark-json "$OUT/pytest_cuda.json" --benchmark-columns=median,iqr,rounds
step anymodule_cuda 120 "$PYTHON" -m pytest benchmarks/test_anymodule.py -o addopts="" -p no:cacheprovider -q \
    --bench-device cuda --benchmark-json "$OUT/anymodule_cuda.json" --benchmark-columns=median,rounds
if [[ -s "$OUT/anymodule_cuda.json" ]]; then
    "$PYTHON" -m benchmarks.test_anymodule "$OUT/anymodule_cuda.json" >"$OUT/anymodule_cuda.md" 2>&1
    tee -a "$LOG" <"$OUT/anymodule_cuda.md"
fi

say "done: $failed step(s) failed; results in $OUT"
exit "$failed"
