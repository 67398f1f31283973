"""Collectives for ranks on several hosts: shared memory within a host, the network only between hosts.

Why: a flat gloo group sends every byte through TCP, including the bytes between two ranks that
share a machine; shared memory moves those with a copy. When Ray places the ranks of one node on
several hosts (a cluster joined with --ray-address), each host's ranks form one shared-memory
group (collectives/shm.py) and the first rank of every host, its *leader*, joins a gloo group of
leaders. The decoder's all-reduce then costs one shared-memory reduce per host and one exchange of
a single message per host over the network, instead of a network exchange among all ranks.

  all_reduce / allreduce_add_rmsnorm:
      1. within the host: shared-memory all_reduce (rank order inside the host);
      2. across hosts, leaders only: all_gather of the host sums over gloo, then a sum in host order
         0..H-1 (fp32 accumulation for floating types, as the shm backend does) -- a fixed order, so
         every leader gets the same bits (gloo's own all_reduce order is its business);
      3. within the host: the leader broadcasts the total.
      Every rank then holds the same bits; the add + RMSNorm (+ FP8) epilogue runs locally on them.
      The sum order is ((host 0's ranks) + (host 1's ranks) + ...), not the flat 0..N-1, so the
      result equals the flat reference to rounding (exactly for values whose sums are exact).
  all_gather: shared-memory gather within the host, leaders exchange host blocks (padded to the
      largest host), the leader broadcasts the world's rows within its host.
  broadcast: within the source's host, then among leaders, then within every other host.
  all_to_all (and the MoE dispatch / combine built on it): rows for ranks of this host through
      shared memory, rows for other hosts through one gloo all-to-all of the whole world.
  barrier: the world's gloo barrier (it names the ranks that never came).

Inference mode: the shm backend caches typed views of its segments, made in whatever mode the
first call ran in, and a tensor made in inference mode cannot be written outside it. The model
calls some collectives inside torch.inference_mode (the forward) and some outside (sampling), and
here one shm call (the host broadcast, its empty placeholder included) serves both, so every call
runs with inference mode off: the views are ordinary tensors, writable in either mode.

Hosts are labels (Ray node ids in cluster/): any two ranks with the same label share memory. The
ranks of a host need not be contiguous (Ray's SPREAD alternates them). Every rank must make the
same calls in the same order, as for every backend. `hierarchical_calls` counts, per operation,
the calls that went through this path (tests read it to see the layout reached the data plane).
"""
from __future__ import annotations

import datetime
import functools
from collections import Counter

import torch
import torch.distributed as dist

from collectives.communicator import Communicator, SingleRankCommunicator, add_rmsnorm
from collectives.shm import ShmCommunicator
from collectives.torch_dist import TorchDistCommunicator


def host_groups(hosts: list) -> list[list[int]]:
    """The ranks of each host, hosts in the order of their lowest rank: ["b", "a", "b"] -> [[0, 2], [1]]."""
    groups: dict = {}
    for rank, host in enumerate(hosts):
        groups.setdefault(host, []).append(rank)
    return list(groups.values())


