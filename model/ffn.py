"""Feed-forward blocks at per-rank shapes: the dense SwiGLU MLP and the Llama 4 MoE.

Both return a partial sum that the decoder all-reduces (fused with the residual add and the
next RMSNorm), so neither issues a collective of its own, except the MoE in expert-parallel
mode, whose dispatch and combine are all-to-alls.

MoE math (as Llama 4 defines it): router logits -> top-k -> sigmoid of the chosen logits; the
expert INPUT is scaled by the score (`expert(h * score)`, not `score * expert(h)`); an always-on
shared expert is added. Experts are stored fused like the HF checkpoint: gate_up [E, H, 2I] and
down [E, I, H], at this rank's slice ("tp": every expert, I split; "ep": E/world whole experts).

Expert-parallel dispatch: every rank holds the same (replicated) normed tokens after the
all-reduce, so rank r dispatches only its contiguous share of the tokens; the results come back
to r, which places them in its partial sum. The decoder's all-reduce then both sums the shared
expert's partials and gathers the routed outputs: no token is computed twice. Two ways to move
the rows, the same results:
  * dynamic (prefill, CPU backends): rows grouped by owner, `comm.dispatch` / `comm.combine`,
    all-to-alls whose counts go through the host; experts see only real rows;
  * static (a communicator with `device_dispatch`, at most EP_STATIC_MAX_ROWS rows a rank, i.e.
    decode): every rank sends ceil(N / world) * k rows (padding rows go nowhere),
    `comm.dispatch_static` / `combine_static` keep every shape independent of the routing (world x
    rows slots, padding slots zero), so the layer has no host sync and is CUDA-graph capturable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from collectives.communicator import Communicator
from model.config import ModelConfig
from model.parallel import ShardLayout

EP_STATIC_MAX_ROWS = 16  # routed rows a rank dispatches on the static path (decode steps route fewer)
# Batch invariance on CPU: MKL's fp32 GEMM takes another kernel for fewer than 4 rows, whose rows
# round differently from the same rows in a larger GEMM (measured on this project's VM: rows of
# M = 1..3 agree with each other, rows of every M >= 4 agree with each other). An expert's row count
# depends on what the OTHER tokens of a batch chose, so without padding a row's output would depend
# on its batch; small groups are zero-padded to Experts.gemm_rows rows: 4, or all the batch engine's
# rows on a CPU whose larger counts round differently too (workers/gemm_rows.py asks the CPU).
MIN_GEMM_ROWS = 4


class MLP(nn.Module):
    """SwiGLU with fused gate|up (FC13): column-parallel in, row-parallel out."""

    def __init__(self, hidden: int, intermediate_per_rank: int) -> None:
        super().__init__()
        self.intermediate_per_rank = intermediate_per_rank
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate_per_rank, bias=False)
        self.down_proj = nn.Linear(intermediate_per_rank, hidden, bias=False)

    @property
    def input_quant_scale(self) -> torch.Tensor | None:
        """High precision in: no FP8 scale for the collective to quantize with (Fp8MLP has one)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (..., I_r) each
        return self.down_proj(F.silu(gate) * up)


