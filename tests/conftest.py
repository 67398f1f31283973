"""Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1).

Triton decides between compiling and interpreting when a kernel is DEFINED (module import), so
this must be set before any test imports a kernel module: conftest.py is imported first.

Without a GPU the test process also runs torch with ONE intra-op thread, from the start. A
Worker sets its process to run.threads_per_rank (1) threads, so a test used to run with torch's
default threads or with one depending on whether an earlier test had built an in-process node.
The tests' tensors are small, and on a 2-core machine whose other core is busy (rank processes,
a CLI subprocess, another job) every parallel op waits for a second thread that has no core: run
on their own, the HF conformance tests took 185 s with 2 threads and 14 s with one (user CPU
106 s -> 17 s), the tiny model's reference decode of tests/test_sharded.py 20-34 s -> 1.2-2 s.

Processes that import Ray skip jsonschema's optional IRI grammar: see tests/stub_packages.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

STUB_PACKAGES = str(Path(__file__).resolve().parent / "stub_packages")
os.environ["PYTHONPATH"] = os.pathsep.join([STUB_PACKAGES] + [p for p in [os.environ.get("PYTHONPATH")] if p])
sys.modules.setdefault("rfc3987_syntax", None)  # this process: `import rfc3987_syntax` raises ImportError

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)


@pytest.fixture
def poison_empty():
    """With deterministic algorithms on, torch.empty fills floats with NaN: an element a kernel
    forgets to write shows up as NaN in its output."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)
