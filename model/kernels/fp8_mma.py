"""FP8 weights x FP8 activations on the tensor cores at decode token counts (M = 1..16), Triton.

Why: the CUDA-core GEMV (linear_small_m.py) converts every e4m3 weight byte before it can multiply
it, and on Hopper those conversions, not HBM, bound it: 21-71% of copy bandwidth, so an FP8 step
was no faster than a BF16 one. The tensor cores multiply e4m3 by e4m3 natively (Hopper's wgmma,
Ada's mma.sync k32), so nothing is converted. At M <= 16 the operands are swapped ("swap AB", as
TensorRT-LLM's small-M FP8 GEMMs do): the weight tile (BLOCK_N output rows x BLOCK_K) is the
dot's M side, and the 1..16 activation rows, zero-padded to 16, are its N side (wgmma m64n16k32
on Hopper). The weight is read once for every row. BLOCK_N must be a multiple of 64 for that:
with narrower tiles Triton falls back to mma.sync and converts the e4m3 operands to fp16 on sm90
(tests/sm90_compile.py counts the wgmma and cvt instructions in the PTX).

x arrives quantized (`prequantize`, a one-program-per-row pre-pass that linear_small_m's FP8 paths
share: e4m3 rows and one float32 scale per row, bit-identical to model/fp8.py). Each program owns
BLOCK_N output columns and a span of K; with SPLIT_K > 1 the last of a tile's programs to finish
(an arrival counter) adds the splits' float32 partials in split order, so sums are deterministic.
Hopper's FP8 tensor-core sums keep ~14 mantissa bits inside the instruction chain (DeepSeek-V3 §3.3;
on an H200 here a single k32 instruction is already 1.6e-4 of the largest output off), so the chain
is cut every PROMOTE_K products: summed into a zeroed partial tile and added to the float32
accumulator (Triton's max_num_imprecise_acc, explicit so that no fold of `acc += dot` into the dot
can lengthen the chain; the reference is model/fp8.py's float32 emulated_gemm; tests compare within
a tolerance, not bits).
Epilogue as linear_small_m's: (sum * x_scale) * w_scale, then SwiGLU (gate | up, N/2 apart).
"""
from __future__ import annotations

import torch

from collectives.triton_support import pdl_kwargs, tl, triton

ROWS = 16  # activation rows of every dot (M <= 16, zero-padded)
PROMOTE_K = 128  # FP8 products summed inside the tensor core before a float32 add (DeepSeek-V3's interval)
FP8 = torch.float8_e4m3fn
ONE_PASS_MAX_K = 16384  # rows the quantization pre-pass loads whole (32 values a thread at 16 warps)

