"""Loads the C++/CUDA extension (the ``cpu`` and ``cuda`` backends).

In order: (1) a prebuilt ``fasttrain._C``
(``FASTTRAIN_BUILD_EXT=1 pip install --no-build-isolation .``) if it was built against the
running torch, from the csrc/ sources present, with the same flags (else an error that says to
rebuild it; it is built for the building machine's CPU, -march=native); (2) a JIT build of
csrc/ with torch.utils.cpp_extension and ninja into a cache folder (``$FASTTRAIN_CACHE`` or
``~/.cache/fasttrain``, one subfolder per torch version and hash of the sources, flags, CPU
and GPU architectures; later processes import the cached module directly); (3) if that
fails, one warning that includes the compiler's error, and ``None`` so that callers fall back
to the Triton or torch path.

The ops register themselves under ``torch.ops.fasttrain`` when the module is imported. The
module itself also has ``adamw_cpu_`` and ``sum_sq_cpu``: the same CPU kernels with the same
arguments, called without the dispatcher, which reads the Python lists in place (~3x less
per-tensor overhead than torch.ops with thousands of tensors; eager use only).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
import warnings
from pathlib import Path

from fasttrain import _ext_sources as _sources

try:
    import fcntl
except ImportError:  # not POSIX: no lock between processes
    fcntl = None

_lock = threading.RLock()
_loaded = False
_module = None
_error: str | None = None
_status = "not loaded yet"
_probed = None  # load(build=False): whether a build was found (None: not looked yet)
_fakes_registered = False

_MAX_ERROR_CHARS = 6000


def cache_root() -> Path:
    return Path(os.environ.get("FASTTRAIN_CACHE") or Path.home() / ".cache" / "fasttrain"
                ).expanduser()


def _torch_tag() -> str:
    import torch

    version = torch.__version__.replace("+", "_")
    return f"torch{version}_py{sys.version_info.major}{sys.version_info.minor}"


def _try_prebuilt():
    """The ahead-of-time module if it exists and matches the running torch; else (None, why)."""
    import torch

    if importlib.util.find_spec("fasttrain._C") is None:
        return None, "no prebuilt fasttrain._C"
    try:
        from fasttrain import _C
    except ImportError as e:  # typically undefined symbols: built against another torch
        return None, f"prebuilt fasttrain._C does not import: {e}"
    built = _C.torch_build() or _C.torch_version()
    running = torch.__version__ if _C.torch_build() else torch.__version__.split("+")[0]
    if built != running:
        # Its ops are registered already; a JIT module would register them a second time.
        raise RuntimeError(
            f"the prebuilt fasttrain._C was built for torch {built}, this is torch "
            f"{torch.__version__}: rebuild it (FASTTRAIN_BUILD_EXT=1 pip install "
            "--no-build-isolation .), or delete fasttrain/_C*.so for a JIT build on first use")
    built_from = _C.sources_key() if hasattr(_C, "sources_key") else ""
    try:
        expected = _sources.fingerprint(_sources.csrc_dir(), _C.has_cuda())  # as setup.py's
    except FileNotFoundError:  # no sources shipped: nothing to compare with
        expected = built_from
    if built_from != expected:
        raise RuntimeError(
            "the prebuilt fasttrain._C was built from other sources or flags than these "
            "(csrc/ edited since): rebuild it (FASTTRAIN_BUILD_EXT=1 pip install "
            "--no-build-isolation .), or delete fasttrain/_C*.so for a JIT build on first use")
    return _C, None


def _import_from(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def jit_build_dir() -> tuple[str, Path]:
    """(module name, folder) of this machine's JIT build."""
    with_cuda = _sources.want_cuda()
    key = _sources.fingerprint(_sources.csrc_dir(), with_cuda, _sources.machine_tag(with_cuda))
    return (f"fasttrain_ext_{key}",
            cache_root() / f"{_torch_tag()}_{'cuda' if with_cuda else 'cpu'}_{key}")


def _jit():
    """Import the cached JIT build, building it first if needed. Returns (module, status)."""
    csrc = _sources.csrc_dir()
    with_cuda = _sources.want_cuda()
    name, build_dir = jit_build_dir()
    library = build_dir / f"{name}.so"
    marker = build_dir / "BUILD_OK"
    if marker.is_file() and library.is_file():
        return _import_from(library, name), f"cached at {build_dir}"
    build_dir.mkdir(parents=True, exist_ok=True)
    failed = build_dir / "BUILD_FAILED"
    waiting_since = time.time()
    with open(build_dir / "fasttrain.flock", "w") as flock:
        if fcntl is not None:  # one builder at a time; released by the kernel if it dies
            fcntl.flock(flock, fcntl.LOCK_EX)
        if marker.is_file() and library.is_file():  # another process built it meanwhile
            return _import_from(library, name), f"cached at {build_dir}"
        # Another process's build failed while this one waited: the same sources would fail
        # again (8 test workers would otherwise build one after another). A later process,
        # which did not wait on that build, tries again.
        if failed.is_file() and failed.stat().st_mtime >= waiting_since:
            raise RuntimeError(f"the build failed in another process: {failed.read_text()}")
        # torch's own lock file, left by a build that was killed: only a holder of the flock
        # builds, so it is stale, and torch would wait on it forever
        (build_dir / "lock").unlink(missing_ok=True)
        try:
            module = _build(name, csrc, with_cuda, build_dir, marker)
        except Exception as e:
            failed.write_text(f"{type(e).__name__}: {e}"[-_MAX_ERROR_CHARS:])
            raise
        failed.unlink(missing_ok=True)
        return module


