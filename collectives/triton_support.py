"""Triton where it is installed, and whether its kernels run compiled or in its interpreter.

CUDA builds of torch bring Triton; CPU builds do not (then `triton` is None and every kernel
module keeps to its torch code). Triton decides when a kernel is DEFINED whether `@triton.jit`
compiles it or runs it in its numpy interpreter (TRITON_INTERPRET=1, how the kernels' tests run
on CPU). INTERPRETED says which, read off a probe kernel defined here, so all kernel modules agree.
"""
from __future__ import annotations

import functools
import os

try:  # CUDA builds of torch bring Triton; CPU builds do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None

class ArrivalCounters:
    """int32 arrival counters per device for kernels whose last-arriving program finishes the work
    (split-K sums, merges of split partials) and resets its own counter, so they are zero between
    calls. They are made or grown outside CUDA graph capture only (a graph holds their address)."""

    def __init__(self, who: str, minimum: int) -> None:
        self.who, self.minimum = who, minimum
        self.by_device: dict = {}

    def __call__(self, device, n: int):
        import torch
        have = self.by_device.get(device)
        if have is None or have.numel() < n:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"{self.who}: run a call of this shape once before CUDA graph capture "
                                   "(its arrival counters are made outside the capture)")
            self.by_device[device] = have = torch.zeros(max(n, self.minimum), dtype=torch.int32, device=device)
        return have


if triton is not None:
    @triton.jit
    def _probe():
        pass

    INTERPRETED = not isinstance(_probe, triton.runtime.JITFunction)
else:  # pragma: no cover - depends on the install
    INTERPRETED = False


# Programmatic dependent launch (PDL, Hopper and later): a kernel launched with `launch_pdl=True`
# may start while the kernel before it in the stream is finishing; it must call `pdl_wait` before
# it reads anything an earlier kernel wrote or writes anything (an earlier kernel may still read
# memory the allocator handed out again), and it calls `pdl_launch_dependents` after that wait, so
# that when a kernel starts, everything two launches back has completed. What it may do before the
# wait: read memory no kernel of the step writes (weights). CUDA graph capture keeps these edges.
# DGX_EMU_PDL=0 turns it off (read once, at import); `PDL_ENABLED` may be flipped at run time
# (benchmarks A/B it in one process). Results are the same bits either way: only the order in
# which independent loads are issued changes.
_PDL_ENV = os.environ.get("DGX_EMU_PDL", "1").strip().lower()
if _PDL_ENV not in ("0", "1", "off", "on", "false", "true"):
    raise ValueError(f"DGX_EMU_PDL must be 0 or 1 (off / on), got {_PDL_ENV!r}")
PDL_ENABLED = _PDL_ENV in ("1", "on", "true")


@functools.lru_cache(maxsize=None)
def _sm90_or_later(device_index: int) -> bool:
    import torch
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(x) -> bool:
    """Launch this call's kernels with PDL? Only compiled (not interpreted), on a CUDA tensor of an
    sm90+ GPU, with PDL_ENABLED."""
    if not PDL_ENABLED or INTERPRETED or triton is None or not x.is_cuda:
        return False
    import torch
    return _sm90_or_later(x.device.index if x.device.index is not None else torch.cuda.current_device())


def pdl_kwargs(x) -> dict:
    """Launch keywords of a kernel that takes a `PDL` constexpr: PDL, and launch_pdl when on."""
    pdl = use_pdl(x)
    return {"PDL": pdl, "launch_pdl": True} if pdl else {"PDL": False}


if triton is not None:
    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """Waits until the kernels before this one have completed and their writes are visible
        (griddepcontrol.wait). A no-op unless PDL (a constexpr: never traced by the interpreter)."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def pdl_launch_dependents(PDL: tl.constexpr):
        """Lets the next kernel in the stream start once every program of this one got here."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
