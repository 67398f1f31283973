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

  reduce-once (small messages, more ranks than cores):  every rank writes and posts its input;
      rank 0 alone reduces, adds, normalizes, writes the result into its B buffer and posts flag B;
      the others copy it out. One-shot repeats the whole reduction on every rank, which is free on
      GPUs (each has its own SMs) but on a 2-core host with 8 ranks costs 8 reductions of CPU time
      per call; reduce-once costs one reduction and N-1 small copies. Same bits everywhere by
      construction. `small_algorithm="auto"` picks it when the ranks outnumber the usable cores.

Buffers are double-buffered by the parity of k. A rank can run at most one call ahead of the
slowest peer (call k+1 needs every peer's k+1 post, which comes after that peer finished reading
call k), so writing buffer (k+1) % 2 never disturbs a peer still reading buffer k % 2.
"""
from __future__ import annotations

import math
import os

import torch

from collectives.communicator import Communicator, add_rmsnorm, quantize_fp8, rms_norm
from collectives.shm_sync import FlagBoard, Segment

FLAG_A, FLAG_B = 0, 1  # input posted / two-shot chunk or reduce-once result posted (words 13-15: bells)
N_FLAGS = 16  # int32 words at the head of each segment (64 bytes: one cache line)
META_BYTES = 512  # per buffer: all-to-all counts (int64 x world) and the like
ALIGN = 64
SMALL_ALGORITHMS = ("auto", "one-shot", "reduce-once")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class ShmCommunicator(Communicator):
    backend = "shm"

    def __init__(self, rank: int, world_size: int, store, name: str, timeout_s: float = 120.0,
                 capacity_bytes: int = 8 << 20, wait: str = "hybrid", two_shot_bytes: int = 256 << 10,
                 small_algorithm: str = "auto") -> None:
        """store: a torch.distributed Store shared by the group (for the one-time setup only).
        name: unique to this node and group (it prefixes the segments).
        small_algorithm: how messages up to two_shot_bytes are reduced (see the module docstring)."""
        if world_size > (META_BYTES // 8):
            raise ValueError(f"world size {world_size} exceeds the {META_BYTES // 8} ranks the metadata holds")
        if small_algorithm not in SMALL_ALGORITHMS:
            raise ValueError(f"small-message algorithm must be one of {SMALL_ALGORITHMS}, got {small_algorithm!r}")
        self.small_algorithm_setting = small_algorithm
        if small_algorithm == "auto":
            small_algorithm = "reduce-once" if world_size > usable_cores() else "one-shot"
        self.small_algorithm = small_algorithm
        self.rank, self.world_size, self.name = rank, world_size, name
        self.capacity, self.two_shot_bytes, self.timeout_s = _aligned(capacity_bytes), two_shot_bytes, timeout_s
        self.buffer_bytes = META_BYTES + self.capacity
        self.offsets = {"A": N_FLAGS * 4, "B": N_FLAGS * 4 + 2 * self.buffer_bytes}  # 2 buffers each
        self.offsets["G"] = self.offsets["B"] + 2 * self.capacity  # rank 0 only: reduce-once inputs
        self.small_limit = min(two_shot_bytes, self.capacity // 2)  # normed | residual fit in B
        self.gather_slot = _aligned(self.small_limit)
        size = self.offsets["G"]
        sizes = [size + (2 * world_size * self.gather_slot if r == 0 else 0) for r in range(world_size)]
        self.segments: list[Segment] = [None] * world_size
        self.segments[rank] = Segment(f"{name}-r{rank}", sizes[rank], create=True)
        store.set(f"{name}/created/{rank}", "1")
        store.wait([f"{name}/created/{r}" for r in range(world_size)])
        for r in range(world_size):
            if r != rank:
                self.segments[r] = Segment(f"{name}-r{r}", sizes[r], create=False)
        store.set(f"{name}/attached/{rank}", str(os.getpid()))
        store.wait([f"{name}/attached/{r}" for r in range(world_size)])
        self.pids = [int(store.get(f"{name}/attached/{r}")) for r in range(world_size)]
        self.segments[rank].unlink()  # everyone holds a mapping: the name is no longer needed
        self.flags = FlagBoard(self.segments, rank, N_FLAGS, wait, timeout_s, self.pids)
        self.bytes = [torch.frombuffer(s.map, dtype=torch.uint8) for s in self.segments]
        self.seq = 0
        self._views: dict = {}
        self._plans: dict = {}
        self.store, self.wait_strategy, self.capacity_bytes = store, wait, capacity_bytes
        self.n_groups = 0

    def new_group(self, ranks: list[int], small_algorithm: str | None = None) -> "ShmCommunicator | None":
        """A communicator over a subset of this group's ranks. Every rank of this group calls it
        with the same list, in the same order; ranks outside the subset get None.
        small_algorithm: as in the constructor (default: this group's setting)."""
        ranks = sorted(set(ranks))
        if not ranks or ranks[0] < 0 or ranks[-1] >= self.world_size:
            raise ValueError(f"subgroup {ranks} is not within 0..{self.world_size - 1}")
        self.n_groups += 1
        if self.rank not in ranks:
            return None
        name = f"{self.name}-g{self.n_groups}"
        return ShmCommunicator(ranks.index(self.rank), len(ranks), self.store, name, self.timeout_s,
                               self.capacity_bytes, self.wait_strategy, self.two_shot_bytes,
                               small_algorithm or self.small_algorithm_setting)

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

    def _publish(self, x: torch.Tensor, what: str, wait: bool = True) -> tuple[int, int]:
        """Writes x into my A buffer for the next call and (with `wait`) waits until every rank has
        done the same."""
        nbytes = x.numel() * x.element_size()
        if nbytes > self.capacity:
            raise ValueError(f"{what}: {nbytes} bytes exceed the shared-memory buffer ({self.capacity} bytes)")
        seq, parity = self._next()
        self._view(self.rank, "A", parity, x.dtype, x.shape).copy_(x)
        self._post(FLAG_A, seq)
        if wait:
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
            return f"shm-{self.small_algorithm}" if nbytes <= self.two_shot_bytes else "shm-two-shot"
        return "shm"

    # --- collectives -----------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(x, None, None, 0.0, None)[0]

    def allreduce_add_rmsnorm(self, partial, residual, weight, eps, quant_scale=None):
        if residual is None:  # no residual (a step's first norm): here residual None means a plain all-reduce
            return add_rmsnorm(self.all_reduce(partial), None, weight, eps, quant_scale)
        return self._reduce(partial, residual, weight, eps, quant_scale)

    def _reduce(self, x, residual, weight, eps, quant_scale):
        """Sum over ranks (rank order), then optionally + residual and RMSNorm (and FP8). Large
        messages go through in row chunks that fit the buffers."""
        if x.numel() * x.element_size() <= self.small_limit:  # the decode case: no chunking
            return self._small(x, residual, weight, eps, quant_scale)
        flat = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)  # (rows, H)
        res = residual.reshape(flat.shape) if residual is not None else None
        rows = self._rows_per_chunk(flat) // (2 if residual is not None else 1)  # two-shot packs normed|residual
        outs, new_res = [], []
        for lo in range(0, flat.shape[0], rows):
            chunk = flat[lo: lo + rows]
            step = self._small if chunk.numel() * chunk.element_size() <= self.two_shot_bytes else self._two_shot
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

    def _small(self, x, residual, weight, eps, quant_scale):
        if self.small_algorithm == "reduce-once" and self.world_size > 1:
            return self._reduce_once(x, residual, weight, eps, quant_scale)
        return self._one_shot(x, residual, weight, eps, quant_scale)

    def _reduce_once_plan(self, shape, dtype: torch.dtype, out_dtype: torch.dtype):
        """Views for one message shape, per buffer parity: my slot and all slots of the gather
        region (rank 0's segment, slot r written by rank r), and rank 0's result (normed | residual)."""
        key = (shape, dtype, out_dtype)
        plan = self._plans.get(key)
        if plan is None:
            numel, world = math.prod(shape), self.world_size
            slot_elems = self.gather_slot // dtype.itemsize
            plan = {"mine": [], "all": [], "out": [], "res": []}
            for parity in (0, 1):
                start = self.offsets["G"] + parity * world * self.gather_slot
                region = self.bytes[0][start: start + world * self.gather_slot].view(dtype)
                plan["all"].append(region.as_strided((world, numel), (slot_elems, 1)))  # (world, numel)
                plan["mine"].append(region[self.rank * slot_elems: self.rank * slot_elems + numel].view(shape))
                plan["out"].append(self._view(0, "B", parity, out_dtype, shape))
                plan["res"].append(self._view(0, "B", parity, dtype, (2, *shape))[1])
            self._plans[key] = plan
        return plan

    def _reduce_once(self, x, residual, weight, eps, quant_scale):
        """Rank 0 reduces (and normalizes) once; the others copy its result (module docstring)."""
        out_dtype = torch.float8_e4m3fn if quant_scale is not None and residual is not None else x.dtype
        plan = self._reduce_once_plan(x.shape, x.dtype, out_dtype)
        seq, parity = self._next()
        plan["mine"][parity].copy_(x)
        self._post(FLAG_A, seq)
        everyone = range(self.world_size)
        if self.rank == 0:
            self.flags.wait(everyone, FLAG_A, seq, "all_reduce (inputs)", bell=FlagBoard.BELL_LEADER,
                            ring_if_last=False)
            accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
            total = plan["all"][parity].sum(0, dtype=accumulate).view(x.shape).to(x.dtype)  # rank order
            out, new_res = self._epilogue(total, residual, weight, eps, quant_scale)
            plan["out"][parity].copy_(out)
            if new_res is not None:
                plan["res"][parity].copy_(new_res)
            self._post(FLAG_B, seq)
            self.flags.ring(FlagBoard.BELL_RESULT)
            return out, new_res
        self.flags.fence()
        if not self.flags.missing(everyone, FLAG_A, seq):  # mine was the last input: wake rank 0
            self.flags.ring(FlagBoard.BELL_LEADER)
        self.flags.wait((0,), FLAG_B, seq, "all_reduce", bell=FlagBoard.BELL_RESULT, ring_if_last=False,
                        culprits=lambda: self.flags.missing(everyone, FLAG_A, seq))  # whom rank 0 waits for
        out = plan["out"][parity].clone()
        return out, (None if residual is None else plan["res"][parity].clone())

    def _one_shot(self, x, residual, weight, eps, quant_scale):
        _, parity = self._publish(x, "all_reduce")
        total = self._sum_rows(parity, x.shape, x.dtype, slice(None))
        return self._epilogue(total, residual, weight, eps, quant_scale)

    def _two_shot(self, x, residual, weight, eps, quant_scale):
        """x: (rows, H). Rank j reduces and normalizes rows chunk j into its B buffer (normed plane,
        then the residual plane), then every rank copies each chunk once into its outputs."""
        seq, parity = self._publish(x, "all_reduce (reduce-scatter)")
        n_rows, world = x.shape[0], self.world_size
        bounds = [min(n_rows, (n_rows * j + world - 1) // world) for j in range(world + 1)]
        mine = slice(bounds[self.rank], bounds[self.rank + 1])
        total = self._sum_rows(parity, x.shape, x.dtype, mine)
        out, new_res = self._epilogue(total, None if residual is None else residual[mine], weight, eps, quant_scale)
        planes = [(out.dtype, lambda j: self._view(j, "B", parity, out.dtype, x.shape))]
        if new_res is not None:  # the residual plane starts where a full x-sized plane would end
            planes.append((x.dtype, lambda j: self._view(j, "B", parity, x.dtype, (2, *x.shape))[1]))
        for (_, plane), part in zip(planes, (out, new_res)):
            plane(self.rank)[mine].copy_(part)
        self._post(FLAG_B, seq)
        self.flags.wait(range(world), FLAG_B, seq, "all_reduce (all-gather)")
        results = []
        for dtype, plane in planes:
            full = torch.empty(x.shape, dtype=dtype)
            for j in range(world):
                full[bounds[j]: bounds[j + 1]].copy_(plane(j)[bounds[j]: bounds[j + 1]])
            results.append(full)
        return results[0], (results[1] if new_res is not None else None)

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
