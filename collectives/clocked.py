"""The virtual clock's communicator: the ranks settle when each collective ends in modeled time.

A rank's virtual clock (workers/virtual_clock.py) says when the rank would reach a collective on
the emulated node and what the transfer would take there. A collective cannot end before its last
participant arrives, so on every rank it ends at

    max(arrival over ranks) + max(transfer over ranks)

(the slowest rank's transfer bounds an uneven all-to-all; even collectives have one transfer).
The ranks learn each other's modeled times through `exchange_times`: ONE all-gather of a small
float64 vector on the *untraced* communicator, beside the real calls, never inside them. Within a
decode step the clock batches: each rank sends its step's start, and per collective the modeled
work since the previous one and its transfer, once, at the step's end, and every rank replays the
same max/plus recurrence (a collective outside a step is settled on its own, at once). So the
model still makes one visible call per sub-layer, the measured trace shows exactly those calls,
every byte still moves through collectives/, and the clock costs one extra all-gather per step.

Without --emulate-node no wrapper exists: the untouched path costs nothing.
"""
from __future__ import annotations

import torch

from collectives.communicator import Communicator
from collectives.trace import describe_call

CLOCKED = ("all_reduce", "allreduce_add_rmsnorm", "all_gather", "all_to_all", "dispatch", "combine", "broadcast",
           "barrier")


class ClockedCommunicator:
    """Wraps `inner` (the communicator the model uses, traced or not); `raw` carries the modeled
    times (the communicator under any tracer or delay, so the exchange is never traced or delayed)."""

    def __init__(self, inner: Communicator, raw: Communicator, clock, device: str | torch.device = "cpu") -> None:
        self.inner, self.raw, self.clock = inner, raw, clock
        self.rank, self.world_size, self.backend = inner.rank, inner.world_size, inner.backend
        self.device = torch.device(device)
        clock.exchange = self.exchange_times
        for name in CLOCKED:
            setattr(self, name, self._clocked(name))

    def _clocked(self, call: str):
        clock = self.clock

        def clocked(*args, **kwargs):
            clock.arrive(call, args)
            out = getattr(self.inner, call)(*args, **kwargs)  # looked up per call: a paused tracer swaps its methods
            clock.depart(out, describe_call(self, call, args, out) if clock.recording else None)
            return out
        clocked.__name__ = clocked.__qualname__ = call
        return clocked

    def norm_quantizes_rows(self, x) -> bool:
        return self.inner.norm_quantizes_rows(x)  # the clocked call forwards fp8_rows unchanged

    def exchange_times(self, values: list[float]) -> list[list[float]]:
        """Every rank's `values` (the same length on every rank), in rank order."""
        if self.world_size == 1:
            return [list(values)]
        with torch.inference_mode():  # always: the shm backend caches its views in the mode it first made them
            mine = torch.tensor([values], dtype=torch.float64, device=self.device)
            return self.raw.all_gather(mine, dim=0).tolist()  # (world, len(values))

    def close(self) -> None:
        self.inner.close()


Communicator.register(ClockedCommunicator)
