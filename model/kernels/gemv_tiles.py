"""Tile shapes of the decode GEMVs (model/kernels/linear_small_m.py, moe_decode.py's pairs): the
heuristic, the shapes measured best, and which one-row FP8 GEMVs go on the tensor cores.

Why a module of its own: these are the numbers the GPU sweeps decide (benchmarks/gemv_bench.py
--sweep / --variants), read by the kernels' launchers, the emulator's cost model (mma_default) and
the tests; the launchers' file keeps the kernels and their argument checks.
"""
from __future__ import annotations

import functools

import torch

from collectives.triton_support import INTERPRETED, triton

FP8 = torch.float8_e4m3fn
SMS = 132  # H100/H200 multiprocessors: the heuristic counts programs against them
MAX_M = 16  # rows the decode GEMVs take (the 16-row tl.dot's tile)
ELEMENT_SIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, FP8: 1}
MMA_MIN_N_AT_M1 = 16384  # one-row FP8 GEMVs with at least this many output rows go on the tensor cores


# Tiles of the dense one-row FP8 GEMV measured best on an H200 where they beat tiles()'s by 10-30%
# (benchmarks/results/h200-gemv-variants-deep-k.json: Maverick's fc2 at TP1 / TP2, o_proj at TP1 /
# TP2, medium's fc2). Irregular on purpose: which tile wins turns on how many programs fit one wave
# and on K % BLOCK_K (bk2048 loses 2x where K = 5120), not on a rule the heuristic could state.
TUNED_FP8_GEMV = {(5120, 16384): {"BLOCK_N": 8, "BLOCK_K": 2048}, (5120, 8192): {"BLOCK_K": 512},
                  (5120, 5120): {"BLOCK_K": 512}, (5120, 2560): {"BLOCK_K": 512}, (2048, 4096): {"BLOCK_K": 2048}}


# One-row FP8 GEMVs (and MoE pairs) with K up to this take 8-row tiles of 4 warps, not 16 rows of 8: at 16 rows a
# program held 118 registers a thread, two programs an SM (ncu: 23% occupancy, long-scoreboard stalls first,
# 4096x2048 at 22% of DRAM throughput). Measured on an H200 (session 12, 815aa5d): the medium weight stream as
# linear_small_m launches 189.3 vs 194.4 us, the medium FP8 decode step 302.1 / 302.2 vs 308.4 / 308.1 us
# (h200-ab-*-tiles-*-815aa5d*.json; 4 rows, 2048-deep chunks, PREQUANT and 32 rows were slower). Maverick's
# K = 5120 shapes keep their measured tiles (TUNED_FP8_GEMV).
ONE_ROW_FP8_MAX_K = 4096

# One-row BF16 GEMVs (K-contiguous): a program takes as many weight rows as make ~PROGRAM_BYTES (at most 4), and
# these measured shapes their best tiles (h200-gemv-bf16-8fc0176.json, gemv_bench.py --variants --cases bf16 on an
# H200). One row of 2 KB per step had medium's K = 2048 GEMVs at 58-83% of copy bandwidth (its LM head 77%, 40.9 us);
# 2-4 rows: 61-103% (the LM head 30.6 us at 2 rows). At K = 5120 one row stays best (8192x5120: 98% vs 84% at 2).
PROGRAM_BYTES = 16384
TUNED_BF16_GEMV = {(32768, 2048): {"BLOCK_N": 2}, (2048, 4096): {"BLOCK_N": 2, "BLOCK_K": 2048}}


def rows_per_program(m: int, k: int, size: int, swiglu: bool) -> int:
    """BLOCK_N of a K-contiguous high-precision GEMV: at one row, the weight rows (1, 2 or 4) that make
    about PROGRAM_BYTES a program (SwiGLU loads a gate and an up row each); 1 for gathered or more rows."""
    rows = PROGRAM_BYTES // (k * size * (2 if swiglu else 1)) if m == 1 else 1
    return 4 if rows >= 4 else 2 if rows >= 2 else 1


def mma_default(m: int, n: int, k: int) -> bool:
    """Dense FP8 on the tensor cores (fp8_mma.py) unless a config says otherwise? Measured on an H200
    (benchmarks/results/h200-gemv-variants-mma.json, graph-timed): from 2 rows up always (4 rows: 6.6
    vs 9.6 us at 4096x2048, 13.1 vs 18.8 at 4096x5120; 16 rows: 8.3 vs 15.4 at 8192x2048); at one row
    only for many 64-row tiles (32768x2048: 20.3 vs 28.0 us; 8192x2048 even, 7.4 vs 7.5; 4096x5120
    12.9 vs 8.5 and 2048x2048 5.5 vs 3.2: there the CUDA-core GEMV's shorter launch wins). n: the
    weight's output rows (gate and up both, for SwiGLU); k unused so far."""
    return m > 1 or n >= MMA_MIN_N_AT_M1


@functools.lru_cache(maxsize=None)
def tiles(M: int, N: int, K: int, layout: str, dtype: torch.dtype, gemv: bool | None = None,
            swiglu: bool = False) -> dict:
    """Tile shapes and launch knobs. N: output columns of the grid (N/2 for SwiGLU); layout: "k" if
    the weight is K-contiguous, else "n"; dtype: the weight's. Chosen from sweeps on an H200
    (benchmarks/gemv_bench.py --sweep): a K-major GEMV wants many small programs (1 row of W,
    2 KB per step), except with FP8, where each program also quantizes x and 8-16 rows share that
    work; an N-major GEMV wants strips 16-32 bytes wide and 32 KB deep; the 16-row tl.dot wants
    32-column tiles, 512 deep, 4 stages."""
    size = ELEMENT_SIZE[dtype]
    gemv = (M == 1) if gemv is None else gemv
    tiles = lambda block_n: M * -(-N // block_n) if gemv else -(-N // block_n)  # noqa: E731 (programs)
    if gemv and layout == "k" and dtype == FP8:
        if M == 1 and K <= ONE_ROW_FP8_MAX_K:  # ONE_ROW_FP8_MAX_K's comment: measured
            block_n, warps = 8 if tiles(8) >= SMS else 4, 4
        else:
            block_n = 16 if tiles(16) >= SMS else 8 if tiles(8) >= SMS else 4
            warps = 8 if block_n == 16 and not swiglu else 4
        block_k, stages = 512 if swiglu else 1024, 1
    elif gemv and layout == "k":
        block_n, block_k, warps, stages = rows_per_program(M, K, size, swiglu), 2048 // size, 4, 1
    elif gemv:
        block_n = (16 if tiles(16) >= SMS else 8) * 2 // size if size <= 2 else 4
        block_k, warps, stages = 32768 // (block_n * size), 8, 3
    else:
        block_n = 32 if tiles(32) >= 96 else 16
        block_k, warps = 128 if size == 4 else 512, 4
        stage_bytes = (2 if swiglu else 1) * block_n * block_k * size + MAX_M * block_k * 2  # W tile(s) + x tile
        stages = max(1, min(4, (200 << 10) // stage_bytes))  # Hopper: 227 KB of shared memory per block
    if INTERPRETED and gemv:
        block_n, block_k = max(block_n, 64), min(block_k, 256)  # numpy pays per program and @jit call
    return {"BLOCK_N": block_n, "BLOCK_K": max(16, min(block_k, triton.next_power_of_2(K))),
            "num_warps": warps, "num_stages": stages}
