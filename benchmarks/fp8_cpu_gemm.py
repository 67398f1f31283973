"""Which CPU path computes FP8 GEMMs: torch._scaled_mm on CPU, or the float32 emulation?

Both compute the same numbers (exact e4m3 products, float32 sums, float32 scale epilogue); this
measures how fast, at decode (M = 1, 4, 16) and prefill (M = 128) token counts, on the embedded
model's shapes and on Maverick TP8 shard shapes, with one torch thread (one rank's budget). Paths:
  scaled_mm      torch._scaled_mm on CPU (unit per-tensor scales, float32 out) + the float32 epilogue
                 (model.fp8.scaled_mm_sums_gemm; unit scales because some CPU builds have no others)
  emulated_cast  e4m3 -> float32 with torch's cast, float32 matmul, epilogue
  emulated_bits  e4m3 -> float32 by moving bits (model.fp8.fp8_values), float32 matmul, epilogue
  fp32_cached    float32 matmul on weights converted once: the floor if memory were no object
  bf16           the BF16 matmul the FP8 layer replaces
Each path's result is also checked against a float64 reference of the same quantized values.

    python benchmarks/fp8_cpu_gemm.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import machine, median, print_table, save  # noqa: E402
from model.fp8 import (PER_CHANNEL, emulated_gemm, quantize_activation, quantize_weight,  # noqa: E402
                       scaled_mm_sums_gemm)

SHAPES = {  # name: (K, N)
    "embedded qkv 256x512": (256, 512),
    "embedded fc13 256x1024": (256, 1024),
    "maverick-tp8 qkv 5120x896": (5120, 896),
    "maverick-tp8 expert fc13 5120x2048": (5120, 2048),
    "maverick-tp8 expert fc2 1024x5120": (1024, 5120),
}
TOKENS = (1, 4, 16, 128)


def _time(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return median(samples) * 1e3


def _emulated_cast(x_q, x_scale, w_q, w_scale):
    return (x_q.float() @ w_q.float().t()) * x_scale * w_scale


def bench_shape(k: int, n: int, m: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(k * 7 + n + m)
    w_q, w_scale = quantize_weight(torch.randn(n, k, generator=gen), "channel")
    w_scale = w_scale.flatten()
    x_q, x_scale = quantize_activation(torch.randn(m, k, generator=gen), PER_CHANNEL)
    w_cached, w_bf16, x_bf16 = w_q.float(), (w_q.float() * w_scale[:, None]).bfloat16(), torch.randn(m, k).bfloat16()
    paths = {
        "scaled_mm": lambda: scaled_mm_sums_gemm(x_q, x_scale, w_q, w_scale),
        "emulated_cast": lambda: _emulated_cast(x_q, x_scale, w_q, w_scale),
        "emulated_bits": lambda: emulated_gemm(x_q, x_scale, w_q, w_scale),
        "fp32_cached": lambda: (x_q.float() @ w_cached.t()) * x_scale * w_scale,
        "bf16": lambda: x_bf16 @ w_bf16.t(),
    }
    ref = (x_q.double() @ w_q.double().t()) * x_scale.double() * w_scale.double()
    bound = (x_q.double().abs() @ w_q.double().abs().t()) * x_scale.double() * w_scale.double() * k * 2.0 ** -23
    row = {"K": k, "N": n, "M": m}
    for name, fn in paths.items():
        row[f"{name}_ms"] = _time(fn, repeats)
        if name != "bf16":
            err = (fn().double() - ref).abs()
            row[f"{name}_within_fp32_bound"] = bool((err <= bound).all())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, (k, n) in SHAPES.items():
        for m in TOKENS:
            row = bench_shape(k, n, m, args.repeats)
            row["shape"] = name
            rows.append(row)
            print(f"{name} M={m}: scaled_mm {row['scaled_mm_ms']:.2f} ms, bits {row['emulated_bits_ms']:.2f} ms",
                  file=sys.stderr)
    headers = ["shape", "M", "scaled_mm ms", "emu cast ms", "emu bits ms", "fp32 cached ms", "bf16 ms", "all exact"]
    table = [[r["shape"], r["M"], r["scaled_mm_ms"], r["emulated_cast_ms"], r["emulated_bits_ms"],
              r["fp32_cached_ms"], r["bf16_ms"],
              all(v for key, v in r.items() if key.endswith("_within_fp32_bound"))] for r in rows]
    print_table(headers, table)
    speedup = [r["scaled_mm_ms"] / r["emulated_bits_ms"] for r in rows]
    wins = sum(s > 1 for s in speedup)
    summary = {"bits_faster_than_scaled_mm": f"{wins}/{len(rows)}", "median_speedup_vs_scaled_mm": median(speedup),
               "chosen_cpu_path": "emulated_bits" if wins > len(rows) / 2 else "scaled_mm"}
    print(summary)
    path = save("fp8_cpu_gemm", {"machine": machine(), "threads": 1, "repeats": args.repeats, "rows": rows,
                                 "summary": summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
