"""Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1).

Triton decides between compiling and interpreting when a kernel is DEFINED (module import), so
this must be set before any test imports a kernel module: conftest.py is imported first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