class Experts(nn.Module):
    """The routed experts held by this rank, in HF's fused layout."""

    def __init__(self, n_experts_per_rank: int, hidden: int, intermediate_per_rank: int,
                 out_major: bool = False) -> None:
        """out_major: store each expert's matrix (out, in) in memory, the logical (in, out) layout a
        transposed view: a decode GEMV then streams contiguous rows of K (measured on an H200 at
        Maverick's expert shape: 67-86% of copy bandwidth, against 34-55% reading HF's layout)."""
        super().__init__()
        e, h, i = n_experts_per_rank, hidden, intermediate_per_rank

        def param(d_in: int, d_out: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(e, d_out, d_in).transpose(1, 2) if out_major else torch.empty(e, d_in, d_out))

        self.gate_up_proj = param(h, 2 * i)  # logical (E, H, 2I)
        self.down_proj = param(i, h)  # logical (E, I, H)
        self.gemm_rows = MIN_GEMM_ROWS  # CPU: smaller expert groups are zero-padded to this many rows

    def forward(self, x: torch.Tensor, local_expert: torch.Tensor) -> torch.Tensor:
        """x: (M, H) rows, each for local expert `local_expert[m]`. Returns (M, H)."""
        out = torch.empty_like(x)
        order = torch.argsort(local_expert, stable=True)
        counts = torch.bincount(local_expert, minlength=self.gate_up_proj.shape[0]).tolist()
        offset = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = order[offset: offset + count]
            offset += count
            routed = x[rows]  # (n, H)
            if count < self.gemm_rows and not x.is_cuda:  # zero rows up to the GEMM kernel all counts take
                routed = F.pad(routed, (0, 0, 0, self.gemm_rows - count))  # (max(n, gemm_rows), H)
            gate, up = (routed @ self.gate_up_proj[expert]).chunk(2, dim=-1)  # (n', I_r) each
            out[rows] = ((F.silu(gate) * up) @ self.down_proj[expert])[:count]
        return out


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: ShardLayout, comm: Communicator, out_major_experts: bool = False) -> None:
        super().__init__()
        self.comm = comm
        self.top_k = cfg.experts_per_token
        self.n_experts = cfg.n_experts
        self.expert_parallel = shard.expert_parallel
        self.experts_per_rank = shard.experts_per_rank
        self.expert_start = shard.expert_start
        self.router = nn.Linear(cfg.hidden_size, cfg.n_experts, bias=False)  # replicated
        self.experts = Experts(shard.experts_per_rank, cfg.hidden_size, shard.expert_intermediate_per_rank,
                               out_major_experts)
        self.shared_expert = MLP(cfg.hidden_size, shard.shared_intermediate_per_rank)

    @property
    def input_quant_scale(self) -> torch.Tensor | None:
        """Always None: the router reads the normed input in high precision, and the experts take
        it scaled by the router score, so no GEMM consumes the collective's output as it is."""
        return None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, H). Returns chosen expert ids (N, k) and their sigmoid scores (N, k)."""
        top_logits, top_ids = torch.topk(self.router(x), self.top_k, dim=-1)
        return top_ids, torch.sigmoid(top_logits.float()).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, H) normed, identical on every rank. Returns this rank's partial sum."""
        flat = x.reshape(-1, x.shape[-1])  # (N, H)
        expert_ids, scores = self.route(flat)
        partial = self.shared_expert(flat)
        if self.expert_parallel:
            partial = partial + self._routed_expert_parallel(flat, expert_ids, scores)
        else:
            token = torch.arange(flat.shape[0], device=x.device).repeat_interleave(self.top_k)
            routed_in = flat[token] * scores.reshape(-1, 1)  # (N*k, H): input scaled by score
            partial.index_add_(0, token, self.experts(routed_in, expert_ids.reshape(-1)))
        return partial.view_as(x)

    def static_dispatch_applies(self, n_tokens: int) -> bool:
        """True when the expert-parallel rows of `n_tokens` tokens take the static path: the
        communicator runs dispatch_static / combine_static on the device (no host sync) and this
        rank sends at most EP_STATIC_MAX_ROWS rows."""
        share = -(-n_tokens // self.comm.world_size)
        return bool(getattr(self.comm, "device_dispatch", False)) and share * self.top_k <= EP_STATIC_MAX_ROWS

    def _routed_expert_parallel(self, flat: torch.Tensor, expert_ids: torch.Tensor,
                                scores: torch.Tensor) -> torch.Tensor:
        if self.static_dispatch_applies(flat.shape[0]):
            return self.routed_static(flat, expert_ids, scores)
        return self.routed_dynamic(flat, expert_ids, scores)

    def routed_dynamic(self, flat: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """This rank's share of the routed rows through dispatch / combine (counts on the host)."""
        world, rank = self.comm.world_size, self.comm.rank
        n_tokens = flat.shape[0]
        share = -(-n_tokens // world)
        lo, hi = min(rank * share, n_tokens), min((rank + 1) * share, n_tokens)  # this rank's tokens
        token = torch.arange(lo, hi, device=flat.device).repeat_interleave(self.top_k)  # (M,)
        experts = expert_ids[lo:hi].reshape(-1)
        owner = experts // self.experts_per_rank
        order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=world).tolist()
        routed_in = flat[token[order]] * scores[lo:hi].reshape(-1, 1)[order]  # (M, H), grouped by owner
        recv_x, recv_experts, recv_counts = self.comm.dispatch(routed_in, experts[order], send_counts)
        recv_y = self.experts(recv_x, recv_experts - self.expert_start)
        back = self.comm.combine(recv_y, recv_counts, send_counts)  # (M, H), in `order`
        routed = torch.zeros_like(flat)
        routed.index_add_(0, token[order], back)
        return routed

    def routed_static(self, flat: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor,
                      run_experts=None) -> torch.Tensor:
        """routed_dynamic's result with shapes that do not depend on the routing (no host sync in
        the collectives). run_experts(rows (R, H), local expert ids (R,)) -> (R, H): the routed
        experts over every received slot, e.g. the fused path's gathered GEMVs (padding rows are
        zero, so an expert maps them to zero, and the combine ignores them anyway). Default: the
        torch experts over the filled slots only (they read their counts on the host anyway), so
        every expert GEMM sees the rows routed_dynamic's does, in the same order: the same bits."""
        world, rank, k = self.comm.world_size, self.comm.rank, self.top_k
        n_tokens = flat.shape[0]
        share = -(-n_tokens // world)
        mine = rank * share + torch.arange(share, device=flat.device)  # (S,) this rank's tokens; >= N: padding
        real = (mine < n_tokens).repeat_interleave(k)  # (M,) M = S * k
        mine = mine.clamp(max=n_tokens - 1)
        token = mine.repeat_interleave(k)  # (M,)
        experts = expert_ids[mine].reshape(-1)  # (M,)
        dest = torch.where(real, experts // self.experts_per_rank, -1)
        routed_in = flat[token] * scores[mine].reshape(-1, 1)  # (M, H): input scaled by score
        recv_x, recv_ids = self.comm.dispatch_static(routed_in, dest, experts)  # (world*M, H), (world*M,)
        if run_experts is not None:
            recv_y = run_experts(recv_x, local_expert_ids(recv_ids, self.expert_start))  # (world*M, H)
        else:
            filled = torch.nonzero(recv_ids >= 0)[:, 0]  # slots s*M + i: by source, then row, as dispatch orders
            y = self.experts(recv_x[filled], recv_ids[filled] - self.expert_start)
            recv_y = y.new_zeros(recv_x.shape[0], y.shape[1]).index_copy_(0, filled, y)  # (world*M, H)
        back = self.comm.combine_static(recv_y, recv_ids, dest)  # (M, H), zeros where dest is -1
        routed = torch.zeros_like(flat)
        routed.index_add_(0, token, back.to(flat.dtype))
        return routed


def local_expert_ids(recv_ids: torch.Tensor, expert_start: int) -> torch.Tensor:
    """The local expert of each received slot (recv_ids - expert_start). Padding slots (-1) take
    the first filled slot's expert, so a gathered GEMM reads no extra expert's weights for them
    (expert 0 when nothing came)."""
    filled = recv_ids >= 0
    first = recv_ids.gather(0, torch.argmax(filled.to(torch.int32)).reshape(1))  # (1,): never read on the host
    return (torch.where(filled, recv_ids, first) - expert_start).clamp_(min=0)
