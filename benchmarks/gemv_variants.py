"""The GEMV variants `gemv_bench.py --variants` times, each case against its copy bandwidth.

Why: an FP8 decode GEMV on an H200 reached 21-71% of copy bandwidth (bf16: 46-105%), and which of
the candidate fixes pays can only be measured: converting e4m3 by integer ops instead of two
cvt instructions per byte (CVT "bits" / "words", model/kernels/gemv_math.py), quantizing x once
in a pre-pass kernel instead of in every program (PREQUANT), cutting K among programs (SPLIT_K),
fp16 instead of bf16 tensor-core operands for the 16-row dot (DOT_F16), e4m3 x e4m3 on the tensor
cores with the operands swapped (MMA, model/kernels/fp8_mma.py), and the tile / warp /
stage knobs around the heuristic's choice. One run times every variant of every case (one GPU,
a few minutes; the case list is what the medium and Maverick decode steps run) and prints, per
case, each variant's time and % of copy bandwidth, best first, so the defaults in
`model/kernels/gemv_tiles.py` can be set from one run. Variants that fail to compile are listed as such.
"""
from __future__ import annotations

import time

# (kind, dtype, M, N, K): dense weights or out-major FP8 experts (128 of them, SwiGLU)
CASES = [("dense", "fp8", 1, 4096, 2048), ("dense", "fp8", 1, 2048, 2048), ("dense", "fp8", 4, 4096, 2048),
         ("dense", "fp8", 4, 8192, 2048), ("dense", "fp8", 16, 8192, 2048),
         ("dense", "fp8", 1, 8192, 2048), ("dense", "fp8", 1, 2048, 4096),
         ("dense", "fp8", 1, 4096, 5120), ("dense", "fp8", 1, 32768, 2048), ("dense", "fp8", 4, 4096, 5120),
         ("dense", "fp8", 16, 4096, 5120), ("experts", "fp8", 1, 2048, 5120), ("experts", "fp8", 4, 2048, 5120),
         ("dense", "bf16", 1, 4096, 2048), ("dense", "bf16", 1, 2048, 2048), ("dense", "bf16", 1, 8192, 2048)]

FP8_GEMV = [("heuristic", {}), ("bits", {"CVT": "bits"}), ("words", {"CVT": "words"}),
            ("prequant", {"PREQUANT": True}), ("prequant bits", {"PREQUANT": True, "CVT": "bits"}),
            ("prequant words", {"PREQUANT": True, "CVT": "words"}), ("split2", {"SPLIT_K": 2}),
            ("split4", {"SPLIT_K": 4}), ("words split2", {"CVT": "words", "SPLIT_K": 2}),
            ("prequant words split2", {"PREQUANT": True, "CVT": "words", "SPLIT_K": 2}),
            ("stages2", {"num_stages": 2}), ("words stages2", {"CVT": "words", "num_stages": 2}),
            ("bn4", {"BLOCK_N": 4}), ("bn8", {"BLOCK_N": 8}), ("bn32 bk256", {"BLOCK_N": 32, "BLOCK_K": 256}),
            ("prequant bn4", {"PREQUANT": True, "BLOCK_N": 4}), ("prequant words bn8", {"PREQUANT": True,
                                                                                      "CVT": "words", "BLOCK_N": 8}),
            ("bk512", {"BLOCK_K": 512}), ("bk2048", {"BLOCK_K": 2048}), ("warps4", {"num_warps": 4}),
            ("warps8", {"num_warps": 8})]
FP8_DOT = [("dot bf16", {"gemv": False}), ("dot f16", {"gemv": False, "DOT_F16": True}),
           ("dot f16 bn16", {"gemv": False, "DOT_F16": True, "BLOCK_N": 16}),
           ("dot f16 bn64 bk256", {"gemv": False, "DOT_F16": True, "BLOCK_N": 64, "BLOCK_K": 256})]
