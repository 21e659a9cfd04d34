"""Test setup: Triton kernels run in the interpreter where there is no CUDA device.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set here, at
collection start. GPU-only tests carry @pytest.mark.gpu and skip without CUDA.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
