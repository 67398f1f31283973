"""Llama 4 attention at per-rank shapes, with its KV cache, RoPE and masks.

Two kinds of layers share one module:
  * RoPE layers: interleaved-pair rotary embedding (the complex-number view, not rotate-half),
    optional L2 QK-norm, and chunked local attention (a query sees only keys of its own chunk).
  * NoPE layers: no rotary embedding, global causal attention, and attention-temperature tuning
    `q *= log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1`.

Q, K and V come from one fused projection (FC_QKV: one GEMM instead of three). o_proj is
row-parallel: the module returns a partial sum that the caller all-reduces.

The KV cache is a slot array per sequence, kept in the compute dtype or in FP8 (e4m3, one
per-tensor scale for K and one for V per layer, as ModelOpt's `k_scale` / `v_scale`): the cache
quantizes what it stores and hands back dequantized keys and values, so attention reads FP8 K/V
without knowing how they are stored. A step writes its T new tokens at slots
`lengths[b] .. lengths[b] + T - 1` (rows padded on the right write harmless garbage past their
length). Keys already cached are the committed prefix, so their slot is their position; new keys
carry explicit positions, and a (B, T, T) `step_mask` says which new tokens see which, which is
causal by default and a tree for speculative verification. Rolling back is setting `lengths`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from collectives.communicator import quantize_fp8, rms_norm
from model.config import ModelConfig
from model.fp8 import FP8, fp8_values, static_input_scale
from model.parallel import ShardLayout


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with llama3 scaling when configured (as HF computes them)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    if s.high_freq_factor != s.low_freq_factor:  # otherwise there is no medium band to smooth
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        scaled = torch.where(medium, smoothed, scaled)
    return scaled


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs (x[2i], x[2i+1]). x: (B, T, heads, D); cos/sin: (B, T, D/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, heads, D/2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache:
    """Per-layer K/V slots for a batch of sequences: (B, n_kv_heads_per_rank, max_len, head_dim).
    An FP8 cache stores K / k_scales[layer] and V / v_scales[layer], saturated to e4m3."""

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads_per_rank: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu",
                 scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        shape = (batch, n_kv_heads_per_rank, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len
        self.dtype = dtype
        one = torch.ones((), dtype=torch.float32, device=device)
        self.scales = [(k.float(), v.float()) for k, v in scales] if scales is not None else [(one, one)] * n_layers

    def write(self, layer: int, rows: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (B, T, Hkv, D) for slots (B, T) of batch rows `rows` (B, 1)."""
        k_scale, v_scale = self.scales[layer]
        self.k[layer][rows, :, slots] = self._encode(k, k_scale)  # indexed view: (B, T, Hkv, D)
        self.v[layer][rows, :, slots] = self._encode(v, v_scale)

    def read(self, layer: int, n_keys: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [0, n_keys), each (B, Hkv, S, D) in `dtype`."""
        k_scale, v_scale = self.scales[layer]
        return (self._decode(self.k[layer][:, :, :n_keys], k_scale, dtype),
                self._decode(self.v[layer][:, :, :n_keys], v_scale, dtype))

    def _encode(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return quantize_fp8(x, scale) if self.dtype == FP8 else x.to(self.dtype)

    def _decode(self, x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (fp8_values(x) * scale).to(dtype) if self.dtype == FP8 else x.to(dtype)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def rollback(self, lengths: torch.Tensor) -> None:
        """Forgets every slot at or after `lengths[b]` (lengths may only shrink)."""
        if bool((lengths > self.lengths).any()):
            raise ValueError("rollback can only shorten sequences")
        self.lengths.copy_(lengths)

    def compact(self, start: torch.Tensor, keep: torch.Tensor, n_keep: torch.Tensor) -> None:
        """Keeps an accepted tree path: a verification step wrote its nodes at slots start[b] + j;
        slot start[b] + keep[b, i] moves to start[b] + i for i < n_keep[b], and the sequence ends
        there. keep: (B, M) offsets of slots the step wrote; entries past n_keep[b] are padding
        (their moves land past the new length). Every layer gathers all its moved rows before it
        writes any, so no slot is overwritten before it is read. Works on stored values, FP8 or
        not. No host read: a CUDA graph captures it (workers/spec_graphs.py)."""
        rows = torch.arange(self.batch, device=keep.device)[:, None]  # (B, 1)
        src = start[:, None] + keep  # (B, M)
        dst = start[:, None] + torch.arange(keep.shape[1], device=keep.device)
        for stored in self.k + self.v:
            stored[rows, :, dst] = stored[rows, :, src]  # gathers first, then scatters: (B, M, heads, D)
        self.lengths.copy_(start + n_keep)


@dataclass
class StepContext:
    """Everything about one forward step that every layer shares (built once per step)."""

    slots: torch.Tensor  # (B, T) cache slot of each new token
    cos: torch.Tensor | None  # (B, T, D/2); None where the kernels compute RoPE themselves
    sin: torch.Tensor | None  # (B, T, D/2)
    masks: dict  # "full" / "chunked" -> (B, 1, T, S) bool, True = may attend (empty: kernels build their own)
    temperature: torch.Tensor | None  # (B, T, 1, 1) NoPE query scale
    n_keys: int  # S: slots read this step
    positions: torch.Tensor | None = None  # (B, T) absolute positions of the new tokens
    start: torch.Tensor | None = None  # (B,) cache length before the step (the committed prefix)
    step_mask: torch.Tensor | None = None  # (B, T, T) among the new tokens; None: causal
    inv_freq: torch.Tensor | None = None  # (D/2,) RoPE inverse frequencies behind cos / sin


def build_step_context(cfg: ModelConfig, inv_freq: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                       step_mask: torch.Tensor | None, static: bool = False,
                       torch_tables: bool = True) -> StepContext:
    """positions: (B, T) absolute positions of the new tokens; step_mask: (B, T, T) or None (causal).

    static: the step reads the WHOLE cache buffer (S = max_len) with a length mask instead of the
    slots up to the longest row, so no tensor's shape depends on a device value: nothing is read
    back to the host and the step can be captured in a CUDA graph. torch_tables=False skips what
    only the torch ops read, the (B, T, S) masks and the RoPE / temperature tables: the attention
    kernels compute them from positions and lengths themselves (a dozen launches fewer a step)."""
    batch, n_new = positions.shape
    device = positions.device
    start = cache.lengths  # (B,)
    slots = start[:, None] + torch.arange(n_new, device=device)  # (B, T)
    if static:
        n_keys = cache.max_len
        if n_new > n_keys:
            raise ValueError(f"step of {n_new} tokens for a cache of {cache.max_len} slots")
    else:
        n_keys = int(start.max()) + n_new  # a host sync: eager steps only
        if n_keys > cache.max_len:
            raise ValueError(f"step needs {n_keys} cache slots but the cache holds {cache.max_len}")
    inv_freq = inv_freq.to(device)
    if not torch_tables:
        return StepContext(slots=slots, cos=None, sin=None, masks={}, temperature=None, n_keys=n_keys,
                           positions=positions, start=start, step_mask=step_mask, inv_freq=inv_freq)
    freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
    temperature = torch.log1p(torch.floor((positions.float() + 1.0) / cfg.floor_scale)) * cfg.attn_scale + 1.0
    return StepContext(slots=slots, cos=freqs.cos(), sin=freqs.sin(),
                       masks=_dense_masks(cfg, start, slots, positions, step_mask, n_keys),
                       temperature=temperature[:, :, None, None], n_keys=n_keys, positions=positions,
                       start=start, step_mask=step_mask, inv_freq=inv_freq)


def _dense_masks(cfg: ModelConfig, start: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                 step_mask: torch.Tensor | None, n_keys: int) -> dict:
    """"full" and "chunked" (B, 1, T, S) visibility of every key slot for every new token."""
    full, chunked = visibility(start, slots, positions, step_mask, n_keys, cfg.attention_chunk_size)
    masks = {"full": full[:, None]}
    if chunked is not None:
        masks["chunked"] = chunked[:, None]
    return masks


def visibility(start: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, step_mask: torch.Tensor | None,
               n_keys: int, chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T, S) masks of the key slots each new token may attend to: all of them, and (with
    chunk_size) those in its own attention chunk. The committed prefix keeps slot == position."""
    batch, n_new = positions.shape
    device = positions.device
    if step_mask is None:
        step_mask = torch.ones(n_new, n_new, dtype=torch.bool, device=device).tril().expand(batch, n_new, n_new)
    key_pos = torch.arange(n_keys, device=device).expand(batch, n_keys).clone()  # (B, S)
    key_pos.scatter_(1, slots, positions)  # new slots take their tokens' positions
    slot_ids = torch.arange(n_keys, device=device)
    in_prefix = slot_ids[None, None, :] < start[:, None, None]  # (B, 1, S)
    new_visible = torch.zeros(batch, n_new, n_keys, dtype=torch.bool, device=device)
    new_visible.scatter_(2, slots[:, None, :].expand(batch, n_new, n_new), step_mask)
    full = in_prefix | new_visible  # (B, T, S)
    if chunk_size is None:
        return full, None
    same_chunk = (key_pos[:, None, :] // chunk_size) == (positions[:, :, None] // chunk_size)  # (B, T, S)
    return full, full & same_chunk


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: ShardLayout, layer: int) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.n_heads_per_rank = shard.n_heads_per_rank
        self.n_kv_heads_per_rank = shard.n_kv_heads_per_rank
        self.layer = layer
        self.use_rope = cfg.rope_layers[layer]
        self.use_qk_norm = cfg.use_qk_norm and self.use_rope
        self.use_temperature = cfg.attn_temperature_tuning and not self.use_rope
        self.mask_kind = "chunked" if self.use_rope and cfg.attention_chunk_size is not None else "full"
        self.chunk_size = cfg.attention_chunk_size if self.mask_kind == "chunked" else None
        self.temperature = (cfg.floor_scale, cfg.attn_scale) if self.use_temperature else None
        self.eps = cfg.rms_norm_eps
        qkv_rows = (self.n_heads_per_rank + 2 * self.n_kv_heads_per_rank) * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, qkv_rows, bias=False)  # column-parallel, fused Q|K|V
        self.o_proj = nn.Linear(self.n_heads_per_rank * cfg.head_dim, cfg.hidden_size, bias=False)  # row-parallel
        # FP8 KV-cache scales (dequantization multipliers); 1 unless a checkpoint or calibration sets them
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32), persistent=False)

    @property
    def input_quant_scale(self) -> torch.Tensor | None:
        """The static FP8 scale qkv_proj wants its input quantized with (None: it takes high precision)."""
        return static_input_scale(self.qkv_proj)

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: KVCache) -> torch.Tensor:
        """x: (B, T, H) normed hidden states. Returns this rank's partial o_proj output (B, T, H)."""
        batch, n_new, _ = x.shape
        q_width = self.n_heads_per_rank * self.head_dim
        kv_width = self.n_kv_heads_per_rank * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_width, kv_width, kv_width], dim=-1)
        q = q.view(batch, n_new, self.n_heads_per_rank, self.head_dim)  # (B, T, Hq, D)
        k = k.view(batch, n_new, self.n_kv_heads_per_rank, self.head_dim)  # (B, T, Hkv, D)
        v = v.view(batch, n_new, self.n_kv_heads_per_rank, self.head_dim)
        if self.use_rope:
            q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if self.use_qk_norm:
            q, k = rms_norm(q, None, self.eps), rms_norm(k, None, self.eps)
        if self.use_temperature:
            q = (q * ctx.temperature).to(q.dtype)
        rows = torch.arange(batch, device=x.device)[:, None]  # (B, 1)
        cache.write(self.layer, rows, ctx.slots, k, v)
        keys, values = cache.read(self.layer, ctx.n_keys, q.dtype)  # (B, Hkv, S, D) each
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=ctx.masks[self.mask_kind],
            scale=self.head_dim ** -0.5, enable_gqa=self.n_heads_per_rank != self.n_kv_heads_per_rank,
        )  # (B, Hq, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(batch, n_new, q_width))