MMA = [("mma", {"MMA": True}), ("mma split1", {"MMA": True, "SPLIT_K": 1}),
       ("mma split2", {"MMA": True, "SPLIT_K": 2}), ("mma split4", {"MMA": True, "SPLIT_K": 4}),
       ("mma split8", {"MMA": True, "SPLIT_K": 8}), ("mma bk128", {"MMA": True, "BLOCK_K": 128}),
       ("mma bk512", {"MMA": True, "BLOCK_K": 512}), ("mma bn32 (converts)", {"MMA": True, "BLOCK_N": 32}),
       ("mma bn128", {"MMA": True, "BLOCK_N": 128}),
       ("mma stages2", {"MMA": True, "num_stages": 2}), ("mma stages3", {"MMA": True, "num_stages": 3}),
       ("mma warps8", {"MMA": True, "num_warps": 8}),
       ("mma bk512 split2", {"MMA": True, "BLOCK_K": 512, "SPLIT_K": 2})]
# Maverick's deep-K FP8 GEMVs (fc2 16384 / 8192 deep at TP1 / TP2, o_proj, qkv) and medium's deepest:
# at TP2 the fc2 GEMV reads 84 MB in 60-80 us (25-33% of copy) inside the step, and split-K did not fix it
CASES_DEEP_K = [("dense", "fp8", 1, 5120, 16384), ("dense", "fp8", 1, 5120, 8192), ("dense", "fp8", 1, 5120, 5120),
                ("dense", "fp8", 1, 5120, 2560), ("dense", "fp8", 1, 7168, 5120), ("dense", "fp8", 1, 2048, 4096),
                ("dense", "fp8", 1, 2048, 2048), ("dense", "fp8", 4, 5120, 16384), ("dense", "fp8", 4, 5120, 8192)]
DEEP_K_GEMV = [("heuristic", {}), ("bn4", {"BLOCK_N": 4}), ("bn8", {"BLOCK_N": 8}), ("stages2", {"num_stages": 2}),
               ("stages3", {"num_stages": 3}), ("bn4 stages2", {"BLOCK_N": 4, "num_stages": 2}),
               ("bn8 stages2", {"BLOCK_N": 8, "num_stages": 2}), ("bn8 stages3", {"BLOCK_N": 8, "num_stages": 3}),
               ("bn4 stages3", {"BLOCK_N": 4, "num_stages": 3}), ("bk2048", {"BLOCK_K": 2048}),
               ("bn8 bk2048", {"BLOCK_N": 8, "BLOCK_K": 2048}), ("bk512", {"BLOCK_K": 512}),
               ("bn8 bk512 stages3", {"BLOCK_N": 8, "BLOCK_K": 512, "num_stages": 3}),
               ("bn4 bk512 stages3", {"BLOCK_N": 4, "BLOCK_K": 512, "num_stages": 3}),
               ("warps4", {"num_warps": 4}), ("bn8 warps8", {"BLOCK_N": 8, "num_warps": 8}),
               ("prequant", {"PREQUANT": True}), ("prequant bn8 stages2", {"PREQUANT": True, "BLOCK_N": 8,
                                                                          "num_stages": 2}),
               ("split2", {"SPLIT_K": 2}), ("split4", {"SPLIT_K": 4}), ("bn8 split2", {"BLOCK_N": 8, "SPLIT_K": 2}),
               ("words", {"CVT": "words"})]
# one-row dense GEMVs of the decode steps (medium: qkv, o_proj, fc13 with SwiGLU, fc2, LM head; Maverick: qkv /
# fc13 at TP2, fc2 at TP1), FP8 on the CUDA cores vs the tensor cores, BF16 beside. At 34db471 the tensor-core
# kernel also took one row of x unquantized and quantized each K chunk itself (no pre-pass launch): it lost to
# the pre-pass at every shape, 2-4x (h200-gemv-one-row-fused-quant-34db471.json, whose "mma" rows are that
# kernel and "mma prepass" rows today's "mma"), and was removed.
CASES_ONE_ROW = [("dense", "fp8", 1, 4096, 2048), ("dense", "fp8", 1, 2048, 2048), ("dense swiglu", "fp8", 1, 8192, 2048),
                 ("dense", "fp8", 1, 2048, 4096), ("dense", "fp8", 1, 32768, 2048), ("dense", "fp8", 1, 4096, 5120),
                 ("dense swiglu", "fp8", 1, 16384, 5120), ("dense", "fp8", 1, 5120, 16384),
                 ("dense", "bf16", 1, 4096, 2048), ("dense", "bf16", 1, 2048, 2048),
                 ("dense swiglu", "bf16", 1, 8192, 2048), ("dense", "bf16", 1, 2048, 4096)]
