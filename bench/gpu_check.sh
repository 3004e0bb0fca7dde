#!/usr/bin/env bash
# What a session with a lent GPU runs (issue 6), in device calls of at most 10 minutes each,
# three of which fit the 30 minutes of device time with the machine's start (bench/NOTES.md):
#
#   DEADLINE=480 STEPS="tests memcheck" bash bench/gpu_check.sh    # call 1 (the two side by side)
#   DEADLINE=540 STEPS=bench SUITES="adamw varlen_attn" bash bench/gpu_check.sh         # call 2
#   DEADLINE=540 STEPS=bench SUITES="lora e2e" BENCH_ARGS=--quick bash bench/gpu_check.sh
#   STEPS=tune bash bench/gpu_check.sh            # the config sweep, when a session has time
#
# The harness writes each suite's JSON after every workload, so a suite that runs into the
# deadline keeps what it measured (the file says "complete": false).
# Every call installs fasttrain (no network there: torch, triton, pytest, xdist are in the
# image) and loads or builds the C++/CUDA extension with ninja. The steps share one deadline
# (DEADLINE seconds from the start, default 560) and stop early enough to pack what was built.
# What comes back under $OUT (at most 8 files): gpu_check.log (everything printed), the
# harness's JSON results, tune/ (the sweep's JSON: commit it under bench/results/tune/), and
# devcache.tgz: the built extension and Triton's compiled kernels. Copy that file to
# .devcache/ (git-ignored) here and name .devcache in the next call's `carry`: that call then
# skips the builds it already paid for. Commit the results JSON under bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
STEPS=${STEPS:-tests memcheck bench}
DEADLINE=$((SECONDS + ${DEADLINE:-560}))
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 FASTTRAIN_CACHE=/tmp/fasttrain-cache TRITON_CACHE_DIR=/tmp/triton-cache
PY=python3
status=0

step() { echo "=== $* ($(date +%T), $((DEADLINE - SECONDS)) s left)"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }
# run LIMIT CMD...: CMD for at most LIMIT seconds, and never past the deadline less 30 s (kept
# for packing); a failure or a timeout marks the run failed (and returns non-zero, for a run in
# a background subshell). At the limit CMD gets SIGINT: pytest then still prints its summary
# (which tests failed, and why) before it exits; 10 s later, SIGKILL.
run() {
  local limit=$1; shift
  local left=$((DEADLINE - SECONDS - 30))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 0 ]; then echo "!!! no time left for: $*"; status=1; return 1; fi
  timeout -s INT --kill-after=10 "$limit" "$@"
  local rc=$?
  local why=""
  [ $rc -eq 124 ] && why=" (timed out after $limit s)"
  [ $rc -eq 0 ] || { echo "!!! exit $rc$why: $*"; status=1; }
  return $rc
}
# a build killed mid-way leaves torch's lock file, on which every later load would wait
drop_locks() { rm -f /tmp/fasttrain-cache/*/lock; }

step "install (steps: $STEPS)"
if [ -f .devcache/devcache.tgz ]; then
  tar xzf .devcache/devcache.tgz -C / && drop_locks && echo "unpacked the carried build cache"
fi
run 120 $PY -m pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv
step "environment and extension build"
run 300 $PY -m fasttrain.env

# memcheck runs beside the GPU tests (its own process, small sizes; 8 pytest workers leave it
# CPU cores to compile on). Without torch's caching allocator every tensor is its own
# allocation, so an access past a tensor's end is one memcheck sees (inside a cached 2 MB
# segment it is not). It launches each LoRA config in turn, nothing timed.
memcheck_pid=""
if has memcheck; then
  step "compute-sanitizer memcheck (tests/memcheck_kernels.py), in the background"
  (export PYTORCH_NO_CUDA_MEMORY_CACHING=1
   run 390 compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
     $PY tests/memcheck_kernels.py) > "$OUT/memcheck.log" 2>&1 &
  memcheck_pid=$!
fi

if has tests; then
  step "GPU tests"
  xdist=()
  $PY -c "import xdist, pytest_timeout" 2>/dev/null && xdist=(-n 8 --timeout 300)
  run 390 $PY -m pytest -q -m gpu -p no:cacheprovider "${xdist[@]}" -rfEs --durations=15
fi

if [ -n "$memcheck_pid" ]; then
  wait "$memcheck_pid" || status=1
  step "memcheck output"
  cat "$OUT/memcheck.log"
fi

if has bench; then
  step "benchmarks: ${SUITES:=adamw varlen_attn lora e2e} ${BENCH_ARGS:=}"
  run 560 $PY -m bench --suite $SUITES --device cuda --out "$OUT" $BENCH_ARGS
fi

if has tune; then
  step "varlen attention config sweep"
  run 560 $PY -m bench.tune --out "$OUT/tune" ${TUNE_ARGS:-}
fi

step "pack the build cache"
drop_locks
dirs=()
for d in /tmp/fasttrain-cache /tmp/triton-cache; do [ -d "$d" ] && dirs+=("${d#/}"); done
if [ ${#dirs[@]} -gt 0 ]; then
  # Triton reloads a kernel from its cubin and metadata (.json, __grp__*.json); its IR files
  # (ptx, ttir, ttgir, llir, source) would more than double the archive
  tar czf "$OUT/devcache.tgz" -C / --exclude='*.ptx' --exclude='*.ttir' --exclude='*.ttgir' \
    --exclude='*.llir' --exclude='*.source' "${dirs[@]}"
  if [ "$(stat -c %s "$OUT/devcache.tgz")" -gt 15000000 ]; then  # over the 16 MiB a file
    echo "Triton's cache is too big to carry; packing the extension alone"
    tar czf "$OUT/devcache.tgz" -C / tmp/fasttrain-cache 2>/dev/null || rm -f "$OUT/devcache.tgz"
  fi
fi
ls -laR "$OUT"
step "done, status $status"
exit $status
