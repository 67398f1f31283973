"""The local half of the fused AllReduce + residual + RMSNorm collective, as ONE GPU kernel (Triton).

Why: `allreduce_add_rmsnorm` runs twice per decoder layer. Once the partial sums are reduced, torch
takes about eight launches to finish it (add, float cast, square, mean, add eps, rsqrt, multiply,
cast, multiply by the weight, and three more to quantize for an FP8 GEMM), each a few kilobytes at
decode token counts: launch overhead, not bandwidth. This kernel reads the reduced partial and the
residual once and writes the new residual and the normed (optionally FP8) activations once. A GPU
backend of the Communicator calls it after (or inside) its reduction; this file is the single-rank
math, which is also the whole collective for a world of one.

Design: one program per row, the whole row in registers (hidden size up to MAX_HIDDEN = 8192 in one
block of the next power of two; Llama 4's 5120 fits), num_warps grown with the block so a thread
holds at most 32 values. No atomics, a fixed reduction tree: the same bits on every run.

Numerics follow `Communicator.allreduce_add_rmsnorm` (`reference_add_rmsnorm` is that code):
  * residual + partial rounds to the dtype (torch adds in float32 and rounds: the same bits);
  * the mean of squares is in float32 but summed in a tree, not in torch's order, so the
    normalized value may differ by a float32 ulp or two, which can move a bf16/fp16 result by
    an ulp (then one more through the weight multiply): the test allows 2 ulps (1e-6 relative
    for float32);
  * normalize, round to the dtype, multiply by the weight in float32 and round to the result
    dtype (torch's type promotion of dtype x weight dtype), then for FP8 divide by the scale
    (IEEE `div_rn`), clamp to +-448 and round to e4m3 (round-to-nearest-even on a GPU);
  * the kernel is compiled without FMA contraction, so every product rounds as torch's does.
Under Triton's interpreter float32 -> bfloat16 casts truncate, so `_round` rounds to nearest-even
by hand there; its float32 -> e4m3 cast is wrong too, which the test works around (see there).
"""
from __future__ import annotations

import torch

from collectives import gpu_stamps
from collectives.communicator import (FP8_MAX, INV_FP8_MAX, MIN_AMAX, fill_fp8_rows, fp8_rows_static_scale,
                                      quantize_fp8, rms_norm)
from collectives.triton_support import INTERPRETED, pdl_kwargs, tl, triton

FP8 = torch.float8_e4m3fn
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HIDDEN = 8192  # one row per program, held in registers

