"""The head of a decode step in ONE launch (Triton): the vocab-parallel embedding gather, the first
layer's RMSNorm, and the step's bookkeeping (positions, the cache length before the step, the
length advanced by the new tokens).

Why: before the first GEMV of a graph-replayed step, torch spent 13 launches (~25 us on an H200)
on a few kilobytes: positions = lengths + arange, the step context's slots, the embedding gather
(index: 4.8 us), the RMSNorm as seven elementwise / reduce kernels; and `lengths += n_new` at the
end. None of them takes part in programmatic dependent launch, so each also stalled the Triton
kernels' overlap. Here program `b * T + t` gathers token (b, t)'s row and, with a norm weight,
writes RMSNorm(row) * weight (collectives/fused_norm.py's `rmsnorm_row`: the same code and bits as
every other norm of the fused path); program `b * T` also reads lengths[b] once and writes
start[b] = lengths[b], positions[b, t] = lengths[b] + t (unless the caller gave positions) and
lengths[b] += n_new[b]. Only that program touches lengths[b], so no program reads a length another
one has advanced. The layers read `start` (the snapshot), never the advanced lengths.

Numerics (the reference is VocabEmbedding then `rms_norm`, `reference_embed_norm` below):
  * the rows are copies: bit-identical. An id outside [vocab_start, vocab_start + vocab_valid)
    embeds to +0.0 (VocabEmbedding multiplies row 0 by 0, which gives -0.0 for negative entries:
    equal values, and equal bits after the all-reduce adds the owner's row). A world of one owns
    every id; an id outside the vocabulary gives zeros here where torch's index raises.
  * normed: fused_norm's numerics (its docstring): float32 statistics summed in a tree, not torch's
    order, so within 1e-6 relative (float32) or 2 ulps (bf16 / fp16) of `rms_norm`, and bit-equal to
    fused_norm.add_rmsnorm of the row onto a zero residual.
At a world of several ranks the caller passes no norm weight and hands the rows (a partial sum) to
the communicator's allreduce_add_rmsnorm with no residual: the sum is the residual.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from collectives import fused_norm, gpu_stamps
from collectives.communicator import rms_norm
from collectives.triton_support import INTERPRETED, pdl_kwargs, tl, triton

DTYPES = fused_norm.DTYPES
MAX_HIDDEN = fused_norm.MAX_HIDDEN

if triton is not None:
    from collectives.fused_norm import rmsnorm_row
    from collectives.gpu_stamps import write_stamp
    from collectives.triton_support import pdl_launch_dependents, pdl_wait

    @triton.jit
    def _step_bookkeeping(lengths_ptr, n_new_ptr, positions_ptr, start_ptr, b, stride_n,
                          T: tl.constexpr, T_P2: tl.constexpr, HAS_N_NEW: tl.constexpr, POSITIONS: tl.constexpr):
        """Row b of the step: start = lengths[b]; positions[b, :T] = start + t; lengths[b] += n_new[b] (or T)."""
        start = tl.load(lengths_ptr + b)
        if POSITIONS:
            ts = tl.arange(0, T_P2)
            tl.store(positions_ptr + b * T + ts, start + ts, mask=ts < T)
        tl.store(start_ptr + b, start)
        n_new = T
        if HAS_N_NEW:
            n_new = tl.load(n_new_ptr + b * stride_n).to(tl.int64)
        tl.store(lengths_ptr + b, start + n_new)

    @triton.jit
    def _embed_norm_kernel(ids_ptr, weight_ptr, norm_w_ptr, rows_ptr, normed_ptr, lengths_ptr, n_new_ptr,
                           positions_ptr, start_ptr, stride_ib, stride_it, stride_wv, stride_n, vocab_start,
                           vocab_valid, eps, T: tl.constexpr, T_P2: tl.constexpr, HIDDEN: tl.constexpr,
                           BLOCK: tl.constexpr, NORM: tl.constexpr, NORM_DTYPE: tl.constexpr, STEP: tl.constexpr,
                           HAS_N_NEW: tl.constexpr, POSITIONS: tl.constexpr, stamps_ptr, stamp_slot,
                           STAMP: tl.constexpr, PDL: tl.constexpr):
        """Program `row` = b * T + t: rows[row] = the embedding of token (b, t) (0 outside the slice);
        with NORM, normed[row] = RMSNorm(rows[row]) * norm weight; with STEP, program b * T does row
        b's bookkeeping (_step_bookkeeping). With PDL: waits for the kernel before (it wrote the ids
        and the lengths) before anything else. With STAMP, program 0 stamps the step's begin
        (collectives/gpu_stamps.py) as it starts."""
        pdl_wait(PDL)
        pdl_launch_dependents(PDL)
        row = tl.program_id(0).to(tl.int64)
        if STAMP:
            if row == 0:
                write_stamp(stamps_ptr, stamp_slot)
        b, t = row // T, row % T
        token = tl.load(ids_ptr + b * stride_ib + t * stride_it).to(tl.int64)
        local = token - vocab_start
        owned = (local >= 0) & (local < vocab_valid)
        local = tl.where(owned, local, 0)
        cols = tl.arange(0, BLOCK)
        mask = cols < HIDDEN
        x = tl.load(weight_ptr + local * stride_wv + cols, mask=mask, other=0.0)  # (BLOCK,) the row's dtype
        x = tl.where(owned, x, tl.zeros_like(x))  # +0.0 outside this rank's slice (row 0 was read instead)
        tl.store(rows_ptr + row * HIDDEN + cols, x, mask=mask)
        if NORM:
            io = weight_ptr.dtype.element_ty
            y = rmsnorm_row(x.to(tl.float32), norm_w_ptr, norm_w_ptr, cols, mask, eps, HIDDEN, io, NORM_DTYPE, False)
            tl.store(normed_ptr + row * HIDDEN + cols, y.to(normed_ptr.dtype.element_ty), mask=mask)
        if STEP:
            if t == 0:
                _step_bookkeeping(lengths_ptr, n_new_ptr, positions_ptr, start_ptr, b, stride_n, T, T_P2, HAS_N_NEW,
                                  POSITIONS)


class EmbedStep(NamedTuple):
    rows: torch.Tensor  # (B, T, H) embedding rows in the weight's dtype: the residual (world 1) or a partial
    normed: torch.Tensor | None  # (B, T, H) RMSNorm(rows) * norm weight, promoted dtype; None without a weight
    positions: torch.Tensor | None  # (B, T) int64: the given positions, or start + t; None without lengths
    start: torch.Tensor | None  # (B,) int64 cache lengths before the step; None without lengths


def available(token_ids: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the kernel takes these: (B, T) integer ids and a (V_r, H <= MAX_HIDDEN) float32/bf16/
    fp16 weight with unit stride along H, on CUDA (or on the CPU under Triton's interpreter)."""
    on_device = weight.is_cuda or (INTERPRETED and weight.device.type == "cpu")
    return (triton is not None and on_device and token_ids.dim() == 2 and not token_ids.is_floating_point()
            and weight.dim() == 2 and weight.dtype in DTYPES and weight.stride(1) == 1
            and 1 <= weight.shape[1] <= MAX_HIDDEN)