def _outside_inference_mode(call):
    """Runs a collective with inference mode (and autograd) off: see the module docstring."""
    @functools.wraps(call)
    def wrapped(*args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return call(*args, **kwargs)
    return wrapped


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.float64 or not dtype.is_floating_point:
        return dtype
    return torch.float32


class HierarchicalCommunicator(Communicator):
    backend = "shm+gloo"

    def __init__(self, rank: int, world_size: int, store, name: str, hosts: list, timeout_s: float = 120.0,
                 wait: str = "hybrid", small_algorithm: str = "auto") -> None:
        """store: the group's torch.distributed Store (setup only); name: unique to this node (it
        prefixes the shared-memory segments, one group per host); hosts: the host label of every rank."""
        if len(hosts) != world_size:
            raise ValueError(f"hosts names {len(hosts)} ranks, the world has {world_size}")
        self.rank, self.world_size = rank, world_size
        self.groups = host_groups(hosts)
        self.host_of = [0] * world_size  # rank -> host index
        for h, ranks in enumerate(self.groups):
            for r in ranks:
                self.host_of[r] = h
        self.host = self.host_of[rank]
        self.local = self.groups[self.host]  # this host's ranks, ascending; local[0] is its leader
        self.leaders = [ranks[0] for ranks in self.groups]
        self.is_leader = self.local[0] == rank
        self.world = TorchDistCommunicator(rank, world_size, store, "gloo", timeout_s)
        self.leader_group = dist.new_group(self.leaders, timeout=datetime.timedelta(seconds=timeout_s),
                                           backend="gloo")  # every rank calls it; non-leaders get a non-member
        if len(self.local) > 1:
            self.intra = ShmCommunicator(self.local.index(rank), len(self.local), store, f"{name}-h{self.host}",
                                         timeout_s, wait=wait, small_algorithm=small_algorithm)
        else:
            self.intra = SingleRankCommunicator()
        self.hierarchical_calls: Counter = Counter()

    def algorithm(self, op: str, nbytes: int) -> str:
        inner = self.intra.algorithm(op, nbytes) if hasattr(self.intra, "algorithm") else "local"
        return f"hier({inner}+gloo)"

    # --- steps ------------------------------------------------------------------------------
    def _host_broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """The leader's x on every rank of this host, in pieces that fit the shared-memory buffers."""
        if isinstance(self.intra, SingleRankCommunicator):
            return x
        flat = x.contiguous().view(-1)
        step = max(1, self.intra.capacity // max(1, x.element_size()))
        if flat.numel() <= step:
            return self.intra.broadcast(x, 0)
        return torch.cat([self.intra.broadcast(flat[lo: lo + step], 0) for lo in range(0, flat.numel(), step)]).view(x.shape)

    def _leaders_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Leaders only: every host's x, stacked in host order. (H, *x.shape)"""
        parts = [torch.empty_like(x) for _ in self.groups]
        dist.all_gather(parts, x.contiguous(), group=self.leader_group)
        return torch.stack(parts)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        host_sum = self.intra.all_reduce(x)
        total = x.new_empty(x.shape)
        if self.is_leader:
            sums = self._leaders_gather(host_sum)  # (H, *x.shape)
            acc = sums[0].to(_accumulator(x.dtype), copy=True)
            for h in range(1, len(self.groups)):
                acc += sums[h]
            total = acc.to(x.dtype)
        return self._host_broadcast(total)

    # --- collectives ------------------------------------------------------------------------
    @_outside_inference_mode
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.hierarchical_calls["all_reduce"] += 1
        return self._reduce(x)

    @_outside_inference_mode
    def allreduce_add_rmsnorm(self, partial, residual, weight, eps, quant_scale=None):
        self.hierarchical_calls["allreduce_add_rmsnorm"] += 1
        return add_rmsnorm(self._reduce(partial), residual, weight, eps, quant_scale)

    @_outside_inference_mode
    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        self.hierarchical_calls["all_gather"] += 1
        x = x.contiguous()
        block = self.intra.all_gather(x.unsqueeze(0), 0)  # (len(local), *x.shape), local rank order
        rows = x.new_empty((self.world_size, *x.shape))
        if self.is_leader:
            widest = max(len(ranks) for ranks in self.groups)
            padded = x.new_zeros((widest, *x.shape))
            padded[: block.shape[0]] = block
            blocks = self._leaders_gather(padded)  # (H, widest, *x.shape)
            for h, ranks in enumerate(self.groups):
                rows[ranks] = blocks[h, : len(ranks)]
        rows = self._host_broadcast(rows)  # (world, *x.shape), rank order
        return torch.cat(rows.unbind(0), dim=dim)

    @_outside_inference_mode
    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        self.hierarchical_calls["broadcast"] += 1
        src_host = self.host_of[src]
        out = x.contiguous()
        if self.host == src_host and not isinstance(self.intra, SingleRankCommunicator):
            out = self.intra.broadcast(out, self.local.index(src))
        if self.is_leader:
            out = out.clone()
            dist.broadcast(out, self.leaders[src_host], group=self.leader_group)
        if self.host != src_host:
            out = self._host_broadcast(out)
        return out

    @_outside_inference_mode
    def all_to_all(self, x: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        self.hierarchical_calls["all_to_all"] += 1
        if len(send_counts) != self.world_size or sum(send_counts) != x.shape[0]:
            raise ValueError(f"send_counts {send_counts} do not split {x.shape[0]} rows over {self.world_size} ranks")
        starts = [0]
        for n in send_counts:
            starts.append(starts[-1] + n)
        rows_for = [x[starts[r]: starts[r + 1]] for r in range(self.world_size)]
        here = [self.host_of[r] == self.host for r in range(self.world_size)]
        local_x = torch.cat([rows_for[r] for r in self.local])
        got_local, local_counts = self.intra.all_to_all(local_x, [send_counts[r] for r in self.local])
        remote_counts = [0 if here[r] else send_counts[r] for r in range(self.world_size)]
        remote_x = torch.cat([rows_for[r] for r in range(self.world_size) if not here[r]] or [x[:0]])
        got_remote, remote_recv = self.world.all_to_all(remote_x, remote_counts)
        local_parts = dict(zip(self.local, got_local.split(local_counts)))
        remote_parts = got_remote.split(remote_recv)
        parts = [local_parts[r] if here[r] else remote_parts[r] for r in range(self.world_size)]
        counts = [p.shape[0] for p in parts]
        return torch.cat(parts), counts

    @_outside_inference_mode
    def barrier(self) -> None:
        self.hierarchical_calls["barrier"] += 1
        self.world.barrier()

    def close(self) -> None:
        if self.intra is not None:
            self.intra.close()
            self.intra = None
        self.world.close()