if triton is not None:
    from collectives.gpu_stamps import write_stamp
    from collectives.triton_support import pdl_launch_dependents, pdl_wait

    FP8_MAX_CONST = tl.constexpr(FP8_MAX)
    MIN_AMAX_CONST, INV_FP8_MAX_CONST = tl.constexpr(MIN_AMAX), tl.constexpr(INV_FP8_MAX)
    TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

    if INTERPRETED:
        @triton.jit
        def _round(x, DTYPE: tl.constexpr):
            """x rounded to DTYPE and widened back: the value torch holds after an op that returns DTYPE."""
            if DTYPE == tl.bfloat16:  # the interpreter's float32 -> bfloat16 cast truncates
                bits = x.to(tl.uint32, bitcast=True)
                bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16  # round half to even at bit 16
                return bits.to(tl.float32, bitcast=True)
            else:
                return x.to(DTYPE).to(tl.float32)
    else:
        @triton.jit
        def _round(x, DTYPE: tl.constexpr):
            """x rounded to DTYPE (round to nearest even) and widened back: what torch holds after an op
            that returns DTYPE."""
            return x.to(DTYPE).to(tl.float32)

    @triton.jit
    def rmsnorm_row(s, weight_ptr, scale_ptr, cols, mask, eps, HIDDEN: tl.constexpr, IO: tl.constexpr,
                    NORM_DTYPE: tl.constexpr, QUANT: tl.constexpr):
        """RMSNorm(s) * weight of one row s (float32 holding IO values; masked lanes 0), in float32 holding
        NORM_DTYPE values, or with QUANT divided by *scale_ptr and clamped to e4m3's range (the caller's
        store rounds). Shared with the multi-GPU kernel (collectives/fused_allreduce.py): the same bits."""
        # RMSNorm statistics in float32; masked lanes are 0 and add nothing
        mean_sq = tl.math.div_rn(tl.sum(s * s, axis=0), HIDDEN * 1.0)
        inv_rms = tl.math.rsqrt(mean_sq + eps)
        normed = _round(s * inv_rms, IO)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = _round(normed * w, NORM_DTYPE)  # normed * weight in torch's promoted dtype
        if QUANT:  # quantize_fp8: y / scale, saturated to e4m3's range, rounded to nearest even
            scale = tl.load(scale_ptr)
            y = tl.minimum(tl.maximum(tl.math.div_rn(y, scale), -FP8_MAX_CONST), FP8_MAX_CONST)
        return y

    @triton.jit
    def quantize_e4m3(x, divisor):
        """clamp(x / divisor, +-448) rounded to e4m3 (quantize_fp8), returned as float32."""
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, divisor), -FP8_MAX_CONST), FP8_MAX_CONST)
        return q.to(tl.float8e4nv).to(tl.float32)

    @triton.jit
    def dynamic_scale(row_amax):
        """(scale, divisor) of a row whose |x| max is row_amax: quantize_rows_fp8's scale, and the divisor
        the row is quantized with. An all-zero row quantizes to zeros with any divisor: it divides by 1,
        not by 2e-15, which sends IEEE division down its slow path."""
        xs = tl.maximum(row_amax, MIN_AMAX_CONST) * INV_FP8_MAX_CONST
        return xs, tl.where(row_amax > 0, xs, 1.0)

    @triton.jit
    def _add_rmsnorm_kernel(partial_ptr, residual_ptr, weight_ptr, scale_ptr, normed_ptr, new_residual_ptr, eps,
                            HIDDEN: tl.constexpr, BLOCK: tl.constexpr, NORM_DTYPE: tl.constexpr,
                            QUANT: tl.constexpr, stamps_ptr, begin_slot, end_slot, STAMP: tl.constexpr,
                            q_ptr, q_scale_ptr, ROW_QUANT: tl.constexpr = False,
                            PDL: tl.constexpr = False, HAS_RESIDUAL: tl.constexpr = True, q_static_ptr=None,
                            STATIC_ROWS: tl.constexpr = False):
        """Program `row`: s = residual + partial (without HAS_RESIDUAL: s = partial, and no residual is
        stored: the partial is the new residual); normed = (s * rsqrt(mean(s^2) + eps)) * weight.
        With ROW_QUANT, also normed quantized per row (quantize_rows_fp8) into q_ptr, its scale into
        q_scale_ptr[row]; with STATIC_ROWS quantized with the static scale at q_static_ptr instead (no amax),
        which goes into q_scale_ptr[row].
        With STAMP, program 0 writes GPU timestamps into stamps_ptr[begin_slot] and [end_slot].
        With PDL (programmatic dependent launch, triton_support.py) it waits for the kernel that
        wrote the partial before anything else."""
        pdl_wait(PDL)
        pdl_launch_dependents(PDL)
        row = tl.program_id(0).to(tl.int64)
        if STAMP:
            if row == 0:
                write_stamp(stamps_ptr, begin_slot)
        cols = tl.arange(0, BLOCK)
        mask = cols < HIDDEN
        io = residual_ptr.dtype.element_ty
        # The new residual, in the dtype: the row is loaded once and stays in registers
        p = tl.load(partial_ptr + row * HIDDEN + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
        s = p
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + row * HIDDEN + cols, mask=mask, other=0.0).to(tl.float32)
            s = _round(r + p, io)
            tl.store(new_residual_ptr + row * HIDDEN + cols, s.to(io), mask=mask)
        y = rmsnorm_row(s, weight_ptr, scale_ptr, cols, mask, eps, HIDDEN, io, NORM_DTYPE, QUANT)
        tl.store(normed_ptr + row * HIDDEN + cols, y.to(normed_ptr.dtype.element_ty), mask=mask)
        if ROW_QUANT:  # y holds the stored values (rounded to the normed dtype); masked lanes are 0
            if STATIC_ROWS:
                xs = tl.load(q_static_ptr)
                divisor = xs
            else:
                xs, divisor = dynamic_scale(tl.max(tl.abs(y), axis=0))
            tl.store(q_ptr + row * HIDDEN + cols, quantize_e4m3(y, divisor).to(tl.float8e4nv), mask=mask)
            tl.store(q_scale_ptr + row, xs)
        if STAMP:
            if row == 0:
                write_stamp(stamps_ptr, end_slot)