def _check(token_ids, weight, norm_weight, lengths, n_new, positions) -> None:
    """Raises ValueError naming the argument at fault, before anything runs."""
    if token_ids.dim() != 2 or token_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"embed_norm: token_ids must be (B, T) int32/int64, got {token_ids.dtype} "
                         f"{tuple(token_ids.shape)}")
    if not available(token_ids, weight):
        raise ValueError(f"embed_norm: weight must be (V_r, H) float32/bfloat16/float16 with unit stride along H, "
                         f"1 <= H <= {MAX_HIDDEN}, on CUDA (or under Triton's interpreter), got {weight.dtype} "
                         f"{tuple(weight.shape)} on {weight.device}")
    batch, n_tokens = token_ids.shape
    hidden = weight.shape[1]
    if norm_weight is not None and (norm_weight.shape != (hidden,) or norm_weight.dtype not in DTYPES
                                    or not norm_weight.is_contiguous()):
        raise ValueError(f"embed_norm: norm_weight must be a contiguous float ({hidden},), got {norm_weight.dtype} "
                         f"{tuple(norm_weight.shape)}")
    if lengths is None and (n_new is not None or positions is not None):
        raise ValueError("embed_norm: n_new and positions go with lengths (the step's bookkeeping)")
    if lengths is not None and (lengths.shape != (batch,) or lengths.dtype != torch.int64
                                or not lengths.is_contiguous()):
        raise ValueError(f"embed_norm: lengths must be a contiguous int64 ({batch},), got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")
    if n_new is not None and (n_new.shape != (batch,) or n_new.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"embed_norm: n_new must be int32/int64 ({batch},), got {n_new.dtype} {tuple(n_new.shape)}")
    if positions is not None and positions.shape != (batch, n_tokens):
        raise ValueError(f"embed_norm: positions must be ({batch}, {n_tokens}), got {tuple(positions.shape)}")
    others = (token_ids, norm_weight, lengths, n_new, positions)
    if any(t is not None and t.device != weight.device for t in others):
        raise ValueError(f"embed_norm: every tensor must be on the weight's device {weight.device}")


