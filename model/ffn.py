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
expert's partials and gathers the routed outputs: no token is computed twice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from collectives.communicator import Communicator
from model.config import ModelConfig
from model.parallel import ShardLayout


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
            gate, up = (x[rows] @ self.gate_up_proj[expert]).chunk(2, dim=-1)  # (n, I_r) each
            out[rows] = (F.silu(gate) * up) @ self.down_proj[expert]
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

    def _routed_expert_parallel(self, flat: torch.Tensor, expert_ids: torch.Tensor,
                                scores: torch.Tensor) -> torch.Tensor:
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
