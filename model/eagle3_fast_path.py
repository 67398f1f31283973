"""The EAGLE-3 draft's forward on the fused kernels (`Eagle3Draft(kernels="triton")`): the target's
fast path (model/fast_path.py) applied to the draft's one decoder layer.

A speculative step runs the draft several times (the catch-up on the accepted tokens, then one
forward per tree depth), and on the torch ops each forward was about a hundred launches of a few
kilobytes (RoPE tables, dense masks, SDPA, casts, norms as elementwise kernels, cats, gathers):
with the target's verify on the fused kernels, a chain-3 step took longer than plain decoding.
Here a draft forward of at most fast_path.MAX_TOKENS rows is

    fc GEMV (target features only)
    -> prologue: embedding gather, input_layernorm | hidden_norm and their concat, positions, the
       cache length snapshot and cache.lengths advanced (model/kernels/draft_prologue.py)
    -> QKV GEMV -> RoPE + KV-cache write + split-KV attention, causal or step_mask, over the static
       cache (model/kernels/decode_attention.py) -> o_proj GEMV
    -> add + RMSNorm (the collective) -> FC13 GEMV with SwiGLU -> FC2 GEMV -> add + RMSNorm
    -> gather of logit_rows -> LM head GEMV on those rows only

about a dozen launches. At several ranks the embedding's and fc's partial sums still meet in one
all-reduce (Eagle3Draft.embed_and_feature) before the prologue.

RoPE: the draft's is Llama's rotate-half (pairs x[i], x[i + D/2]); the kernel rotates interleaved
pairs (x[2i], x[2i + 1]). So the kernels read a copy of the QKV weight whose q and k head rows are
in pair order (`rotary_pair_rows`): the GEMV then hands the kernel each rotate-half pair as an
interleaved one, and the rotated q and k come out with their pairs interleaved. The torch path
(eagle3.rotate_half_rope) writes its keys in that same order, so the draft's cache holds the same
keys whichever path wrote them (a long prefill takes the torch ops, the steps after it the
kernels); attention reads q and k only through their dot products, which one permutation of both
leaves unchanged. The copy is made at the first fused forward (before a graph capture: the capture's
warm-up) and again whenever the weight changes (its version counter moves with in-place writes).

Nothing here reads a device value on the host for a static step, so it is capturable in a CUDA
graph (workers/spec_graphs.py). tests/test_eagle3_fast_path.py holds it equal to the torch path.
"""
from __future__ import annotations

import torch
from torch import nn

from model import fast_path
from model.kernels import decode_attention, draft_prologue, linear_small_m as gemv

HIGH = gemv.HIGH  # weight and cache dtypes the kernels take (float32, bf16, fp16)


