"""The Communicator interface: every byte that moves between ranks goes through one of these.

Model code holds a Communicator and calls it once per sub-layer; it never sees a process group,
a socket or a shared-memory segment. Backends (torch.distributed gloo/NCCL, CPU shared memory,
GPU symmetric memory) and the trace recorder are Communicators too, so they plug in without
touching the model.

`allreduce_add_rmsnorm` is the one fused collective of the decoder:
    s = sum over ranks of partial;  residual' = residual + s;  normed = RMSNorm(residual') * weight
Here it is composed from `all_reduce` and a local residual add + RMSNorm: on CUDA tensors that
local half is one Triton kernel (collectives/fused_norm.py, tested against `rms_norm` below), on
CPU the torch ops. Fused backends override the whole call and a test holds them equal to this
composition.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Llama RMSNorm: normalize in fp32, cast back, then scale (weight None: no scale, as QK-norm)."""
    x_fp32 = x.float()
    inv_rms = torch.mean(x_fp32 * x_fp32, -1, keepdim=True).add_(eps).rsqrt_()  # same bits as pow(2).mean(), fewer ops
    normed = (x_fp32 * inv_rms).type_as(x)
    return normed if weight is None else normed * weight


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, saturated to the e4m3 range, rounded to float8_e4m3fn (round-to-nearest-even).
    `scale` broadcasts against x (per-tensor: a scalar; per-token: (..., 1))."""
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def add_rmsnorm(reduced: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                quant_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The local half of allreduce_add_rmsnorm: (RMSNorm(residual + reduced) * weight [as FP8 with
    quant_scale], residual + reduced). One kernel on CUDA, torch ops elsewhere."""
    if reduced.is_cuda:
        from collectives import fused_norm
        if (fused_norm.available(reduced) and residual.is_contiguous() and residual.shape == reduced.shape
                and residual.dtype == reduced.dtype):
            return fused_norm.add_rmsnorm(reduced, residual, weight, eps, quant_scale)
    new_residual = residual + reduced
    normed = rms_norm(new_residual, weight, eps)
    return (normed if quant_scale is None else quantize_fp8(normed, quant_scale)), new_residual


class Communicator(ABC):
    """Collectives among the ranks of one group. All calls are blocking and return new tensors."""

    rank: int
    world_size: int
    backend: str = "abstract"

    @abstractmethod
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks, in the same order on every rank."""

    @abstractmethod
    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenation of every rank's `x` along `dim`, in rank order (shapes must match)."""

    @abstractmethod
    def all_to_all(self, x: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Rows x[sum(send_counts[:j]) : ...+send_counts[j]] go to rank j. Returns the rows received,
        concatenated in source-rank order, and how many came from each rank."""

    @abstractmethod
    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """`src`'s tensor on every rank (others pass a tensor of the same shape and dtype)."""

    @abstractmethod
    def barrier(self) -> None:
        """Returns once every rank has entered."""

    def allreduce_add_rmsnorm(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                              eps: float, quant_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (RMSNorm(residual + all_reduce(partial)) * weight, residual + all_reduce(partial)).
        With `quant_scale`, the normed output comes back as float8_e4m3fn (normed / quant_scale,
        saturated), ready for the next FP8 GEMM; the residual stays in its own dtype."""
        return add_rmsnorm(self.all_reduce(partial), residual, weight, eps, quant_scale)

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor,
                 send_counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """MoE dispatch: rows of `x` (grouped by destination rank) and their expert ids go to the
        ranks that own those experts. Returns (rows received, their expert ids, counts per source)."""
        recv_x, recv_counts = self.all_to_all(x, send_counts)
        recv_ids, _ = self.all_to_all(expert_ids, send_counts)
        return recv_x, recv_ids, recv_counts

    def combine(self, y: torch.Tensor, recv_counts: list[int], send_counts: list[int]) -> torch.Tensor:
        """MoE combine: the inverse of dispatch; expert outputs return to the ranks that sent them."""
        back, _ = self.all_to_all(y, recv_counts)
        return back

    def close(self) -> None:
        """Releases the backend's resources (idempotent)."""


class SingleRankCommunicator(Communicator):
    """World size 1: every collective is the identity. The unsharded model runs on this."""

    backend = "single"

    def __init__(self) -> None:
        self.rank, self.world_size = 0, 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return x

    def all_to_all(self, x: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        if list(send_counts) != [x.shape[0]]:
            raise ValueError(f"send_counts {send_counts} do not cover {x.shape[0]} rows on 1 rank")
        return x, [x.shape[0]]

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        return x

    def barrier(self) -> None:
        return None
