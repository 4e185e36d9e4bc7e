"""Test set-up: without a GPU, the Triton kernels run on the CPU through Triton's interpreter.

``TRITON_INTERPRET`` must be set before triton is imported, so this happens before any package import.
"""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so failures reproduce."""
    import torch

    torch.manual_seed(0)


@pytest.fixture
def device() -> str:
    return "cuda" if _HAS_CUDA else "cpu"
