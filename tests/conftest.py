"""Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1).

Triton decides between compiling and interpreting when a kernel is DEFINED (module import), so
this must be set before any test imports a kernel module: conftest.py is imported first.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def poison_empty():
    """With deterministic algorithms on, torch.empty fills floats with NaN: an element a kernel
    forgets to write shows up as NaN in its output."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)
