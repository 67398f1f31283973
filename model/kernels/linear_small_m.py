"""y = x W^T for decode token counts (M = 1..16 rows) as a weight-streaming GPU kernel (Triton).

Why: at decode a Linear is a weight stream: 1..16 rows of x against megabytes of W. cuBLAS tiles for
large M, and at M = 1 its FP8 path takes longer than the BF16 matmul of twice the bytes
(model/fp8_kernels.py). What matters here is HBM bandwidth, so every variant reads each weight
byte once, with enough programs to keep every SM reading, and does the rest in the same launch:
  * gathered experts: row m multiplies by weight[expert_ids[m]] (ids stay on the GPU: top-1 MoE
    reads only the routed experts, no host sync, CUDA-graph capturable);
  * the router score (`row_scale`) multiplies x first, rounded to x's dtype as ffn.py's torch does;
  * FP8 weights: the GEMV quantizes the activation in its prologue (static scale, or per row:
    every program re-derives the row amax, K is only a few thousand), which saves a launch;
    products of e4m3 values are exact in float32 (model/fp8.py);
  * SwiGLU: a program computes a gate tile and the matching up tile (N/2 apart) and writes
    silu(gate) * up, rounded once from the float32 sums.

Kernels: M == 1 or gathered rows run the GEMV, one program per (row, n tile), rows adjacent so
that rows sharing a tile share it in L2: multiply-add of a (BLOCK_N, BLOCK_K) weight tile with
the broadcast x chunk in float32, one tl.sum at the end. Dense M > 1 runs tl.dot on 16-row tiles
(rows >= M masked) so the weight is read once for all rows; with FP8 weights a one-program-per-
row pre-pass quantizes x first, since in the dot kernel every program would redo 16 rows of IEEE
divisions (measured on an H200, 4096x5120, M = 16: 37 us at the best tiles, 19 us with the pre-pass).
No split-K: small BLOCK_N (1..16 rows of W) gives a few programs per SM (132 on an H100/H200)
at the Llama 4 shard shapes, and every sum has a fixed order (no atomics).
Weights come in either layout: K-contiguous ((N, K) nn.Linear, FP8 experts' `W[e].mT`) or
N-contiguous (BF16 HF experts (E, K, N) passed as `w.transpose(1, 2)`). Strides go in as ints:
Triton specializes a stride of 1, so loads vectorize along whichever dimension is contiguous, and
`gemv_tiles.tiles` picks tile shapes per layout. K-contiguous streams about twice as fast at M = 1
(benchmarks/gemv_bench.py): N-major strips are 16-32 bytes wide and N/16 of them are too few
programs to cover HBM latency.

Numerics: float32 accumulation always; FP8 out = (sum q_x q_w) * x_scale * w_scale in that order
(model/fp8.py's emulated_gemm); quantization is bit-identical to model/fp8.py (IEEE division
`div_rn`, clamp, round-to-nearest-even cast) on a GPU. Triton's interpreter rounds float32 -> e4m3
(and -> bf16) by truncation, so CPU tests check quantization only where it is exact.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from collectives.communicator import quantize_fp8, quantize_rows_fp8
from collectives.triton_support import INTERPRETED, ArrivalCounters, pdl_kwargs, tl, triton
from model.kernels import fp8_mma, gemv_tiles
from model.kernels.gemv_math import CVT_MODES
from model.kernels.gemv_tiles import MAX_M, TUNED_BF16_GEMV, TUNED_FP8_GEMV, mma_default

FP8 = torch.float8_e4m3fn
HIGH = (torch.float32, torch.bfloat16, torch.float16)
CONFIG_KEYS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "gemv", "CVT", "SPLIT_K", "DOT_F16", "PREQUANT", "MMA")
MMA_KEYS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "SPLIT_K", "MMA")
FLAGS = ("PREQUANT", "DOT_F16", "MMA")
# No L2 prefetch (PTX prefetch.global.L2) of the rest of a GEMV's span before its PDL wait: with it on
# (and the attention's), the medium decode step on an H200 took bf16 377.6 us vs 352.3 off, FP8 345.2 vs
# 342.4 (c6bff85, h200x2-ab-decode-medium-*-c6bff85-tp1-prefetch-*.json): the prefetches compete for HBM
# with the kernel before, itself bandwidth-bound. The attention's alone changed nothing measurable
# (11a53b9: maverick-slice 997.8 vs 997.6 us, medium bf16 340.0 vs 338.1, fp8 323.7 vs 325.3), so
# neither stayed. Nor a bulk L2 prefetch (cp.async.bulk.prefetch.L2) of the layer's next weights (o_proj, then
# FC13 and FC2) by the attention programs after their PDL wait, while HBM idles behind the latency-bound
# attention: slower at every budget (d98c1e7 on one H200, 0 / 16 / 32 MB: medium fp8 317.8 / 344.4 / 354.1 us,
# bf16 340.3 / 361.9 / 385.7, maverick-slice at 24 MB 1010.5 vs 993.9; h200-ab-decode-*-l2-*-d98c1e7-tp1.json).
# Nor two K chunks of the tile loaded before the PDL wait instead of one (medium's K = 2048 tiles: all of the tile;
# f142e91, one H200, three alternated rounds): medium bf16 decode 344.4 / 344.3 / 344.6 us vs 323.3 / 323.5 / 323.2,
# fp8 318.9 / 318.6 / 318.2 vs 309.4 / 309.5 / 309.1 (h200-ab-decode-medium-*-{early2,one-chunk}-*-f142e91-tp1.json).
# Nor (session 12, one H200, each A/B in one call) the next K chunk requested before the current chunk's math, after
# the wait (ee8ae24): medium fp8 decode 311.4 / 311.7 vs 307.7 / 308.3 us, bf16 319.0 / 319.2 vs 322.4 / 322.4, verify
# the other way round (fp8 461 vs 472, bf16 540 vs 537) (h200-ab-decode-medium-*-pf{0,1}-*-ee8ae24-tp1.json).
# Nor the one-row FP8 GEMV on the tensor cores with its whole span loaded before the wait and x quantized in the
# kernel (818229e "MMA_ROW": fp8 step 343.0 / 342.9 vs 308.0 / 308.5 us), nor half of each FP8 chunk converted by
# integer ops to share the conversion pipe with the ALUs (818229e CVT "mixed": 347.1 / 348.2)
# (h200-ab-decode-medium-fp8-{default,cvt-mixed,mma-row-cvt-mixed}-*-818229e-tp1.json; MMA_ROW's own two files
# exceeded the call's file limit: its numbers are from the call's log).
if triton is not None:
    from collectives.triton_support import pdl_launch_dependents, pdl_wait
    from model.kernels import gemv_math as gm

    @triton.jit
    def _split_k_finish(g, u, xs, part_ptr, count_ptr, ws_ptr, out_ptr, row, tile, split, cols, col_ok, M, N_OUT,
                        stride_om, QUANT: tl.constexpr, SWIGLU: tl.constexpr, CVT: tl.constexpr,
                        SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """Publishes this split's float32 sums; the last split of the (row, tile) to arrive (an atomic
        counter, reset after) adds all splits in split order (deterministic) and writes the output.
        part: (SPLIT_K, M, 2 N_OUT) float32 scratch; count: one int32 per (row, tile), zero between calls."""
        slot = (split * M + row) * (2 * N_OUT)
        tl.store(part_ptr + slot + cols, g, mask=col_ok)
        if SWIGLU:
            tl.store(part_ptr + slot + N_OUT + cols, u, mask=col_ok)
        tl.debug_barrier()  # every thread's partial stored before the (release) count
        counter = count_ptr + row * (tl.num_programs(0) // M) + tile
        if tl.atomic_add(counter, 1) == SPLIT_K - 1:
            g = tl.zeros((BLOCK_N,), tl.float32)
            u = tl.zeros((BLOCK_N,), tl.float32)
            for s in tl.static_range(SPLIT_K):
                base = part_ptr + (s * M + row) * (2 * N_OUT)
                g += tl.load(base + cols, mask=col_ok, other=0.0, cache_modifier=".cg")  # L2: other SMs wrote
                if SWIGLU:
                    u += tl.load(base + N_OUT + cols, mask=col_ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counter, 0)
            y = gm.finish(g, u, xs, ws_ptr, cols, col_ok, N_OUT, QUANT, SWIGLU, CVT)
            tl.store(out_ptr + row * stride_om + cols, y.to(out_ptr.dtype.element_ty), mask=col_ok)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, ids_ptr, rs_ptr, xs_ptr, ws_ptr, out_ptr, part_ptr, count_ptr, M, N_OUT,
                     stride_xm, stride_we, stride_wn, stride_wk, stride_xse, stride_xsm, stride_wse, stride_om,
                     K: tl.constexpr, GATHER: tl.constexpr, ROW_SCALE: tl.constexpr, QUANT: tl.constexpr,
                     SWIGLU: tl.constexpr, CVT: tl.constexpr, SPLIT_K: tl.constexpr, K_SPAN: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """Program (row, n tile, K split): out[row, tile] = f(x[row] @ W[tile].T), W = weight[ids[row]] if
        GATHER, over K in [split * K_SPAN, + K_SPAN) (all of K unless SPLIT_K > 1).
        QUANT: 0 high precision, 1 static x scale, 2 dynamic per-row x scale, 3 x quantized by a pre-pass
        (e4m3, scales (M,) at xs_ptr) (FP8 weights); CVT: how
        FP8 weights become float32 (gemv_math.py). Rows vary fastest, so rows that share a weight tile
        run side by side and share it in L2. With PDL the first K chunk of a dense weight is in flight
        before the wait for the kernel that wrote x (a gathered one waits first: the kernel before
        wrote the expert ids)."""
        row, tile = tl.program_id(0) % M, tl.program_id(0) // M
        split = tl.program_id(1)
        k_lo = split * K_SPAN
        expert = 0
        if GATHER:
            pdl_wait(PDL)
            expert = tl.load(ids_ptr + row).to(tl.int64)  # int64: E * N * K can pass 2^31
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output columns
        col_ok = cols < N_OUT
        w_gate = w_ptr + expert * stride_we + cols.to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1)
        w_up = w_gate + N_OUT * stride_wn  # SwiGLU: the up rows sit N/2 below the gate rows
        w_g, w_u = gm.first_chunk(w_gate, w_up, col_ok, stride_wk, k_lo, K, SWIGLU, CVT, BLOCK_K)
        if not GATHER:
            pdl_wait(PDL)
        pdl_launch_dependents(PDL)
        x_row = x_ptr + row * stride_xm
        rs = 1.0
        if ROW_SCALE:
            rs = tl.load(rs_ptr + row).to(x_ptr.dtype.element_ty).to(tl.float32)
        xs_row = xs_ptr + expert * stride_xse + row * stride_xsm
        g, u, xs = gm.gemv_sums(x_row, rs, xs_row, w_gate, w_up, w_g, w_u, col_ok, stride_wk,
                                k_lo, K, K_SPAN, ROW_SCALE, QUANT, SWIGLU, CVT, BLOCK_N, BLOCK_K)
        ws_row = ws_ptr + expert * stride_wse
        if SPLIT_K == 1:
            y = gm.finish(g, u, xs, ws_row, cols, col_ok, N_OUT, QUANT, SWIGLU, CVT)
            tl.store(out_ptr + row * stride_om + cols, y.to(out_ptr.dtype.element_ty), mask=col_ok)
        else:
            _split_k_finish(g, u, xs, part_ptr, count_ptr, ws_row, out_ptr, row, tile, split, cols, col_ok, M,
                            N_OUT, stride_om, QUANT, SWIGLU, CVT, SPLIT_K, BLOCK_N)

    @triton.jit
    def _load_wt(w_gate, w_up, ks, mask, stride_wk, SWIGLU: tl.constexpr):
        """One K chunk of W^T as stored: (BLOCK_K, BLOCK_N) gate columns (and up columns)."""
        b_g = tl.load(w_gate + ks[:, None] * stride_wk, mask=mask, other=0.0)
        b_u = b_g
        if SWIGLU:
            b_u = tl.load(w_up + ks[:, None] * stride_wk, mask=mask, other=0.0)
        return b_g, b_u

    @triton.jit
    def _dot_chunk(acc_g, acc_u, b_g, b_u, x_rows, ks, mask, rs, ROW_SCALE: tl.constexpr, SWIGLU: tl.constexpr,
                   DOT_DTYPE: tl.constexpr):
        """acc += x chunk (BLOCK_M, BLOCK_K) @ W^T chunk, operands in DOT_DTYPE (exact), float32 sums."""
        a = gm.load_x(x_rows + ks[None, :], mask, rs, ROW_SCALE)
        a = a.to(DOT_DTYPE)  # exact: x's own dtype, or e4m3 values into bf16 / fp16
        acc_g = tl.dot(a, b_g.to(DOT_DTYPE), acc_g, input_precision="ieee")
        if SWIGLU:
            acc_u = tl.dot(a, b_u.to(DOT_DTYPE), acc_u, input_precision="ieee")
        return acc_g, acc_u

    @triton.jit
    def _dot_kernel(x_ptr, w_ptr, rs_ptr, xs_ptr, ws_ptr, out_ptr, M, N_OUT, stride_xm, stride_wn, stride_wk,
                    stride_om, K: tl.constexpr, ROW_SCALE: tl.constexpr, QUANT: tl.constexpr, SWIGLU: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PDL: tl.constexpr):
        """Program (n tile): out[:M, tile] = f(x @ W[tile].T) on 16-row tiles; W read once for all rows.
        FP8 (QUANT): x comes quantized by fp8_mma.prequantize, row scales applied, with its scales (M,).
        With PDL the first K chunk of W is in flight before the wait for the kernel that wrote x."""
        rows = tl.arange(0, BLOCK_M)
        row_ok = rows < M
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N_OUT
        x_rows = x_ptr + rows[:, None] * stride_xm  # (BLOCK_M, 1)
        w_gate = w_ptr + cols.to(tl.int64)[None, :] * stride_wn  # (1, BLOCK_N): W^T tiles
        w_up = w_gate + N_OUT * stride_wn
        ks = tl.arange(0, BLOCK_K)  # the first K chunk
        k_ok = ks < K
        b_g, b_u = _load_wt(w_gate, w_up, ks, k_ok[:, None] & col_ok[None, :], stride_wk, SWIGLU)
        pdl_wait(PDL)
        pdl_launch_dependents(PDL)
        rs = tl.full((BLOCK_M, 1), 1.0, tl.float32)
        if ROW_SCALE:
            rs = tl.load(rs_ptr + rows, mask=row_ok, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)[:, None]
        xs = 1.0
        if QUANT:  # x is already e4m3 (fp8_mma.prequantize), with one scale per row
            xs = tl.load(xs_ptr + rows, mask=row_ok, other=1.0)[:, None]  # (BLOCK_M, 1)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_g, acc_u = _dot_chunk(acc_g, acc_u, b_g, b_u, x_rows, ks, row_ok[:, None] & k_ok[None, :], rs,
                                  ROW_SCALE, SWIGLU, DOT_DTYPE)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            b_g, b_u = _load_wt(w_gate, w_up, ks, k_ok[:, None] & col_ok[None, :], stride_wk, SWIGLU)
            acc_g, acc_u = _dot_chunk(acc_g, acc_u, b_g, b_u, x_rows, ks, row_ok[:, None] & k_ok[None, :], rs,
                                      ROW_SCALE, SWIGLU, DOT_DTYPE)
        ws_g, ws_u = 1.0, 1.0
        if QUANT:
            ws_g = tl.load(ws_ptr + cols, mask=col_ok, other=0.0)[None, :]  # (1, BLOCK_N)
            if SWIGLU:
                ws_u = tl.load(ws_ptr + N_OUT + cols, mask=col_ok, other=0.0)[None, :]
        y = gm.epilogue(acc_g, acc_u, xs, ws_g, ws_u, QUANT, SWIGLU)
        out = out_ptr + rows[:, None] * stride_om + cols[None, :]
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def available(x: torch.Tensor) -> bool:
    """True when these kernels can run on `x`: a CUDA tensor (or a CPU one under Triton's interpreter)."""
    return triton is not None and (x.is_cuda or (INTERPRETED and x.device.type == "cpu"))


GEMV_ONLY = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "CVT", "SPLIT_K", "PREQUANT")


