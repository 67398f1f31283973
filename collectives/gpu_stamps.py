"""GPU timestamps written by the step's own kernels: tracing that survives CUDA-graph replay.

Why: a replayed CUDA graph runs the whole step as one launch, so host clocks and per-op CUDA
events see nothing inside it, and a separate timestamp kernel costs a launch (~2 us in a graph,
as much as a small GEMV) per stamp. Instead, the kernels that already sit at the boundaries the
trace cares about -- the fused add+RMSNorm and AllReduce+RMSNorm between sub-layers -- read the
GPU's global nanosecond timer (%globaltimer) and store it into a slot of a device buffer when
tracing is on: one register read and one 8-byte store per kernel, no extra launch. The step's
own begin and end stamps come the same way, from its first kernel (the embedding's) and its last
(the greedy argmax), when those are the fused kernels (`step_edge`); a one-thread stamp kernel
stands in where they are not.

A `StampLedger` owns that buffer. Slots are handed out in call order while the step is captured
(or run eagerly) and each carries a label (what started or ended there), so after every replay
the host copies the buffer back and turns consecutive stamps into spans. While a ledger is
`active()`, kernel wrappers ask it for slots with `take(label)`; with none active they pass a
null stamp and the kernels compile a variant without the store (a constexpr), so tracing off
costs nothing.

Clocks: %globaltimer is a nanosecond counter of the GPU, not the host's CLOCK_MONOTONIC;
`calibrate()` maps one onto the other from stamps taken while the GPU is idle, bracketed by host
clock reads (the offset's error is about half the bracket, a few microseconds; spans measured
between two GPU stamps are exact). Under Triton's interpreter there is no GPU timer: a stamp
there is its slot index times 1000, which keeps the order and the bookkeeping testable on CPU.
"""
from __future__ import annotations

import contextlib
import time

import torch

from collectives.triton_support import INTERPRETED, tl, triton

if triton is not None:
    if INTERPRETED:
        @triton.jit
        def _now(index):
            """A stand-in time under the interpreter: the slot index x 1000."""
            return index.to(tl.int64) * 1000
    else:
        @triton.jit
        def _now(index):
            """The GPU's global nanosecond timer."""
            return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                             pack=1)

    @triton.jit
    def write_stamp(stamps_ptr, index):
        """Stores the time now into stamps_ptr[index]."""
        tl.store(stamps_ptr + index, _now(index))

    @triton.jit
    def write_latest_stamp(stamps_ptr, index):
        """Keeps the latest of several programs' times in stamps_ptr[index] (an atomic max: the timer
        only grows, so what a previous replay left there is always older)."""
        tl.atomic_max(stamps_ptr + index, _now(index))

    @triton.jit
    def _stamp_kernel(stamps_ptr, index):
        write_stamp(stamps_ptr, index)


STEP_EDGES = ("begin", "end")