def num_warps(block: int) -> int:
    """Warps for a row of `block` lanes: at most 32 values a thread (the reduction tree follows from it)."""
    return min(16, max(1, block // 256))


def available(x: torch.Tensor) -> bool:
    """True when the kernel takes `x` as its partial: a contiguous (..., H <= MAX_HIDDEN) float32/bf16/fp16
    CUDA tensor (or a CPU one under Triton's interpreter). Callers fall back to torch otherwise."""
    on_device = x.is_cuda or (INTERPRETED and x.device.type == "cpu")
    return (triton is not None and on_device and x.dim() >= 1 and x.dtype in DTYPES and x.is_contiguous()
            and 1 <= x.shape[-1] <= MAX_HIDDEN)


def _check(partial, residual, weight, quant_scale) -> None:
    """Raises ValueError naming the argument at fault, before anything runs. residual None: the
    partial stands in for it (there is no residual to add)."""
    residual = partial if residual is None else residual
    if partial.shape != residual.shape or partial.dtype != residual.dtype:
        raise ValueError(f"partial and residual must match, got {partial.dtype} {tuple(partial.shape)} and "
                         f"{residual.dtype} {tuple(residual.shape)}")
    if residual.dim() < 1 or residual.dtype not in DTYPES or not (partial.is_contiguous() and residual.is_contiguous()):
        raise ValueError(f"partial and residual must be contiguous (..., H) float32/bfloat16/float16, got "
                         f"{residual.dtype} {tuple(residual.shape)}")
    hidden = residual.shape[-1]
    if not 1 <= hidden <= MAX_HIDDEN:
        raise ValueError(f"hidden size H = {hidden} is outside 1..{MAX_HIDDEN} (one row per program)")
    if weight.shape != (hidden,) or weight.dtype not in DTYPES or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous float (H,) = ({hidden},), got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if quant_scale is not None and (quant_scale.numel() != 1 or quant_scale.dtype != torch.float32):
        raise ValueError(f"quant_scale must be a float32 scalar tensor, got {quant_scale.dtype} "
                         f"{tuple(quant_scale.shape)}")
    others = [partial, weight] + ([quant_scale] if quant_scale is not None else [])
    if any(t.device != residual.device for t in others):
        raise ValueError(f"every tensor must be on residual's device {residual.device}")


def check_fp8_rows(normed: torch.Tensor, quant_scale, fp8_rows) -> None:
    """Refuses fp8_rows buffers that cannot hold `normed` quantized per row: (e4m3 like normed,
    contiguous; float32 (rows,)[; a float32 one-element static scale]), on normed's device, and not with a
    static quant_scale (which makes the normed output itself FP8)."""
    if fp8_rows is None:
        return
    if len(fp8_rows) not in (2, 3):
        raise ValueError(f"fp8_rows must be (values, scales) or (values, scales, static scale), "
                         f"got {len(fp8_rows)} items")
    q, scales = fp8_rows[:2]
    static = fp8_rows_static_scale(fp8_rows)
    if static is not None and (not isinstance(static, torch.Tensor) or static.dtype != torch.float32
                               or static.numel() != 1 or static.device != normed.device):
        raise ValueError(f"fp8_rows' static scale must be a one-element float32 tensor on {normed.device}, "
                         f"got {static!r:.80}")
    rows = normed.numel() // max(1, normed.shape[-1])
    if quant_scale is not None:
        raise ValueError("fp8_rows (dynamic per-row FP8) and quant_scale (a static scale) exclude each other")
    if (q.dtype != FP8 or q.shape != normed.shape or not q.is_contiguous() or scales.dtype != torch.float32
            or scales.shape != (rows,) or q.device != normed.device or scales.device != normed.device):
        raise ValueError(f"fp8_rows must be (contiguous float8_e4m3fn {tuple(normed.shape)}, float32 ({rows},)) "
                         f"on {normed.device}, got ({q.dtype} {tuple(q.shape)}, {scales.dtype} {tuple(scales.shape)})")


def add_rmsnorm(partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                quant_scale: torch.Tensor | None = None,
                fp8_rows: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """partial, residual: contiguous (..., H), one float32/bf16/fp16 dtype, H <= 8192; weight (H,).
    Returns (normed, residual + partial): normed = RMSNorm(residual + partial) * weight in the
    promoted dtype, or float8_e4m3fn (normed / quant_scale, saturated) when quant_scale, a float32
    scalar tensor, is given. New tensors; the inputs are not modified. residual None: no residual
    (a step's first norm, of the embedding): returns (RMSNorm(partial) * weight, partial itself).
    fp8_rows: buffers (e4m3 (..., H), float32 (rows,)) the kernel also fills with normed quantized per
    row (quantize_rows_fp8), or, given a third item (a float32 static scale s), with quantize_fp8(normed, s)
    and s in every row: for the FP8 GEMV that reads it (linear_small_m's x_fp8)."""
    _check(partial, residual, weight, quant_scale)
    check_fp8_rows(partial, quant_scale, fp8_rows)
    static = fp8_rows_static_scale(fp8_rows)
    if not available(partial):
        raise ValueError(f"add_rmsnorm needs Triton and a CUDA tensor (or Triton's interpreter), got {partial.device}")
    has_residual = residual is not None
    residual = residual if has_residual else partial
    hidden = residual.shape[-1]
    norm_dtype = torch.promote_types(residual.dtype, weight.dtype)
    normed = torch.empty(residual.shape, dtype=FP8 if quant_scale is not None else norm_dtype, device=residual.device)
    new_residual = torch.empty_like(residual) if has_residual else partial
    rows = residual.numel() // hidden
    if rows == 0:
        return normed, new_residual
    block = triton.next_power_of_2(hidden)
    stamps, begin, end = gpu_stamps.slots("allreduce_add_rmsnorm", partial)
    _add_rmsnorm_kernel[(rows,)](
        partial, residual, weight, quant_scale if quant_scale is not None else weight, normed, new_residual,
        float(eps), HIDDEN=hidden, BLOCK=block, NORM_DTYPE=TL_DTYPES[norm_dtype], QUANT=quant_scale is not None,
        stamps_ptr=stamps if stamps is not None else new_residual, begin_slot=begin, end_slot=end,
        STAMP=stamps is not None, q_ptr=fp8_rows[0] if fp8_rows else normed,
        q_scale_ptr=fp8_rows[1] if fp8_rows else normed, ROW_QUANT=fp8_rows is not None,
        q_static_ptr=static if static is not None else normed, STATIC_ROWS=static is not None,
        HAS_RESIDUAL=has_residual, num_warps=num_warps(block), enable_fp_fusion=False, **pdl_kwargs(residual))
    return normed, new_residual


def reference_add_rmsnorm(partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                          quant_scale: torch.Tensor | None = None,
                          fp8_rows: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Communicator.allreduce_add_rmsnorm for a world of one, in plain torch (the test oracle)."""
    _check(partial, residual, weight, quant_scale)
    check_fp8_rows(partial, quant_scale, fp8_rows)
    new_residual = partial if residual is None else residual + partial
    normed = rms_norm(new_residual, weight, eps)
    if fp8_rows is not None:
        fill_fp8_rows(normed, fp8_rows)
    return (normed if quant_scale is None else quantize_fp8(normed, quant_scale)), new_residual
