"""The scripts that bench/gpu_check.sh runs on a lent GPU, dry-run here so they do not rot."""
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