if triton is not None:
    from collectives.triton_support import pdl_launch_dependents, pdl_wait
    from model.kernels import gemv_math as gm
    ROWS_C = tl.constexpr(ROWS)  # a kernel reads globals only as constexprs

    @triton.jit
    def _quantize_kernel(x_ptr, rs_ptr, xs_ptr, q_ptr, scale_ptr, stride_xm, K: tl.constexpr,
                         ROW_SCALE: tl.constexpr, QUANT: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """Program (row): the row's FP8 activation and scale, as the GEMV prologue derives them, stored
        once for the 16-row tl.dot kernel: there every program would redo 16 rows of IEEE divisions."""
        pdl_wait(PDL)
        pdl_launch_dependents(PDL)
        row = tl.program_id(0)
        x_row = x_ptr + row * stride_xm
        rs = 1.0
        if ROW_SCALE:
            rs = tl.load(rs_ptr + row).to(x_ptr.dtype.element_ty).to(tl.float32)
        if BLOCK_K >= K:  # the whole row in registers: one load, its amax, its quantization (no reload)
            ks = tl.arange(0, BLOCK_K)
            x = gm.load_x(x_row + ks, ks < K, rs, ROW_SCALE)
            if QUANT == 2:
                xs, div = gm.dynamic_scale(tl.max(tl.abs(x), axis=0))
            else:
                xs, div = gm.x_scale(x_row, xs_ptr, rs, K, ROW_SCALE, QUANT, BLOCK_K)
            tl.store(q_ptr + row * K + ks, gm.quantize(x, div).to(tl.float8e4nv), mask=ks < K)
        else:
            xs, div = gm.x_scale(x_row, xs_ptr, rs, K, ROW_SCALE, QUANT, BLOCK_K)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                q = gm.quantize(gm.load_x(x_row + ks, ks < K, rs, ROW_SCALE), div)
                tl.store(q_ptr + row * K + ks, q.to(tl.float8e4nv), mask=ks < K)
        tl.store(scale_ptr + row, xs)

    @triton.jit
    def _span_sums(w_rows, xq_cols, col_ok, row_ok, k_lo, K: tl.constexpr, K_SPAN: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PROMOTE_K: tl.constexpr):
        """(BLOCK_N, ROWS_C) float32: W[tile, k_lo : k_lo + K_SPAN] @ x_q[:, same]^T, one dot per chunk."""
        acc = tl.zeros((BLOCK_N, ROWS_C), tl.float32)
        for k0 in range(0, K_SPAN, BLOCK_K):
            ks = k_lo + k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            k_ok = ks < K
            w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
            x = tl.load(xq_cols + ks[:, None], mask=k_ok[:, None] & row_ok[None, :], other=0.0)  # (BLOCK_K, ROWS_C)
            # sm90's default is 2**30 imprecise products: every PROMOTE_K of them go to a zeroed partial
            # tile, added to acc in float32 (CUTLASS / DeepGEMM's "promotion")
            acc = tl.dot(w, x, acc, out_dtype=tl.float32, max_num_imprecise_acc=PROMOTE_K)
        return acc

    @triton.jit
    def _fp8_mma_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, part_ptr, count_ptr, M, N_OUT, stride_wn,
                        stride_om, K: tl.constexpr, SWIGLU: tl.constexpr, SPLIT_K: tl.constexpr,
                        K_SPAN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PROMOTE_K: tl.constexpr,
                        PDL: tl.constexpr):
        """Program (n tile, K split): out[:M, tile] = f(x_q @ W[tile].T * scales) over K in
        [split * K_SPAN, + K_SPAN). x_q: (M, K) e4m3 contiguous, xs: (M,) float32; W: (N, K) e4m3
        K-contiguous, ws: (N,) float32. part: (SPLIT_K, 2, ROWS_C, N_OUT) float32 scratch; count: one
        int32 per tile, zero between calls."""
        tile, split = tl.program_id(0), tl.program_id(1)
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output columns
        col_ok = cols < N_OUT
        rows = tl.arange(0, ROWS_C)  # (ROWS_C,) activation rows
        row_ok = rows < M
        w_gate = w_ptr + cols.to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1)
        xq_cols = xq_ptr + rows[None, :] * K  # (1, ROWS_C): x_q^T as the dot's right operand
        k_lo = split * K_SPAN
        pdl_wait(PDL)  # x_q comes from the pre-pass just before
        pdl_launch_dependents(PDL)
        g = _span_sums(w_gate, xq_cols, col_ok, row_ok, k_lo, K, K_SPAN, BLOCK_N, BLOCK_K, PROMOTE_K)
        u = g
        if SWIGLU:
            u = _span_sums(w_gate + N_OUT * stride_wn, xq_cols, col_ok, row_ok, k_lo, K, K_SPAN, BLOCK_N, BLOCK_K,
                           PROMOTE_K)
        ok = col_ok[:, None] & row_ok[None, :]  # (BLOCK_N, ROWS_C)
        if SPLIT_K > 1:
            slot = part_ptr + split * (2 * ROWS_C * N_OUT) + rows[None, :] * N_OUT + cols[:, None]  # (BLOCK_N, ROWS_C)
            tl.store(slot, g, mask=ok)
            if SWIGLU:
                tl.store(slot + ROWS_C * N_OUT, u, mask=ok)
            tl.debug_barrier()  # every thread's partial stored before the (release) count
            last = tl.atomic_add(count_ptr + tile, 1) == SPLIT_K - 1
            if last:
                g = tl.zeros((BLOCK_N, ROWS_C), tl.float32)
                u = tl.zeros((BLOCK_N, ROWS_C), tl.float32)
                for s in tl.static_range(SPLIT_K):  # split order: the same sum on every run
                    base = part_ptr + s * (2 * ROWS_C * N_OUT) + rows[None, :] * N_OUT + cols[:, None]
                    g += tl.load(base, mask=ok, other=0.0, cache_modifier=".cg")  # L2: other SMs wrote it
                    if SWIGLU:
                        u += tl.load(base + ROWS_C * N_OUT, mask=ok, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(count_ptr + tile, 0)
                _store(g, u, xs_ptr, ws_ptr, out_ptr, rows, cols, row_ok, col_ok, N_OUT, stride_om, SWIGLU)
        else:
            _store(g, u, xs_ptr, ws_ptr, out_ptr, rows, cols, row_ok, col_ok, N_OUT, stride_om, SWIGLU)

    @triton.jit
    def _store(g, u, xs_ptr, ws_ptr, out_ptr, rows, cols, row_ok, col_ok, N_OUT, stride_om, SWIGLU: tl.constexpr):
        """Sums (BLOCK_N, ROWS_C) -> out[rows, cols]: scales, SwiGLU, one rounding."""
        xs = tl.load(xs_ptr + rows, mask=row_ok, other=1.0)[None, :]  # (1, ROWS_C)
        ws_g = tl.load(ws_ptr + cols, mask=col_ok, other=0.0)[:, None]  # (BLOCK_N, 1)
        ws_u = ws_g
        if SWIGLU:
            ws_u = tl.load(ws_ptr + N_OUT + cols, mask=col_ok, other=0.0)[:, None]
        y = gm.epilogue(g, u, xs, ws_g, ws_u, 1, SWIGLU)
        out = out_ptr + rows[None, :] * stride_om + cols[:, None]  # (BLOCK_N, ROWS_C)
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=col_ok[:, None] & row_ok[None, :])


