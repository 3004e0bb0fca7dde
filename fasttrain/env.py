"""Environment report: ``python -m fasttrain.env``.

Prints the versions (python, torch, triton, CUDA), the devices, whether TRITON_INTERPRET is
set, which backends can run CPU and CUDA tensors (and why not, where they cannot), and the state
of the C++ extension (prebuilt / cached / built / unbuildable and why). Paste it into bug
reports. Loading the extension may build it first (about a minute, once).
"""
from __future__ import annotations

import importlib.util
import os
import platform
import sys


def _triton_version() -> str:
    if importlib.util.find_spec("triton") is None:
        return "not installed"
    try:
        import triton

        return triton.__version__
    except Exception as e:  # noqa: BLE001 - report, do not fail
        return f"import failed: {type(e).__name__}: {e}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _devices(torch) -> list[str]:
    lines = [f"cpu: {_cpu_name()}, {os.cpu_count()} logical cores, "
             f"torch threads {torch.get_num_threads()}, "
             f"SIMD {torch.backends.cpu.get_cpu_capability()}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {p.name}, sm_{p.major}{p.minor}, "
                         f"{p.total_memory / 2**30:.1f} GiB")
    else:
        lines.append("cuda: none visible")
    return lines


def report() -> str:
    """The report as text."""
    import torch

    from fasttrain import _backend, _ext

    lines = ["fasttrain environment"]
    try:
        from fasttrain import __version__ as fasttrain_version
    except ImportError:
        fasttrain_version = "unknown"
    lines.append(f"  fasttrain        {fasttrain_version}")
    lines.append(f"  python           {sys.version.split()[0]} ({platform.platform()})")
    lines.append(f"  torch            {torch.__version__}")
    lines.append(f"  triton           {_triton_version()}")
    lines.append(f"  CUDA (torch)     {torch.version.cuda or 'none (CPU-only torch build)'}")
    interpret = os.environ.get("TRITON_INTERPRET")
    lines.append(f"  TRITON_INTERPRET {interpret if interpret is not None else 'not set'}"
                 + (" (Triton runs CPU tensors in the interpreter)"
                    if _backend.interpret_mode() else ""))
    forced = os.environ.get("FASTTRAIN_BACKEND")
    lines.append(f"  FASTTRAIN_BACKEND {forced if forced else 'not set (automatic choice)'}")
    lines.append("devices")
    lines.extend(f"  {line}" for line in _devices(torch))

    # Load the extension before asking the backends, so its status line comes with it.
    ext_status = _ext.status()
    lines.append("backends")
    for device in ("cpu", "cuda"):
        dev = torch.device(device)
        if device == "cuda" and not torch.cuda.is_available():
            lines.append("  cuda tensors: no CUDA device visible here; the lines below say what "
                         "would run if there were one")
        for backend, why_not in (("triton", _backend.triton_unavailable_reason(dev)),
                                 ("cuda" if device == "cuda" else "cpu",
                                  _backend.ext_unavailable_reason(dev)),
                                 ("torch", None)):
            state = "available" if why_not is None else f"unavailable: {why_not}"
            lines.append(f"  {device:<4} tensors  {backend:<6} {state}")
    lines.append("extension")
    lines.append(f"  status           {ext_status}")
    lines.append(f"  cuda kernels     {'yes' if _ext.has_cuda() else 'no'}")
    lines.append(f"  cache folder     {_ext.cache_root()}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
