"""Triton where it is installed, and whether its kernels run compiled or in its interpreter.

CUDA builds of torch bring Triton; CPU builds do not (then `triton` is None and every kernel
module keeps to its torch code). Triton decides when a kernel is DEFINED whether `@triton.jit`
compiles it or runs it in its numpy interpreter (TRITON_INTERPRET=1, how the kernels' tests run
on CPU). INTERPRETED says which, read off a probe kernel defined here, so all kernel modules agree.
"""
from __future__ import annotations

try:  # CUDA builds of torch bring Triton; CPU builds do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None

if triton is not None:
    @triton.jit
    def _probe():
        pass

    INTERPRETED = not isinstance(_probe, triton.runtime.JITFunction)
else:  # pragma: no cover - depends on the install
    INTERPRETED = False