def default_config(m: int, n_out: int, k: int, swiglu: bool, sms: int = 132) -> dict:
    """Tiles for an (m, n_out, k) call: 64-row weight tiles (one wgmma), K split until there are
    about as many programs as SMs, 256-byte K chunks."""
    block_n, block_k = 64, 256
    tiles = -(-n_out // block_n)
    split_k = 1
    while tiles * split_k * 2 <= sms and k // (split_k * 2) >= block_k:
        split_k *= 2
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k, "num_warps": 4, "num_stages": 4}


def fp8_mma(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
            out: torch.Tensor, counters, *, swiglu: bool, config: dict, launch: dict) -> torch.Tensor:
    """out (M, N_out) = f(x_q @ weight.T scaled), the kernel launch itself: linear_small_m checks the
    arguments and quantizes x. x_q: (M, K) e4m3 contiguous; x_scale: (M,) float32; weight: (N, K)
    e4m3 with unit stride along K; weight_scale: (N,) float32; counters(device, n) gives zeroed int32
    arrival counters; launch: PDL keywords."""
    m, k = x_q.shape
    n_out = weight.shape[0] // 2 if swiglu else weight.shape[0]
    block_n, block_k = config["BLOCK_N"], config["BLOCK_K"]
    tiles = triton.cdiv(n_out, block_n)
    split_k = max(1, min(int(config.get("SPLIT_K", 1)), triton.cdiv(k, block_k)))
    k_span = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_span)  # no split without a chunk of K
    part = x_scale if split_k == 1 else torch.empty((split_k, 2, ROWS, n_out), dtype=torch.float32,
                                                      device=x_q.device)
    count = x_scale if split_k == 1 else counters(x_q.device, tiles)
    _fp8_mma_kernel[(tiles, split_k)](
        x_q, x_scale, weight, weight_scale, out, part, count, m, n_out, weight.stride(0), out.stride(0), K=k,
        SWIGLU=swiglu, SPLIT_K=split_k, K_SPAN=k_span, BLOCK_N=block_n, BLOCK_K=block_k,
        PROMOTE_K=min(block_k, PROMOTE_K),
        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 4), **launch)
    return out


def prequantize(x: torch.Tensor, row_scale: torch.Tensor | None, act_quant) -> tuple[torch.Tensor, torch.Tensor]:
    """x (row scale applied) as e4m3 (M, K) and its float32 scales (M,), one program per row. A row
    of up to ONE_PASS_MAX_K values is loaded once and quantized from registers (the H200 trace of
    the maverick-slice TP2 step at 4bacff0 shows the looping pre-pass taking ~5 us after its input
    was ready, for one 5120-wide row: three dependent 2048-wide loads, then three more)."""
    m, k = x.shape
    x_q = torch.empty((m, k), dtype=FP8, device=x.device)  # (M, K) scratch
    xs = torch.empty((m,), dtype=torch.float32, device=x.device)  # (M,) scratch
    static = isinstance(act_quant, torch.Tensor)
    block = triton.next_power_of_2(k)
    if block > ONE_PASS_MAX_K:  # longer rows: the amax pass, then the quantization pass, in 2048-wide steps
        block = 2048
    _quantize_kernel[(m,)](x, x if row_scale is None else row_scale, act_quant if static else x, x_q, xs,
                           x.stride(0), K=k, ROW_SCALE=row_scale is not None, QUANT=1 if static else 2,
                           BLOCK_K=block, num_warps=min(16, max(4, block // 1024)), **pdl_kwargs(x))
    return x_q, xs


def linear_on_tensor_cores(x, weight, row_scale, weight_scale, act_quant, swiglu, out, layout, cfg, counters,
                           x_fp8=None):
    """Dense FP8 on the tensor cores: the activation quantized by the pre-pass (or x_fp8, by its
    producer), then one swap-AB dot kernel into out (M, N_out), which linear_small_m allocates."""
    if layout != "k" or weight.stride(-1) != 1:
        raise ValueError(f"linear_small_m: MMA reads a K-contiguous FP8 weight, got strides {weight.stride()}")
    if isinstance(act_quant, torch.Tensor) and act_quant.numel() > 1:
        raise ValueError("linear_small_m: MMA takes one static scale or 'token', not per-expert scales")
    x_q, xs = x_fp8 if x_fp8 is not None else prequantize(x, row_scale, act_quant)
    return fp8_mma(x_q, xs, weight, weight_scale, out, counters, swiglu=swiglu, config=cfg, launch=pdl_kwargs(x))
