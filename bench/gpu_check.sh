#!/usr/bin/env bash
# Everything a session with a lent GPU should do, in one device call (see issue 6):
#   device run: bash bench/gpu_check.sh        (results land in $OUT; commit the JSON)
# Installs fasttrain (no network there: torch, triton, pytest are in the image), builds the
# C++/CUDA extension with ninja, runs the GPU tests, a memcheck of each kernel on a small run,
# and the benchmark suites at real sizes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FASTTRAIN_CACHE=/tmp/fasttrain-cache
PY=python3
status=0

step() { echo "=== $* ($(date +%T))"; }

step install
$PY -m pip install -q --no-deps --no-build-isolation -e . || status=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"

step "environment and extension build"
$PY -m fasttrain.env 2>&1 | tee "$OUT/env.txt"

step "GPU tests"
$PY -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "compute-sanitizer memcheck (small runs)"
compute-sanitizer --tool memcheck --error-exitcode 3 \
  $PY -m pytest -q -m gpu -p no:cacheprovider -k "gpu_backend_is_chosen or test_gqa or lora_linear_gpu" 2>&1 | tail -5 \
  | tee "$OUT/memcheck.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "benchmarks"
# one device call may last 10 minutes: SUITES="adamw" (etc.) splits the work over calls
$PY -m bench --suite ${SUITES:-adamw varlen_attn lora e2e} --device cuda --out "$OUT" 2>&1 \
  | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "done, status $status"
exit $status
