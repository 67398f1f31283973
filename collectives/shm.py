"""Shared-memory Communicator for ranks on one host, with the fused AllReduce + add + RMSNorm.

The CPU analogue of TensorRT-LLM's one-shot kernel over NVLink peer memory. Every rank owns one
segment that all peers map. A collective call k (every rank makes the same calls in the same
order, so k is the same everywhere) goes:

  one-shot (small messages):  write my input into my segment, post flag A = k; wait until every
      peer's flag A >= k; then read ALL inputs straight out of the peers' segments and reduce them
      in rank order 0..N-1 (the same order on every rank, so every rank gets the same bits), add
      the residual and RMS-normalize in the same step. No separate barrier, no extra copy.
  two-shot (large messages):  as above, but rank j reduces only rows chunk j (reduce-scatter), adds
      and normalizes them, writes the result into its segment and posts flag B = k; then every rank
      copies all chunks (all-gather). Each rank then reads 2(N-1)/N of the message instead of N-1.

Reading is pull (the reader fetches from peers' memory), unlike the GPU kernel's push, because on a
CPU every segment is equally near and a pull writes each input once instead of N times.

Buffers are double-buffered by the parity of k. A rank can run at most one call ahead of the
slowest peer (call k+1 needs every peer's k+1 post, which comes after that peer finished reading
call k), so writing buffer (k+1) % 2 never disturbs a peer still reading buffer k % 2.
"""
from __future__ import annotations

import math
import os

import torch

from collectives.communicator import Communicator, quantize_fp8, rms_norm
from collectives.shm_sync import FlagBoard, Segment