def embed_norm(token_ids: torch.Tensor, weight: torch.Tensor, *, vocab_start: int = 0, vocab_valid: int | None = None,
               norm_weight: torch.Tensor | None = None, eps: float = 1e-5, lengths: torch.Tensor | None = None,
               n_new: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> EmbedStep:
    """token_ids (B, T) int; weight (V_r, H): rows [vocab_start, vocab_start + vocab_valid) of the
    vocabulary (vocab_valid default V_r). norm_weight (H,): also RMSNorm the rows (eps). lengths (B,)
    int64, the cache's lengths: also the step's bookkeeping, lengths advanced IN PLACE by n_new (B,)
    (default T); positions (B, T): the step's own (returned as given), else start + t.
    Returns EmbedStep (new tensors but `positions` when given)."""
    _check(token_ids, weight, norm_weight, lengths, n_new, positions)
    batch, n_tokens = token_ids.shape
    hidden, device = weight.shape[1], weight.device
    vocab_valid = weight.shape[0] if vocab_valid is None else vocab_valid
    rows = torch.empty((batch, n_tokens, hidden), dtype=weight.dtype, device=device)  # (B, T, H)
    norm_dtype = weight.dtype if norm_weight is None else torch.promote_types(weight.dtype, norm_weight.dtype)
    normed = torch.empty_like(rows, dtype=norm_dtype) if norm_weight is not None else None
    step = lengths is not None
    start = torch.empty_like(lengths) if step else None  # (B,)
    new_positions = step and positions is None
    if new_positions:
        positions = torch.empty((batch, n_tokens), dtype=torch.int64, device=device)  # (B, T)
    if batch * n_tokens == 0:
        return EmbedStep(rows, normed, positions, start)
    block = triton.next_power_of_2(hidden)
    placeholder = rows  # pointers of the parts not asked for: never read or written
    stamps, stamp_slot = gpu_stamps.step_edge("begin") if step else (None, 0)  # a traced graph's first kernel
    _embed_norm_kernel[(batch * n_tokens,)](
        token_ids, weight, norm_weight if norm_weight is not None else weight, rows,
        normed if normed is not None else placeholder, lengths if step else placeholder,
        n_new if n_new is not None else placeholder, positions if new_positions else placeholder,
        start if step else placeholder, token_ids.stride(0), token_ids.stride(1), weight.stride(0),
        n_new.stride(0) if n_new is not None else 0, int(vocab_start), int(vocab_valid), float(eps),
        T=n_tokens, T_P2=triton.next_power_of_2(n_tokens), HIDDEN=hidden, BLOCK=block, NORM=normed is not None,
        NORM_DTYPE=fused_norm.TL_DTYPES[norm_dtype], STEP=step, HAS_N_NEW=n_new is not None,
        POSITIONS=new_positions, stamps_ptr=stamps if stamps is not None else placeholder, stamp_slot=stamp_slot,
        STAMP=stamps is not None, num_warps=fused_norm.num_warps(block), enable_fp_fusion=False,
        **pdl_kwargs(weight))
    return EmbedStep(rows, normed, positions, start)


def reference_embed_norm(token_ids: torch.Tensor, weight: torch.Tensor, *, vocab_start: int = 0,
                         vocab_valid: int | None = None, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
                         lengths: torch.Tensor | None = None, n_new: torch.Tensor | None = None,
                         positions: torch.Tensor | None = None) -> EmbedStep:
    """`embed_norm` as Llama4.forward's torch ops do it: VocabEmbedding's masked gather, rms_norm,
    positions = lengths + arange, lengths += n_new (in place)."""
    _check(token_ids, weight, norm_weight, lengths, n_new, positions)
    vocab_valid = weight.shape[0] if vocab_valid is None else vocab_valid
    local = token_ids - vocab_start
    owned = (local >= 0) & (local < vocab_valid)
    rows = weight[torch.where(owned, local, 0)] * owned[..., None].to(weight.dtype)  # (B, T, H)
    normed = rms_norm(rows, norm_weight, eps) if norm_weight is not None else None
    if lengths is None:
        return EmbedStep(rows, normed, None, None)
    start = lengths.clone()
    if positions is None:
        positions = start[:, None] + torch.arange(token_ids.shape[1], device=lengths.device)  # (B, T)
    lengths += token_ids.shape[1] if n_new is None else n_new
    return EmbedStep(rows, normed, positions, start)
