"""The virtual clock's communicator: each collective also settles when it ends in modeled time.

A rank's virtual clock (workers/virtual_clock.py) says when the rank would reach a collective on
the emulated node and what the transfer would take there. A collective cannot end before its last
participant arrives, so every call made through this wrapper is followed by ONE small all-gather
of (modeled arrival, modeled transfer) over the ranks, and on every rank the collective ends at

    max(arrival over ranks) + max(transfer over ranks)

(the slowest rank's transfer bounds an uneven all-to-all; even collectives have one transfer).
The exchange is a separate call on the *untraced* communicator beside the real one, not a change
to the real call's tensors: the model still makes one visible call per sub-layer, the measured
trace shows exactly those calls, and every byte still moves through collectives/. Protocol:

    arrival_s, transfer_s = clock.arrive(call, args)   # the local ops before the call are charged
    out = the wrapped call, unchanged
    clock.depart(call, args, out, arrival_s, end_s, record)

Without --emulate-node no wrapper exists, so the untouched path costs nothing. With it, a
collective costs one extra 16-byte all-gather per rank (benchmarks/virtual_clock_overhead.py
measures it); on a GPU that exchange also reads the times back, so emulated steps run eagerly.
"""
from __future__ import annotations

import torch

from collectives.communicator import Communicator
from collectives.trace import describe_call

CLOCKED = ("all_reduce", "allreduce_add_rmsnorm", "all_gather", "all_to_all", "dispatch", "combine", "broadcast",
           "barrier")


class ClockedCommunicator:
    """Wraps `inner` (the communicator the model uses, traced or not); `exchange` carries the
    modeled times (the raw communicator, so the exchange is never traced or delayed)."""

    def __init__(self, inner: Communicator, exchange: Communicator, clock, device: str | torch.device = "cpu") -> None:
        self.inner, self.exchange, self.clock = inner, exchange, clock
        self.rank, self.world_size, self.backend = inner.rank, inner.world_size, inner.backend
        self.device = torch.device(device)
        for name in CLOCKED:
            setattr(self, name, self._clocked(name))

    def _clocked(self, call: str):
        clock = self.clock

        def clocked(*args, **kwargs):
            arrival, transfer = clock.arrive(call, args)
            out = getattr(self.inner, call)(*args, **kwargs)  # looked up per call: a paused tracer swaps its methods
            end = self.release(arrival, transfer, args)
            clock.depart(call, args, out, arrival, end, describe_call(self, call, args, out) if clock.recording else None)
            return out
        clocked.__name__ = clocked.__qualname__ = call
        return clocked

    def release(self, arrival_s: float, transfer_s: float, args: tuple = ()) -> float:
        """The modeled end of a collective: the last arrival plus the slowest transfer."""
        if self.world_size == 1:
            return arrival_s + transfer_s
        device = args[0].device if args and isinstance(args[0], torch.Tensor) else self.device
        mine = torch.tensor([[arrival_s, transfer_s]], dtype=torch.float64, device=device)
        last, slowest = self.exchange.all_gather(mine, dim=0).max(dim=0).values.tolist()  # over (world, 2)
        return last + slowest

    def close(self) -> None:
        self.inner.close()


Communicator.register(ClockedCommunicator)
