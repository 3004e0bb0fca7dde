#!/usr/bin/env bash
# What a session with a lent GPU runs (issue 6). A session has 15 minutes of device time: the
# machine's start takes 1-2, one call at most 10, and no machine starts with under 4 left, so a
# session gets one full call and, only while the machine is still warm (30 s after a call),
# one short one (bench/NOTES.md, "Plan of device calls"):
#
#   git rev-parse HEAD > .git_sha; git diff --quiet HEAD || echo dirty >> .git_sha  # here
#                                                  # first: the results' sha (carry it)
#   bash bench/gpu_check.sh                        # call 1, timeout_s=600: the default plan
#   DEADLINE=150 STEPS=bench SUITES=lora BENCH_ARGS=--quick bash bench/gpu_check.sh  # call 2
#   STEPS=tune bash bench/gpu_check.sh             # the config sweep, in a session of its own
#   STEPS=profile bash bench/gpu_check.sh          # Nsight Compute, one launch of each kernel
#
# The default plan, in one deadline (DEADLINE seconds from the start, default 570): install
# fasttrain (no network there: torch, triton, pytest, xdist are in the image), build the
# C++/CUDA extension in the background, run the GPU tests (TESTS: pytest arguments, default
# every gpu-marked test) beside compute-sanitizer's memcheck for at most TEST_CAP seconds
# (default 200), then the benchmark suites (SUITES, default all four) with BENCH_ARGS (default
# --targets: the workloads of DESIGN.md's targets), and last the verdict on every target.
# The harness writes each suite's JSON after every workload, so a suite that runs into the
# deadline keeps what it measured (the file says "complete": false).
# What comes back under $OUT (at most 8 files): gpu_check.log (everything printed), the
# harness's JSON results, tune/ (the sweep's JSON: commit it under bench/results/tune/), and
# devcache.tgz: the built extension and Triton's compiled kernels. Copy that file to
# .devcache/ (git-ignored) here and name .devcache in the next call's `carry`: that call then
# skips the builds it already paid for. Commit the results JSON under bench/results/.
# PY (default python3), INSTALL=0 (skip the install) and BENCH_DEVICE (default cuda) are for
# the dry run the tests make on a CPU machine (tests/test_gpu_scripts.py).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/gpu_check}
STEPS=${STEPS:-tests memcheck bench}
# every test file with gpu-marked tests, in the order they run (tests/test_gpu_scripts.py
# checks that none is missing)
GPU_TEST_FILES="tests/test_varlen_attn.py tests/test_lora.py tests/test_integrations_transformers.py
  tests/test_integrations_trainers.py tests/test_adamw.py tests/test_devices.py"
