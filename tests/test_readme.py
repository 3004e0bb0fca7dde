"""The README's ```python blocks run as written: each in a fresh subprocess of this venv's
Python, on the CPU, with a timeout. A block preceded by the line ``<!-- no-run -->`` (blank
lines allowed in between) is skipped; every other python block is picked up automatically."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = ("README.md",)
NO_RUN = "<!-- no-run -->"
TIMEOUT_S = 300  # the first CPU AdamW builds the C++ extension when the cache is cold


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number, code, runnable) of every ```python block in ``text``."""
    blocks = []
    for m in re.finditer(r"^```python[^\n]*\n(.*?)^```[ \t]*$", text, re.M | re.S):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip().splitlines()
        blocks.append((line, m.group(1), not (before and before[-1].strip() == NO_RUN)))
    return blocks


def cases():
    out = []
    for doc in DOCS:
        for line, code, runnable in python_blocks((REPO / doc).read_text()):
            marks = () if runnable else (pytest.mark.skip(reason=f"marked {NO_RUN}"),)
            out.append(pytest.param(code, id=f"{doc}:{line}", marks=marks))
    return out


def test_block_parser():
    text = "x\n```python\na = 1\n```\n<!-- no-run -->\n\n```python\nb = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(2, "a = 1\n", True), (7, "b = 2\n", False)]


def test_readme_has_runnable_blocks():
    assert any(runnable for _, _, runnable in python_blocks((REPO / "README.md").read_text()))


@pytest.mark.parametrize("code", cases())
def test_readme_block_runs(code, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1",
           "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def test_the_checkouts_kernels_folder_does_not_hide_a_kernels_package(tmp_path):
    """``python -m``/``-c`` in the checkout puts its root first on sys.path, where the top-level
    kernels/ folder (fasttrain.kernels once installed) would hide any other package named
    ``kernels``: Hugging Face's, which transformers >= 5.25 imports (every model import failed
    from the root). The name goes to the installed package; fasttrain.kernels is unaffected."""
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("WHO = 'the installed kernels package'\n")
    code = ("import kernels, fasttrain.kernels.common as c; "
            "print(kernels.WHO); print(c.__name__, c.__file__)")
    link = tmp_path / "checkout"  # the checkout under a second spelling too (a symlink)
    link.symlink_to(REPO)
    for cwd, path in ((REPO, tmp_path / "site"), (link, f"{link}{os.pathsep}{tmp_path / 'site'}")):
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd,
                             env={**os.environ, "PYTHONPATH": str(path)}, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.splitlines() == [
            "the installed kernels package",
            f"fasttrain.kernels.common {REPO / 'kernels' / 'common.py'}"]
