"""FP8 activation quantization as ONE GPU kernel (Triton), bit-identical to model/fp8.py's torch code.

Why: at decode token counts an FP8 Linear is launch-bound, not bandwidth-bound. In eager torch,
quantizing an activation per token is abs, amax, clamp, divide, divide, clamp and cast: six or
seven kernels (and their Python dispatch) in front of the one FP8 GEMM, so the FP8 layer took
several times as long as the BF16 matmul it replaces (benchmarks/results/fp8_gpu_h200.json).
Here each granularity is a single launch: per token (row amax -> scale -> quantize), per 1x128
group (same per group, k_offset-aligned like model/fp8.py's `to_groups`) and static (one given
scale).

The numbers are the torch path's exactly: the amax is exact, the scale is amax times float32(1/448)
(model/fp8.py's INV_FP8_MAX), x / scale is an IEEE round-to-nearest division (`div_rn`, as torch
divides by a tensor), the clamp to +-448 happens before the cast, and the
float32 -> e4m3 cast rounds to nearest-even (Hopper's cvt.rn.satfinite). tests/test_fp8_kernels.py
checks equality byte for byte on a GPU.

Triton ships with CUDA builds of torch; without it (CPU builds) `available()` is False and
model/fp8.py keeps its torch code.
"""
from __future__ import annotations

import torch

from collectives.communicator import FP8_MAX

try:  # CUDA builds of torch bring Triton; CPU builds do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def available(x: torch.Tensor) -> bool:
    """True when `x` can be quantized by these kernels (a 2-D CUDA tensor, Triton present)."""
    return triton is not None and x.is_cuda and x.dim() == 2 and x.stride(-1) == 1


if triton is not None:
    FP8_MAX_CONST = tl.constexpr(FP8_MAX)  # a jit'ed function reads module globals only as constexprs
    INV_FP8_MAX_CONST = tl.constexpr(1.0 / FP8_MAX)

    @triton.jit
    def _quantize_rows(x_ptr, q_ptr, scale_ptr, n_cols, x_stride, q_stride, min_amax, lead,
                       GROUP: tl.constexpr, BLOCK: tl.constexpr):
        """Program (row, group): amax of the group's columns, scale = max(amax, min_amax) * (1/448),
        q = clamp(x / scale). A group is [g*GROUP - lead, (g+1)*GROUP - lead) cut to [0, n_cols)."""
        row, group = tl.program_id(0), tl.program_id(1)
        cols = group * GROUP - lead + tl.arange(0, BLOCK)
        mask = (cols >= 0) & (cols < n_cols) & (tl.arange(0, BLOCK) < GROUP)
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.maximum(amax, min_amax) * INV_FP8_MAX_CONST
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX_CONST), FP8_MAX_CONST)
        tl.store(q_ptr + row * q_stride + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(scale_ptr + row * tl.num_programs(1) + group, scale)

    @triton.jit
    def _quantize_static(x_ptr, q_ptr, scale_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX_CONST), FP8_MAX_CONST)
        tl.store(q_ptr + offs, q.to(tl.float8e4nv), mask=mask)


