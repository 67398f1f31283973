"""The per-tile math of the decode GEMVs (Triton @jit helpers), shared by linear_small_m.py's
kernels and moe_decode.py's: one program computes f(x_row @ W[tile].T) for a tile of output rows.

Why a module of its own: the GEMV, the MoE pair kernel and the split-K variant all stream a weight
tile against one activation row; the math (FP8 activation quantization, float32 sums, scales,
SwiGLU) must be the same bits everywhere, so it is written once.

FP8 weights -> float32, three ways (the `CVT` constexpr; benchmarks/gemv_bench.py --variants
times them). On Hopper the GEMV is bound by conversions, not bytes, when every e4m3 byte takes
`cvt.rn.f16x2.e4m3x2` and then `cvt.f32.f16`, both on the 16-per-clock conversion pipe (~2.8 TB/s
of weights at most on an H200; measured: 21-71% of copy bandwidth).
  CVT 0 "cvt":   w.to(float32), Triton's conversion (the two cvt instructions).
  CVT 1 "bits":  integer ops on each byte: float32 bits = sign << 31 | (byte & 0x7F) << 20, which
                 IS the value q_w * 2^-120 (e4m3's subnormals land on float32 subnormals, exactly);
                 x is quantized and scaled by 2^119 (448 * 2^119 < float32 max), so each product is
                 q_w * q_x / 2 exactly and the sums are half the CVT 0 sums (same roundings: a power
                 of two); the epilogue doubles them. Same bits as CVT 0 (no FTZ: Triton emits
                 mul/fma.f32 without .ftz, and FFMA takes subnormal inputs at full rate).
  CVT 2 "words": the same on int32 words of four e4m3 bytes (the weight passed as its int32 view,
                 K % 4 == 0): byte j of a word shifts to the top, sign and magnitude are masked in
                 place, and the four products meet x[4i + j] loaded with a stride of 4; about three
                 integer ops per byte instead of five. Sums in another order than CVT 0 (4 lanes per
                 word), so the last bits may differ.
"""
from __future__ import annotations

from collectives.triton_support import tl, triton

# Measured and dropped (session 13, cc20476, one H200): summing each K chunk's products into per-row sums at once,
# instead of the per-lane (BLOCK_N, BLOCK_K) sums reduced at the end that hold 64 of the one-row FP8 GEMV's ~120
# registers (ncu: 4 programs an SM). Fewer registers, but a block-wide reduction per chunk: medium decode FP8
# 322.9 / 322.8 vs 302.7 / 302.5 us, BF16 337.9 / 337.8 vs 323.3 / 323.3; the chain FP8 207.2 vs 188.1
# (h200-ab-*-sums{0,1}-*cc20476*.json).
CVT_MODES = {"cvt": 0, "bits": 1, "words": 2}

