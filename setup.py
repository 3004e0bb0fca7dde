"""Packaging for fasttrain.

The Triton kernels live in the top-level ``kernels/`` folder and ship as ``fasttrain.kernels``;
the C++/CUDA sources in ``csrc/`` ship as package data and are JIT-built on first use
(see ``fasttrain/_ext.py``). Set ``FASTTRAIN_BUILD_EXT=1`` to build the extension ahead of time.
"""
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


kwargs = {}
if os.environ.get("FASTTRAIN_BUILD_EXT") == "1":
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError as e:
        raise SystemExit("FASTTRAIN_BUILD_EXT=1 builds against the installed torch: run "
                         "pip install --no-build-isolation . (pip's isolated build has no "
                         "torch)") from e

    import importlib.util

    spec = importlib.util.spec_from_file_location("_ext_sources",
                                                  ROOT / "fasttrain" / "_ext_sources.py")
    sources = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sources)
    kwargs = dict(ext_modules=[sources.extension(ROOT)], cmdclass={"build_ext": BuildExtension})

setup(
    packages=["fasttrain", "fasttrain.optim", "fasttrain.ops", "fasttrain.nn", "fasttrain.data",
              "fasttrain.integrations", "fasttrain.kernels",
              "fasttrain.csrc", "fasttrain.csrc.adamw"],
    package_dir={"fasttrain.kernels": "kernels", "fasttrain.csrc": "csrc"},
    package_data={"fasttrain.csrc": ["*.cpp", "*.h"],
                  "fasttrain.csrc.adamw": ["*.cpp", "*.cu", "*.h"]},
    **kwargs,
)
