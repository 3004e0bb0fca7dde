"""Backend selection shared by every op family.

Backends: ``triton`` (CUDA GPUs; CPU tensors only under ``TRITON_INTERPRET=1``), ``cuda`` (the
C++/CUDA extension), ``cpu`` (the C++ extension, OpenMP + SIMD) and ``torch`` (the reference).
An explicit ``backend=`` argument or ``FASTTRAIN_BACKEND`` forces one; forcing one that cannot
run is an error that says why. The automatic choice is logged once at INFO.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")
logger = logging.getLogger("fasttrain")
_logged: set = set()
# Looked up once: torch.compile (torch 2.11) refuses to trace importlib's find_spec, and the
# dispatch below runs inside compiled graphs.
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None if Triton kernels can run on tensors of ``device``, else why not."""
    if not _HAS_TRITON:
        return "triton is not installed"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    if device.type == "cpu":
        if interpret_mode():
            return None
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before importing triton)"
    return f"Triton kernels do not support device type {device.type!r}"


def ext_unavailable_reason(device: torch.device) -> str | None:
    """None if the C++ extension can run on ``device`` (cpu or cuda backend), else why not."""
    from fasttrain import _ext

    if device.type == "cuda" and not torch.version.cuda:
        return "this torch build has no CUDA"
    if device.type not in ("cpu", "cuda"):
        return f"no C++ kernels for device type {device.type!r}"
    module, error = _ext.load()
    if module is None:
        return f"the C++ extension is unavailable: {error}"
    if device.type == "cuda" and not _ext.has_cuda():
        return "the C++ extension was built without CUDA kernels"
    return None


def requested(backend: str | None, offers: tuple[str, ...] = BACKENDS) -> str | None:
    """The forced backend, or None for the automatic choice. ``offers``: the family's backends
    (attention and LoRA: triton and torch, with ``cpu`` meaning their CPU backend, the torch
    reference). An explicit ``backend=`` the family lacks is returned for the family to reject;
    FASTTRAIN_BACKEND is global, so a backend a family lacks (``cuda`` for attention) leaves
    that family on its automatic choice."""
    explicit = backend is not None
    backend = backend or os.environ.get("FASTTRAIN_BACKEND") or None
    if backend is None:
        return None
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "cpu" and "cpu" not in offers:
        backend = "torch"
    return backend if explicit or backend in offers else None


def log_once(family: str, backend: str, why: str) -> None:
    """The one INFO line of a backend choice (nothing while torch.compile traces: logging
    would break the graph; is_compiling first, or the trace would guard on the set and
    recompile once an eager call had logged)."""
    key = (family, backend, why)
    if not torch.compiler.is_compiling() and key not in _logged:
        _logged.add(key)
        logger.info("fasttrain.%s: using the %s backend (%s)", family, backend, why)


def warn_once(family: str, device_type: str, reasons: str) -> None:
    """The one warning of an automatic fallback to the torch reference."""
    key = (family, "fallback", device_type)
    if not torch.compiler.is_compiling() and key not in _logged:
        _logged.add(key)
        warnings.warn(f"fasttrain.{family}: no fused backend for {device_type} tensors "
                      f"({reasons}); using the torch reference implementation", stacklevel=4)