def rotary_pair_rows(weight: torch.Tensor, q_and_k_heads: int, head_dim: int) -> torch.Tensor:
    """A copy of a QKV weight (N, K) whose first `q_and_k_heads` heads have their rows in rotary-pair
    order: row 2i of a head is its row i, row 2i + 1 its row i + D/2 (the v heads stay as they are)."""
    rows = q_and_k_heads * head_dim
    qk = weight[:rows].view(q_and_k_heads, 2, head_dim // 2, -1).transpose(1, 2)  # (heads, D/2, 2, K)
    return torch.cat([qk.reshape(rows, -1), weight[rows:]]).contiguous()  # (N, K)


def rotary_qkv_weight(draft: nn.Module) -> torch.Tensor:
    """The draft's QKV weight with its q and k rows in pair order, made again when the weight changes.
    Writes through `.data` move no version counter: the checkpoint loader drops the copy itself
    (Eagle3Draft.forget_kernel_copies)."""
    attn = draft.midlayer.self_attn
    weight = attn.qkv_proj.weight
    key = (weight.data_ptr(), weight.dtype, weight.device, None if weight.is_inference() else weight._version)
    held = draft.__dict__.get("_rotary_qkv")
    if held is None or held[0] != key:
        if weight.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("Eagle3Draft: run a fused draft forward once before CUDA graph capture (its QKV "
                               "weight in rotary-pair order is made outside the capture)")
        held = (key, rotary_pair_rows(weight.detach(), attn.hq + attn.hkv, attn.head_dim))
        draft.__dict__["_rotary_qkv"] = held
    return held[1]


def takes(draft: nn.Module, cache) -> bool:
    """Do the kernels take this draft and cache? (head_dim a power of two in 16..256, hidden size
    within one norm program, plain bias-free float Linears, a float cache); otherwise the torch ops."""
    cfg, layer = draft.cfg, draft.midlayer
    linears = (draft.fc, layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
               layer.mlp.down_proj)
    norms = (layer.hidden_norm, layer.input_layernorm, layer.post_attention_layernorm, draft.norm)
    return (16 <= cfg.head_dim <= 256 and cfg.head_dim & (cfg.head_dim - 1) == 0
            and cfg.hidden_size <= draft_prologue.MAX_HIDDEN
            and all(type(m) is nn.Linear and m.bias is None and m.weight.dtype in HIGH for m in linears)
            and all(n.weight.dtype in draft_prologue.DTYPES for n in norms)
            and draft.lm_head_weight().dtype in HIGH and cache.dtype in HIGH)


def _check_size(cache, n_tokens: int, static: bool) -> None:
    """build_step_context's refusals, before anything runs (a dynamic step reads the longest length)."""
    if static and n_tokens > cache.max_len:
        raise ValueError(f"step of {n_tokens} tokens for a cache of {cache.max_len} slots")
    if not static:
        n_keys = int(cache.lengths.max()) + n_tokens  # a host sync, as there: eager steps only
        if n_keys > cache.max_len:
            raise ValueError(f"step needs {n_keys} cache slots but the cache holds {cache.max_len}")


def forward(draft: nn.Module, tokens: torch.Tensor, cache, target_features: torch.Tensor | None,
            hidden: torch.Tensor | None, n_new: torch.Tensor | None, positions: torch.Tensor | None,
            step_mask: torch.Tensor | None, logit_rows: torch.Tensor | None,
            static: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Eagle3Draft.forward on the kernels: (logits (B, R, Vd_r), pre-norm hidden (B, T, H)), or None
    when they do not take this draft (then the torch ops run). Advances cache.lengths by n_new."""
    if not takes(draft, cache):
        return None
    _check_size(cache, tokens.shape[1], static)
    layer, comm, eps = draft.midlayer, draft.comm, draft.eps
    embed = draft.target.embed
    gather = comm.world_size == 1 and embed.owns_every_id  # the prologue embeds: no all-reduce to wait for
    if gather:
        feature = hidden if target_features is None else fast_path.linear(
            draft.fc, target_features[..., draft.fc_cols].to(draft.fc.weight.dtype))  # (B, T, H)
        embeds = None
    else:
        embeds, feature = draft.embed_and_feature(tokens, target_features, hidden, fused=True)
    head = draft_prologue.draft_prologue(
        feature, layer.input_layernorm.weight, layer.hidden_norm.weight, eps, lengths=cache.lengths,
        token_ids=tokens if gather else None, embed_weight=embed.weight if gather else None, embeds=embeds,
        n_new=n_new, positions=positions, residual_normed=draft.cfg.norm_before_residual)
    partial = attention(draft, head, cache, step_mask)
    h, residual = comm.allreduce_add_rmsnorm(partial, head.residual, layer.post_attention_layernorm.weight, eps)
    normed, out = comm.allreduce_add_rmsnorm(fast_path.feed_forward(layer.mlp, h), residual, draft.norm.weight, eps)
    if logit_rows is not None:
        normed = normed.gather(1, logit_rows[..., None].expand(-1, -1, normed.shape[-1]))  # (B, R, H)
    weight = draft.lm_head_weight()
    logits = gemv.linear_small_m(normed.reshape(-1, normed.shape[-1]), weight).view(*normed.shape[:2], weight.shape[0])
    return draft.mask_padded_vocab(logits), out


def attention(draft: nn.Module, head: draft_prologue.DraftHead, cache, step_mask: torch.Tensor | None) -> torch.Tensor:
    """DraftAttention.forward on the kernels: a plain Llama attention (RoPE on q and k, no QK-norm,
    no temperature, no chunking, scale D^-0.5), causal or step_mask among the new tokens, over the
    cache slots [0, start + t]. head.x (B, T, 2H) -> the o_proj partial sum (B, T, H)."""
    attn = draft.midlayer.self_attn
    batch, n_tokens, width = head.x.shape
    qkv = gemv.linear_small_m(head.x.view(-1, width), rotary_qkv_weight(draft)).view(batch, n_tokens, -1)
    out = decode_attention.rope_decode_attention(  # (B, T, Hq, D)
        qkv, head.positions, head.start, cache.k[0], cache.v[0], n_heads=attn.hq, n_kv_heads=attn.hkv,
        head_dim=attn.head_dim, inv_freq=draft.inv_freq, use_rope=True, use_qk_norm=False, eps=draft.eps,
        temperature=None, scale=attn.head_dim ** -0.5, step_mask=step_mask)
    return fast_path.linear(attn.o_proj, out.reshape(batch, n_tokens, attn.hq * attn.head_dim))