ONE_ROW_FP8 = [("heuristic", {}), ("gemv", {"MMA": False})] + MMA
# one-row BF16 GEMVs at K = 2048 / 4096 (medium's linears and its 32768-row LM head, which the FP8 step keeps in
# BF16 too) and Maverick's TP2 fc13 shape: tiles and warps around the heuristic's one row x 2 KB per step
CASES_BF16 = [("dense", "bf16", 1, 32768, 2048), ("dense", "bf16", 1, 4096, 2048), ("dense", "bf16", 1, 2048, 2048),
              ("dense swiglu", "bf16", 1, 8192, 2048), ("dense", "bf16", 1, 2048, 4096), ("dense", "bf16", 1, 8192, 5120)]
CASE_SETS = {"decode": CASES, "deep-k": CASES_DEEP_K, "one-row": CASES_ONE_ROW, "bf16": CASES_BF16}
BF16_GEMV = [("heuristic", {}), ("bn2", {"BLOCK_N": 2}), ("bn4", {"BLOCK_N": 4}), ("bk2048", {"BLOCK_K": 2048}),
             ("bn2 bk2048", {"BLOCK_N": 2, "BLOCK_K": 2048}), ("warps8", {"num_warps": 8}),
             ("stages2", {"num_stages": 2}), ("split2", {"SPLIT_K": 2})]
BF16_ONE_ROW = BF16_GEMV + [("bn8", {"BLOCK_N": 8}), ("bk512", {"BLOCK_K": 512}),
                            ("bn4 bk512", {"BLOCK_N": 4, "BLOCK_K": 512}), ("warps2", {"num_warps": 2}),
                            ("bn2 warps8", {"BLOCK_N": 2, "num_warps": 8}), ("stages3", {"num_stages": 3})]


def variants(kind: str, dtype: str, m: int, case_set: str = "decode") -> list[tuple[str, dict]]:
    """Named config overrides for one case (on top of the heuristic's tiles)."""
    if case_set == "bf16":
        return BF16_ONE_ROW
    if case_set == "one-row":
        return ONE_ROW_FP8 if dtype == "fp8" else [("heuristic", {})]
    if case_set == "deep-k":
        gemv = DEEP_K_GEMV if m == 1 else [(f"gemv {name}", {"gemv": True, **cfg}) for name, cfg in DEEP_K_GEMV[:9]]
        return gemv + MMA
    if dtype == "bf16":
        return BF16_GEMV
    if kind == "experts":  # always the GEMV path (gathered rows)
        return [v for v in FP8_GEMV if not v[0].startswith(("bn32", "bk2048"))]
    if m == 1:
        return FP8_GEMV[:8] + FP8_DOT + MMA
    gemv = [(f"gemv {name}", {"gemv": True, **cfg}) for name, cfg in FP8_GEMV[:4]]
    return [("heuristic (dot bf16)", {})] + FP8_DOT[1:] + gemv + MMA


def _rel_error(case: dict, config: dict) -> float:
    from model.kernels.linear_small_m import linear_small_m, reference_linear_small_m
    got = linear_small_m(case["x"], case["w"], config=config, **case["kw"]).float()
    ref = reference_linear_small_m(case["x"], case["w"], **case["kw"]).float()
    return float((got - ref).abs().max() / ref.abs().max())


