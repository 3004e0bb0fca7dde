"""The scripts that bench/gpu_check.sh runs on a lent GPU, dry-run here so they do not rot."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_memcheck_script_dry_run_on_cpu():
    """tests/memcheck_kernels.py --cpu: every case runs (Triton under the interpreter, the C++
    CPU kernel for AdamW's cuda cases) and agrees with its reference."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "tests/memcheck_kernels.py", "--cpu"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "all ok"
    ok = [line for line in lines if line.startswith("ok ")]
    assert sum("adamw" in line for line in ok) == 5
    assert sum("varlen_attn" in line for line in ok) == 16
    assert sum(line.startswith("ok lora") for line in ok) == 10


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """bench/gpu_check.sh's bench step on the CPU at tiny sizes, as a lent GPU runs it: the
    extension builds beside the other steps, the harness's JSON lands in $OUT with the packed
    build cache, and the verdict on DESIGN.md's targets closes the log."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(out), PY=sys.executable, INSTALL="0", STEPS="bench", SUITES="adamw",
               BENCH_ARGS="--sizes tiny", BENCH_DEVICE="cpu", DEADLINE="500",
               FASTTRAIN_CACHE=os.environ.get("FASTTRAIN_CACHE", "~/.cache/fasttrain"),
               TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    env["FASTTRAIN_CACHE"] = os.path.expanduser(env["FASTTRAIN_CACHE"])
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    log = (out / "gpu_check.log").read_text()
    assert proc.returncode == 0, log
    assert "fasttrain" in log and "extension" in log  # python -m fasttrain.env's report
    (results,) = out.glob("adamw-*.json")
    assert json.loads(results.read_text())["complete"] is True
    assert (out / "devcache.tgz").stat().st_size > 0
    tail = log[log.index("DESIGN.md's targets, judged"):]
    assert "| target | rows | measured | needed | verdict | on |" in tail
    assert "not measured" in tail and tail.splitlines()[-1].startswith("=== done, status 0")


def test_gpu_check_marks_a_step_without_time_failed(tmp_path):
    """A step the deadline leaves no time for is reported and fails the call (exit 1), as does
    a background step (the extension build) that fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path), PY=sys.executable, INSTALL="0", STEPS="bench",
               SUITES="adamw", BENCH_DEVICE="cpu", DEADLINE="20")
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    log = (tmp_path / "gpu_check.log").read_text()
    assert proc.returncode == 1, log
    assert "!!! no time left for: " in log and "-m bench --suite adamw" in log
    assert log.splitlines()[-1].startswith("=== done, status 1")


def test_gpu_check_runs_every_file_with_gpu_tests():
    """bench/gpu_check.sh names the test files in the order it runs them: a gpu-marked test in
    a file it does not name would never run on a lent GPU."""
    script = (REPO / "bench" / "gpu_check.sh").read_text()
    named = script.split('GPU_TEST_FILES="', 1)[1].split('"', 1)[0].split()
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                          "-p", "no:cacheprovider", "tests"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    files = {line.split("::")[0] for line in out.stdout.splitlines() if "::" in line}
    assert files and files <= set(named), (files - set(named), out.stdout[-2000:])
    assert all((REPO / f).is_file() for f in named)


# A stand-in for Nsight Compute (there is none here): it records its arguments, runs the
# profiled command (what follows its options) and writes the report; --import prints a details
# page, as CSV with a message line before the header as ncu prints them
FAKE_NCU = r"""#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../ncu_args"
if [ "$1" = --import ]; then
  if [[ " $* " == *" --csv "* ]]; then
    echo '==PROF== a message before the header'
    echo '"ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"'
    echo '"0","_adamw_kernel(long)","GPU Speed Of Light Throughput","Duration","usecond","12.5"'
    echo '"0","_adamw_kernel(long)","Launch Statistics","Registers Per Thread","reg","40"'
  else
    echo "details page"
  fi
  exit 0
fi
report=""
while [ $# -gt 0 ]; do
  case $1 in
    -o) report=$2; shift 2;;
    --clock-control|--profile-from-start|--section) shift 2;;
    -f) shift;;
    *) break;;
  esac
done
"$@" && touch "$report.ncu-rep"
"""


def test_gpu_check_profile_step_with_a_stand_in_ncu(tmp_path):
    """The profile step's wiring: ncu gets its options, runs bench/profile.py (tiny sizes,
    Triton under the interpreter), the report's details come back as text and CSV, and the
    table of the CSV's figures is in the log."""
    (tmp_path / "bin").mkdir()
    ncu = tmp_path / "bin" / "ncu"
    ncu.write_text(FAKE_NCU)
    ncu.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PY=sys.executable, INSTALL="0", STEPS="profile",
               PROFILE_ARGS="--tiny --only adamw lora", TRITON_INTERPRET="1", DEADLINE="500",
               PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
               FASTTRAIN_CACHE=os.path.expanduser(os.environ.get("FASTTRAIN_CACHE",
                                                                 "~/.cache/fasttrain")),
               TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    log = (out / "gpu_check.log").read_text()
    assert proc.returncode == 0, log
    first = (tmp_path / "ncu_args").read_text().splitlines()[0]
    assert "--clock-control none --profile-from-start off" in first
    assert "--section WarpStateStats" in first and "-m bench.profile --tiny" in first
    assert "profiled adamw: " in log and "profiled lora: " in log
    assert "| 0 | _adamw_kernel | 12.5 usecond | - | - | - | 40 reg | - | - |" in log
    assert (out / "ncu_details.txt").read_text() == "details page\n"
    assert (out / "profile.ncu-rep").exists()


def test_remaining_suites_are_those_after_the_one_that_died(tmp_path):
    from bench.remaining import remaining

    def write(suite, complete):
        (tmp_path / f"{suite}-h200-20261203-000000.json").write_text(
            json.dumps({"suite": suite, "complete": complete}))

    suites = ["adamw", "varlen_attn", "lora", "e2e"]
    assert remaining(tmp_path, suites) == ["varlen_attn", "lora", "e2e"]  # died before a row
    write("adamw", True)
    write("varlen_attn", False)  # died mid-suite
    assert remaining(tmp_path, suites) == ["lora", "e2e"]
    write("varlen_attn", True)
    write("lora", True)
    write("e2e", True)
    assert remaining(tmp_path, suites) == []


def test_gpu_check_runs_the_suites_after_a_failed_one_in_a_new_process(tmp_path):
    """A suite whose process dies (here: an unknown suite name, refused at once) does not take
    the suites after it along: they run again in a new process, and the call is marked failed."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(out), PY=sys.executable, INSTALL="0", STEPS="bench",
               SUITES="no_such_suite adamw", BENCH_ARGS="--sizes tiny", BENCH_DEVICE="cpu",
               DEADLINE="500", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    log = (out / "gpu_check.log").read_text()
    assert proc.returncode == 1, log
    assert "=== benchmarks again, after the failed suite: adamw" in log
    (results,) = out.glob("adamw-*.json")
    assert json.loads(results.read_text())["complete"] is True
    assert log.splitlines()[-1].startswith("=== done, status 1")
