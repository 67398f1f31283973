"""Fault injection for tests and studies: a Communicator whose rank arrives late.

`DelayedCommunicator` sleeps before forwarding each collective, so its rank reaches every
collective `delay_s` after it would have; to its peers it looks like a rank with slower
compute. Wrapped outside the tracer, the trace shows it as the last arrival (the straggler);
with a delay past the collective timeout, the peers' wait becomes an error that names it.
"""
from __future__ import annotations

import time

from collectives.communicator import Communicator


class DelayedCommunicator(Communicator):
    def __init__(self, inner: Communicator, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.rank, self.world_size, self.backend = inner.rank, inner.world_size, inner.backend

    def _late(self):
        time.sleep(self.delay_s)
        return self.inner

    def all_reduce(self, x):
        return self._late().all_reduce(x)

    def allreduce_add_rmsnorm(self, partial, residual, weight, eps, quant_scale=None):
        return self._late().allreduce_add_rmsnorm(partial, residual, weight, eps, quant_scale)

    def all_gather(self, x, dim: int = 0):
        return self._late().all_gather(x, dim)

    def all_to_all(self, x, send_counts):
        return self._late().all_to_all(x, send_counts)

    def dispatch(self, x, expert_ids, send_counts):
        return self._late().dispatch(x, expert_ids, send_counts)

    def combine(self, y, recv_counts, send_counts):
        return self._late().combine(y, recv_counts, send_counts)

    def broadcast(self, x, src: int = 0):
        return self._late().broadcast(x, src)

    def barrier(self) -> None:
        return self._late().barrier()

    def close(self) -> None:
        self.inner.close()
