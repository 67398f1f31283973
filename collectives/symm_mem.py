"""GPU Communicator for ranks on one host: the fused AllReduce (+ RMSNorm) over symmetric memory.

Why: NCCL spends ~20 us on a decode step's all-reduce of a few kilobytes inside a CUDA graph, and
the norm after it is one more launch; the kernel in collectives/lamport_allreduce.py does both in one
launch over NVLink peer memory (the decoder's `allreduce_add_rmsnorm` twice per layer); its launcher
is collectives/fused_allreduce.py's, which also holds the older flag protocol.

What it needs: every process sees all GPUs of the host and has called torch.cuda.set_device(rank)
(cluster/procs.py does; Ray actors need RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES), and the GPUs
reach each other by peer access (NVLink). NVLink multicast is not used (no multimem ops).

What it does: at construction it joins an NCCL process group (TorchDistCommunicator) and allocates
ONE symmetric buffer per rank through torch's symmetric memory (torch.distributed._symmetric_memory:
`empty` + `rendezvous` map every rank's buffer into every process), fills it (Lamport sentinels, or
zero flags) and waits for every rank before any kernel may push into it. The buffer holds messages of up to `capacity` values
(DEFAULT_CAPACITY: 128 tokens x 8192 hidden). Then:
  * all_reduce: the fused kernel for contiguous float32/bf16/fp16 CUDA tensors of at most
    `capacity` values; NCCL otherwise;
  * allreduce_add_rmsnorm: one launch for contiguous (..., H <= 8192) partial/residual of one dtype
    and at most `capacity` values, weight (H,), optional float32 scalar quant_scale; anything else
    (larger inputs, strided residuals) falls back to NCCL all_reduce + add_rmsnorm;
  * all_gather: float tensors the fused kernel takes as a sum of zero-padded slots (below);
  * all_to_all, broadcast, barrier, dispatch/combine: NCCL.
Every call is capturable in a CUDA graph (the kernel keeps its epochs in device memory), so
`graph_capturable` is True. The fused kernel's results are the same bits on every rank (rank-order
fp32 sums); NCCL's all-reduce order is its own, so the two backends agree to rounding only.
A fused wait that times out (a peer out of step or dead) is reported by the next barrier().
"""
from __future__ import annotations

import torch

from collectives import fused_norm
from collectives.communicator import Communicator, add_rmsnorm
from collectives.fused_allreduce import FusedAllReduce
from collectives.symm_layout import Layout
from collectives.moe_all_to_all import DeviceDispatch, MoeLayout, SymmetricMoeAllToAll
from collectives.symm_buffer import map_symmetric
from collectives.torch_dist import TorchDistCommunicator

GATHER_BY_SUM = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_CAPACITY = 128 * 8192  # values per message through the fused kernel (4 bytes each reserved)