if triton is not None:
    # the norm kernel quantizes rows for these GEMVs (x_fp8): one definition of the FP8 activation quantization
    from collectives.fused_norm import dynamic_scale, quantize_e4m3 as quantize  # noqa: F401
    TWO_119 = tl.constexpr(2.0 ** 119)

    @triton.jit
    def load_x(ptrs, mask, rs, ROW_SCALE: tl.constexpr):
        """x as float32; with ROW_SCALE, x * score rounded to x's dtype first (ffn.py's torch op)."""
        x = tl.load(ptrs, mask=mask, other=0.0)
        if ROW_SCALE:
            x = (x.to(tl.float32) * rs).to(x.dtype)  # product of two x-dtype values: one rounding
        return x.to(tl.float32)

    @triton.jit
    def x_scale(x_row, xs_ptr, rs, K: tl.constexpr, ROW_SCALE: tl.constexpr, QUANT: tl.constexpr,
                BLOCK_K: tl.constexpr):
        """(scale, divisor) of one row's FP8 activation. QUANT 1: the static scale at xs_ptr; 2: max(amax,
        1e-12) * float32(1/448), model/fp8.py's dynamic scale (the amax loop unrolled, so its K / BLOCK_K loads
        from L2 overlap rather than follow one another after the PDL wait); 3: x is e4m3 already, its scale at
        xs_ptr. An all-zero row divides by 1 (dynamic_scale; inferred: zero padding rows made an earlier dot
        kernel slower at M = 4 than at M = 16)."""
        if QUANT == 1:
            xs = tl.load(xs_ptr)
            div = xs
        elif QUANT == 3:  # x arrives quantized (a pre-pass kernel), with its scale at xs_ptr
            xs = tl.load(xs_ptr)
            div = 1.0
        else:
            amax = tl.zeros((BLOCK_K,), tl.float32)
            for k0 in tl.static_range(0, K, BLOCK_K):  # unrolled: the row's loads all in flight at once
                ks = k0 + tl.arange(0, BLOCK_K)
                amax = tl.maximum(amax, tl.abs(load_x(x_row + ks, ks < K, rs, ROW_SCALE)))
            xs, div = dynamic_scale(tl.max(amax, axis=0))
        return xs, div

    @triton.jit
    def epilogue(g, u, xs, ws_g, ws_u, QUANT: tl.constexpr, SWIGLU: tl.constexpr):
        """float32 sums -> output values: FP8 scales ((sum * x_scale) * w_scale), then SwiGLU."""
        if QUANT:
            g = g * xs * ws_g
            if SWIGLU:
                u = u * xs * ws_u
        if SWIGLU:
            g = g / (1.0 + tl.exp(-g)) * u  # silu(gate) * up, float32
        return g

    @triton.jit
    def load_w(w_gate, w_up, ks, mask, stride_wk, SWIGLU: tl.constexpr):
        """One K chunk of the weight tile(s) as stored: (BLOCK_N, BLOCK_K) gate rows (and up rows).
        ks: element offsets along K (word offsets for CVT 2)."""
        w_g = tl.load(w_gate + ks[None, :] * stride_wk, mask=mask, other=0.0)
        w_u = w_g
        if SWIGLU:
            w_u = tl.load(w_up + ks[None, :] * stride_wk, mask=mask, other=0.0)
        return w_g, w_u

    @triton.jit
    def _e4m3_bits(b):
        """uint32 holding an e4m3 byte in bits 0..7 -> float32 of value e4m3 * 2^-120 (exact)."""
        return (((b & 0x80) << 24) | ((b & 0x7F) << 20)).to(tl.float32, bitcast=True)

    @triton.jit
    def _e4m3_top(t):
        """uint32 with an e4m3 byte in bits 24..31 -> float32 of value e4m3 * 2^-120 (exact)."""
        return (((t >> 31) << 31) | ((t >> 4) & 0x07F00000)).to(tl.float32, bitcast=True)

    @triton.jit
    def _quantized_x(x_row, ks, k_ok, rs, div, ROW_SCALE: tl.constexpr, QUANT: tl.constexpr, CVT: tl.constexpr):
        """The activation chunk as the products want it: x, or its e4m3 value (times 2^119 for CVT 1/2)."""
        x = load_x(x_row + ks, k_ok, rs, ROW_SCALE)
        if QUANT:
            if QUANT != 3:
                x = quantize(x, div)
            if CVT > 0:
                x = x * TWO_119
        return x

    @triton.jit
    def fma_chunk(acc_g, acc_u, w_g, w_u, x_row, k0, rs, div, K: tl.constexpr, ROW_SCALE: tl.constexpr,
                  QUANT: tl.constexpr, SWIGLU: tl.constexpr, CVT: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc += W chunk * x chunk [k0, k0 + BLOCK_K) (x broadcast over the tile's rows), float32."""
        if CVT == 2:  # w_g, w_u: (BLOCK_N, BLOCK_K / 4) words; x[4i + j] meets byte j of word i
            lanes = k0 + 4 * tl.arange(0, BLOCK_K // 4)
            words_g, words_u = w_g.to(tl.uint32, bitcast=True), w_u.to(tl.uint32, bitcast=True)
            for j in tl.static_range(4):
                x = _quantized_x(x_row, lanes + j, lanes + j < K, rs, div, ROW_SCALE, QUANT, CVT)
                acc_g += _e4m3_top(words_g << (24 - 8 * j)) * x[None, :]
                if SWIGLU:
                    acc_u += _e4m3_top(words_u << (24 - 8 * j)) * x[None, :]
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            x = _quantized_x(x_row, ks, ks < K, rs, div, ROW_SCALE, QUANT, CVT)
            if CVT == 1:
                acc_g += _e4m3_bits(w_g.to(tl.uint8, bitcast=True).to(tl.uint32)) * x[None, :]
                if SWIGLU:
                    acc_u += _e4m3_bits(w_u.to(tl.uint8, bitcast=True).to(tl.uint32)) * x[None, :]
            else:
                acc_g += w_g.to(tl.float32) * x[None, :]
                if SWIGLU:
                    acc_u += w_u.to(tl.float32) * x[None, :]
        return acc_g, acc_u

    @triton.jit
    def gemv_sums(x_row, rs, xs_ptr, w_gate, w_up, w_g, w_u, col_ok, stride_wk, k_lo,
                  K: tl.constexpr, K_SPAN: tl.constexpr, ROW_SCALE: tl.constexpr, QUANT: tl.constexpr,
                  SWIGLU: tl.constexpr, CVT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Float32 sums over K in [k_lo, k_lo + K_SPAN) of one (row, n tile), and the row's x scale;
        the chunk at k_lo (w_g, w_u) is already loaded. For CVT 1/2 the sums are halved (see above)."""
        xs, div = 1.0, 1.0
        if QUANT:
            xs, div = x_scale(x_row, xs_ptr, rs, K, ROW_SCALE, QUANT, BLOCK_K)
        WIDTH: tl.constexpr = BLOCK_K // 4 if CVT == 2 else BLOCK_K
        acc_g = tl.zeros((BLOCK_N, WIDTH), tl.float32)  # per-lane partial sums, reduced once at the end
        acc_u = tl.zeros((BLOCK_N, WIDTH), tl.float32)
        acc_g, acc_u = fma_chunk(acc_g, acc_u, w_g, w_u, x_row, k_lo, rs, div, K, ROW_SCALE, QUANT, SWIGLU, CVT,
                                 BLOCK_K)
        for k0 in range(BLOCK_K, K_SPAN, BLOCK_K):
            w_g, w_u = first_chunk(w_gate, w_up, col_ok, stride_wk, k_lo + k0, K, SWIGLU, CVT, BLOCK_K)
            acc_g, acc_u = fma_chunk(acc_g, acc_u, w_g, w_u, x_row, k_lo + k0, rs, div, K, ROW_SCALE, QUANT, SWIGLU,
                                     CVT, BLOCK_K)
        return tl.sum(acc_g, axis=1), tl.sum(acc_u, axis=1), xs

    @triton.jit
    def finish(g, u, xs, ws_ptr, cols, col_ok, N_OUT, QUANT: tl.constexpr, SWIGLU: tl.constexpr,
               CVT: tl.constexpr):
        """Sums -> outputs: undo the CVT 1/2 halving (exact), FP8 scales (ws_ptr: this weight's
        per-row scales, gate then up), SwiGLU."""
        if QUANT and CVT > 0:
            g, u = g * 2.0, u * 2.0
        ws_g, ws_u = 1.0, 1.0
        if QUANT:
            ws_g = tl.load(ws_ptr + cols, mask=col_ok, other=0.0)
            if SWIGLU:
                ws_u = tl.load(ws_ptr + N_OUT + cols, mask=col_ok, other=0.0)
        return epilogue(g, u, xs, ws_g, ws_u, QUANT, SWIGLU)

    @triton.jit
    def first_chunk(w_gate, w_up, col_ok, stride_wk, k_lo, K: tl.constexpr, SWIGLU: tl.constexpr,
                    CVT: tl.constexpr, BLOCK_K: tl.constexpr):
        """The weight chunk at k_lo (words for CVT 2): what a PDL kernel loads before its wait, and
        every later chunk of the K loop."""
        if CVT == 2:
            offs = k_lo // 4 + tl.arange(0, BLOCK_K // 4)
            return load_w(w_gate, w_up, offs, col_ok[:, None] & (offs < K // 4)[None, :], stride_wk, SWIGLU)
        else:
            offs = k_lo + tl.arange(0, BLOCK_K)
            return load_w(w_gate, w_up, offs, col_ok[:, None] & (offs < K)[None, :], stride_wk, SWIGLU)

    @triton.jit
    def gemv_tile(x_row, rs, xs_ptr, ws_ptr, w_gate, w_up, w_g, w_u, cols, col_ok, N_OUT, stride_wk,
                  K: tl.constexpr, ROW_SCALE: tl.constexpr, QUANT: tl.constexpr, SWIGLU: tl.constexpr,
                  CVT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """f(x_row @ W[tile].T) in float32 over all of K, the first chunk (w_g, w_u) already loaded."""
        g, u, xs = gemv_sums(x_row, rs, xs_ptr, w_gate, w_up, w_g, w_u, col_ok, stride_wk, 0, K, K, ROW_SCALE,
                             QUANT, SWIGLU, CVT, BLOCK_N, BLOCK_K)
        return finish(g, u, xs, ws_ptr, cols, col_ok, N_OUT, QUANT, SWIGLU, CVT)