def run(seconds: float, copy_tb_s: float, gb, case_set: str = "decode") -> list[dict]:
    """Times every variant of every case of CASE_SETS[case_set] (until `seconds` run out). gb: the
    gemv_bench module (its case builders, timing and call wrapper). Returns one record per (case, variant)."""
    import torch
    stop, records = time.perf_counter() + seconds, []
    for kind, dtype, m, n, k in CASE_SETS[case_set]:
        if time.perf_counter() > stop:
            print(f"variants: time is up before {kind} {dtype} M={m} {n}x{k}", flush=True)
            break
        case = (gb.dense_case(m, n, k, dtype, swiglu=kind.endswith("swiglu")) if kind.startswith("dense")
                else gb.expert_case(128, n, k, "k", m, True, dtype))
        info = {"kind": kind + (" swiglu" if kind == "experts" else ""), "dtype": dtype, "M": m, "N": n, "K": k,
                "bytes": case["bytes"]}
        rows = []
        for name, cfg in variants(kind, dtype, m, case_set):
            try:
                err = _rel_error(case, cfg)
                us = gb.bench(gb.ours(case, cfg), case["calls"])
                rows.append({**info, "variant": name, "config": cfg, "us": us, "rel_err": err,
                             "pct_copy": 100 * case["bytes"] / us / 1e6 / copy_tb_s})
            except Exception as exc:  # noqa: BLE001 - a variant the compiler refuses (shared memory, ...)
                rows.append({**info, "variant": name, "config": cfg, "error": f"{type(exc).__name__}: {exc}"[:160]})
        rows.sort(key=lambda r: r.get("us", float("inf")))
        print(f"\n{kind} {dtype} M={m} {n}x{k} ({case['bytes'] / 1e6:.1f} MB)", flush=True)
        for r in rows:
            line = (f"  {r['variant']:<26} {r['us']:8.2f} us  {r['pct_copy']:5.1f}% copy  err {r['rel_err']:.1e}"
                    if "us" in r else f"  {r['variant']:<26} failed: {r['error']}")
            print(line, flush=True)
        records += rows
        del case
        torch.cuda.empty_cache()
    return records


ROUTERS = [(1, 16, 2048, (16, 8, 4, 2)), (4, 16, 2048, (16, 4)), (1, 128, 5120, (8, 4, 2, 1))]  # (M, E, H, block_e)


def run_router(copy_tb_s: float, gb) -> list[dict]:
    """route_top1 per experts-per-program (block_e) at medium's and Maverick's router shapes, and the
    torch ops it replaces (router GEMM, top-k, sigmoid, casts): router weights rotate through L2."""
    import math

    import torch
    from model.kernels.moe_decode import route_top1
    records = []
    for m, n_experts, hidden, blocks in ROUTERS:
        x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n_experts, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
        copies = [w] + [w.clone() for _ in range(min(2000, math.ceil(gb.ROTATE_BYTES / w.nbytes)) - 1)]
        nbytes = w.nbytes + x.nbytes

        def torch_route(nxt=gb.cycler(copies)):
            logits, ids = torch.topk(x @ nxt().T, 1, dim=-1)
            return ids, torch.sigmoid(logits.float()).to(x.dtype)
        runs = [("torch mm+topk+sigmoid", None, torch_route)]
        runs += [(f"block_e {b}", b, lambda b=b, nxt=gb.cycler(copies): route_top1(x, nxt(), block_e=b))
                 for b in blocks]
        print(f"\nrouter M={m} {n_experts}x{hidden} ({nbytes / 1e6:.2f} MB)", flush=True)
        for name, block_e, fn in runs:
            us = gb.bench(fn, len(copies))
            records.append({"kind": "router", "dtype": "bf16", "M": m, "N": n_experts, "K": hidden, "variant": name,
                            "config": {"block_e": block_e}, "us": us, "bytes": nbytes,
                            "pct_copy": 100 * nbytes / us / 1e6 / copy_tb_s})
            print(f"  {name:<26} {us:8.2f} us  {records[-1]['pct_copy']:5.1f}% copy", flush=True)
    return records


def best(records: list[dict]) -> list[dict]:
    """The fastest variant of each case, with the heuristic's time beside it."""
    out = {}
    for r in records:
        key = (r["kind"], r["dtype"], r["M"], r["N"], r["K"])
        if "us" in r and (key not in out or r["us"] < out[key]["us"]):
            out[key] = r
    for r in records:
        key = (r["kind"], r["dtype"], r["M"], r["N"], r["K"])
        if r["variant"].startswith("heuristic") and "us" in r and key in out:
            out[key] = {**out[key], "heuristic_us": r["us"], "heuristic_pct_copy": r["pct_copy"]}
    return list(out.values())