def env_overrides(name: str) -> dict:
    """Config overrides from the environment, e.g. DGX_EMU_GEMV_FP8="CVT=words,BLOCK_N=8": how a
    variant found by `gemv_bench.py --variants` is tried in a whole decode step without a code
    change. They apply to calls without an explicit config: the tile keys, CVT, SPLIT_K and
    PREQUANT to the GEMV path (M = 1, gathered experts; moe_decode's pair kernels take the tile
    keys and CVT), DOT_F16 to the 16-row dot."""
    return parse_overrides(os.environ.get(name, ""), name)


def parse_overrides(text: str, name: str = "overrides") -> dict:
    """Overrides from their "KEY=VALUE,..." text, as env_overrides reads them (`name` labels the errors)."""
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = (t.strip() for t in item.partition("="))
        if not sep or key not in CONFIG_KEYS or key == "gemv":
            raise ValueError(f"{name}: items must be KEY=VALUE with KEY one of {CONFIG_KEYS[:2] + CONFIG_KEYS[2:4]} "
                             f"or {CONFIG_KEYS[5:]}, got {item!r}")
        try:
            overrides[key] = value if key == "CVT" else bool(int(value)) if key in FLAGS \
                else int(value)
        except ValueError:
            raise ValueError(f"{name}: {key} takes an integer, got {value!r}") from None
    return overrides