def _build(name, csrc, with_cuda, build_dir, marker):
    from torch.utils.cpp_extension import load as cpp_load

    print(f"fasttrain: building the C++{'/CUDA' if with_cuda else ''} extension in {build_dir} "
          "(first use only; this takes about a minute)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    module = cpp_load(
        name=name,
        sources=_sources.sources(csrc, with_cuda),
        extra_cflags=_sources.cxx_flags(with_cuda),
        extra_cuda_cflags=_sources.nvcc_flags() if with_cuda else None,
        extra_ldflags=list(_sources.LD_FLAGS),
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        verbose=False,
    )
    seconds = time.perf_counter() - start
    marker.write_text(f"{seconds:.1f}\n")
    print(f"fasttrain: built the extension in {seconds:.1f} s", file=sys.stderr, flush=True)
    return module, f"built in {seconds:.1f} s at {build_dir}"


def _built() -> bool:
    """Whether load() would only import the extension: a cached JIT build, or a prebuilt
    module that imports and matches the running torch."""
    name, build_dir = jit_build_dir()
    if (build_dir / "BUILD_OK").is_file() and (build_dir / f"{name}.so").is_file():
        return True
    try:
        return _try_prebuilt()[0] is not None
    except RuntimeError:  # built for another torch: load() says so
        return False


def loaded():
    """The module if a load() already imported it, else None; never loads anything (for the
    per-step helpers of paths that work without it, e.g. backend="torch")."""
    return _module if _loaded else None


def load(build: bool = True):
    """``(module, None)`` if the extension is usable, else ``(None, why)``. Cached. With
    ``build=False`` an extension that would first have to be compiled is not: ``(None, why)``
    (looked up once per process; a later ``load()`` still builds it)."""
    global _loaded, _module, _error, _status, _probed
    if _loaded:
        return _module, _error
    if not build:
        if _probed is None:
            _probed = _built()
        if not _probed:
            return None, "not built yet"
    with _lock:
        if _loaded:
            return _module, _error
        try:
            module, why_not_prebuilt = _try_prebuilt()
            if module is not None:
                _module, _status = module, "prebuilt"
            else:
                _module, _status = _jit()
        except Exception as e:  # noqa: BLE001 - any failure means: no extension, say why
            message = f"{type(e).__name__}: {e}".strip()
            if len(message) > _MAX_ERROR_CHARS:
                message = "..." + message[-_MAX_ERROR_CHARS:]
            _module, _error, _status = None, message, f"unbuildable: {message}"
            warnings.warn(
                "fasttrain: the C++ extension is unavailable, so the cpu/cuda backends are off "
                f"and fasttrain falls back to the Triton/torch paths. Reason: {message}",
                RuntimeWarning, stacklevel=2)
        if _module is not None:
            _register_fakes()
        _loaded = True
        return _module, _error


def _register_fakes() -> None:
    """Fake (meta) kernels of the C++ ops, for FakeTensor tracing (torch.compile, opcheck),
    and the CUDA step marked side-effecting: it writes through the pointers of its device
    table, so its schema shows no mutation that would keep dead-code elimination off it.
    Once per process (the ops are registered once, whichever module brought them)."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True
    import torch

    def no_output(*args):
        return None

    for name in ("adamw_cpu_", "adamw_cuda_"):
        torch.library.register_fake(f"fasttrain::{name}", no_output)

    @torch.library.register_fake("fasttrain::sum_sq_cpu")
    def _sum_sq_fake(tensors):
        return torch.empty((), dtype=torch.float64, device="cpu")

    # the overload and its packet: a graph traced from a call of the packet holds the packet,
    # and torch 2.11's DCE does not look through it to the overload (2.13's does)
    torch.fx.node.has_side_effect(torch.ops.fasttrain.adamw_cuda_.default)
    torch.fx.node.has_side_effect(torch.ops.fasttrain.adamw_cuda_)


def has_cuda() -> bool:
    """Whether the loaded extension has the CUDA kernels (False if it is unavailable)."""
    module, _ = load()
    return bool(module is not None and module.has_cuda())


def status() -> str:
    """'prebuilt', 'cached at PATH', 'built in 31.2 s at PATH' or 'unbuildable: why'."""
    load()
    return _status