def quantize_per_token(x: torch.Tensor, min_amax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (M, K). Returns (fp8 (M, K), float32 scales (M, 1))."""
    m, k = x.shape
    block = triton.next_power_of_2(k)
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    _quantize_rows[(m, 1)](x, q, scale, k, x.stride(0), q.stride(0), min_amax, 0, GROUP=block, BLOCK=block,
                           num_warps=min(16, max(1, block // 512)))
    return q, scale


def quantize_per_group(x: torch.Tensor, k_offset: int, n_groups: int, min_amax: float,
                       group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (M, K) whose column 0 sits at `k_offset % group` of a group. Returns (fp8 (M, K), (M, G))."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, n_groups), dtype=torch.float32, device=x.device)
    _quantize_rows[(m, n_groups)](x, q, scale, k, x.stride(0), q.stride(0), min_amax, k_offset % group,
                                  GROUP=group, BLOCK=group, num_warps=1)
    return q, scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: (M, K), scale: a float32 scalar tensor on x's device. Returns fp8 (M, K)."""
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    n, block = x.numel(), 1024
    _quantize_static[(triton.cdiv(n, block),)](x, q, scale, n, BLOCK=block, num_warps=4)
    return q


# ---------------------------------------------------------------------------------------------
# FP8 GEMM for decode token counts
# ---------------------------------------------------------------------------------------------
# torch._scaled_mm with row-wise scales takes ~15 us of GPU time at M = 1 on an H200 for a
# Maverick TP8 qkv shard (5120 x 896, 4.6 MB of FP8: a ~1 us HBM floor), longer than the BF16
# matmul of twice the bytes (~6 us; benchmarks/results/fp8_gpu_h200.json). At a handful of tokens
# the GEMM is a weight stream: this kernel tiles N, splits K across enough programs to keep every
# SM reading, multiplies 16-row tiles on the FP8 tensor cores (tl.dot, float32 accumulation),
# scales in float32 and writes one float32 partial per split; one torch sum adds them in a fixed
# order (no atomics: the result is the same on every run).
SPLIT_TARGET_PROGRAMS = 264  # ~2 per SM of an H100/H200 (132)

if triton is not None:
    @triton.jit
    def _gemm_small_m(x_ptr, w_ptr, x_scale_ptr, w_scale_ptr, out_ptr, M, N, K, x_stride, w_stride, k_per_split,
                      SCALE_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
        """Program (n tile, k split): out[split, :, tile] = (x[:, ks] @ w[tile, ks].T) * x_scale * w_scale."""
        rows = tl.arange(0, BLOCK_M)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_start = tl.program_id(1) * k_per_split
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + rows[:, None] * x_stride + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                        other=0.0)
            b = tl.load(w_ptr + cols[None, :] * w_stride + ks[:, None], mask=(cols[None, :] < N) & (ks[:, None] < K),
                        other=0.0)  # (BLOCK_K, BLOCK_N): W is (N, K) row-major
            acc = tl.dot(a, b, acc)
        x_scale = tl.load(x_scale_ptr + rows, mask=rows < M, other=0.0) if SCALE_PER_ROW else tl.load(x_scale_ptr)
        w_scale = tl.load(w_scale_ptr + cols, mask=cols < N, other=0.0)
        if SCALE_PER_ROW:
            acc = acc * x_scale[:, None]
        else:
            acc = acc * x_scale
        acc = acc * w_scale[None, :]
        out = out_ptr + tl.program_id(1) * M * N + rows[:, None] * N + cols[None, :]
        tl.store(out, acc, mask=(rows[:, None] < M) & (cols[None, :] < N))


def gemm_small_m(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                 out_dtype: torch.dtype, block_n: int = 32, block_k: int = 128) -> torch.Tensor:
    """(M, N) = (x_q @ w_q.T) * x_scale * w_scale for M <= 16. x_q: (M, K) fp8 (unit column stride);
    w_q: (N, K) fp8 row-major; x_scale: () or (M, 1) float32; w_scale: (N,) float32."""
    m, k = x_q.shape
    n = w_q.shape[0]
    if m > 16 or w_q.stride(1) != 1 or x_q.stride(1) != 1:
        raise ValueError(f"gemm_small_m takes M <= 16 rows with unit column strides, got {tuple(x_q.shape)}")
    n_tiles, k_blocks = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    splits = max(1, min(k_blocks, SPLIT_TARGET_PROGRAMS // n_tiles))
    k_per_split = triton.cdiv(k_blocks, splits) * block_k
    splits = triton.cdiv(k, k_per_split)
    partial = torch.empty((splits, m, n), dtype=torch.float32, device=x_q.device)
    _gemm_small_m[(n_tiles, splits)](x_q, w_q, x_scale, w_scale, partial, m, n, k, x_q.stride(0), w_q.stride(0),
                                     k_per_split, SCALE_PER_ROW=x_scale.dim() > 0, BLOCK_M=16, BLOCK_N=block_n,
                                     BLOCK_K=block_k, num_warps=4)
    out = partial[0] if splits == 1 else partial.sum(0)
    return out.to(out_dtype)
