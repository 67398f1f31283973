"""Attention of a few new tokens over a static KV cache, as split-KV "flash-decoding" (Triton).

Why: Attention.forward reads the cache through `cache.read` (a copy of every slot up to the longest
row, dequantized for FP8), builds a (B, T, S) boolean mask per step, and SDPA then walks all S keys
with at most 16 query rows: a decode step spends its time on launches and on copies of the cache,
and one program per (row, head) would leave most of the GPU idle. Here the cache buffer is read in
place, once, by about two programs per SM, and nothing of size S is materialized.

Design: grid (B * Hkv, n_splits, row blocks). A program takes ALL query rows of its KV group (the T
new tokens times Hq / Hkv heads, row = t * group + g, padded to >= 16 rows so `tl.dot` applies)
against one split of that row's live keys [0, start + T), in blocks of BLOCK_S keys: scores in
float32, the visibility mask rebuilt from start / positions / step_mask / chunk_size (what
build_step_context computes), and an online softmax (running max m and sum l, base-2 exponentials
with log2(e) folded into the scale). A split is a share of the row's live length read on the
device, so the loop bound is dynamic, the grid is static (CUDA-graph capturable) and the work is
balanced whatever the lengths; slots >= start + T are never loaded. Partials (acc, m, l) go to
float32 scratch, and a second small kernel merges the splits of each (row, query head) in a fixed
order: no atomics, deterministic. A query row that sees no key (padding; never a real token, which
sees itself) gets l = 0 and an output of 0, not NaN. With PDL a program loads its first key block's
committed keys and values before it waits for the QKV GEMV, so their HBM latency overlaps that kernel.

Numerics: a 16/32-bit cache is cast to q.dtype, as KVCache._decode does. An FP8 cache is read as
its bare e4m3 values (exact in any dot dtype) and its per-tensor scales multiply the scores
(k_scale) and the partial outputs (v_scale) in float32; the model's `(fp8 * scale).to(q.dtype)`
rounds every scaled value to q.dtype instead, so with bf16 q this is the more exact of the two. With
an FP8 cache and bf16 q the dots run in fp16 (q saturated at +-65504): e4m3 -> fp16 is one
instruction on Hopper, e4m3 -> bf16 is not (on an H200, 130k keys: 1.2 TB/s of FP8 cache as bf16
dots with per-element scaling, 1.9 TB/s this way). float32 dots are IEEE (no TF32); 16-bit dots
run on tensor cores with float32 accumulation, the softmax weights rounded to the dot dtype for
P @ V as flash attention does. Triton's interpreter (CPU tests) cannot do bf16 dots nor loops with
tensor bounds, so there the dots run in float32 and the key loop is a `while` around the same body.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.fp8 import fp8_values

from collectives.triton_support import INTERPRETED, ArrivalCounters, pdl_kwargs, tl, triton

FP8 = torch.float8_e4m3fn
Q_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_NEW_TOKENS = 16
PROGRAMS_PER_SM = 2  # the split count aims at 2 programs per SM (measured best on an H200)
CPU_SMS = 132  # without CUDA (the interpreter): plan as for an H200
MAX_SPLITS = 128
TILE_BYTES = 16384  # keys (or values) loaded per block: 64 bf16 keys of 128 dims, 128 fp8 keys
MERGE_TILE = 16384  # float32 partials the merge holds at once: all 128 splits of a 128-dim row
FUSED_MERGE_BYTES = 65536  # partials one program merges at most (medium's decode step: 16 KB; verify: 64 KB)
# Measured and dropped (one H200): (1) the new tokens' keys, values and positions taken from registers after
# write_new_kv (no read back of the slot just written; their loads issued with start's, before the RoPE of q), 67a5a9c:
# the kernel alone got slower, medium T = 1: 8.10 vs 6.66 us, maverick-tp1 T = 1: 8.12 vs 7.13
# (h200-ab-attention-{regs-67a5a9c,base-919d76a}.json), and its T > 1 form (tl.gather of the new rows) failed Triton's
# TritonGPUOptimizeThreadLocality pass on sm90. (2) _merge_rows in one online pass (running max, rescaled sums) instead
# of two, f71213b: kernel medium T = 1 6.75 vs 6.89 us, T = 4 7.48 vs 7.38, maverick-tp1 7.32 vs 7.08 / 9.64 vs 9.43;
# medium decode step bf16 323.0 vs 322.8 us, fp8 308.7 vs 308.5 (medians of 3 alternated rounds): no gain
# (h200-ab-attention-{merge-f71213b,base-c2-919d76a}.json, h200-ab-decode-medium-*-{merge,base-c2}-r*-tp1.json).

if triton is not None:
    from collectives.triton_support import pdl_launch_dependents, pdl_wait
    from model.kernels.qkv_rope import rope_q_rows, write_new_kv

    @triton.jit
    def _as_dot(x, FP8_CACHE: tl.constexpr, Q_DT: tl.constexpr, DOT_DT: tl.constexpr):
        """Cached keys or values as the dots take them: `.to(q.dtype)`, or the bare e4m3 values (exact
        in any dot dtype) for an FP8 cache, whose per-tensor scales go onto the scores and the output."""
        if FP8_CACHE:
            return x.to(DOT_DT)
        return x.to(Q_DT).to(DOT_DT)

    @triton.jit
    def _load_kv(ptrs, ok, FP8_CACHE: tl.constexpr, Q_DT: tl.constexpr, DOT_DT: tl.constexpr):
        """(BLOCK_S, D) keys or values where ok, as the dots take them (`_as_dot`)."""
        return _as_dot(tl.load(ptrs, mask=ok[:, None], other=0.0), FP8_CACHE, Q_DT, DOT_DT)

    @triton.jit
    def _first_block_early(k_ptr, v_ptr, kv_base, start, split, s_max, T: tl.constexpr, D: tl.constexpr,
                           BLOCK_S: tl.constexpr, N_SPLITS: tl.constexpr):
        """Before the PDL wait: the split's first key block as `start` (read before the wait too) places
        it, only its slots below start: keys and values of earlier steps, which no kernel of this step
        writes (the step's first kernel writes start, two or more launches back). Their HBM latency then
        overlaps the kernel before (the QKV GEMV). Returns (k, v, which slots were loaded)."""
        lo, hi = _split_bounds(start, split, s_max, T, BLOCK_S, N_SPLITS)
        s = lo + tl.arange(0, BLOCK_S)
        early = (s < hi) & (s < start)
        offs = kv_base + s[:, None] * D + tl.arange(0, D)[None, :]  # (BLOCK_S, D)
        return (tl.load(k_ptr + offs, mask=early[:, None], other=0.0),
                tl.load(v_ptr + offs, mask=early[:, None], other=0.0), early)

    @triton.jit
    def _first_block(k_ptr, v_ptr, kv_base, k_early, v_early, keep, lo, hi, D: tl.constexpr, BLOCK_S: tl.constexpr):
        """The first key block [lo, lo + BLOCK_S) cut at hi: the early tiles' rows where `keep` (their
        start was this one's, so the same slots, all committed), the others (the new tokens' slots,
        written by this program; or every slot if start moved) loaded now."""
        s = lo + tl.arange(0, BLOCK_S)
        late = (s < hi) & (keep == 0)  # not `~keep`: Triton 3.9's interpreter makes that an invalid mask
        offs = kv_base + s[:, None] * D + tl.arange(0, D)[None, :]  # (BLOCK_S, D)
        k = tl.where(keep[:, None], k_early, tl.load(k_ptr + offs, mask=late[:, None], other=0.0))
        v = tl.where(keep[:, None], v_early, tl.load(v_ptr + offs, mask=late[:, None], other=0.0))
        return k, v

    @triton.jit
    def _attend_block(acc, m_i, l_i, q, s0, hi, start, b, t, q_pos, row_ok, qk_scale, chunk,
                      k_ptr, v_ptr, kv_base, mask_ptr, sm_b, sm_t, sm_j, pos_ptr, sp_b, sp_t,
                      T: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr,
                      CHUNKED: tl.constexpr, FP8_CACHE: tl.constexpr, Q_DT: tl.constexpr,
                      DOT_DT: tl.constexpr, PREC: tl.constexpr):
        """Keys [s0, s0 + BLOCK_S) cut at `hi`: loaded, then `_attend_kv`."""
        s = s0 + tl.arange(0, BLOCK_S)  # (BLOCK_S,) key slots
        offs = kv_base + s[:, None] * D + tl.arange(0, D)[None, :]  # (BLOCK_S, D)
        k = _load_kv(k_ptr + offs, s < hi, FP8_CACHE, Q_DT, DOT_DT)
        v = _load_kv(v_ptr + offs, s < hi, FP8_CACHE, Q_DT, DOT_DT)
        return _attend_kv(acc, m_i, l_i, q, k, v, s0, hi, start, b, t, q_pos, row_ok, qk_scale, chunk, mask_ptr,
                          sm_b, sm_t, sm_j, pos_ptr, sp_b, sp_t, T, BLOCK_S, HAS_MASK, CHUNKED, DOT_DT, PREC)

    @triton.jit
    def _attend_kv(acc, m_i, l_i, q, k, v, s0, hi, start, b, t, q_pos, row_ok, qk_scale, chunk, mask_ptr,
                   sm_b, sm_t, sm_j, pos_ptr, sp_b, sp_t, T: tl.constexpr, BLOCK_S: tl.constexpr,
                   HAS_MASK: tl.constexpr, CHUNKED: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr):
        """Keys k / values v (BLOCK_S, D) of slots [s0, s0 + BLOCK_S) cut at `hi`: scores, visibility,
        one online-softmax update. A block with no visible key changes nothing (p = 0, alpha = 1 or,
        while m = -inf, 0 times a zero acc)."""
        s = s0 + tl.arange(0, BLOCK_S)  # (BLOCK_S,) key slots
        in_range = s < hi
        scores = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BLOCK_R, BLOCK_S), log2 units
        # Visibility, as build_step_context: the committed prefix, or a new token the step mask allows.
        j = s - start  # (BLOCK_S,) index among the new tokens
        is_new = (j >= 0) & (j < T)
        if HAS_MASK:
            allowed = tl.load(mask_ptr + b * sm_b + t[:, None] * sm_t + j[None, :] * sm_j,
                              mask=row_ok[:, None] & is_new[None, :], other=0) != 0
        else:  # causal among the new tokens
            allowed = j[None, :] <= t[:, None]
        visible = ((s < start)[None, :] | (is_new[None, :] & allowed)) & in_range[None, :] & row_ok[:, None]
        if CHUNKED:  # chunked local attention: key and query in the same chunk of positions
            key_pos = tl.where(is_new, tl.load(pos_ptr + b * sp_b + j * sp_t, mask=is_new & in_range, other=0), s)
            visible = visible & ((key_pos[None, :] // chunk) == (q_pos[:, None] // chunk))
        scores = tl.where(visible, scores, float("-inf"))
        # Online softmax; a row with nothing visible yet keeps m = -inf and takes 0 as its reference.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)  # rescales what was summed under the old max
        p = tl.exp2(scores - m_ref[:, None])  # (BLOCK_R, BLOCK_S)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DT), v, input_precision=PREC)  # (BLOCK_R, D)
        return acc, m_new, l_i

    @triton.jit
    def _split_share(start, s_max, T: tl.constexpr, BLOCK_S: tl.constexpr, N_SPLITS: tl.constexpr):
        """(the row's live keys [0, start + T) cut at s_max, the keys of each split in whole blocks)."""
        n_keys = tl.minimum(start + T, s_max).to(tl.int32)
        return n_keys, tl.cdiv(tl.cdiv(n_keys, N_SPLITS), BLOCK_S) * BLOCK_S

    @triton.jit
    def _split_bounds(start, split, s_max, T: tl.constexpr, BLOCK_S: tl.constexpr, N_SPLITS: tl.constexpr):
        """This split's share [lo, hi) of the row's live keys, in whole blocks."""
        n_keys, per_split = _split_share(start, s_max, T, BLOCK_S, N_SPLITS)
        lo = split * per_split
        return lo, tl.minimum(lo + per_split, n_keys)

    @triton.jit
    def _live_splits(start, s_max, T: tl.constexpr, BLOCK_S: tl.constexpr, N_SPLITS: tl.constexpr):
        """How many splits hold keys (the first ones): a cache of many slots holding a short context
        leaves the rest empty, and the merge need not read their (empty) partials."""
        n_keys, per_split = _split_share(start, s_max, T, BLOCK_S, N_SPLITS)
        return tl.cdiv(n_keys, per_split)

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, start_ptr, pos_ptr, mask_ptr, ks_ptr, vs_ptr, acc_ptr, m_ptr, l_ptr,
                      count_ptr, out_ptr, inv_freq_ptr, ss_b, sq_b, sq_t, sq_h, sq_d, sm_b, sm_t, sm_j, sp_b, sp_t,
                      s_max, qk_scale, chunk, eps, floor_scale, attn_scale,
                      T: tl.constexpr, GROUP: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, N_SPLITS: tl.constexpr,
                      HAS_MASK: tl.constexpr, CHUNKED: tl.constexpr, FP8_CACHE: tl.constexpr,
                      Q_DT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr, CLAMP_Q: tl.constexpr,
                      LOOP_WHILE: tl.constexpr, FUSED_MERGE: tl.constexpr, ROPE_IN: tl.constexpr, T_P2: tl.constexpr,
                      USE_ROPE: tl.constexpr, USE_QK_NORM: tl.constexpr, USE_TEMPERATURE: tl.constexpr,
                      PDL: tl.constexpr, MERGE_UNROLL: tl.constexpr = 8):
        """Program (b * HKV + h, split, row block): unnormalized partial attention of one split. With
        FUSED_MERGE the last split of its (b * HKV + h, row block) to finish (an atomic counter in
        count_ptr, reset after) merges all splits into out, and no merge kernel runs. With ROPE_IN,
        q_ptr is the fused QKV projection (B, T, (Hq + 2 Hkv) D): the program makes its q rows, and
        the keys and values of the new tokens in its split, as qkv_rope.py does (no kernel of its own).
        With PDL: waits for the kernel that wrote q and the new keys before anything else."""
        bh = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        b, h = bh // HKV, bh % HKV
        kv_base = bh * s_max * D
        # The first key block's committed slots, loaded before the wait (see _first_block_early)
        start_early = tl.load(start_ptr + b * ss_b)
        k_early, v_early, early = _first_block_early(k_ptr, v_ptr, kv_base, start_early, split, s_max, T, D, BLOCK_S,
                                                     N_SPLITS)
        pdl_wait(PDL)
        pdl_launch_dependents(PDL)
        start = tl.load(start_ptr + b * ss_b)  # first: the key loop's bounds wait on it, not on the RoPE below
        rows = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) row = t * GROUP + g
        row_ok = rows < T * GROUP
        t = rows // GROUP
        d = tl.arange(0, D)
        if ROPE_IN:
            q = rope_q_rows(q_ptr, pos_ptr, inv_freq_ptr, b, h, rows, row_ok, t, sp_b, sp_t, eps, floor_scale, attn_scale,
                        T, GROUP, HKV, D, Q_DT, USE_ROPE, USE_QK_NORM, USE_TEMPERATURE)
        else:
            q_offs = b * sq_b + t[:, None] * sq_t + (h * GROUP + rows % GROUP)[:, None] * sq_h + d[None, :] * sq_d
            q = tl.load(q_ptr + q_offs, mask=row_ok[:, None], other=0.0)  # (BLOCK_R, D)
        if CLAMP_Q:  # bf16 q into an fp16 dot (FP8 cache): saturate instead of overflowing to inf
            q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0)
        q = q.to(DOT_DT)
        lo, hi = _split_bounds(start, split, s_max, T, BLOCK_S, N_SPLITS)
        q_pos = t
        if CHUNKED:
            q_pos = tl.load(pos_ptr + b * sp_b + t * sp_t, mask=row_ok, other=0)
        acc = tl.zeros((BLOCK_R, D), dtype=tl.float32)
        m_i = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
        if ROPE_IN:  # the new keys this split reads: written, then read back by the loop below
            write_new_kv(q_ptr, pos_ptr, inv_freq_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, b, h, start, lo, hi, kv_base,
                          sp_b, sp_t, eps, T, T_P2, GROUP, HKV, D, Q_DT, FP8_CACHE, USE_ROPE, USE_QK_NORM)
            tl.debug_barrier()  # this program's writes before its loads
        if FP8_CACHE:  # scores = q . (k_scale * k_fp8)
            qk_scale = qk_scale * tl.load(ks_ptr)
        # block 0: the early tiles where they hold committed slots of this very split, the rest loaded now
        k, v = _first_block(k_ptr, v_ptr, kv_base, k_early, v_early, early & (start_early == start), lo, hi, D,
                            BLOCK_S)
        acc, m_i, l_i = _attend_kv(acc, m_i, l_i, q, _as_dot(k, FP8_CACHE, Q_DT, DOT_DT),
                                   _as_dot(v, FP8_CACHE, Q_DT, DOT_DT), lo, hi, start, b, t, q_pos, row_ok, qk_scale,
                                   chunk, mask_ptr, sm_b, sm_t, sm_j, pos_ptr, sp_b, sp_t, T, BLOCK_S, HAS_MASK,
                                   CHUNKED, DOT_DT, PREC)
        if LOOP_WHILE:  # the interpreter cannot take tensor bounds in range()
            s0 = lo + BLOCK_S
            while s0 < hi:
                acc, m_i, l_i = _attend_block(
                    acc, m_i, l_i, q, s0, hi, start, b, t, q_pos, row_ok, qk_scale, chunk, k_ptr, v_ptr, kv_base,
                    mask_ptr, sm_b, sm_t, sm_j, pos_ptr, sp_b, sp_t,
                    T, D, BLOCK_S, HAS_MASK, CHUNKED, FP8_CACHE, Q_DT, DOT_DT, PREC)
                s0 += BLOCK_S
        else:  # a for loop: Triton software-pipelines its loads
            for s0 in range(lo + BLOCK_S, hi, BLOCK_S):
                acc, m_i, l_i = _attend_block(
                    acc, m_i, l_i, q, s0, hi, start, b, t, q_pos, row_ok, qk_scale, chunk, k_ptr, v_ptr, kv_base,
                    mask_ptr, sm_b, sm_t, sm_j, pos_ptr, sp_b, sp_t,
                    T, D, BLOCK_S, HAS_MASK, CHUNKED, FP8_CACHE, Q_DT, DOT_DT, PREC)
        if FP8_CACHE:  # sum_s p_s * (v_scale * v_fp8[s])
            acc = acc * tl.load(vs_ptr)
        rows_pad = tl.num_programs(2) * BLOCK_R
        part = (bh * N_SPLITS + split) * rows_pad + rows  # (BLOCK_R,) scratch rows
        tl.store(m_ptr + part, m_i)
        tl.store(l_ptr + part, l_i)
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc)
        if FUSED_MERGE:
            tl.debug_barrier()  # every thread's partials stored before the (release) count
            counter = count_ptr + bh * tl.num_programs(2) + tl.program_id(2)
            if tl.atomic_add(counter, 1) == N_SPLITS - 1:
                live = _live_splits(start, s_max, T, BLOCK_S, N_SPLITS)
                _merge_rows(acc_ptr, m_ptr, l_ptr, out_ptr, bh, rows, row_ok, rows_pad, live, T, GROUP, HKV, D,
                            N_SPLITS, BLOCK_R, MERGE_UNROLL)
                tl.atomic_xchg(counter, 0)

    @triton.jit
    def _merge_rows(acc_ptr, m_ptr, l_ptr, out_ptr, bh, rows, row_ok, rows_pad, live, T: tl.constexpr,
                    GROUP: tl.constexpr,
                    HKV: tl.constexpr, D: tl.constexpr, N_SPLITS: tl.constexpr, BLOCK_R: tl.constexpr,
                    UNROLL: tl.constexpr):
        """out[rows] = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i over the splits, in split order;
        the partials come from other programs (other SMs): loaded through L2 (.cg). Only the first
        `live` splits are read: an empty split's partial (m = -inf, l = 0, acc = 0) adds exactly
        nothing. UNROLL: the split loops unrolled by this factor, so that several splits' loads are in
        flight at once (same sums, same order)."""
        base = bh * N_SPLITS * rows_pad + rows  # (BLOCK_R,) scratch rows of split 0
        m_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        # (rows * 0 + i) < live, not i < live: Triton 3.9's interpreter makes a scalar comparison an invalid mask
        for i in tl.range(0, N_SPLITS, loop_unroll_factor=UNROLL):
            ok = row_ok & ((rows * 0 + i) < live)
            m_i = tl.load(m_ptr + base + i * rows_pad, mask=ok, other=float("-inf"), cache_modifier=".cg")
            m_max = tl.maximum(m_max, m_i)
        m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
        d = tl.arange(0, D)
        total = tl.zeros((BLOCK_R,), tl.float32)
        o = tl.zeros((BLOCK_R, D), tl.float32)
        for i in tl.range(0, N_SPLITS, loop_unroll_factor=UNROLL):
            ok = row_ok & ((rows * 0 + i) < live)
            w = tl.exp2(tl.load(m_ptr + base + i * rows_pad, mask=ok, other=float("-inf"), cache_modifier=".cg") - m_ref)
            total += w * tl.load(l_ptr + base + i * rows_pad, mask=ok, other=0.0, cache_modifier=".cg")
            a = tl.load(acc_ptr + (base + i * rows_pad)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0,
                        cache_modifier=".cg")
            o += w[:, None] * a
        o = o / tl.where(total == 0.0, 1.0, total)[:, None]
        b, h, t, g = bh // HKV, bh % HKV, rows // GROUP, rows % GROUP
        out_offs = ((b * T + t) * (HKV * GROUP) + h * GROUP + g)[:, None] * D + d[None, :]  # out: (B, T, Hq, D)
        tl.store(out_ptr + out_offs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _merge_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, rows_pad,
                      T: tl.constexpr, GROUP: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                      N_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, SPLIT_BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Program (b * HKV + h, row): out = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i."""
        pdl_wait(PDL)
        pdl_launch_dependents(PDL)
        bh = tl.program_id(0).to(tl.int64)
        row = tl.program_id(1)
        base = bh * N_SPLITS * rows_pad + row  # scratch row of split 0
        splits = tl.arange(0, SPLITS_P2)
        m = tl.load(m_ptr + base + splits * rows_pad, mask=splits < N_SPLITS, other=float("-inf"))
        l = tl.load(l_ptr + base + splits * rows_pad, mask=splits < N_SPLITS, other=0.0)
        m_max = tl.max(m, axis=0)
        m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
        total = tl.sum(tl.exp2(m - m_ref) * l, axis=0)
        d = tl.arange(0, D)
        o = tl.zeros((D,), dtype=tl.float32)
        for c in range(0, N_SPLITS, SPLIT_BLOCK):  # static bounds, fixed order
            sp = c + tl.arange(0, SPLIT_BLOCK)
            ok = sp < N_SPLITS
            w = tl.exp2(tl.load(m_ptr + base + sp * rows_pad, mask=ok, other=float("-inf")) - m_ref)
            a = tl.load(acc_ptr + (base + sp * rows_pad)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
            o += tl.sum(w[:, None] * a, axis=0)
        o = o / tl.where(total == 0.0, 1.0, total)
        b, h, t, g = bh // HKV, bh % HKV, row // GROUP, row % GROUP
        out_offs = ((b * T + t) * (HKV * GROUP) + h * GROUP + g) * D + d  # out: (B, T, Hq, D) contiguous
        tl.store(out_ptr + out_offs, o.to(out_ptr.dtype.element_ty))

    # Triton chose at import (TRITON_INTERPRET) whether kernels compile or run in its numpy interpreter


def available(x: torch.Tensor) -> bool:
    """True when attention on `x` (the queries) can run compiled here (a CUDA tensor, Triton present)."""
    return triton is not None and x.is_cuda


def _check_inputs(q, k_cache, v_cache, start, positions, chunk_size, step_mask, k_scale, v_scale) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be (B, T, Hq, D), got shape {tuple(q.shape)}")
    batch, n_new, n_heads, head_dim = q.shape
    if q.dtype not in Q_DTYPES:
        raise ValueError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    if not 1 <= n_new <= MAX_NEW_TOKENS:
        raise ValueError(f"q has T={n_new} new tokens; decode attention takes 1..{MAX_NEW_TOKENS}")
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two in 16..256, got {head_dim}")
    if k_cache.dim() != 4 or k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache must be (B={batch}, Hkv, S_max, D={head_dim}), got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match k_cache "
                         f"{tuple(k_cache.shape)} {k_cache.dtype}")
    if k_cache.dtype not in Q_DTYPES + (FP8,):
        raise ValueError(f"the cache must be float32, bfloat16, float16 or float8_e4m3fn, got {k_cache.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    n_kv_heads, s_max = k_cache.shape[1], k_cache.shape[2]
    if n_heads % n_kv_heads:
        raise ValueError(f"Hq={n_heads} query heads is not a multiple of Hkv={n_kv_heads} kv heads")
    if s_max < n_new:
        raise ValueError(f"the cache holds {s_max} slots, fewer than the T={n_new} new tokens")
    if start.shape != (batch,) or start.dtype != torch.int64:
        raise ValueError(f"start must be int64 (B={batch},), got {start.dtype} {tuple(start.shape)}")
    if positions.shape != (batch, n_new) or positions.dtype != torch.int64:
        raise ValueError(f"positions must be int64 (B, T)=({batch}, {n_new}), got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if step_mask is not None and (step_mask.shape != (batch, n_new, n_new) or step_mask.dtype != torch.bool):
        raise ValueError(f"step_mask must be bool (B, T, T)=({batch}, {n_new}, {n_new}), got {step_mask.dtype} "
                         f"{tuple(step_mask.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if k_cache.dtype == FP8:
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s is None or not isinstance(s, torch.Tensor) or s.numel() != 1 or s.dtype != torch.float32:
                raise ValueError(f"an FP8 cache needs {name} as a one-element float32 tensor, got {s!r}")
    extra = [step_mask] + ([k_scale, v_scale] if k_cache.dtype == FP8 else [])
    for name, x in zip(("k_cache", "v_cache", "start", "positions", "step_mask", "k_scale", "v_scale"),
                       [k_cache, v_cache, start, positions] + extra):
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")


def _plan(q: torch.Tensor, k_cache: torch.Tensor, n_splits: int | None,
          block_s: int | None) -> tuple[int, int, int, int]:
    """(BLOCK_S, BLOCK_R, row blocks, n_splits) for a launch: about 2 programs per SM by default."""
    batch, n_new, n_heads, head_dim = q.shape
    n_kv_heads, s_max = k_cache.shape[1], k_cache.shape[2]
    block_s = block_s or min(128, max(16, TILE_BYTES // (head_dim * k_cache.element_size())))
    if block_s < 16 or block_s & (block_s - 1):
        raise ValueError(f"block_s must be a power of two >= 16, got {block_s}")
    rows = n_new * (n_heads // n_kv_heads)
    block_r = min(64, max(16, triton.next_power_of_2(rows)))
    row_blocks = triton.cdiv(rows, block_r)
    if n_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else CPU_SMS
        n_splits = min(triton.cdiv(PROGRAMS_PER_SM * sms, batch * n_kv_heads * row_blocks),
                       triton.cdiv(s_max, block_s), MAX_SPLITS)
    if not isinstance(n_splits, int) or not 1 <= n_splits <= MAX_SPLITS:
        raise ValueError(f"n_splits must be an int in 1..{MAX_SPLITS}, got {n_splits!r}")
    return block_s, block_r, row_blocks, max(1, n_splits)




_counters = ArrivalCounters("decode_attention", 1024)  # per device; see triton_support.ArrivalCounters
_COUNTERS = _counters.by_device


def decode_attention(q, k_cache, v_cache, start, positions, *, scale: float, chunk_size: int | None = None,
                     step_mask: torch.Tensor | None = None, k_scale=None, v_scale=None,
                     n_splits: int | None = None, block_s: int | None = None,
                     fused_merge: bool | None = None) -> torch.Tensor:
    """Attention of the T new tokens (already written at slots start[b] + t) over the cache.

    q: (B, T, Hq, D) float32/bf16/fp16, 1 <= T <= 16, D a power of two in 16..256, Hq a multiple of
    Hkv. k_cache, v_cache: (B, Hkv, S_max, D) contiguous, float32/bf16/fp16 or float8_e4m3fn (then
    k_scale, v_scale: float32 one-element tensors). start: (B,) int64, positions: (B, T) int64 (>= 0),
    step_mask: (B, T, T) bool or None (causal). q, start, positions and step_mask may be strided (an
    expanded mask is fine). The caller guarantees start + T <= S_max (slots past S_max are ignored,
    never read). n_splits / block_s override the launch plan. fused_merge: the last split of each
    group merges (one launch, not two); default when the merged partials are at most
    FUSED_MERGE_BYTES (a decode step's few rows), as one program then reads them all. Returns
    (B, T, Hq, D) in q.dtype, what `reference_decode_attention` returns. No host sync: capturable
    in a CUDA graph.
    """
    if triton is None:
        raise RuntimeError("decode_attention needs Triton")
    _check_inputs(q, k_cache, v_cache, start, positions, chunk_size, step_mask, k_scale, v_scale)
    plan = _plan(q, k_cache, n_splits, block_s)
    return _attend(q, q, k_cache, v_cache, start, positions, scale, chunk_size, step_mask, k_scale, v_scale, plan,
                   _fuse_merge(q, k_cache, plan[3]) if fused_merge is None else fused_merge, None)


def _fuse_merge(q: torch.Tensor, k_cache: torch.Tensor, n_splits: int) -> bool:
    """Default of fused_merge: the partials one program would merge are at most FUSED_MERGE_BYTES."""
    rows = q.shape[1] * (q.shape[2] // k_cache.shape[1])
    return n_splits * rows * q.shape[3] * 4 <= FUSED_MERGE_BYTES


def merge_fuses(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Does a call at these shapes (q (B, T, Hq, D), k_cache (B, Hkv, S, D); meta tensors will do)
    merge its splits in the attention launch itself, with the default plan? rope_decode_attention
    is then ONE launch, else three (qkv_rope, the splits, the merge). The emulator's launch plans
    (workers/launch_plan.py) ask this."""
    return _fuse_merge(q, k_cache, _plan(q, k_cache, None, None)[3])


def rope_decode_attention(qkv, positions, start, k_cache, v_cache, *, n_heads: int, n_kv_heads: int, head_dim: int,
                          inv_freq, use_rope: bool, use_qk_norm: bool, eps: float,
                          temperature: tuple[float, float] | None, scale: float, chunk_size: int | None = None,
                          step_mask: torch.Tensor | None = None, k_scale=None, v_scale=None,
                          n_splits: int | None = None, block_s: int | None = None,
                          launch: dict | None = None) -> torch.Tensor:
    """qkv_rope.qkv_rope_cache then decode_attention, in ONE launch where the merge fuses (a decode
    step's few rows): each split program makes its q rows from qkv, and writes (then reads) the new
    keys and values of its own slots. Same arguments as those two; the same cache bytes and q
    (the same math, compiled as there: no FMA contraction; so the attention's own float32 steps may
    round apart from decode_attention's by an ulp on a GPU). Otherwise the two (or three) launches.
    launch: the split kernel's num_warps / num_stages / MERGE_UNROLL instead of the defaults (benchmarks)."""
    from model.kernels import qkv_rope
    qkv_rope._check(qkv, positions, start, k_cache, v_cache, n_heads, n_kv_heads, head_dim, inv_freq, k_scale, v_scale)
    q_view = qkv[..., :n_heads * head_dim].unflatten(-1, (n_heads, head_dim))  # (B, T, Hq, D) view for the checks
    _check_inputs(q_view, k_cache, v_cache, start, positions, chunk_size, step_mask, k_scale, v_scale)
    plan = _plan(q_view, k_cache, n_splits, block_s)
    if not _fuse_merge(q_view, k_cache, plan[3]):
        q = qkv_rope.qkv_rope_cache(qkv, positions, start, k_cache, v_cache, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                    head_dim=head_dim, inv_freq=inv_freq, use_rope=use_rope, use_qk_norm=use_qk_norm,
                                    eps=eps, temperature=temperature, k_scale=k_scale, v_scale=v_scale)
        return _attend(q, q, k_cache, v_cache, start, positions, scale, chunk_size, step_mask, k_scale, v_scale, plan,
                       False, None)
    floor_scale, attn_scale = temperature if temperature is not None else (1.0, 0.0)
    rope = dict(inv_freq_ptr=inv_freq, eps=float(eps), floor_scale=float(floor_scale), attn_scale=float(attn_scale),
                ROPE_IN=True, T_P2=triton.next_power_of_2(qkv.shape[1]), USE_ROPE=bool(use_rope),
                USE_QK_NORM=bool(use_qk_norm), USE_TEMPERATURE=temperature is not None)
    return _attend(qkv, q_view, k_cache, v_cache, start, positions, scale, chunk_size, step_mask, k_scale, v_scale,
                   plan, True, rope, launch)


def _attend(q_src, q, k_cache, v_cache, start, positions, scale, chunk_size, step_mask, k_scale, v_scale, plan,
            fused_merge: bool, rope: dict | None, launch: dict | None = None) -> torch.Tensor:
    """Launches the split kernel (and the merge kernel unless fused_merge). q_src: q, or with `rope`
    (the kernel's RoPE arguments) the fused QKV projection; q: a (B, T, Hq, D) tensor or view of it.
    launch: num_warps / num_stages / MERGE_UNROLL overrides for the split kernel."""
    batch, n_new, n_heads, head_dim = q.shape
    n_kv_heads, s_max = k_cache.shape[1], k_cache.shape[2]
    block_s, block_r, row_blocks, n_splits = plan
    rows_pad = row_blocks * block_r
    acc = torch.empty((batch * n_kv_heads, n_splits, rows_pad, head_dim), dtype=torch.float32, device=q.device)
    m = torch.empty((batch * n_kv_heads, n_splits, rows_pad), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    out = torch.empty((batch, n_new, n_heads, head_dim), dtype=q.dtype, device=q.device)
    fp8_cache = k_cache.dtype == FP8
    mask = step_mask.view(torch.uint8) if step_mask is not None else positions[:, :, None]  # a placeholder
    scales = (k_scale, v_scale) if fp8_cache else (positions, positions)  # placeholders are never read
    count = _counters(q.device, batch * n_kv_heads * row_blocks) if fused_merge else m  # placeholder: never read
    rope = rope or dict(inv_freq_ptr=positions, eps=0.0, floor_scale=1.0, attn_scale=0.0, ROPE_IN=False, T_P2=1,
                        USE_ROPE=False, USE_QK_NORM=False, USE_TEMPERATURE=False)
    fp32_dot = INTERPRETED or q.dtype == torch.float32
    q_dt = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[q.dtype]
    dot_dt = tl.float32 if fp32_dot else (tl.float16 if fp8_cache else q_dt)  # e4m3 -> fp16 is one cvt
    _split_kernel[(batch * n_kv_heads, n_splits, row_blocks)](
        q_src, k_cache, v_cache, start, positions, mask, *scales, acc, m, l, count, out, rope.pop("inv_freq_ptr"),
        start.stride(0), *q.stride(), *mask.stride(), *positions.stride(),
        s_max, scale * math.log2(math.e), chunk_size or 1, rope.pop("eps"), rope.pop("floor_scale"),
        rope.pop("attn_scale"),
        T=n_new, GROUP=n_heads // n_kv_heads, HKV=n_kv_heads, D=head_dim, BLOCK_R=block_r, BLOCK_S=block_s,
        N_SPLITS=n_splits, HAS_MASK=step_mask is not None, CHUNKED=chunk_size is not None, FP8_CACHE=fp8_cache,
        Q_DT=q_dt, DOT_DT=dot_dt, PREC="ieee" if fp32_dot else "tf32",
        CLAMP_Q=dot_dt == tl.float16 and q_dt != tl.float16, LOOP_WHILE=INTERPRETED, FUSED_MERGE=fused_merge,
        **{"num_warps": 8 if block_r * head_dim >= 2048 else 4, **(launch or {})}, **rope, **pdl_kwargs(q),
        enable_fp_fusion=not rope["ROPE_IN"])  # RoPE in: compiled as qkv_rope.py is, libdevice's cos / sin too
    if fused_merge:
        return out
    splits_p2 = triton.next_power_of_2(n_splits)
    split_block = min(MERGE_TILE // head_dim, splits_p2)
    _merge_kernel[(batch * n_kv_heads, n_new * (n_heads // n_kv_heads))](
        acc, m, l, out, rows_pad, T=n_new, GROUP=n_heads // n_kv_heads, HKV=n_kv_heads, D=head_dim,
        N_SPLITS=n_splits, SPLITS_P2=splits_p2, SPLIT_BLOCK=split_block,
        num_warps=min(8, max(2, split_block * head_dim // 2048)), **pdl_kwargs(q))
    return out


def _dequantize(x: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """KVCache._decode: stored values as the model reads them."""
    return (fp8_values(x) * scale).to(dtype) if x.dtype == FP8 else x.to(dtype)


def reference_decode_attention(q, k_cache, v_cache, start, positions, *, scale: float,
                               chunk_size: int | None = None, step_mask: torch.Tensor | None = None,
                               k_scale=None, v_scale=None) -> torch.Tensor:
    """The model's own math: build_step_context's mask over the slots [0, max(start) + T), the
    cache read as KVCache.read does, and Attention.forward's SDPA call. Same arguments as
    decode_attention; returns (B, T, Hq, D) in q.dtype. (Syncs with the host, as the model does.)"""
    _check_inputs(q, k_cache, v_cache, start, positions, chunk_size, step_mask, k_scale, v_scale)
    batch, n_new, n_heads, _ = q.shape
    device = q.device
    from model.attention import visibility  # the model's own mask (attention.py may import kernels)
    slots = start[:, None] + torch.arange(n_new, device=device)  # (B, T)
    n_keys = int(start.max()) + n_new
    if n_keys > k_cache.shape[2]:
        raise ValueError(f"step needs {n_keys} cache slots but the cache holds {k_cache.shape[2]}")
    full, chunked = visibility(start, slots, positions, step_mask, n_keys, chunk_size)  # (B, T, S) each
    mask = full if chunked is None else chunked
    keys = _dequantize(k_cache[:, :, :n_keys], k_scale, q.dtype)  # (B, Hkv, S, D)
    values = _dequantize(v_cache[:, :, :n_keys], v_scale, q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask[:, None], scale=scale,
                                         enable_gqa=n_heads != k_cache.shape[1])  # (B, Hq, T, D)
    return out.transpose(1, 2).contiguous()
