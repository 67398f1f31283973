"""The head of an EAGLE-3 draft step in ONE launch (Triton): the embedding gather, the two RMSNorms
that open the draft's decoder layer, their concatenation, and the step's bookkeeping.

Why: before its QKV GEMV, Eagle3Draft.forward spends some thirty torch launches on a few kilobytes:
positions = lengths + arange, the step context's slots, RoPE tables and masks, the embedding
gather, hidden_norm(feature) and input_layernorm(embedding) at seven elementwise / reduce kernels
each, the cat of the two, and `lengths += n_new` at the end; and a speculative step runs the draft
several times (catch-up and one forward per tree depth). Here program `b * T + t` reads token
(b, t)'s embedding row (gathered from the target's embedding at a world of one, or the reduced
rows the caller passes) and its feature row, and writes

    x[b, t]        = [RMSNorm(embedding) * input_norm | RMSNorm(feature) * hidden_norm]   (2H)
    residual[b, t] = RMSNorm(feature) * hidden_norm, or a copy of the feature (when asked for:
                     norm_before_residual, or a feature the next kernel cannot read in place)

and program `b * T` also reads lengths[b] once and writes start[b] = lengths[b], positions[b, t] =
lengths[b] + t (unless the caller gave positions) and lengths[b] += n_new[b]. Only that program
touches lengths[b]; the attention reads the snapshot `start`.

Numerics: both norms are collectives/fused_norm.py's `rmsnorm_row` (float32 statistics summed in a
tree: within 1e-6 relative of `rms_norm` in float32, 2 ulps in bf16 / fp16); rows are copies. An id
outside [0, vocab_valid) embeds to zeros where torch's index would raise.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from collectives import fused_norm
from collectives.triton_support import INTERPRETED, pdl_kwargs, tl, triton

DTYPES = fused_norm.DTYPES
MAX_HIDDEN = fused_norm.MAX_HIDDEN

if triton is not None:
    from collectives.fused_norm import TL_DTYPES, rmsnorm_row
    from collectives.triton_support import pdl_launch_dependents, pdl_wait
    from model.kernels.embed_norm import _step_bookkeeping

    @triton.jit
    def _prologue_kernel(ids_ptr, embed_ptr, feat_ptr, w_in_ptr, w_hidden_ptr, x_ptr, res_ptr, lengths_ptr,
                         n_new_ptr, positions_ptr, start_ptr, stride_ib, stride_it, stride_eb, stride_et,
                         stride_fb, stride_ft, stride_n, vocab_valid, eps,
                         T: tl.constexpr, T_P2: tl.constexpr, HIDDEN: tl.constexpr, BLOCK: tl.constexpr,
                         GATHER: tl.constexpr, EMBED_IO: tl.constexpr, FEAT_IO: tl.constexpr,
                         NORM_DTYPE: tl.constexpr, RESIDUAL: tl.constexpr, RESIDUAL_NORMED: tl.constexpr,
                         HAS_N_NEW: tl.constexpr, POSITIONS: tl.constexpr, PDL: tl.constexpr):
        """Program `row` = b * T + t (module docstring). GATHER: embed_ptr is the (V, H) embedding
        (row stride stride_eb) and ids_ptr the tokens; else embed_ptr holds the (B, T, H) rows.
        RESIDUAL: also store the residual row (the normed feature with RESIDUAL_NORMED, else a copy).
        With PDL: waits for the kernel before (it wrote the feature and the lengths) first."""
        pdl_wait(PDL)
        pdl_launch_dependents(PDL)
        row = tl.program_id(0).to(tl.int64)
        b, t = row // T, row % T
        cols = tl.arange(0, BLOCK)
        mask = cols < HIDDEN
        if GATHER:
            token = tl.load(ids_ptr + b * stride_ib + t * stride_it).to(tl.int64)
            owned = (token >= 0) & (token < vocab_valid)
            src = embed_ptr + tl.where(owned, token, 0) * stride_eb
            e = tl.load(src + cols, mask=mask, other=0.0)
            e = tl.where(owned, e, tl.zeros_like(e))  # +0.0 outside this rank's slice (row 0 was read instead)
        else:
            e = tl.load(embed_ptr + b * stride_eb + t * stride_et + cols, mask=mask, other=0.0)
        f = tl.load(feat_ptr + b * stride_fb + t * stride_ft + cols, mask=mask, other=0.0)
        e_normed = rmsnorm_row(e.to(tl.float32), w_in_ptr, w_in_ptr, cols, mask, eps, HIDDEN, EMBED_IO, NORM_DTYPE,
                               False)
        f_normed = rmsnorm_row(f.to(tl.float32), w_hidden_ptr, w_hidden_ptr, cols, mask, eps, HIDDEN, FEAT_IO,
                               NORM_DTYPE, False)
        out = x_ptr + row * (2 * HIDDEN)
        tl.store(out + cols, e_normed.to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(out + HIDDEN + cols, f_normed.to(x_ptr.dtype.element_ty), mask=mask)
        if RESIDUAL:
            kept = f_normed if RESIDUAL_NORMED else f.to(tl.float32)
            tl.store(res_ptr + row * HIDDEN + cols, kept.to(res_ptr.dtype.element_ty), mask=mask)
        if t == 0:  # row b's bookkeeping, by one program only (as the target's step head does it)
            _step_bookkeeping(lengths_ptr, n_new_ptr, positions_ptr, start_ptr, b, stride_n, T, T_P2, HAS_N_NEW,
                              POSITIONS)


class DraftHead(NamedTuple):
    x: torch.Tensor  # (B, T, 2H) [input_layernorm(embedding) | hidden_norm(feature)]: the QKV GEMV's input
    residual: torch.Tensor  # (B, T, H) the layer's residual: the feature itself, or a new row per the docstring
    positions: torch.Tensor  # (B, T) int64: the given positions, or start + t
    start: torch.Tensor  # (B,) int64 cache lengths before the step


def available(feature: torch.Tensor) -> bool:
    """True when the kernel can run on `feature`'s device: CUDA, or the CPU under Triton's interpreter."""
    return triton is not None and (feature.is_cuda or (INTERPRETED and feature.device.type == "cpu"))


def _rows(x: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
    if x.shape != shape or x.dtype not in DTYPES or x.stride(-1) != 1:
        raise ValueError(f"draft_prologue: {name} must be {shape} float32/bfloat16/float16 with unit stride along H, "
                         f"got {x.dtype} {tuple(x.shape)} strides {x.stride()}")


def _check(feature, input_norm, hidden_norm, token_ids, embed_weight, embeds, lengths, n_new, positions) -> None:
    """Raises ValueError naming the argument at fault, before anything runs."""
    if feature.dim() != 3:
        raise ValueError(f"draft_prologue: feature must be (B, T, H), got {tuple(feature.shape)}")
    batch, n_tokens, hidden = feature.shape
    _rows(feature, "feature", (batch, n_tokens, hidden))
    if not 1 <= hidden <= MAX_HIDDEN:
        raise ValueError(f"draft_prologue: hidden size {hidden} is outside 1..{MAX_HIDDEN}")
    for name, w in (("input_norm", input_norm), ("hidden_norm", hidden_norm)):
        if w.shape != (hidden,) or w.dtype not in DTYPES or not w.is_contiguous():
            raise ValueError(f"draft_prologue: {name} must be a contiguous float ({hidden},), got {w.dtype} "
                             f"{tuple(w.shape)}")
    if (embeds is None) == (embed_weight is None):
        raise ValueError("draft_prologue: pass the embedding rows (embeds) or token_ids with embed_weight, not both")
    if embeds is not None:
        _rows(embeds, "embeds", (batch, n_tokens, hidden))
    else:
        if (token_ids is None or token_ids.shape != (batch, n_tokens)
                or token_ids.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"draft_prologue: token_ids must be int32/int64 ({batch}, {n_tokens}), got "
                             f"{None if token_ids is None else (token_ids.dtype, tuple(token_ids.shape))}")
        if embed_weight.dim() != 2 or embed_weight.shape[1] != hidden:
            raise ValueError(f"draft_prologue: embed_weight must be (V, {hidden}), got {tuple(embed_weight.shape)}")
        _rows(embed_weight, "embed_weight", tuple(embed_weight.shape))
    if lengths.shape != (batch,) or lengths.dtype != torch.int64 or not lengths.is_contiguous():
        raise ValueError(f"draft_prologue: lengths must be a contiguous int64 ({batch},), got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")
    if n_new is not None and (n_new.shape != (batch,) or n_new.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"draft_prologue: n_new must be int32/int64 ({batch},), got {n_new.dtype} "
                         f"{tuple(n_new.shape)}")
    if positions is not None and (positions.shape != (batch, n_tokens) or positions.dtype != torch.int64):
        raise ValueError(f"draft_prologue: positions must be int64 ({batch}, {n_tokens}), got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    others = (input_norm, hidden_norm, token_ids, embed_weight, embeds, lengths, n_new, positions)
    if any(t is not None and t.device != feature.device for t in others):
        raise ValueError(f"draft_prologue: every tensor must be on the feature's device {feature.device}")
    if not available(feature):
        raise ValueError(f"draft_prologue needs Triton and a CUDA tensor (or Triton's interpreter), got "
                         f"{feature.device}")


def draft_prologue(feature: torch.Tensor, input_norm: torch.Tensor, hidden_norm: torch.Tensor, eps: float, *,
                   lengths: torch.Tensor, token_ids: torch.Tensor | None = None,
                   embed_weight: torch.Tensor | None = None, embeds: torch.Tensor | None = None,
                   n_new: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                   residual_normed: bool = False) -> DraftHead:
    """feature (B, T, H): the layer's feature rows (fc's output or the draft's own hidden state);
    input_norm / hidden_norm (H,): the two norm weights. The embedding: token_ids (B, T) with the
    whole (V, H) embed_weight (a world of one, which owns every id), or the reduced rows `embeds`
    (B, T, H). lengths (B,) int64, the draft cache's lengths: advanced IN PLACE by n_new (B,)
    (default T); positions (B, T): the step's own (returned as given), else start + t.
    residual_normed: the residual is hidden_norm(feature) (norm_before_residual), not the feature.
    Feature and embedding rows may be strided along B and T. Returns DraftHead."""
    _check(feature, input_norm, hidden_norm, token_ids, embed_weight, embeds, lengths, n_new, positions)
    batch, n_tokens, hidden = feature.shape
    device = feature.device
    embed_io = (embeds if embeds is not None else embed_weight).dtype
    norm_dtype = torch.promote_types(embed_io, input_norm.dtype)
    if torch.promote_types(feature.dtype, hidden_norm.dtype) != norm_dtype:
        raise ValueError(f"draft_prologue: the two norms give {norm_dtype} and "
                         f"{torch.promote_types(feature.dtype, hidden_norm.dtype)}; their concat needs one dtype")
    x = torch.empty((batch, n_tokens, 2 * hidden), dtype=norm_dtype, device=device)  # (B, T, 2H)
    store_residual = residual_normed or not feature.is_contiguous()
    residual = (torch.empty((batch, n_tokens, hidden), dtype=norm_dtype if residual_normed else feature.dtype,
                            device=device) if store_residual else feature)  # (B, T, H)
    start = torch.empty_like(lengths)  # (B,)
    new_positions = positions is None
    if new_positions:
        positions = torch.empty((batch, n_tokens), dtype=torch.int64, device=device)  # (B, T)
    if batch * n_tokens == 0:
        return DraftHead(x, residual, positions, start)
    gather = embeds is None
    rows = embed_weight if gather else embeds
    block = triton.next_power_of_2(hidden)
    _prologue_kernel[(batch * n_tokens,)](
        token_ids if gather else lengths, rows, feature, input_norm, hidden_norm, x, residual, lengths,
        n_new if n_new is not None else lengths, positions, start,
        token_ids.stride(0) if gather else 0, token_ids.stride(1) if gather else 0,
        rows.stride(0), 0 if gather else rows.stride(1), feature.stride(0), feature.stride(1),
        n_new.stride(0) if n_new is not None else 0, embed_weight.shape[0] if gather else 0, float(eps),
        T=n_tokens, T_P2=triton.next_power_of_2(n_tokens), HIDDEN=hidden, BLOCK=block, GATHER=gather,
        EMBED_IO=TL_DTYPES[embed_io], FEAT_IO=TL_DTYPES[feature.dtype], NORM_DTYPE=TL_DTYPES[norm_dtype],
        RESIDUAL=store_residual, RESIDUAL_NORMED=residual_normed, HAS_N_NEW=n_new is not None,
        POSITIONS=new_positions, num_warps=fused_norm.num_warps(block), enable_fp_fusion=False,
        **pdl_kwargs(feature))
    return DraftHead(x, residual, positions, start)
