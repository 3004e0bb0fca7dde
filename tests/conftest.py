"""Test set-up: Triton runs on CPU tensors under its interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection time.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def devices():
    """cpu always; cuda (marked gpu) where present. The same test body runs on both."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