FLAG_A, FLAG_B = 0, 1  # input posted / two-shot chunk posted (word 15 is the doorbell)
N_FLAGS = 16  # int32 words at the head of each segment (64 bytes: one cache line)
META_BYTES = 512  # per buffer: all-to-all counts (int64 x world) and the like
ALIGN = 64


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class ShmCommunicator(Communicator):
    backend = "shm"

    def __init__(self, rank: int, world_size: int, store, name: str, timeout_s: float = 120.0,
                 capacity_bytes: int = 8 << 20, wait: str = "futex", two_shot_bytes: int = 256 << 10) -> None:
        """store: a torch.distributed Store shared by the group (for the one-time setup only).
        name: unique to this node and group (it prefixes the segments)."""
        if world_size > (META_BYTES // 8):
            raise ValueError(f"world size {world_size} exceeds the {META_BYTES // 8} ranks the metadata holds")
        self.rank, self.world_size, self.name = rank, world_size, name
        self.capacity, self.two_shot_bytes, self.timeout_s = _aligned(capacity_bytes), two_shot_bytes, timeout_s
        self.buffer_bytes = META_BYTES + self.capacity
        self.offsets = {"A": N_FLAGS * 4, "B": N_FLAGS * 4 + 2 * self.buffer_bytes}  # 2 buffers each
        size = self.offsets["B"] + 2 * self.capacity
        self.segments: list[Segment] = [None] * world_size
        self.segments[rank] = Segment(f"{name}-r{rank}", size, create=True)
        store.set(f"{name}/created/{rank}", "1")
        store.wait([f"{name}/created/{r}" for r in range(world_size)])
        for r in range(world_size):
            if r != rank:
                self.segments[r] = Segment(f"{name}-r{r}", size, create=False)
        store.set(f"{name}/attached/{rank}", str(os.getpid()))
        store.wait([f"{name}/attached/{r}" for r in range(world_size)])
        self.pids = [int(store.get(f"{name}/attached/{r}")) for r in range(world_size)]
        self.segments[rank].unlink()  # everyone holds a mapping: the name is no longer needed
        self.flags = FlagBoard(self.segments, rank, N_FLAGS, wait, timeout_s, self.pids)
        self.bytes = [torch.frombuffer(s.map, dtype=torch.uint8) for s in self.segments]
        self.seq = 0
        self._views: dict = {}
        self.store, self.wait_strategy, self.capacity_bytes = store, wait, capacity_bytes
        self.n_groups = 0

    def new_group(self, ranks: list[int]) -> "ShmCommunicator | None":
        """A communicator over a subset of this group's ranks. Every rank of this group calls it
        with the same list, in the same order; ranks outside the subset get None."""
        ranks = sorted(set(ranks))
        if not ranks or ranks[0] < 0 or ranks[-1] >= self.world_size:
            raise ValueError(f"subgroup {ranks} is not within 0..{self.world_size - 1}")
        self.n_groups += 1
        if self.rank not in ranks:
            return None
        name = f"{self.name}-g{self.n_groups}"
        return ShmCommunicator(ranks.index(self.rank), len(ranks), self.store, name, self.timeout_s,
                               self.capacity_bytes, self.wait_strategy, self.two_shot_bytes)

    # --- buffers ---------------------------------------------------------------------------
    def _view(self, rank: int, region: str, parity: int, dtype: torch.dtype, shape) -> torch.Tensor:
        """A typed view of a buffer in `rank`'s segment (views are cached: decode shapes repeat)."""
        key = (rank, region, parity, dtype, tuple(shape))
        view = self._views.get(key)
        if view is None:
            start = self.offsets[region] + parity * (self.buffer_bytes if region == "A" else self.capacity)
            if region == "A":
                start += META_BYTES
            n = math.prod(shape) * dtype.itemsize
            view = self.bytes[rank][start: start + n].view(dtype).view(shape)
            if len(self._views) > 4096:
                self._views.clear()
            self._views[key] = view
        return view

    def _meta(self, rank: int, parity: int) -> torch.Tensor:
        start = self.offsets["A"] + parity * self.buffer_bytes
        return self.bytes[rank][start: start + META_BYTES].view(torch.int64)

    def _next(self) -> tuple[int, int]:
        self.seq += 1
        return self.seq, self.seq & 1

    def _post(self, flag: int, seq: int) -> None:
        self.flags.post(flag, seq)

    def _publish(self, x: torch.Tensor, what: str) -> tuple[int, int]:
        """Writes x into my A buffer for the next call and waits until every rank has done the same."""
        nbytes = x.numel() * x.element_size()
        if nbytes > self.capacity:
            raise ValueError(f"{what}: {nbytes} bytes exceed the shared-memory buffer ({self.capacity} bytes)")
        seq, parity = self._next()
        self._view(self.rank, "A", parity, x.dtype, x.shape).copy_(x)
        self._post(FLAG_A, seq)
        self.flags.wait(range(self.world_size), FLAG_A, seq, what)
        return seq, parity

    def _rows_per_chunk(self, x: torch.Tensor) -> int:
        row_bytes = max(1, x[0].numel() * x.element_size()) if x.dim() else x.element_size()
        return max(2, self.capacity // row_bytes)

    def algorithm(self, op: str, nbytes: int) -> str:
        """How this backend carries `op` of `nbytes` (for traces)."""
        if op in ("all_reduce", "allreduce_add_rmsnorm"):
            if nbytes > self.capacity:
                return "shm-chunked"
            return "shm-one-shot" if nbytes <= self.two_shot_bytes else "shm-two-shot"
        return "shm"

    # --- collectives -----------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(x, None, None, 0.0, None)[0]

    def allreduce_add_rmsnorm(self, partial, residual, weight, eps, quant_scale=None):
        return self._reduce(partial, residual, weight, eps, quant_scale)

    def _reduce(self, x, residual, weight, eps, quant_scale):
        """Sum over ranks (rank order), then optionally + residual and RMSNorm (and FP8). Large
        messages go through in row chunks that fit the buffers."""
        flat = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)  # (rows, H)
        res = residual.reshape(flat.shape) if residual is not None else None
        rows = self._rows_per_chunk(flat) // (2 if residual is not None else 1)  # two-shot packs normed|residual
        outs, new_res = [], []
        for lo in range(0, flat.shape[0], rows):
            chunk = flat[lo: lo + rows]
            step = self._one_shot if chunk.numel() * chunk.element_size() <= self.two_shot_bytes else self._two_shot
            o, r = step(chunk, None if res is None else res[lo: lo + rows], weight, eps, quant_scale)
            outs.append(o)
            new_res.append(r)
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        if residual is None:
            return out.view(x.shape), None
        return out.view(x.shape), (torch.cat(new_res) if len(new_res) > 1 else new_res[0]).view(x.shape)

    def _sum_rows(self, parity: int, shape, dtype, rows: slice) -> torch.Tensor:
        """Sum of every rank's rows in rank order, accumulated in fp32 (fp64 for fp64), as the GPU kernels do."""
        accumulate = torch.float64 if dtype == torch.float64 else torch.float32
        total = self._view(0, "A", parity, dtype, shape)[rows].to(accumulate, copy=True)
        for r in range(1, self.world_size):
            total += self._view(r, "A", parity, dtype, shape)[rows]
        return total.to(dtype)

    def _epilogue(self, total, residual, weight, eps, quant_scale):
        if residual is None:
            return total, None
        new_residual = residual + total
        normed = rms_norm(new_residual, weight, eps)
        return (normed if quant_scale is None else quantize_fp8(normed, quant_scale)), new_residual

    def _one_shot(self, x, residual, weight, eps, quant_scale):
        _, parity = self._publish(x, "all_reduce")
        total = self._sum_rows(parity, x.shape, x.dtype, slice(None))
        return self._epilogue(total, residual, weight, eps, quant_scale)

    def _two_shot(self, x, residual, weight, eps, quant_scale):
        seq, parity = self._publish(x, "all_reduce (reduce-scatter)")
        n_rows, world = x.shape[0], self.world_size
        bounds = [min(n_rows, (n_rows * j + world - 1) // world) for j in range(world + 1)]
        mine = slice(bounds[self.rank], bounds[self.rank + 1])
        total = self._sum_rows(parity, x.shape, x.dtype, mine)
        out, new_res = self._epilogue(total, None if residual is None else residual[mine], weight, eps, quant_scale)
        out_dtype = out.dtype
        packed = out if new_res is None else torch.cat([out.view(torch.uint8), new_res.view(torch.uint8)], -1)
        width = packed.shape[-1]
        self._view(self.rank, "B", parity, packed.dtype, (n_rows, width))[mine].copy_(packed)
        self._post(FLAG_B, seq)
        self.flags.wait(range(world), FLAG_B, seq, "all_reduce (all-gather)")
        gathered = torch.cat([self._view(j, "B", parity, packed.dtype, (n_rows, width))[bounds[j]: bounds[j + 1]]
                              for j in range(world)])
        if new_res is None:
            return gathered.clone(), None
        split = out.shape[-1] * out.element_size()
        normed = gathered[:, :split].contiguous().view(out_dtype)
        return normed, gathered[:, split:].contiguous().view(x.dtype)

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        _, parity = self._publish(x.contiguous(), "all_gather")
        return torch.cat([self._view(r, "A", parity, x.dtype, x.shape) for r in range(self.world_size)], dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        _, parity = self._publish(x.contiguous() if self.rank == src else x.new_empty(0), "broadcast")
        return self._view(src, "A", parity, x.dtype, x.shape).clone()

    def all_to_all(self, x: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        if len(send_counts) != self.world_size or sum(send_counts) != x.shape[0]:
            raise ValueError(f"send_counts {send_counts} do not split {x.shape[0]} rows over {self.world_size} ranks")
        seq, parity = self.seq + 1, (self.seq + 1) & 1
        self._meta(self.rank, parity)[: self.world_size] = torch.tensor(send_counts)
        self._publish(x.contiguous(), "all_to_all")
        row_shape = x.shape[1:]
        parts, recv_counts = [], []
        for src in range(self.world_size):
            counts = self._meta(src, parity)[: self.world_size].tolist()
            offset, n = sum(counts[: self.rank]), counts[self.rank]
            rows = self._view(src, "A", parity, x.dtype, (sum(counts), *row_shape))
            parts.append(rows[offset: offset + n])
            recv_counts.append(n)
        return torch.cat(parts).clone(), recv_counts

    def barrier(self) -> None:
        seq, _ = self._next()
        self._post(FLAG_A, seq)
        self.flags.wait(range(self.world_size), FLAG_A, seq, "barrier")

    def close(self) -> None:
        self.bytes, self._views = [], {}
        self.flags = None
        for s in self.segments:
            if s is not None:
                s.close()
        self.segments = []
