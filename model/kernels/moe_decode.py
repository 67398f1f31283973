"""The MoE sub-layer of a decode step in three launches (Triton): router, FC13 pair, FC2 pair.

Why: at batch 1 the torch MoE is a cuBLAS router GEMM, top-k, a float cast, a sigmoid, a cast back
(5 launches, ~12 us on an H200 where they read 64 KB), then the shared expert's two GEMVs, the
routed expert's two GEMVs and the add of the two: four weight streams of 8-16 MB each paying a
launch, ramp and tail of ~2-3 us. Here:

  route_top1       router GEMV + top-1 + sigmoid in one kernel: expert ids (M,) int32 and scores
                   (M,) in x's dtype stay on the device for the expert GEMVs (no host sync);
  dual_gate_up     the shared expert's FC13 + SwiGLU and the routed expert's (input scaled by
                   its score) as ONE launch: the first programs take the shared weight's tiles,
                   the rest the routed expert's;
  dual_down        shared FC2 + routed FC2 + their sum as ONE launch: each program streams both
                   weights' rows of its output tile, rounds each result to the output dtype as
                   the two modules would, and adds them (one more rounding, as torch's add).

Router math (model/ffn.py `MoE.route`, top_k = 1): logits = x @ W.T summed in float32 and rounded
to x's dtype (what the router Linear returns), the expert with the largest logit, its score
sigmoid(logit in float32) rounded to x's dtype. Ties go to the LOWEST expert id (torch.argmax's
documented rule; torch.topk documents none, and on the CPU picks the lowest too). Programs
(row, block of experts): with one block per row (medium: 16 experts x 2048 = 64 KB) a program
picks directly; with several (Maverick: 128 x 5120 bf16 = 1.3 MB, too much for one SM), each
program publishes (logit, id) packed into one int64 with an atomic max, and the last program of
the row (an atomic counter) unpacks the winner, writes it and resets the slot and counter for the
next call. That state is a small per-device buffer made at the first call (never inside a CUDA
graph capture: the capture's warm-up makes it); calls on one device must not run concurrently.

The expert GEMV math is linear_small_m's (gemv_math.py's `gemv_tile`: in-kernel FP8 activation quantization,
float32 sums, SwiGLU epilogue), so each result equals that function's for the same operands.
"""
from __future__ import annotations

import os

import torch

from collectives.triton_support import INTERPRETED, ArrivalCounters, pdl_kwargs, tl, triton
from model.kernels import gemv_tiles, linear_small_m as lsm

MAX_M = lsm.MAX_M
PAIR_KEYS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "CVT")
ROUTER_TILE_BYTES = 65536  # router weight bytes per program
_SCRATCH: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
EMPTY_KEY = -(2 ** 63)
# A summed pair (dual_down) as separate shared and routed programs, the second of a tile's two to finish adding
# them, rather than one program computing both halves one after the other: "auto" at one row of FP8 weights,
# "1" always, "0" never (DGX_EMU_PAIR_SPLIT_SUM). Measured on an H200 (session 13, 89b45d9, split always vs never,
# alternated): FP8 decode medium 295.8 / 295.6 vs 298.4 / 298.8 us, maverick-slice 963.1 vs 993.4; but medium
# verify (4 rows) FP8 481.9 / 481.9 vs 461.1 / 460.8, BF16 572.3 / 573.2 vs 534.4 / 536.5, and BF16 decode 324.4 /
# 324.3 vs 321.8 / 322.6 (h200-ab-decode-*-split{0,1}-*-89b45d9-tp1.json).
SPLIT_SUM = os.environ.get("DGX_EMU_PAIR_SPLIT_SUM", "auto")
_pair_counters = ArrivalCounters("moe_decode (pair sum)", 4096)  # per device; see triton_support.ArrivalCounters