class StampLedger:
    """A device buffer of `capacity` int64 GPU timestamps and the label of each slot."""

    def __init__(self, device: torch.device | str, capacity: int = 4096) -> None:
        if triton is None:
            raise RuntimeError("GPU stamps need Triton (a CUDA build of torch brings it)")
        self.device = torch.device(device)
        self.stamps = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        self.labels: list[tuple] = []
        self.offset_ns = 0  # host CLOCK_MONOTONIC minus GPU timer, from calibrate()
        self.open_edges: set[str] = set()  # step edges the step's own kernels may still stamp (step_edge)
        self.folded_edges: set[str] = set()  # the edges they did stamp since expect_edges
        self._host = torch.zeros(capacity, dtype=torch.int64, pin_memory=self.device.type == "cuda")

    def take(self, label: tuple) -> int:
        """The next free slot, labeled (e.g. ("begin", "allreduce_add_rmsnorm", layer))."""
        if len(self.labels) == self.stamps.numel():
            raise RuntimeError(f"the stamp ledger is full ({self.stamps.numel()} slots): raise its capacity")
        self.labels.append(label)
        return len(self.labels) - 1

    def stamp(self, label: tuple) -> None:
        """A stamp of its own (one tiny launch): for boundaries no fused kernel sits at."""
        _stamp_kernel[(1,)](self.stamps, self.take(label))

    def expect_edges(self, edges=STEP_EDGES) -> None:
        """From now on the step's first kernel may stamp its ("step", "begin") and its last kernel its
        ("step", "end") (`step_edge`), so that no stamp kernel of its own is needed there; what they did
        shows in `folded_edges`. A stamp taken by any other kernel first closes the begin edge."""
        self.open_edges, self.folded_edges = set(edges), set()

    def rewind(self, n_slots: int = 0) -> None:
        """Forgets the slots from n_slots on (an eager step reuses the same slots every step)."""
        del self.labels[n_slots:]

    def read(self) -> list[tuple[tuple, int]]:
        """(label, host-clock ns) of every taken slot, after the work that writes them (synchronizes)."""
        n = len(self.labels)
        self._host[:n].copy_(self.stamps[:n], non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return [(label, int(t) + self.offset_ns) for label, t in zip(self.labels, self._host[:n].tolist())]

    def calibrate(self, rounds: int = 20) -> int:
        """Sets offset_ns (host CLOCK_MONOTONIC - GPU timer) from the tightest of `rounds` idle stamps
        bracketed by host clock reads. Returns the bracket in ns (the offset's uncertainty x 2)."""
        slot = self.take(("calibration",))
        best = None
        for _ in range(rounds):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            before = time.monotonic_ns()
            _stamp_kernel[(1,)](self.stamps, slot)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            after = time.monotonic_ns()
            gpu = int(self.stamps[slot].item())
            if best is None or after - before < best[0]:
                best = (after - before, (before + after) // 2 - gpu)
        self.rewind(slot)
        self.offset_ns = best[1]
        return best[0]


_ACTIVE: list[StampLedger] = []


def active() -> StampLedger | None:
    """The ledger kernels stamp into now, or None (tracing off: kernels compile without stamps)."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def stamping(ledger: StampLedger):
    """Kernels called inside this block (eagerly or while a graph is captured) stamp into `ledger`."""
    _ACTIVE.append(ledger)
    try:
        yield ledger
    finally:
        _ACTIVE.remove(ledger)


def step_edge(edge: str) -> tuple[torch.Tensor | None, int]:
    """For the kernel that opens ("begin": model/kernels/embed_norm.py) or closes ("end":
    model/kernels/argmax.py) a decode step: (stamp buffer, slot of ("step", edge)) while the active
    ledger expects that edge (StampLedger.expect_edges), else (None, 0). Each edge is taken once."""
    ledger = active()
    if ledger is None or edge not in ledger.open_edges:
        return None, 0
    ledger.open_edges.discard(edge)
    ledger.folded_edges.add(edge)
    return ledger.stamps, ledger.take(("step", edge))


def _take_own(ledger: StampLedger) -> StampLedger:
    """A kernel stamps labels of its own: the step has begun, its first kernel can no longer stamp that."""
    ledger.open_edges.discard("begin")
    return ledger


def slots(name: str, x: torch.Tensor) -> tuple[torch.Tensor | None, int, int]:
    """For a kernel wrapper: (stamp buffer or None, begin slot, end slot) of one call of `name` on
    `x` (its bytes and dtype go into the labels, as a traced collective records them)."""
    ledger = active()
    if ledger is None:
        return None, 0, 0
    _take_own(ledger)
    return ledger.stamps, ledger.take(("begin", name, x.nbytes, x.dtype)), ledger.take(("end", name, x.nbytes, x.dtype))


def triple(name: str, x: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """For a collective kernel: (stamp buffer or None, first of three consecutive slots: begin,
    arrived (every peer's data was there), end)."""
    ledger = active()
    if ledger is None:
        return None, 0
    first = _take_own(ledger).take(("begin", name, x.nbytes, x.dtype))
    ledger.take(("arrived", name, x.nbytes, x.dtype))
    ledger.take(("end", name, x.nbytes, x.dtype))
    return ledger.stamps, first
