"""Sources and compiler flags of the C++/CUDA extension, in one place.

Used by ``fasttrain/_ext.py`` (JIT build with ninja) and by ``setup.py`` (ahead-of-time build
with ``FASTTRAIN_BUILD_EXT=1``; setup.py loads this file by path, so it must not import
fasttrain). Importing it has no side effects: torch.utils.cpp_extension is imported only
inside the functions that need it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

EXT_NAME = "fasttrain._C"  # the ahead-of-time module; the JIT one gets a hashed name

# Relative to the csrc/ folder. The CUDA glue includes torch's CUDA headers, so it is compiled
# only when torch has CUDA (and a CUDA toolkit is there): a CPU-only build never touches it.
CPU_SOURCES = ("bindings.cpp", "adamw/adamw_cpu.cpp")
CUDA_SOURCES = ("adamw/adamw_cuda.cpp", "adamw/adamw_cuda_kernel.cu")

# No -ffast-math: results must match torch bit for bit where possible. -ffp-contract=off keeps
# the compiler from fusing a*b+c on its own; the kernels call std::fma where torch does.
CXX_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off")
NVCC_FLAGS = ("-O3", "-lineinfo", "--expt-relaxed-constexpr")
LD_FLAGS = ("-fopenmp",)
CUDA_DEFINES = ("-DFASTTRAIN_WITH_CUDA",)


def csrc_dir() -> Path:
    """The csrc/ folder: shipped in the package (fasttrain/csrc) or the repository's csrc/."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "bindings.cpp").is_file() and (candidate / "adamw").is_dir():
            return candidate
    raise FileNotFoundError(
        f"fasttrain: C++ sources not found in {package / 'csrc'} or {package.parent / 'csrc'}")


def want_cuda() -> bool:
    """Build the CUDA kernels: torch has CUDA, torch.utils.cpp_extension finds a toolkit, and
    there is an architecture to build for: ``TORCH_CUDA_ARCH_LIST`` or a visible GPU (without
    either torch's arch flags fail, which cost the CPU kernels too: a login node, or
    ``CUDA_VISIBLE_DEVICES=""``, builds them alone)."""
    import torch

    if not torch.version.cuda:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return False
    return bool(os.environ.get("TORCH_CUDA_ARCH_LIST")) or torch.cuda.device_count() > 0


def cuda_arch_tag() -> str:
    """The architectures a CUDA build targets (torch's rule): ``TORCH_CUDA_ARCH_LIST``, else
    the visible GPUs' compute capabilities."""
    import torch

    listed = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if listed:
        return listed
    return ",".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                            for i in range(torch.cuda.device_count())}))


def machine_tag(with_cuda: bool) -> str:
    """What else a build depends on: the CPU's instruction sets and model (-march=native; a
    cache on a shared disk may see other CPUs: x86's ``flags``, Arm's ``Features`` and ``CPU
    part``), the compiler, and for CUDA builds the GPU architectures built for."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    lines = cpuinfo.splitlines()
    cpu = [next((line for line in lines if line.startswith(key)), "")
           for key in ("flags", "Features", "CPU part")]
    arch = cuda_arch_tag() if with_cuda else ""
    return f"{'|'.join(cpu)}|{os.environ.get('CXX', '')}|{arch}"


def sources(root: Path, with_cuda: bool) -> list[str]:
    """Absolute source paths under the csrc folder ``root``."""
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    return [str(root / name) for name in names]


def cxx_flags(with_cuda: bool, torch_build: str | None = None,
              sources_key: str | None = None) -> list[str]:
    flags = list(CXX_FLAGS) + (list(CUDA_DEFINES) if with_cuda else [])
    if torch_build:
        flags.append(f'-DFASTTRAIN_TORCH_BUILD="{torch_build}"')
    if sources_key:  # the fingerprint of what it was built from (checked when loaded)
        flags.append(f'-DFASTTRAIN_SOURCES_KEY="{sources_key}"')
    return flags


def nvcc_flags() -> list[str]:
    return list(NVCC_FLAGS) + list(CUDA_DEFINES)


SOURCE_SUFFIXES = (".cpp", ".cc", ".cu", ".h", ".hpp", ".cuh")


def fingerprint(root: Path, with_cuda: bool, extra: str = "") -> str:
    """Hash of every source file under csrc/, the source list and the flags (the JIT cache
    key: any change to them makes a new build folder)."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES):
        h.update(str(path.relative_to(root)).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    h.update(repr((sources(Path("."), with_cuda), cxx_flags(with_cuda), nvcc_flags(), LD_FLAGS,
                   extra)).encode())
    return h.hexdigest()[:16]


def extension(root):
    """A setuptools extension building ``fasttrain._C`` from ``root``/csrc (for setup.py).

    CUDA kernels are included when torch has CUDA and a toolkit is found. -march=native makes
    the module specific to the building machine's CPU, like a source install.
    """
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    csrc = Path(root) / "csrc"
    with_cuda = want_cuda()
    # the key of the sources and flags (not the machine: $CXX or a kernel's new cpuinfo flags
    # at load time would refuse a good build; it is built for this machine's CPU, -march=native)
    cxx = cxx_flags(with_cuda, torch.__version__, fingerprint(csrc, with_cuda))
    # Relative paths: setuptools wants sources relative to setup.py's folder.
    srcs = [os.path.relpath(s, root) for s in sources(csrc, with_cuda)]
    if with_cuda:
        return CUDAExtension(EXT_NAME, srcs,
                             extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags()},
                             extra_link_args=list(LD_FLAGS))
    return CppExtension(EXT_NAME, srcs, extra_compile_args={"cxx": cxx},
                        extra_link_args=list(LD_FLAGS))
