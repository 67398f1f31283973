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
MIN_AMAX = 1e-12  # a token of zeros: any positive scale quantizes it exactly; keep it finite
# Dynamic activation scales are amax * float32(1/448): a multiplication rounds the same on every
# device, where "amax / 448" does not (CUDA torch divides by a Python scalar as a multiplication
# by its reciprocal, CPU torch divides), and the one-kernel quantizers compute the same bits.
INV_FP8_MAX = 1.0 / 448.0


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, saturated to the e4m3 range, rounded to float8_e4m3fn (round-to-nearest-even).
    `scale` broadcasts against x (per-tensor: a scalar; per-token: (..., 1))."""
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row (per-token) FP8: (float8_e4m3fn x, float32 scales (..., 1)), each row's scale
    max(amax, MIN_AMAX) * float32(1/448)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=MIN_AMAX) * INV_FP8_MAX  # (..., 1)
    return quantize_fp8(x, scale), scale


def fp8_rows_static_scale(fp8_rows: tuple | None) -> torch.Tensor | None:
    """The static scale of fp8_rows (values, scales[, static scale]), or None (dynamic per-row scales)."""
    return fp8_rows[2] if fp8_rows is not None and len(fp8_rows) == 3 else None


def fill_fp8_rows(normed: torch.Tensor, fp8_rows: tuple) -> None:
    """fp8_rows (e4m3 (..., H), float32 (rows,)[, a float32 static scale s]) := quantize_rows_fp8(normed), or with
    s: (quantize_fp8(normed, s), s in every row): the torch ops for what the norm kernel writes with its output."""
    static = fp8_rows_static_scale(fp8_rows)
    q, scale = quantize_rows_fp8(normed) if static is None else (quantize_fp8(normed, static.reshape(())), static)
    fp8_rows[0].copy_(q)
    fp8_rows[1].copy_(scale.reshape(-1).expand(fp8_rows[1].shape))


def add_rmsnorm(reduced: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                quant_scale: torch.Tensor | None = None,
                fp8_rows: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The local half of allreduce_add_rmsnorm: (RMSNorm(residual + reduced) * weight [as FP8 with
    quant_scale], residual + reduced); residual None: (RMSNorm(reduced) * weight, reduced); fp8_rows
    (e4m3 (..., H), float32 (rows,)[, static scale]) filled as fill_fp8_rows says. One kernel on CUDA,
    torch ops elsewhere."""
    if reduced.is_cuda:
        from collectives import fused_norm
        if fused_norm.available(reduced) and (residual is None or (
                residual.is_contiguous() and residual.shape == reduced.shape and residual.dtype == reduced.dtype)):
            return fused_norm.add_rmsnorm(reduced, residual, weight, eps, quant_scale, fp8_rows)
    new_residual = reduced if residual is None else residual + reduced
    normed = rms_norm(new_residual, weight, eps)
    if fp8_rows is not None:
        from collectives.fused_norm import check_fp8_rows
        check_fp8_rows(normed, quant_scale, fp8_rows)
        fill_fp8_rows(normed, fp8_rows)
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

    def allreduce_add_rmsnorm(self, partial: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                              eps: float, quant_scale: torch.Tensor | None = None,
                              fp8_rows: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (RMSNorm(residual + all_reduce(partial)) * weight, residual + all_reduce(partial)).
        With `quant_scale`, the normed output comes back as float8_e4m3fn (normed / quant_scale,
        saturated), ready for the next FP8 GEMM; the residual stays in its own dtype. residual None
        (a step's first norm: the embedding's partial sums): the sum itself is the new residual.
        fp8_rows (buffers: e4m3 like the output, float32 (rows,); optionally a third item, a float32 static
        scale) are filled with the output quantized per row (quantize_rows_fp8), or with that static scale
        (every row's scale is then it), for the FP8 GEMM that reads the output; only where
        `norm_quantizes_rows` says so (other backends do not take the argument)."""
        return add_rmsnorm(self.all_reduce(partial), residual, weight, eps, quant_scale, fp8_rows)

    def norm_quantizes_rows(self, x: torch.Tensor) -> bool:
        """Does allreduce_add_rmsnorm take `fp8_rows` for a partial like x, in its own kernel (no extra
        launch)? The single-rank communicator's norm kernel does; the multi-rank kernels not yet."""
        return False

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

    # --- MoE dispatch / combine at static shapes (collectives/moe_all_to_all.py: the GPU kernels) ---
    device_dispatch: bool = False  # True: dispatch_static / combine_static run on the device, no host sync

    def dispatch_static(self, x: torch.Tensor, dest_rank: torch.Tensor,
                        expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MoE dispatch whose shapes do not depend on the routing. x (M, H): this rank's routed rows
        (the same M on every rank); dest_rank (M,): the rank row i goes to, -1 for a row that goes
        nowhere (padding); expert_ids (M,): each row's expert. Returns recv_x (world*M, H) and
        recv_ids (world*M,) in expert_ids' dtype: slot s*M + i holds row i of rank s and its expert
        id where that row came here, zeros and -1 elsewhere (padding: experts and combine skip it).
        This reference runs two all_to_alls with the counts on the host; `device_dispatch`
        backends run kernels with no host sync."""
        world, m = self.world_size, _check_static(x, dest_rank, expert_ids, self.world_size)
        sent = dest_rank >= 0
        order = torch.argsort(torch.where(sent, dest_rank, world), stable=True)  # by destination, unsent last
        send_counts = torch.bincount(dest_rank[sent], minlength=world).tolist()
        order = order[: sum(send_counts)]
        meta = torch.stack([order, expert_ids[order].long()], dim=1)  # (n, 2): source row index, expert id
        rows, recv_counts = self.all_to_all(x[order], send_counts)
        recv_meta, _ = self.all_to_all(meta, send_counts)
        source = torch.repeat_interleave(torch.arange(world, device=x.device),
                                         torch.tensor(recv_counts, device=x.device))
        slot = source * m + recv_meta[:, 0]  # (n_received,)
        recv_x = x.new_zeros(world * m, x.shape[1])
        recv_x[slot] = rows
        recv_ids = torch.full((world * m,), -1, dtype=expert_ids.dtype, device=x.device)
        recv_ids[slot] = recv_meta[:, 1].to(expert_ids.dtype)
        return recv_x, recv_ids

    def combine_static(self, y: torch.Tensor, recv_ids: torch.Tensor, dest_rank: torch.Tensor) -> torch.Tensor:
        """The inverse of dispatch_static. y (world*M, H): the expert outputs of the received slots;
        recv_ids: dispatch_static's (slots with -1 are ignored); dest_rank (M,): what this rank
        dispatched. Returns (M, H): row i is y's slot [this rank, i] on rank dest_rank[i], zeros
        for rows that went nowhere."""
        world, m = self.world_size, dest_rank.shape[0] if dest_rank.dim() == 1 else -1
        if y.dim() != 2 or y.shape[0] != world * m or recv_ids.shape != (world * m,):
            raise ValueError(f"combine_static: y must be (world*M, H) and recv_ids (world*M,) for M = {m} rows "
                             f"(dest_rank's) on {world} ranks, got {tuple(y.shape)} and {tuple(recv_ids.shape)}")
        filled = torch.nonzero(recv_ids >= 0)[:, 0]  # ascending: grouped by source rank, then row
        back, _ = self.all_to_all(y[filled], torch.bincount(filled // m, minlength=world).tolist())
        sent = dest_rank >= 0
        order = torch.argsort(torch.where(sent, dest_rank, world), stable=True)[: int(sent.sum())]
        out = y.new_zeros(m, y.shape[1])
        out[order] = back  # each destination returns its rows in the order they were sent
        return out

    def close(self) -> None:
        """Releases the backend's resources (idempotent)."""


def _check_static(x: torch.Tensor, dest_rank: torch.Tensor, expert_ids: torch.Tensor, world: int) -> int:
    """dispatch_static's arguments, checked (a host sync: the reference path has them anyway). Returns M."""
    if x.dim() != 2:
        raise ValueError(f"dispatch_static: x must be (M, H) rows, got shape {tuple(x.shape)}")
    m = x.shape[0]
    for name, t in (("dest_rank", dest_rank), ("expert_ids", expert_ids)):
        if t.shape != (m,) or t.dtype not in (torch.int32, torch.int64) or t.device != x.device:
            raise ValueError(f"dispatch_static: {name} must be an int32/int64 ({m},) tensor on {x.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if m and not bool(((dest_rank >= -1) & (dest_rank < world)).all()):
        raise ValueError(f"dispatch_static: dest_rank holds ranks outside -1..{world - 1}: "
                         f"{sorted(set(dest_rank.tolist()) - set(range(-1, world)))}")
    return m


class SingleRankCommunicator(Communicator):
    """World size 1: every collective is the identity. The unsharded model runs on this."""

    backend = "single"

    def __init__(self) -> None:
        self.rank, self.world_size = 0, 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def norm_quantizes_rows(self, x: torch.Tensor) -> bool:
        return True  # add_rmsnorm: collectives/fused_norm.py's kernel on CUDA (torch ops on the CPU)

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
