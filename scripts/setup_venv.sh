#!/usr/bin/env bash
# Create .venv with torch, triton and fasttrain (editable) plus the test/bench extras.
# Safe to re-run: does nothing when the install is current.
#  - A machine whose python already has a CUDA build of torch: the venv uses it
#    (--system-site-packages), nothing is downloaded for torch.
#  - Otherwise torch==2.13.0 is installed (on the project's CPU machines a local wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.fasttrain-installed
want=$(cat pyproject.toml setup.py | sha256sum | cut -c1-16)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "setup: using the CUDA torch of $PY"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade pip "setuptools>=64" wheel
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==2.13.0"
fi
"${pip[@]}" --no-build-isolation -e ".[test,bench]"
.venv/bin/python -c "import torch, fasttrain; print('setup: torch', torch.__version__, '| fasttrain', fasttrain.__version__)"
echo "$want" > "$stamp"
