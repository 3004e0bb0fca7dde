"""``python -m bench.remaining OUT SUITE...``: the suites after the first one that has no
complete results file in OUT (bench/gpu_check.sh reruns them in a new process when a suite's
process died). Prints them space-separated; nothing when every suite finished."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def finished(out: Path, suite: str) -> bool:
    for path in out.glob(f"{suite}-*.json"):
        try:
            if json.loads(path.read_text()).get("complete"):
                return True
        except (OSError, ValueError):
            continue
    return False


def remaining(out: Path, suites: list[str]) -> list[str]:
    for i, suite in enumerate(suites):
        if not finished(out, suite):
            return suites[i + 1:]  # suite i is where the process died: not again
    return []


if __name__ == "__main__":
    print(" ".join(remaining(Path(sys.argv[1]), sys.argv[2:])))
