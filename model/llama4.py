"""Llama 4 text model at per-rank shapes. It never mentions a rank: the ShardLayout gave every
module its shape, and the Communicator is the only way out.

One decoder layer is two sub-layers, each ending in the same visible collective:

    attn_partial      = attention(normed)                       # row-parallel partial sum
    normed, residual  = comm.allreduce_add_rmsnorm(attn_partial, residual, post_attention_norm)
    ffn_partial       = feed_forward(normed)                    # partial sum (MoE or dense)
    normed, residual  = comm.allreduce_add_rmsnorm(ffn_partial, residual, NEXT layer's input_norm)

so the RMSNorm that opens the next layer (or the final norm) is fused into the collective that
closes this one, as TensorRT-LLM's AllReduce+residual+RMSNorm kernel does. When the GEMM that reads
`normed` wants FP8 input with a static scale (`input_quant_scale`, None otherwise), the collective
also quantizes its output; the model never asks what dtype a module computes in. On the fused
kernels, where that GEMM quantizes per token (dynamic scales), the collective's norm kernel also
writes its output quantized per row (`fp8_rows`), so the GEMV skips that work. After layer i,
`residual` is that layer's output hidden state: the auxiliary features EAGLE-3 reads.

The embedding is vocab-parallel (each rank embeds the ids it owns, an all-reduce completes it)
and the LM head is vocab-parallel too: `forward` returns this rank's slice of the logits and
`model.sampling` picks tokens without gathering the full vocabulary for greedy decoding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from collectives.communicator import Communicator, rms_norm
from model.attention import Attention, KVCache, build_step_context, rope_inv_freq
from model.config import ModelConfig
from model import fast_path
from model.ffn import MLP, MoE
from model.parallel import ShardLayout

KERNELS = ("torch", "triton")


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class VocabEmbedding(nn.Module):
    """Rows [vocab_start, vocab_start + vocab_per_rank) of the embedding; other ids embed to zero.
    Replicated (ShardLayout.embedding_replicated): every rank holds every row."""

    def __init__(self, shard: ShardLayout, hidden: int) -> None:
        super().__init__()
        self.replicated, self.rank = shard.embedding_replicated, shard.parallel.rank
        if self.replicated:
            self.vocab_start, self.vocab_valid = 0, shard.model.vocab_size
        else:
            self.vocab_start, self.vocab_valid = shard.vocab_start, shard.vocab_valid_per_rank
        self.owns_every_id = self.vocab_start == 0 and self.vocab_valid >= shard.model.vocab_size
        self.weight = nn.Parameter(torch.zeros(shard.model.vocab_size if self.replicated else shard.vocab_per_rank,
                                               hidden))

    def partial(self, token_ids: torch.Tensor) -> torch.Tensor:
        """This rank's share of the embedding for an all-reduce to complete: the rows of the ids it
        owns (zeros elsewhere); a replicated table gives rank 0 every row and the others zeros."""
        rows = self(token_ids)
        return torch.zeros_like(rows) if self.replicated and self.rank else rows

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.owns_every_id:  # a world of one: one launch, not eight
            return self.weight[token_ids]  # (B, T, H)
        local = token_ids - self.vocab_start
        owned = (local >= 0) & (local < self.vocab_valid)
        rows = self.weight[torch.where(owned, local, 0)]  # (B, T, H)
        return rows * owned[..., None].to(rows.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: ShardLayout, comm: Communicator, layer: int,
                 kernels: str = "torch") -> None:
        super().__init__()
        self.comm = comm
        self.kernels = kernels
        self.eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, shard, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe(layer)
        self.feed_forward = (MoE(cfg, shard, comm, out_major_experts=kernels == "triton") if self.is_moe
                             else MLP(cfg.hidden_size, shard.mlp_intermediate_per_rank))

    def forward(self, normed, residual, ctx, cache: KVCache, next_norm: RMSNorm, next_quant_scale=None,
                normed_fp8=None, next_linear: nn.Module | None = None):
        """Returns (normed, residual, normed_fp8) for the next layer. On the kernels, normed_fp8 is this
        layer's input quantized per row by the norm before (fast_path.fp8_rows; None: the GEMV quantizes
        it), and next_linear is what the second norm feeds (the next layer's qkv_proj; None: the LM head)."""
        fused = self.kernels == "triton" and fast_path.applies(normed)
        if not fused:
            attn_partial = self.self_attn(normed, ctx, cache)
            normed, residual = self.comm.allreduce_add_rmsnorm(attn_partial, residual, self.post_attention_layernorm.weight,
                                                               self.eps, quant_scale=self.feed_forward.input_quant_scale)
            ffn_partial = self.feed_forward(normed)
            normed, residual = self.comm.allreduce_add_rmsnorm(ffn_partial, residual, next_norm.weight, self.eps,
                                                               quant_scale=next_quant_scale)
            return normed, residual, None
        attn_partial = fast_path.attention(self.self_attn, normed, ctx, cache, normed_fp8)
        rows = fast_path.fp8_rows(self.comm, self.feed_forward, attn_partial)
        normed, residual = self.comm.allreduce_add_rmsnorm(attn_partial, residual, self.post_attention_layernorm.weight,
                                                           self.eps, **({} if rows is None else {"fp8_rows": rows}))
        ffn_partial = fast_path.feed_forward(self.feed_forward, normed, rows)
        rows = fast_path.fp8_rows(self.comm, next_linear, ffn_partial)
        normed, residual = self.comm.allreduce_add_rmsnorm(ffn_partial, residual, next_norm.weight, self.eps,
                                                           **({} if rows is None else {"fp8_rows": rows}))
        return normed, residual, rows


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # (B, R, vocab_per_rank): R = T, or 1 when only the last rows were asked for
    aux_hidden: list[torch.Tensor] = field(default_factory=list)  # each (B, T, H), per requested layer


class Llama4(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: ShardLayout, comm: Communicator, kernels: str = "torch") -> None:
        """kernels: "torch" (reference ops, every device) or "triton" (fused GPU kernels for steps of
        up to fast_path.MAX_TOKENS tokens on CUDA; longer steps and CPU tensors take the torch ops)."""
        super().__init__()
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        if comm.world_size != shard.parallel.world_size:
            raise ValueError(f"communicator has {comm.world_size} ranks, layout expects {shard.parallel.world_size}")
        self.cfg, self.shard, self.comm, self.kernels = cfg, shard, comm, kernels
        self.embed_tokens = VocabEmbedding(shard, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, shard, comm, i, kernels) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, shard.vocab_per_rank, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache in `dtype` (default: the model's); an FP8 cache uses each layer's k/v scales."""
        weight = self.embed_tokens.weight
        scales = [(layer.self_attn.k_scale, layer.self_attn.v_scale) for layer in self.layers]
        return KVCache(self.cfg.n_layers, batch, max_len, self.shard.n_kv_heads_per_rank, self.cfg.head_dim,
                       dtype or weight.dtype, weight.device, scales)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, cache: KVCache, *, n_new: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, step_mask: torch.Tensor | None = None,
                aux_layers: tuple[int, ...] = (), last_only: bool = False, static: bool = False) -> ForwardOutput:
        """token_ids: (B, T), right-padded; n_new: (B,) real tokens per row (default T).
        positions: (B, T) (default: cache length + t). Advances cache.lengths by n_new.
        static: attend over the whole cache buffer with a length mask, so the step never reads a
        device value back (what a CUDA graph captures; build_step_context says more)."""
        batch, n_tokens = token_ids.shape
        if batch != cache.batch:
            raise ValueError(f"batch of {batch} rows for a cache of {cache.batch}")
        device = token_ids.device
        fused = self.kernels == "triton" and fast_path.applies(token_ids[..., None])
        # fused: one kernel embeds, norms, makes positions and advances cache.lengths (the layers read
        # the snapshot ctx.start); None where it does not apply
        head = fast_path.step_head(self, token_ids, cache, n_new, positions, step_mask, static) if fused else None
        if head is not None:
            normed, residual, ctx = head
        else:
            if n_new is None:
                n_new = torch.full((batch,), n_tokens, dtype=torch.long, device=device)
            if positions is None:
                positions = cache.lengths[:, None] + torch.arange(n_tokens, device=device)
            ctx = build_step_context(self.cfg, self.inv_freq, cache, positions, step_mask, static=static,
                                     torch_tables=not fused)
            embedded = self.embed_tokens(token_ids)  # (B, T, H): whole rows where the table is replicated
            residual = embedded if self.embed_tokens.replicated else self.comm.all_reduce(embedded)
            normed = rms_norm(residual, self.layers[0].input_layernorm.weight, self.cfg.rms_norm_eps)
        aux, normed_fp8 = [], None
        for i, layer in enumerate(self.layers):  # no device work between layers: each starts where the last ended
            last = i + 1 == len(self.layers)
            next_norm = self.norm if last else self.layers[i + 1].input_layernorm
            next_quant = None if last else self.layers[i + 1].self_attn.input_quant_scale  # LM head: high precision
            next_linear = None if last else self.layers[i + 1].self_attn.qkv_proj
            normed, residual, normed_fp8 = layer(normed, residual, ctx, cache, next_norm, next_quant, normed_fp8,
                                                 next_linear)
            if i in aux_layers:
                aux.append(residual)
        if head is None:
            cache.lengths += n_new
        if last_only:
            normed = (normed[:, -1:] if n_new is None  # every row's last token: a view
                      else normed[torch.arange(batch, device=device), n_new - 1][:, None])  # (B, 1, H)
        logits = (fast_path.lm_head(self.lm_head_weight(), normed) if fused
                  else normed @ self.lm_head_weight().t())  # (B, R, vocab_per_rank)
        if self.shard.vocab_valid_per_rank < self.shard.vocab_per_rank:
            logits[..., self.shard.vocab_valid_per_rank:] = float("-inf")
        return ForwardOutput(logits=logits, aux_hidden=aux)

    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for p in list(self.parameters()) + list(self.buffers()):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total