if triton is not None:
    from collectives.triton_support import pdl_launch_dependents, pdl_wait
    from model.kernels import gemv_math as gm
    from model.kernels.qkv_rope import _round

    EMPTY_KEY_C = tl.constexpr(EMPTY_KEY)

    if INTERPRETED:  # numpy's exp
        @triton.jit
        def _exp(x):
            return tl.exp(x)
    else:
        from triton.language.extra import libdevice

        @triton.jit
        def _exp(x):
            return libdevice.exp(x)  # expf, as torch's CUDA sigmoid (tl.exp is a faster approximation)

    @triton.jit
    def _pick(logit, expert, ids_ptr, scores_ptr, row):
        """ids[row] = expert; scores[row] = sigmoid(logit) in float32 rounded to x's dtype."""
        tl.store(ids_ptr + row, expert.to(tl.int32))
        score = tl.math.div_rn(1.0, 1.0 + _exp(-logit))
        io = scores_ptr.dtype.element_ty
        tl.store(scores_ptr + row, _round(score, io).to(io))  # _round: the interpreter's casts truncate

    @triton.jit
    def _router_kernel(x_ptr, w_ptr, ids_ptr, scores_ptr, key_ptr, count_ptr, M, E, stride_xm, stride_we,
                       K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, E_TILES: tl.constexpr,
                       PDL: tl.constexpr):
        """Program (row, block of experts): the block's logits, its best (lowest id on ties), and the
        row's winner (directly, or by the last of the row's programs through key / count)."""
        row, tile = tl.program_id(0) % M, tl.program_id(0) // M
        experts = tile * BLOCK_E + tl.arange(0, BLOCK_E)  # (BLOCK_E,)
        e_ok = experts < E
        w_rows = w_ptr + experts.to(tl.int64)[:, None] * stride_we  # (BLOCK_E, 1)
        ks = tl.arange(0, BLOCK_K)
        w, _ = gm.load_w(w_rows, w_rows, ks, e_ok[:, None] & (ks < K)[None, :], 1, False)  # the router weight:
        pdl_wait(PDL)  # no kernel writes it, so it is read before the wait for x
        pdl_launch_dependents(PDL)
        acc = tl.zeros((BLOCK_E, BLOCK_K), tl.float32)
        x = tl.load(x_ptr + row * stride_xm + ks, mask=ks < K, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        for k0 in range(BLOCK_K, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_rows + ks[None, :], mask=e_ok[:, None] & (ks < K)[None, :], other=0.0)
            x = tl.load(x_ptr + row * stride_xm + ks, mask=ks < K, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
        logits = _round(tl.sum(acc, axis=1), x_ptr.dtype.element_ty)  # what the router Linear returns
        logits = tl.where(e_ok, logits + 0.0, float("-inf"))  # + 0.0: -0.0 ties with 0.0, as in torch
        best = tl.max(logits, axis=0)
        best_id = tl.min(tl.where(logits == best, experts, E), axis=0)
        if E_TILES == 1:
            _pick(best, best_id, ids_ptr, scores_ptr, row)
        else:
            bits = best.to(tl.int32, bitcast=True)
            ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)  # signed order == float order
            key = ordered * 4294967296 + (E - 1 - best_id)  # larger logit, then lower id, wins
            tl.atomic_max(key_ptr + row, key)
            if tl.atomic_add(count_ptr + row, 1) == E_TILES - 1:  # acq_rel: every block's key is in
                won = tl.atomic_xchg(key_ptr + row, EMPTY_KEY_C)  # read and reset for the next call
                tl.atomic_xchg(count_ptr + row, 0)
                won_bits = (won >> 32).to(tl.int32)
                logit = tl.where(won_bits < 0, won_bits ^ 0x7FFFFFFF, won_bits).to(tl.float32, bitcast=True)
                _pick(logit, E - 1 - (won & 0xFFFFFFFF), ids_ptr, scores_ptr, row)

    @triton.jit
    def _dense_part(x_ptr, w_ptr, xs_ptr, ws_ptr, row, tile, N, stride_xm, stride_wn, K: tl.constexpr,
                    QUANT: tl.constexpr, SWIGLU: tl.constexpr, CVT: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """The shared expert's tile: its first weight chunk is read before the PDL wait."""
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w_gate = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
        w_up = w_gate + N * stride_wn
        w_g, w_u = gm.first_chunk(w_gate, w_up, col_ok, 1, 0, K, SWIGLU, CVT, BLOCK_K)
        pdl_wait(PDL)
        pdl_launch_dependents(PDL)
        y = gm.gemv_tile(x_ptr + row * stride_xm, 1.0, xs_ptr, ws_ptr, w_gate, w_up, w_g, w_u, cols, col_ok, N, 1,
                         K, False, QUANT, SWIGLU, CVT, BLOCK_N, BLOCK_K)
        return y, cols, col_ok

    @triton.jit
    def _routed_part(x_ptr, w_ptr, ids_ptr, rs_ptr, xs_ptr, ws_ptr, row, tile, N, stride_xm, stride_we, stride_wn,
                     stride_xse, stride_wse, K: tl.constexpr, ROW_SCALE: tl.constexpr, QUANT: tl.constexpr,
                     SWIGLU: tl.constexpr, CVT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The routed expert's tile (after the PDL wait: the ids come from the router kernel)."""
        expert = tl.load(ids_ptr + row).to(tl.int64)
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w_gate = w_ptr + expert * stride_we + cols.to(tl.int64)[:, None] * stride_wn
        w_up = w_gate + N * stride_wn
        w_g, w_u = gm.first_chunk(w_gate, w_up, col_ok, 1, 0, K, SWIGLU, CVT, BLOCK_K)
        rs = 1.0
        if ROW_SCALE:
            rs = tl.load(rs_ptr + row).to(x_ptr.dtype.element_ty).to(tl.float32)
        return gm.gemv_tile(x_ptr + row * stride_xm, rs, xs_ptr + expert * stride_xse, ws_ptr + expert * stride_wse,
                            w_gate, w_up, w_g, w_u, cols, col_ok, N, 1, K, ROW_SCALE, QUANT, SWIGLU, CVT, BLOCK_N,
                            BLOCK_K)

    @triton.jit
    def _routed_program(index, M, x_ptr, w_ptr, ids_ptr, rs_ptr, xs_ptr, ws_ptr, N, stride_xm, stride_we, stride_wn,
                        stride_xse, stride_wse, K: tl.constexpr, ROW_SCALE: tl.constexpr, QUANT: tl.constexpr,
                        SWIGLU: tl.constexpr, CVT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PDL: tl.constexpr):
        """A program of the routed half on its own (the `index`-th of them, rows fastest): waits for the
        router, then its tile. Returns (y, row, tile, the tile's columns)."""
        pdl_wait(PDL)
        pdl_launch_dependents(PDL)
        row, tile = index % M, index // M
        y = _routed_part(x_ptr, w_ptr, ids_ptr, rs_ptr, xs_ptr, ws_ptr, row, tile, N, stride_xm, stride_we, stride_wn,
                         stride_xse, stride_wse, K, ROW_SCALE, QUANT, SWIGLU, CVT, BLOCK_N, BLOCK_K)
        return y, row, tile, tile * BLOCK_N + tl.arange(0, BLOCK_N)

    @triton.jit
    def _finish_pair_sum(y, half, part_ptr, count_ptr, out_ptr, row, tile, cols, col_ok, M, N, tiles, stride_om):
        """Publishes one half's result rounded to the output dtype; the second half of the (row, tile) to
        arrive writes round(A) + round(B), rounded (as the one-program sum: the same bits in either order)."""
        io = out_ptr.dtype.element_ty
        tl.store(part_ptr + (half * M + row) * N + cols, _round(y, io), mask=col_ok)
        tl.debug_barrier()  # every thread's half stored before the (release) count
        counter = count_ptr + row * tiles + tile
        if tl.atomic_add(counter, 1) == 1:
            a = tl.load(part_ptr + row * N + cols, mask=col_ok, other=0.0, cache_modifier=".cg")  # L2: another SM
            b = tl.load(part_ptr + (M + row) * N + cols, mask=col_ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counter, 0)
            tl.store(out_ptr + row * stride_om + cols, _round(a + b, io).to(io), mask=col_ok)

    @triton.jit
    def _pair_kernel(xa_ptr, xb_ptr, wa_ptr, wb_ptr, ids_ptr, rs_ptr, xsa_ptr, xsb_ptr, wsa_ptr, wsb_ptr,
                     outa_ptr, outb_ptr, M, NA, NB, stride_xam, stride_xbm, stride_wan, stride_wbe, stride_wbn,
                     stride_xse, stride_wse, stride_oam, stride_obm, stride_xsam, KA: tl.constexpr, KB: tl.constexpr,
                     QUANT_A: tl.constexpr, QUANT_B: tl.constexpr, ROW_SCALE: tl.constexpr,
                     SWIGLU: tl.constexpr, SUM: tl.constexpr, CVT: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PDL: tl.constexpr, part_ptr, count_ptr, SPLIT_SUM: tl.constexpr = False):
        """SUM: program (row, tile) writes round(A) + round(B) to out_a; with SPLIT_SUM, A's and B's programs
        apart (as without SUM) each publish their rounded result to part (2, M, NA) float32 and the second of the
        two to arrive (an atomic counter per (row, tile), reset after) writes the sum (the one-program sum's
        bits, save that a GPU may contract its last float32 multiply and add into an FMA). Otherwise
        the first M * tiles(NA) programs write A's (row, tile) to out_a, the others B's to out_b.
        A: x_a @ W_a.T (dense; QUANT_A 3: x_a is e4m3, quantized by its producer, row scales at xsa_ptr with
        stride_xsam); B: (x_b * rs) @ W_b[ids[row]].T. (Loading B's expert id and first chunk
        before A's GEMV instead of after it was measured on an H200, 3e0e0d1 vs cc9a0b8: medium FP8 decode
        316.1 vs 319.2 us, but its 4-token verify 499.8 vs 474.6; BF16 and maverick-slice unchanged. Not kept.)"""
        pid = tl.program_id(0)
        tiles_a = tl.cdiv(NA, BLOCK_N)
        if SPLIT_SUM:
            if pid < M * tiles_a:
                row, tile = pid % M, pid // M
                y, cols, col_ok = _dense_part(xa_ptr, wa_ptr, xsa_ptr + row * stride_xsam, wsa_ptr, row, tile, NA,
                                              stride_xam, stride_wan, KA, QUANT_A, SWIGLU, CVT, BLOCK_N, BLOCK_K, PDL)
                half = 0
            else:
                y, row, tile, cols = _routed_program(pid - M * tiles_a, M, xb_ptr, wb_ptr, ids_ptr, rs_ptr, xsb_ptr,
                                                     wsb_ptr, NB, stride_xbm, stride_wbe, stride_wbn, stride_xse,
                                                     stride_wse, KB, ROW_SCALE, QUANT_B, SWIGLU, CVT, BLOCK_N,
                                                     BLOCK_K, PDL)
                col_ok = cols < NA
                half = 1
            _finish_pair_sum(y, half, part_ptr, count_ptr, outa_ptr, row, tile, cols, col_ok, M, NA, tiles_a,
                             stride_oam)
        elif SUM:
            row, tile = pid % M, pid // M
            ya, cols, col_ok = _dense_part(xa_ptr, wa_ptr, xsa_ptr + row * stride_xsam, wsa_ptr, row, tile, NA,
                                           stride_xam, stride_wan, KA, QUANT_A, SWIGLU, CVT, BLOCK_N, BLOCK_K, PDL)
            yb = _routed_part(xb_ptr, wb_ptr, ids_ptr, rs_ptr, xsb_ptr, wsb_ptr, row, tile, NB, stride_xbm,
                              stride_wbe, stride_wbn, stride_xse, stride_wse, KB, ROW_SCALE, QUANT_B, SWIGLU,
                              CVT, BLOCK_N, BLOCK_K)
            io = outa_ptr.dtype.element_ty
            y = _round(_round(ya, io) + _round(yb, io), io)  # two module outputs, then torch's add
            tl.store(outa_ptr + row * stride_oam + cols, y.to(io), mask=col_ok)
        elif pid < M * tiles_a:
            row, tile = pid % M, pid // M
            ya, cols, col_ok = _dense_part(xa_ptr, wa_ptr, xsa_ptr + row * stride_xsam, wsa_ptr, row, tile, NA,
                                           stride_xam, stride_wan, KA, QUANT_A, SWIGLU, CVT, BLOCK_N, BLOCK_K, PDL)
            tl.store(outa_ptr + row * stride_oam + cols, ya.to(outa_ptr.dtype.element_ty), mask=col_ok)
        else:
            yb, row, tile, cols = _routed_program(pid - M * tiles_a, M, xb_ptr, wb_ptr, ids_ptr, rs_ptr, xsb_ptr,
                                                  wsb_ptr, NB, stride_xbm, stride_wbe, stride_wbn, stride_xse,
                                                  stride_wse, KB, ROW_SCALE, QUANT_B, SWIGLU, CVT, BLOCK_N, BLOCK_K,
                                                  PDL)
            tl.store(outb_ptr + row * stride_obm + cols, yb.to(outb_ptr.dtype.element_ty), mask=cols < NB)


def _scratch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's per-row (best key, arrivals) slots on `device`, made (reset) at the first call."""
    if device not in _SCRATCH:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("route_top1: its first call on a device must come before CUDA graph capture "
                               "(it allocates the router's reduction slots)")
        _SCRATCH[device] = (torch.full((MAX_M,), EMPTY_KEY, dtype=torch.int64, device=device),
                            torch.zeros(MAX_M, dtype=torch.int32, device=device))
    return _SCRATCH[device]


def _check_router(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_M or x.dtype not in lsm.HIGH or x.stride(-1) != 1:
        raise ValueError(f"route_top1: x must be a float32/bf16/fp16 (M, H) with 1 <= M <= {MAX_M} and unit "
                         f"stride along H, got {x.dtype} {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.dtype not in lsm.HIGH or weight.stride(1) != 1:
        raise ValueError(f"route_top1: the router weight must be a float (E, H = {x.shape[1]}) with unit stride "
                         f"along H, got {weight.dtype} {tuple(weight.shape)}")
    if weight.shape[0] >= 2 ** 31 or weight.device != x.device:
        raise ValueError(f"route_top1: the router weight must be on x's device {x.device}")


def route_top1(x: torch.Tensor, weight: torch.Tensor, block_e: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, H), router weight (E, H). Returns (expert ids (M,) int32, scores (M,) in x's dtype):
    MoE.route with top_k = 1 (ties: lowest id). block_e: experts per program (default: about
    ROUTER_TILE_BYTES of weight each)."""
    _check_router(x, weight)
    if not lsm.available(x):
        raise ValueError(f"route_top1: needs Triton and a CUDA tensor (or TRITON_INTERPRET=1), got {x.device}")
    m, k = x.shape
    n_experts = weight.shape[0]
    if block_e is None:
        rows = max(1, ROUTER_TILE_BYTES // (k * weight.element_size()))
        block_e = min(triton.next_power_of_2(n_experts), 1 << (rows.bit_length() - 1))
    if block_e < 1 or block_e & (block_e - 1):
        raise ValueError(f"route_top1: block_e must be a power of two, got {block_e}")
    block_k = min(triton.next_power_of_2(k), max(64, 8192 // block_e), 4096 if not INTERPRETED else 256)
    e_tiles = triton.cdiv(n_experts, block_e)
    ids = torch.empty(m, dtype=torch.int32, device=x.device)
    scores = torch.empty(m, dtype=x.dtype, device=x.device)
    key, count = _scratch(x.device) if e_tiles > 1 else (ids, ids)  # one block per row: no reduction
    _router_kernel[(m * e_tiles,)](x, weight, ids, scores, key, count, m, n_experts, x.stride(0), weight.stride(0),
                                   K=k, BLOCK_E=block_e, BLOCK_K=block_k, E_TILES=e_tiles,
                                   num_warps=4 if block_e * block_k <= 8192 else 8, **pdl_kwargs(x))
    return ids, scores


def reference_route_top1(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in torch: MoE.route's math with top_k = 1 and torch.argmax's tie rule (lowest id)."""
    _check_router(x, weight)
    logits = x @ weight.T  # (M, E) in x's dtype, as the router Linear
    ids = logits.argmax(dim=-1)  # (M,)
    top = logits.gather(1, ids[:, None])[:, 0]
    return ids.int(), torch.sigmoid(top.float()).to(x.dtype)


def _problem(x, args: dict, expert_ids=None, row_scale=None, swiglu=False):
    """linear_small_m's checks for one half of a pair; returns (n_out, quant, out_dtype)."""
    w = args["weight"]
    m, n, out_dtype, _ = lsm._check(x, w, expert_ids, row_scale, args.get("weight_scale"), args.get("act_quant"),
                                    swiglu, args.get("out_dtype"))
    if w.stride(-1) != 1:
        raise ValueError(f"moe_decode: weights must be K-contiguous (out-major), got strides {w.stride()}")
    act = args.get("act_quant")
    quant = 0 if w.dtype != lsm.FP8 else 2 if isinstance(act, str) else 1
    return n // 2 if swiglu else n, quant, out_dtype


def pair_applies(shared: dict | None, routed: dict | None) -> bool:
    """Can `dual_gate_up` / `dual_down` take these linear_small_m argument sets (else: separate launches)?"""
    return (shared is not None and routed is not None and shared["weight"].dim() == 2
            and routed["weight"].dim() == 3 and shared["weight"].dtype == routed["weight"].dtype
            and shared["weight"].stride(-1) == 1 and routed["weight"].stride(-1) == 1
            and shared.get("out_dtype") == routed.get("out_dtype"))


def _launch_pair(xa, xb, shared, routed, expert_ids, row_scale, swiglu, add, config, shared_fp8=None):
    m = xa.shape[0]
    if xb.shape[0] != m:
        raise ValueError(f"moe_decode: the shared and routed inputs need the same rows, got {m} and {xb.shape[0]}")
    n_a, quant_a, dtype_a = _problem(xa, shared, swiglu=swiglu)
    lsm._check_x_fp8(xa, shared_fp8, shared["weight"], None, shared.get("act_quant"))
    n_b, quant_b, dtype_b = _problem(xb, routed, expert_ids, row_scale, swiglu)
    if shared["weight"].dtype != routed["weight"].dtype:
        raise ValueError("moe_decode: the shared and routed weights must share a dtype")
    if add and (n_a != n_b or dtype_a != dtype_b):
        raise ValueError(f"moe_decode: a summed pair needs one output shape and dtype, got {n_a} {dtype_a} "
                         f"and {n_b} {dtype_b}")
    if not lsm.available(xa):
        raise ValueError(f"moe_decode: needs Triton and a CUDA tensor (or TRITON_INTERPRET=1), got {xa.device}")
    w_a, w_b = shared["weight"], routed["weight"]
    k_a, k_b = xa.shape[1], xb.shape[1]
    cfg = gemv_tiles.tiles(m, n_a if add else n_a + n_b, max(k_a, k_b), "k", w_a.dtype, True, swiglu)
    cfg = {**cfg, **(lsm.defaults(w_a.dtype, True) if config is None else config)}
    unknown = set(cfg) - set(PAIR_KEYS) - {"SPLIT_K", "PREQUANT"}  # those two stay single-launch GEMV variants
    if unknown:
        raise ValueError(f"moe_decode: unknown config keys {sorted(unknown)}; known: {PAIR_KEYS}")
    cvt = lsm.CVT_MODES.get(cfg.get("CVT", "cvt"), cfg.get("CVT"))
    if cvt not in lsm.CVT_MODES.values() or cvt and w_a.dtype != lsm.FP8:
        raise ValueError(f"moe_decode: CVT must be one of {sorted(lsm.CVT_MODES)}, 'bits' / 'words' with FP8 "
                         f"weights only, got {cfg.get('CVT')!r}")
    if cvt == 2:  # the weights as int32 words (their strides then count words)
        if k_a % 4 or k_b % 4 or any(st % 4 for st in w_a.stride()[:-1] + w_b.stride()[:-1]):
            raise ValueError("moe_decode: CVT 'words' needs K % 4 == 0 and word-aligned weight rows")
        w_a, w_b = w_a.view(torch.int32), w_b.view(torch.int32)
    out_a = lsm._alloc_out(m, n_a, dtype_a, xa.device)  # (M, N_A)
    out_b = out_a if add else lsm._alloc_out(m, n_b, dtype_b, xa.device)  # (M, N_B)
    act_b = routed.get("act_quant")
    per_expert = quant_b == 1 and act_b.numel() > 1
    split_sum = add and (SPLIT_SUM == "1" or SPLIT_SUM == "auto" and m == 1 and shared["weight"].dtype == lsm.FP8)
    tiles = triton.cdiv(n_a, cfg["BLOCK_N"]) + (0 if add and not split_sum else triton.cdiv(n_b, cfg["BLOCK_N"]))
    part = torch.empty((2, m, n_a), dtype=torch.float32, device=xa.device) if split_sum else out_a  # (2, M, N)
    count = _pair_counters(xa.device, m * triton.cdiv(n_a, cfg["BLOCK_N"])) if split_sum else out_a
    xs_a = shared["act_quant"] if quant_a == 1 else xa
    if shared_fp8 is not None:  # the shared expert's input as its producer quantized it
        (xa, xs_a), quant_a = shared_fp8, 3
    _pair_kernel[(m * tiles,)](
        xa, xb, w_a, w_b, expert_ids, row_scale if row_scale is not None else xb,
        xs_a, act_b if quant_b == 1 else xb,
        shared.get("weight_scale", xa) if quant_a else xa, routed.get("weight_scale", xb) if quant_b else xb,
        out_a, out_b, m, n_a, n_b, xa.stride(0), xb.stride(0), w_a.stride(0), w_b.stride(0), w_b.stride(1),
        act_b.stride(0) if per_expert else 0, routed["weight_scale"].stride(0) if quant_b else 0,
        out_a.stride(0), out_b.stride(0), 1 if quant_a == 3 else 0, KA=k_a, KB=k_b, QUANT_A=quant_a, QUANT_B=quant_b,
        ROW_SCALE=row_scale is not None, SWIGLU=swiglu, SUM=add, CVT=cvt, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], part_ptr=part, count_ptr=count, SPLIT_SUM=split_sum,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_kwargs(xa))
    return out_a if add else (out_a, out_b)


def dual_gate_up(x: torch.Tensor, shared: dict, routed: dict, expert_ids: torch.Tensor,
                 row_scale: torch.Tensor | None, config: dict | None = None,
                 shared_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu(gate) * up of x @ W_shared.T, the same of (x * row_scale) @ W_routed[ids].T), one launch.
    shared / routed: linear_small_m keyword sets (weight (N, K) / (E, N, K), K-contiguous, one
    dtype; FP8: weight_scale, act_quant, out_dtype). shared_fp8: x as its producer quantized it, for
    the shared half (linear_small_m's x_fp8; the routed half quantizes x * score itself).
    Returns (M, N_shared / 2), (M, N_routed / 2)."""
    return _launch_pair(x, x, shared, routed, expert_ids, row_scale, True, False, config, shared_fp8)


def dual_down(h_shared: torch.Tensor, h_routed: torch.Tensor, shared: dict, routed: dict, expert_ids: torch.Tensor,
              config: dict | None = None) -> torch.Tensor:
    """h_shared @ W_shared.T + h_routed @ W_routed[ids].T, each rounded to the output dtype before the
    add (as the two modules and torch's add would), in one launch. Returns (M, N)."""
    return _launch_pair(h_shared, h_routed, shared, routed, expert_ids, None, False, True, config)


def reference_dual_gate_up(x, shared, routed, expert_ids, row_scale):
    """dual_gate_up as two linear_small_m references."""
    return (lsm.reference_linear_small_m(x, swiglu=True, **shared),
            lsm.reference_linear_small_m(x, expert_ids=expert_ids, row_scale=row_scale, swiglu=True, **routed))


def reference_dual_down(h_shared, h_routed, shared, routed, expert_ids):
    """dual_down as two linear_small_m references and torch's add."""
    return (lsm.reference_linear_small_m(h_shared, **shared)
            + lsm.reference_linear_small_m(h_routed, expert_ids=expert_ids, **routed))
