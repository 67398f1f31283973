"""The reference Communicator: torch.distributed (gloo on CPU, NCCL on GPU).

Every collective here is the plain library call, so this backend is the yardstick the fused
backends are checked against. Ranks on one host rendezvous through a FileStore in a directory
unique to the node (no listening socket at all); ranks spread over hosts use a TCPStore that
rank 0 opens on a port the OS picks (port 0), so no port is ever hard-coded. Every
collective is bounded by the process group's timeout; a rank that never arrives becomes an
error instead of a hang.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from collectives.communicator import Communicator


def open_store(host: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store, on a free port chosen by the OS (read it back from `.port`)."""
    return dist.TCPStore(host, 0, world_size, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def file_store(path: str, world_size: int) -> dist.FileStore:
    """Rendezvous for ranks on one host: a file in a directory private to this node."""
    return dist.FileStore(path, world_size)


def join_store(host: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


# torch 2.13 renamed all_gather_into_tensor (which now warns on every call); older torch has only it
GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TorchDistCommunicator(Communicator):
    def __init__(self, rank: int, world_size: int, store: dist.Store, backend: str = "gloo",
                 timeout_s: float = 120.0, device: torch.device | str = "cpu") -> None:
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.device = torch.device(device)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=self.timeout)
        self._open = True

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """One all_gather_into_tensor into a (world * rows, ...) buffer: along dim 0 that IS the
        gather; other dims concatenate its blocks (the list form of all_gather copied every rank's
        block out of NCCL's flat buffer, then concatenated: n + 1 more launches)."""
        x = (x.contiguous() if x.dim() > 0 else x.reshape(1)).detach()  # no autograd through it, as before
        out = x.new_empty((self.world_size * x.shape[0], *x.shape[1:]))
        GATHER_SINGLE(out, x)
        if dim % x.dim() == 0:
            return out
        return torch.cat(out.chunk(self.world_size, dim=0), dim=dim)

    def all_to_all(self, x: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        if len(send_counts) != self.world_size or sum(send_counts) != x.shape[0]:
            raise ValueError(f"send_counts {send_counts} do not split {x.shape[0]} rows over {self.world_size} ranks")
        counts_out = torch.tensor(send_counts, dtype=torch.long, device=self.device)
        counts_in = torch.empty_like(counts_out)
        dist.all_to_all_single(counts_in, counts_out)
        recv_counts = counts_in.tolist()
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_counts, list(send_counts))
        return out, recv_counts

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        out = x.clone()
        dist.broadcast(out, src)
        return out

    def barrier(self) -> None:
        if self.backend == "gloo":
            dist.monitored_barrier(timeout=self.timeout)  # names the ranks that did not arrive
        else:
            dist.barrier()

    def close(self) -> None:
        if self._open and dist.is_initialized():
            dist.destroy_process_group()
        self._open = False