ENV_OVERRIDES = {FP8: env_overrides("DGX_EMU_GEMV_FP8"), torch.bfloat16: env_overrides("DGX_EMU_GEMV_BF16")}


def defaults(dtype: torch.dtype, gemv: bool) -> dict:
    """The environment's overrides (ENV_OVERRIDES) that apply to a call on `dtype` weights."""
    return {k: v for k, v in ENV_OVERRIDES.get(dtype, {}).items() if (k in GEMV_ONLY) == gemv}


def _check(x, weight, expert_ids, row_scale, weight_scale, act_quant, swiglu, out_dtype):
    """Refuses what the kernels do not take, naming the argument. Returns (M, N, out dtype, gather)."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_M or x.shape[1] < 1:
        raise ValueError(f"linear_small_m: x must be (M, K) with 1 <= M <= {MAX_M}, got {tuple(x.shape)}")
    m, k = x.shape
    if x.dtype not in HIGH or (x.stride(1) != 1 and k > 1):
        raise ValueError(f"linear_small_m: x must be float32/bfloat16/float16 with unit stride along K, "
                         f"got {x.dtype} with strides {x.stride()}")
    if weight.dim() not in (2, 3) or weight.shape[-1] != k or weight.shape[-2] < 1:
        raise ValueError(f"linear_small_m: weight must be (N, K) or (E, N, K) with K = {k} (x's), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype not in HIGH + (FP8,):
        raise ValueError(f"linear_small_m: weight dtype must be float32/bfloat16/float16/float8_e4m3fn, "
                         f"got {weight.dtype}")
    gather, n = weight.dim() == 3, weight.shape[-2]
    if gather != (expert_ids is not None):
        raise ValueError("linear_small_m: a 3-D weight (E, N, K) needs expert_ids (M,) and a 2-D one takes none")
    if gather and (expert_ids.shape != (m,) or expert_ids.dtype not in (torch.int32, torch.int64)
                   or expert_ids.stride(0) != 1):
        raise ValueError(f"linear_small_m: expert_ids must be a unit-stride int32/int64 ({m},) tensor, "
                         f"got {expert_ids.dtype} {tuple(expert_ids.shape)}")
    if row_scale is not None and (row_scale.shape != (m,) or not row_scale.is_floating_point()
                                  or row_scale.stride(0) != 1):
        raise ValueError(f"linear_small_m: row_scale must be a unit-stride float ({m},) tensor, got "
                         f"{row_scale.dtype} {tuple(row_scale.shape)}")
    if swiglu and n % 2:
        raise ValueError(f"linear_small_m: swiglu needs an even N (gate | up), got N = {n}")
    if weight.dtype == FP8:
        if (weight_scale is None or weight_scale.dtype != torch.float32 or weight_scale.shape != weight.shape[:-1]
                or weight_scale.stride(-1) != 1):
            got = None if weight_scale is None else f"{weight_scale.dtype} {tuple(weight_scale.shape)}"
            raise ValueError(f"linear_small_m: FP8 weights need a float32 weight_scale of shape "
                             f"{tuple(weight.shape[:-1])} with unit stride along N, got {got}")
        static = isinstance(act_quant, torch.Tensor)
        if not (act_quant == "token" if isinstance(act_quant, str) else static) or static and (
                act_quant.dtype != torch.float32 or act_quant.numel() != 1
                and not (gather and act_quant.shape == weight.shape[:1])):
            raise ValueError(f"linear_small_m: FP8 weights need act_quant 'token' or a float32 scalar tensor "
                             f"(or (E,) per expert), got {act_quant!r:.80}")
    elif weight_scale is not None or act_quant is not None:
        raise ValueError(f"linear_small_m: weight_scale / act_quant go with FP8 weights only, weight is {weight.dtype}")
    out_dtype = out_dtype or x.dtype
    if out_dtype not in HIGH:
        raise ValueError(f"linear_small_m: out_dtype must be float32/bfloat16/float16, got {out_dtype}")
    others = (weight, expert_ids, row_scale, weight_scale, act_quant if isinstance(act_quant, torch.Tensor) else None)
    if any(t is not None and t.device != x.device for t in others):
        raise ValueError(f"linear_small_m: every tensor must be on x's device {x.device}")
    return m, n, out_dtype, gather


def _check_x_fp8(x, x_fp8, weight, row_scale, act_quant) -> None:
    """Refuses an x_fp8 that does not stand for x quantized per row (see linear_small_m)."""
    if x_fp8 is None:
        return
    static = isinstance(act_quant, torch.Tensor) and act_quant.numel() == 1
    token = isinstance(act_quant, str) and act_quant == "token"
    if weight.dtype != FP8 or not (static or token) or row_scale is not None:
        raise ValueError("linear_small_m: x_fp8 (x quantized by its producer) goes with FP8 weights, act_quant "
                         "'token' or one static scale, and no row_scale")
    x_q, scales = x_fp8
    if (x_q.dtype != FP8 or x_q.shape != x.shape or not x_q.is_contiguous() or scales.dtype != torch.float32
            or scales.shape != x.shape[:1] or x_q.device != x.device or scales.device != x.device):
        raise ValueError(f"linear_small_m: x_fp8 must be (contiguous float8_e4m3fn {tuple(x.shape)}, float32 "
                         f"({x.shape[0]},)) on {x.device}, got ({x_q.dtype} {tuple(x_q.shape)}, {scales.dtype} "
                         f"{tuple(scales.shape)})")


def _dot_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype, f16: bool = False):
    """tl.dot operand type that holds both operands exactly (the interpreter computes in float32).
    FP8 weights: bf16 (default), or fp16 with `f16` (e4m3 -> fp16 is one packed cvt on Hopper; e4m3
    values and their float32 products are exact in both)."""
    if INTERPRETED:
        return tl.float32
    if w_dtype == FP8:
        return tl.float16 if f16 else tl.bfloat16
    if x_dtype == w_dtype != torch.float32:
        return tl.bfloat16 if x_dtype == torch.bfloat16 else tl.float16
    return tl.float32  # float32 or mixed operands: IEEE float32 products (input_precision="ieee")


def _alloc_out(m: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty((m, n), dtype=dtype, device=device)  # tests poison it (NaN) to see every element written




_counters = ArrivalCounters("linear_small_m (split-K)", 4096)  # per device; see triton_support.ArrivalCounters
_COUNTERS = _counters.by_device


def _variant(cfg: dict, weight: torch.Tensor, k: int, gemv: bool) -> tuple[int, int]:
    """(CVT mode, SPLIT_K) of a config, refused where they do not apply."""
    cvt = cfg.get("CVT", "cvt")
    cvt = CVT_MODES.get(cvt, cvt) if isinstance(cvt, str) else cvt
    split_k = int(cfg.get("SPLIT_K", 1))
    if cvt not in CVT_MODES.values():
        raise ValueError(f"linear_small_m: CVT must be one of {sorted(CVT_MODES)}, got {cfg.get('CVT')!r}")
    if cvt and (weight.dtype != FP8 or not gemv):
        raise ValueError("linear_small_m: CVT 'bits' / 'words' convert FP8 weights in the GEMV path only")
    if cvt == 2 and (k % 4 or weight.stride(-1) != 1 or any(st % 4 for st in weight.stride()[:-1])
                     or weight.storage_offset() % 4):
        raise ValueError(f"linear_small_m: CVT 'words' reads int32 words of a K-contiguous weight with K % 4 == 0, "
                         f"got K = {k}, strides {weight.stride()}")
    if split_k < 1 or split_k > 1 and not gemv:
        raise ValueError(f"linear_small_m: SPLIT_K must be >= 1, and > 1 only in the GEMV path, got {split_k}")
    return cvt, split_k


def linear_small_m(x: torch.Tensor, weight: torch.Tensor, *, expert_ids: torch.Tensor | None = None,
                   row_scale: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None,
                   act_quant: str | torch.Tensor | None = None, swiglu: bool = False,
                   out_dtype: torch.dtype | None = None, config: dict | None = None,
                   x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(M, N) = x @ W.T, or (M, N/2) = silu(gate) * up with swiglu, in out_dtype (default x's).

    x: (M, K), M <= 16, float32/bf16/fp16, unit stride along K. weight: (N, K), or (E, N, K) with
    expert_ids (M,) int (row m uses weight[expert_ids[m]]; ids must lie in [0, E): not checked, that
    would sync), any strides; float32/bf16/fp16, or float8_e4m3fn with weight_scale (N,) / (E, N)
    float32 and act_quant "token" (dynamic per row) or a float32 scalar tensor ((E,) per expert
    allowed). row_scale: (M,), x row m times row_scale[m] rounded to x's dtype first.
    config: overrides of `gemv_tiles.tiles`' BLOCK_N / BLOCK_K / num_warps / num_stages; "gemv": True to
    run dense M > 1 as per-row GEMV programs; GEMV variants (benchmarks/gemv_bench.py --variants):
    "CVT" ("cvt", "bits", "words": how FP8 weights become float32, gemv_math.py) and "SPLIT_K"
    (K cut in that many programs per output tile, reduced in a fixed order by the last to finish);
    "PREQUANT": True to quantize an FP8 GEMV's activation in a pre-pass kernel (as the 16-row dot
    always does) rather than in every program; "DOT_F16": True to run the FP8 16-row tl.dot on
    fp16 operands (default bf16).
    x_fp8: (x_q (M, K) float8_e4m3fn, scales (M,) float32), x as its producer already quantized it (no
    row_scale): with act_quant "token" what quantize_rows(x) gives, with a static scale s quantize_fp8(x, s)
    and every scale s; e.g. the fused add + RMSNorm's second output. The kernels read it instead of
    quantizing x in every program or in a pre-pass."""
    m, n, out_dtype, gather = _check(x, weight, expert_ids, row_scale, weight_scale, act_quant, swiglu, out_dtype)
    _check_x_fp8(x, x_fp8, weight, row_scale, act_quant)
    if not available(x):
        raise ValueError(f"linear_small_m: needs Triton and a CUDA tensor (or TRITON_INTERPRET=1), got {x.device}")
    unknown = set(config or {}) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(f"linear_small_m: unknown config keys {sorted(unknown)}; known: {CONFIG_KEYS}")
    k, n_out = x.shape[1], n // 2 if swiglu else n
    layout = "n" if weight.stride(-2) == 1 and weight.stride(-1) != 1 else "k"
    asked = ENV_OVERRIDES.get(weight.dtype, {}) if config is None else config
    by_default = config is None and layout == "k" and mma_default(m, n, k)  # an explicit config says MMA itself
    if weight.dtype == FP8 and not gather and asked.get("MMA", by_default):
        cfg = {**fp8_mma.default_config(m, n_out, k, swiglu), **{key: v for key, v in asked.items() if key in MMA_KEYS}}
        out = _alloc_out(m, n_out, out_dtype, x.device)  # (M, N_out)
        return fp8_mma.linear_on_tensor_cores(x, weight, row_scale, weight_scale, act_quant, swiglu, out, layout,
                                              cfg, _counters, x_fp8)
    gemv = gather or bool((config or {}).get("gemv", m == 1))  # dense M > 1 may be put on the GEMV (sweeps)
    dense_row = m == 1 and layout == "k" and not (gather or swiglu)
    tuned = (TUNED_FP8_GEMV if weight.dtype == FP8 else TUNED_BF16_GEMV if weight.dtype == torch.bfloat16
             else {}).get((n_out, k), {}) if dense_row else {}
    cfg = {**gemv_tiles.tiles(m, n_out, k, layout, weight.dtype, gemv, swiglu), **tuned,
           **(defaults(weight.dtype, gemv) if config is None else config)}
    if cfg.pop("MMA", False):
        raise ValueError("linear_small_m: MMA (FP8 on the tensor cores) takes dense FP8 weights, not experts")
    cvt, split_k = _variant(cfg, weight, k, gemv)
    out = _alloc_out(m, n_out, out_dtype, x.device)  # (M, N_out)
    quant = 0 if weight.dtype != FP8 else 2 if isinstance(act_quant, str) else 1
    rs = x if row_scale is None else row_scale  # unused pointers get x (never read)
    xs, ws = (act_quant if quant == 1 else x), (weight_scale if quant else x)
    flags = dict(ROW_SCALE=row_scale is not None, QUANT=quant, SWIGLU=swiglu, BLOCK_N=cfg["BLOCK_N"],
                 BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_kwargs(x))
    tiles = triton.cdiv(n_out, cfg["BLOCK_N"])
    prequant = quant and (not gemv or cfg.get("PREQUANT", False) or x_fp8 is not None)
    per_expert_xs = quant == 1 and act_quant.numel() > 1  # (E,) static scales
    if prequant:  # FP8: x quantized once (row scale applied), by its producer or a pre-pass, not in every program
        if per_expert_xs:
            raise ValueError("linear_small_m: PREQUANT takes one static scale or 'token', not per-expert scales")
        x, xs = x_fp8 if x_fp8 is not None else fp8_mma.prequantize(x, row_scale, act_quant)
        flags["ROW_SCALE"] = False
        if gemv:
            flags["QUANT"] = 3
    if gemv:
        split_k = min(split_k, triton.cdiv(k, cfg["BLOCK_K"]))  # no split without a chunk of K
        k_span = triton.cdiv(triton.cdiv(k, split_k), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
        part = x if split_k == 1 else torch.empty((split_k, m, 2 * n_out), dtype=torch.float32, device=x.device)
        count = x if split_k == 1 else _counters(x.device, m * tiles)
        words = 4 if cvt == 2 else 1  # CVT 'words': the weight as int32 words, its strides in words
        w = weight.view(torch.int32) if cvt == 2 else weight
        _gemv_kernel[(m * tiles, split_k)](
            x, w, expert_ids if gather else x, rs, xs, ws, out, part, count, m, n_out,
            x.stride(0), weight.stride(0) // words if gather else 0, weight.stride(-2) // words,
            1 if cvt == 2 else weight.stride(-1), act_quant.stride(0) if per_expert_xs else 0,
            1 if prequant else 0, weight_scale.stride(0) if quant and gather else 0, out.stride(0), K=k,
            GATHER=gather, CVT=cvt, SPLIT_K=split_k, K_SPAN=k_span, **flags)
    else:
        dot_dtype = _dot_dtype(x.dtype, weight.dtype, bool(cfg.get("DOT_F16", False)))
        _dot_kernel[(tiles,)](
            x, weight, rs, xs, ws, out, m, n_out, x.stride(0), weight.stride(-2), weight.stride(-1),
            out.stride(0), K=k, DOT_DTYPE=dot_dtype, BLOCK_M=MAX_M, **flags)
    return out


def reference_linear_small_m(x: torch.Tensor, weight: torch.Tensor, *, expert_ids: torch.Tensor | None = None,
                             row_scale: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None,
                             act_quant: str | torch.Tensor | None = None, swiglu: bool = False,
                             out_dtype: torch.dtype | None = None,
                             x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`linear_small_m` in plain torch, as the model computes it: ffn.py's expert input
    `x * score` in x's dtype; model/fp8.py's torch quantize_activation ("token" / "static") and
    emulated_gemm `(q_x @ q_w.T) * x_scale * w_scale` in float32 (x_fp8: those q_x and scales as
    given); y = x.float() @ W.float().T for high precision; SwiGLU on the float32 result, one
    rounding to out_dtype at the end."""
    m, n, out_dtype, gather = _check(x, weight, expert_ids, row_scale, weight_scale, act_quant, swiglu, out_dtype)
    _check_x_fp8(x, x_fp8, weight, row_scale, act_quant)
    if row_scale is not None:
        x = x * row_scale[:, None].to(x.dtype)  # (M, K): the routed expert's input scaled by its score
    if weight.dtype == FP8:
        if x_fp8 is not None:  # quantized by its producer
            x, x_scale = x_fp8[0], x_fp8[1][:, None]
        elif isinstance(act_quant, str):  # dynamic per token
            x, x_scale = quantize_rows_fp8(x)  # scales (M, 1)
        else:
            x_scale = act_quant[expert_ids][:, None] if act_quant.numel() > 1 else act_quant.reshape(())
            x = quantize_fp8(x, x_scale)
    if gather:
        y = (weight[expert_ids].float() @ x.float()[:, :, None])[..., 0]  # (M, N, K) @ (M, K, 1) -> (M, N)
    else:
        y = x.float() @ weight.float().T  # (M, N)
    if weight.dtype == FP8:
        y = y * x_scale * (weight_scale[expert_ids] if gather else weight_scale)
    if swiglu:
        gate, up = y.chunk(2, dim=-1)  # (M, N/2) each
        y = F.silu(gate) * up
    return y.to(out_dtype)
