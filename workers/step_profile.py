"""Where a graph-replayed decode step spends its time: a kernel trace and a table by kernel name.

torch.profiler (CUPTI) sees the kernels inside replayed CUDA graphs. The trace of a few replays
goes to DIR/decode_step_trace.json (open it in Perfetto); the table sums each kernel name's GPU
time per step, and the gap line is the step's span minus its kernels' busy time (launch gaps and
idle between kernels inside the graph).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

REPLAYS = 5


def profile_graph_step(model, context: int, kv_dtype, out_dir: Path | None) -> list[dict]:
    """Every rank of a tensor-parallel model calls this (its graph's collectives need the peers'
    replays); the rank given an out_dir profiles and writes, the others (out_dir None) only replay."""
    from torch.profiler import ProfilerActivity, profile

    from workers.cuda_graphs import DecodeGraph
    from workers.step_bench import prepared_cache
    cache = prepared_cache(model, context, 1, kv_dtype)
    start = cache.lengths.clone()
    graph = DecodeGraph(model, cache, n_tokens=1)
    torch.cuda.synchronize()
    if out_dir is None:
        for _ in range(REPLAYS):
            cache.lengths.copy_(start)
            graph.graph.replay()
        torch.cuda.synchronize()
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            cache.lengths.copy_(start)
            graph.graph.replay()
        torch.cuda.synchronize()
    trace = out_dir / "decode_step_trace.json"
    prof.export_chrome_trace(str(trace))
    kernels = [e for e in json.loads(trace.read_text())["traceEvents"]
               if e.get("cat") == "kernel" and "copy" not in e.get("name", "").lower()]
    per_name, count = defaultdict(float), defaultdict(int)
    for e in kernels:
        per_name[e["name"]] += e["dur"] / REPLAYS
        count[e["name"]] += 1
    busy = sum(per_name.values())
    span = (max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)) / REPLAYS if kernels else 0.0
    rows = sorted(({"kernel": k[:60], "per_step": count[k] // REPLAYS, "us_per_step": round(v, 2)}
                   for k, v in per_name.items()), key=lambda r: -r["us_per_step"])
    print(f"\nkernels of one graph-replayed decode step ({len(kernels) // REPLAYS} launches, "
          f"{busy:.1f} us busy, ~{span:.1f} us span incl. gaps):")
    print(f"{'kernel':<62} {'n':>3} {'us':>8}")
    for r in rows[:25]:
        print(f"{r['kernel']:<62} {r['per_step']:>3} {r['us_per_step']:>8.2f}")
    (out_dir / "decode_step_kernels.json").write_text(json.dumps(
        {"launches_per_step": len(kernels) // REPLAYS, "busy_us": round(busy, 2), "span_us": round(span, 2),
         "kernels": rows}, indent=2))
    return rows