def cuda_device(device: torch.device | str) -> torch.device:
    """The CUDA device this rank uses: `device` with its index, or the current one (set_device)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"the symm backend needs CUDA devices, got {device}; on CPU use shm or gloo")
    if not torch.cuda.is_available():
        raise RuntimeError("the symm backend needs CUDA, and this process sees no GPU")
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


class GatherBySum:
    """all_gather as a sum: rank r's slot holds x, the others 0, and x + 0 = x exactly, so the
    all-reduce of the slots is the gather (a -0.0 comes back as +0.0). The slots of a shape are
    zeroed once and kept (only this rank's slot is ever written, and the all-reduce writes its own
    output), so a call is two launches, the slot's copy and the sum; along dim 0 the gather is a view
    of the sum (no concatenation). Slots made during a CUDA graph capture would live in the graph's
    pool, so a capture gets fresh ones (one more launch) unless an eager call of the shape (the
    capture's warm-up) made them first; slots above KEPT_BYTES are made per call."""

    KEPT_BYTES = 1 << 20

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size, self.kept = rank, world_size, {}

    @staticmethod
    def takes(x: torch.Tensor) -> bool:
        return x.dtype in GATHER_BY_SUM and x.dim() >= 1

    def slots(self, x: torch.Tensor) -> torch.Tensor:
        """(world, *x.shape) zeros: the kept ones of x's shape, or new ones."""
        key = (tuple(x.shape), x.dtype, x.device)
        slots = self.kept.get(key)
        if slots is None:
            slots = x.new_zeros((self.world_size, *x.shape))
            if slots.nbytes <= self.KEPT_BYTES and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
                self.kept[key] = slots
        return slots

    def __call__(self, x: torch.Tensor, dim: int, all_reduce, slots: torch.Tensor | None = None) -> torch.Tensor:
        """The gather of x along dim; slots: `slots(x)` when the caller already has them."""
        slots = self.slots(x) if slots is None else slots
        slots[self.rank].copy_(x)
        gathered = all_reduce(slots)  # (world, *x.shape)
        if dim % x.dim() == 0:
            return gathered.flatten(0, 1)  # (world * x.shape[0], ...): what the cat along dim 0 gives
        return torch.cat(gathered.unbind(0), dim=dim)


class SymmMemCommunicator(DeviceDispatch, Communicator):
    backend = "symm"
    graph_capturable = True

    def __init__(self, rank: int, world_size: int, store, timeout_s: float = 120.0,
                 device: torch.device | str = "cuda", capacity: int = DEFAULT_CAPACITY,
                 protocol: str = "lamport", programs: int | None = None) -> None:
        """protocol: how the fused kernel learns its peers' data arrived (symm_layout.PROTOCOLS);
        programs: its programs per launch (None: the protocol's, symm_layout.Layout)."""
        self.rank, self.world_size = rank, world_size
        layout = Layout(world_size, capacity, programs or 0, protocol)  # refuses bad values before any work
        self.device = cuda_device(device)
        if self.device.index != torch.cuda.current_device():
            raise ValueError(f"rank {rank} was given {self.device} but its current device is cuda:"
                             f"{torch.cuda.current_device()}; call torch.cuda.set_device first")
        self.nccl = TorchDistCommunicator(rank, world_size, store, "nccl", timeout_s, self.device)
        self.layout = layout
        self.mapped = map_symmetric(layout.nbytes, self.nccl, fill=layout.initial_byte)
        self.fused = FusedAllReduce(rank, self.layout, self.mapped.bases, self.device, timeout_s)
        self.moe = SymmetricMoeAllToAll(self.nccl, MoeLayout(world_size), timeout_s)
        torch.cuda.synchronize(self.device)
        self.nccl.barrier()  # every rank's buffer holds its initial bytes before any peer pushes into it
        self._gather = GatherBySum(rank, world_size)
        self._open = True

    def fused_all_reduce_takes(self, x: torch.Tensor) -> bool:
        return x.numel() > 0 and self.fused.fits(x)

    def fused_norm_takes(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         quant_scale: torch.Tensor | None) -> bool:
        """True when allreduce_add_rmsnorm runs as one fused launch (the shapes it takes, above)."""
        return (self.fused_all_reduce_takes(partial) and partial.dim() >= 1
                and 1 <= partial.shape[-1] <= fused_norm.MAX_HIDDEN
                and (residual is None or (residual.shape == partial.shape and residual.dtype == partial.dtype
                                          and residual.device == partial.device and residual.is_contiguous()))
                and weight.shape == (partial.shape[-1],) and weight.dtype in fused_norm.DTYPES
                and weight.device == partial.device and weight.is_contiguous()
                and (quant_scale is None or (quant_scale.numel() == 1 and quant_scale.dtype == torch.float32
                                             and quant_scale.device == partial.device)))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.all_reduce(x) if self.fused_all_reduce_takes(x) else self.nccl.all_reduce(x)

    def allreduce_add_rmsnorm(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                              eps: float, quant_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused_norm_takes(partial, residual, weight, quant_scale):
            return self.fused.allreduce_add_rmsnorm(partial, residual, weight, eps, quant_scale)
        return add_rmsnorm(self.nccl.all_reduce(partial), residual, weight, eps, quant_scale)

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Small float tensors (the LM head's (max, id) pairs) as ONE fused all-reduce of zero-padded
        slots (GatherBySum); everything else through NCCL."""
        slots = self._gather.slots(x) if self._gather.takes(x) else None
        if slots is None or not self.fused_all_reduce_takes(slots):
            return self.nccl.all_gather(x, dim)
        return self._gather(x, dim, self.fused.all_reduce, slots)

    def all_to_all(self, x: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        return self.nccl.all_to_all(x, send_counts)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self.nccl.broadcast(x, src)

    def barrier(self) -> None:
        """NCCL barrier; then raises if a fused wait of this rank ever gave up (reads the device)."""
        self.nccl.barrier()
        missing = sorted(set(self.fused.missing_ranks()) | set(self.moe.missing_ranks()))
        if missing:
            raise RuntimeError(f"rank {self.rank}: the fused all-reduce gave up waiting for rank(s) {missing} "
                               "(timed out); the ranks' collectives are out of step")

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        torch.cuda.synchronize(self.device)
        self.nccl.barrier()  # no peer pushes into this buffer any more
        self.moe.close()
        del self.fused, self.mapped, self.moe
        self.nccl.close()
