#!/usr/bin/env bash
# The GPU machines' software on this CPU machine, before a GPU session spends device time on it:
# Python 3.12, torch 2.11 (its CUDA 13 build from PyPI: about 5 GB in a venv outside the
# repository), Triton 3.6, and NumPy < 2.4 (Triton 3.6's interpreter fails with newer).
#
#   bash scripts/compat_check.sh            # set up (about a minute), build, run the CPU tests
#   bash scripts/compat_check.sh -k adamw   # arguments go to pytest
#
# 1. Builds the C++/CUDA extension with its CUDA glue: torch's CUDA build ships the CUDA
#    headers its glue includes (the CPU build does not), so the whole extension compiles and
#    links here for sm_90, as the GPU machine's JIT build would.
# 2. Runs the test suite (CPU tests; Triton under the interpreter) with that torch and Triton.
# Not part of CI: it downloads about 3 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${COMPAT_VENV:-/tmp/fasttrain-compat}
if [ -z "${PYTHON:-}" ]; then  # Python 3.12 if there is one (pyenv's too), else python3
  for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 python3
  do
    if "$candidate" -c "" 2>/dev/null; then PYTHON=$candidate; break; fi
  done
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "torch==2.11.0" "triton==3.6.0" "numpy<2.4" "setuptools>=64" wheel ninja pybind11 \
  pytest pytest-benchmark hypothesis peft lightning matplotlib transformers
"${pip[@]}" --no-deps --no-build-isolation -e .

source scripts/cuda_home.sh
export FASTTRAIN_CACHE=$VENV/fasttrain-cache
echo "CUDA_HOME=${CUDA_HOME:-not found}"
"$VENV/bin/python" - <<'EOF'
import sys
import torch, triton
from fasttrain import _ext
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}")
module, error = _ext.load()
if module is None or not _ext.has_cuda():
    sys.exit(f"the C++/CUDA extension did not build with its CUDA kernels: {error}")
print("the C++/CUDA extension built with its CUDA kernels (sm_90)")
EOF
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