DEADLINE=$((SECONDS + ${DEADLINE:-570}))
TEST_CAP=${TEST_CAP:-200}
PY=${PY:-python3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
tee_pid=$!  # waited for at the end: the log's last lines are written before the script exits
export PYTHONUNBUFFERED=1 FASTTRAIN_CACHE=${FASTTRAIN_CACHE:-/tmp/fasttrain-cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # no network there: never wait on the hub
source scripts/cuda_home.sh  # CUDA_HOME for the extension's build, nvcc first on PATH
PATH="$(dirname "$($PY -c 'import sys; print(sys.executable)')"):$PATH"  # its ninja
# The results' git sha: the copy sent to the device has no .git (run `git rev-parse HEAD >
# .git_sha` here and carry .git_sha, or pass FASTTRAIN_GIT_SHA)
# (a second line "dirty": tracked files differed from that commit; the results say so)
if [ -f .git_sha ]; then
  export FASTTRAIN_GIT_SHA=${FASTTRAIN_GIT_SHA:-$(head -n 1 .git_sha)}
  grep -qx dirty .git_sha && export FASTTRAIN_GIT_DIRTY=${FASTTRAIN_GIT_DIRTY:-1}
fi
status=0

step() { echo "=== $* ($(date +%T), $((DEADLINE - SECONDS)) s left)"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }
# run LIMIT CMD...: CMD for at most LIMIT seconds, and never past the deadline less 30 s (kept
# for packing); a failure or a timeout marks the run failed (and returns non-zero, for a run in
# a background subshell). At the limit CMD gets SIGINT: pytest then still prints its summary
# (which tests failed, and why) before it exits (its 8 CUDA workers too); 30 s later, SIGKILL.
run() {
  local limit=$1; shift
  local left=$((DEADLINE - SECONDS - 30))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 0 ]; then echo "!!! no time left for: $*"; status=1; return 1; fi
  timeout -s INT --kill-after=30 "$limit" "$@"
  local rc=$?
  local why=""
  [ $rc -eq 124 ] && why=" (timed out after $limit s)"
  [ $rc -eq 0 ] || { echo "!!! exit $rc$why: $*"; status=1; }
  return $rc
}
# a build killed mid-way leaves torch's lock file, on which every later load would wait
drop_locks() { rm -f "$FASTTRAIN_CACHE"/*/lock; }

step "install (steps: $STEPS)"
if [ -f .devcache/devcache.tgz ]; then
  if gzip -t .devcache/devcache.tgz 2>/dev/null; then
    tar xzf .devcache/devcache.tgz -C / && drop_locks && echo "unpacked the carried build cache"
  else
    echo "the carried build cache is truncated or corrupt: building from scratch"
  fi
fi
if [ "${INSTALL:-1}" != 0 ]; then
  run 120 $PY -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  # kernels/ is fasttrain.kernels only through the install's mapping: without it, a link
  $PY -c "import fasttrain.kernels" 2>/dev/null || ln -sfn ../kernels fasttrain/kernels
fi
echo "CUDA_HOME=${CUDA_HOME:-not found}; $(command -v nvcc ninja compute-sanitizer | tr '\n' ' ')"
nvidia-smi --format=csv \
  --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw

# The extension builds (nvcc, about 30 s) while the tests start: a test that needs it waits on
# the build's lock (fasttrain/_ext.py), the Triton tests run meanwhile.
step "environment and extension build, in the background"
env_log=$(mktemp)
(run 300 $PY -m fasttrain.env) > "$env_log" 2>&1 &
env_pid=$!

# memcheck runs beside the GPU tests (its own process, small sizes; 8 pytest workers leave it
# CPU cores to compile on). Without torch's caching allocator every tensor is its own
# allocation, so an access past a tensor's end is one memcheck sees (inside a cached 2 MB
# segment it is not). It launches each LoRA config in turn, nothing timed.
memcheck_pid=""
if has memcheck; then
  step "compute-sanitizer memcheck (tests/memcheck_kernels.py), in the background"
  (export PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONPATH=$PWD  # fasttrain even if pip failed
   run "$TEST_CAP" compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
     $PY tests/memcheck_kernels.py) > "$OUT/memcheck.log" 2>&1 &
  memcheck_pid=$!
fi

if has tests; then
  # the varlen and LoRA kernels first: the cut at TEST_CAP falls on the AdamW tests, whose
  # cuda-backend cases wait for the extension's build anyway
  step "GPU tests (${TESTS:=-m gpu $GPU_TEST_FILES})"
  xdist=()
  $PY -c "import xdist, pytest_timeout" 2>/dev/null && xdist=(-n 8 --timeout 300)
  # shellcheck disable=SC2086  # TESTS is a list of pytest arguments
  run "$TEST_CAP" $PY -m pytest -q $TESTS -p no:cacheprovider "${xdist[@]}" -rfEs --durations=15
fi

wait "$env_pid" || status=1
step "environment (python -m fasttrain.env)"
cat "$env_log"
rm -f "$env_log"

if [ -n "$memcheck_pid" ]; then
  wait "$memcheck_pid" || status=1
  step "memcheck output"
  cat "$OUT/memcheck.log"
fi

if has bench; then
  step "benchmarks: ${SUITES:=adamw varlen_attn lora e2e} ${BENCH_ARGS=--targets}"
  # shellcheck disable=SC2086  # SUITES and BENCH_ARGS are lists
  if ! run 560 $PY -m bench --suite $SUITES --device "${BENCH_DEVICE:-cuda}" --out "$OUT" \
      $BENCH_ARGS; then
    # a suite that died (a CUDA error poisons the process for every later suite): the suites
    # after it, in a new process, while there is time (their JSON says whether they finished)
    # shellcheck disable=SC2086
    rest=$($PY -m bench.remaining "$OUT" $SUITES)
    if [ -n "$rest" ] && [ $((DEADLINE - SECONDS - 30)) -gt 60 ]; then
      step "benchmarks again, after the failed suite: $rest"
      # shellcheck disable=SC2086
      run 560 $PY -m bench --suite $rest --device "${BENCH_DEVICE:-cuda}" --out "$OUT" \
        $BENCH_ARGS
    fi
  fi
fi

if has tune; then
  step "varlen attention config sweep"
  run 560 $PY -m bench.tune --out "$OUT/tune" ${TUNE_ARGS:-}
fi

if has profile; then
  # A later session's step (STEPS=profile, alone or with tests: its three files with the
  # benchmarks' four, the log and the cache would pass the 8 files that come back): one
  # launch of each kernel family under
  # Nsight Compute, clocks left alone (the device tool's METHOD.md), the sections that say
  # where a kernel's time goes. Back come the report (open it with `ncu --import`), its
  # details page as text and CSV, and a table of the main figures in the log.
  step "Nsight Compute: one launch of each kernel family (bench/profile.py)"
  if command -v ncu > /dev/null; then
    # shellcheck disable=SC2086  # PROFILE_ARGS is a list
    run "${PROFILE_CAP:-300}" ncu --clock-control none --profile-from-start off -f \
      -o "$OUT/profile" --section SpeedOfLight --section LaunchStats --section Occupancy \
      --section WarpStateStats --section ComputeWorkloadAnalysis \
      --section MemoryWorkloadAnalysis $PY -m bench.profile ${PROFILE_ARGS:-}
    if [ -f "$OUT/profile.ncu-rep" ]; then
      ncu --import "$OUT/profile.ncu-rep" --page details > "$OUT/ncu_details.txt"
      ncu --import "$OUT/profile.ncu-rep" --page details --csv > "$OUT/ncu_details.csv"
      $PY -m bench.profile --summary "$OUT/ncu_details.csv" || status=1
    else
      echo "!!! ncu wrote no report"; status=1
    fi
  else
    echo "!!! ncu not found"; status=1
  fi
fi

if compgen -G "$OUT/*.json" > /dev/null; then  # before the packing, which may run out of time
  step "DESIGN.md's targets, judged from this call's results"
  $PY -m bench --verdict "$OUT" || status=1
fi

step "pack the build cache"
drop_locks
dirs=()
for d in "$FASTTRAIN_CACHE" "$TRITON_CACHE_DIR"; do [ -d "$d" ] && dirs+=("${d#/}"); done
# pack ARGS...: tar into a temporary name, moved into place when complete (never a truncated
# archive), and done by 20 s past the deadline (inside a 600 s call)
pack() {
  local left=$((DEADLINE + 20 - SECONDS))
  [ "$left" -lt 10 ] && left=10
  timeout "$left" tar czf "$OUT/devcache.tgz.tmp" -C / "$@" \
    && mv "$OUT/devcache.tgz.tmp" "$OUT/devcache.tgz"
}
if [ ${#dirs[@]} -gt 0 ]; then
  # Triton reloads a kernel from its cubin and metadata (.json, __grp__*.json); its IR files
  # (ptx, ttir, ttgir, llir, source) would more than double the archive
  pack --exclude='*.ptx' --exclude='*.ttir' --exclude='*.ttgir' --exclude='*.llir' \
    --exclude='*.source' "${dirs[@]}"
  if [ ! -f "$OUT/devcache.tgz" ]; then
    echo "packing Triton's cache ran out of time; packing the extension alone"
    pack "${FASTTRAIN_CACHE#/}"
  elif [ "$(stat -c %s "$OUT/devcache.tgz")" -gt 15000000 ]; then
    echo "Triton's cache is too big to carry (16 MiB a file); packing the extension alone"
    rm -f "$OUT/devcache.tgz"
    pack "${FASTTRAIN_CACHE#/}"
  fi
  rm -f "$OUT/devcache.tgz.tmp"
fi
ls -laR "$OUT"
step "done, status $status"
exec >&- 2>&-  # close tee's input, then let it write the rest of the log
wait "$tee_pid" 2>/dev/null
exit $status
