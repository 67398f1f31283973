"""A kernel trace of graph-replayed steps of any model, dtype and step size, in the form the
emulator's fit reads (benchmarks/kernel_fit.py): every kernel of REPLAYS replays in time order
(start, duration, name, grid, block), one file. GPU only.

Why: the emulator's per-launch constants come from the one trace committed so far (medium, bf16, a
1-row decode step). Its worst validation cases are 4-row verify steps (FP8 GEMVs at 4 rows, MoE
pair launches over 4 distinct experts), whose costs come from isolated GEMV rows measured before
PDL. A trace of those steps lets `kernel_fit.py --compare` put each traced launch beside the plan's
op, so the responsible term shows launch by launch.

    python benchmarks/step_trace.py --model maverick-slice --dtype fp8 --tokens 4 \\
        --out benchmarks/results/profiles/h200-maverick-slice-fp8-verify-$(git rev-parse --short HEAD)-trace.json
    python benchmarks/kernel_fit.py --trace <that file> --compare maverick-slice fp8 4
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPLAYS = 5


def trace_steps(model_name: str, dtype: str, tokens: int, context: int, copies: bool = False) -> list[dict]:
    """The kernels (cat "kernel" of torch.profiler's CUDA activity) of REPLAYS graph replays; with
    `copies` also the device copies (cat "gpu_memcpy": a same-dtype contiguous copy_ in the graph is
    a memcpy node, no kernel), the REPLAYS resets of the cache lengths between replays among them."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from workers.cuda_graphs import DecodeGraph
    from workers.step_bench import RANDOM_PRESETS, prepared_cache, random_model
    model = random_model(RANDOM_PRESETS[model_name](), dtype, "triton", device="cuda")
    cache = prepared_cache(model, context, tokens, None)
    start = cache.lengths.clone()
    graph = DecodeGraph(model, cache, n_tokens=tokens)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            cache.lengths.copy_(start)  # a memcpy, not a kernel: not in the rows below
            graph.graph.replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    cats = ("kernel", "gpu_memcpy") if copies else ("kernel",)
    kernels = sorted((e for e in events if e.get("cat") in cats), key=lambda e: e["ts"])
    t0 = kernels[0]["ts"]
    return [{"start_us": round(e["ts"] - t0, 3), "dur_us": round(e["dur"], 3), "name": e["name"][:120],
             "grid": e.get("args", {}).get("grid"), "block": e.get("args", {}).get("block"),
             **({"cat": e["cat"]} if copies else {})} for e in kernels]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="medium", choices=["medium", "maverick-slice"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp8"])
    p.add_argument("--tokens", type=int, default=1, help="new tokens a step (1: decode, 4: verify)")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    kernels = trace_steps(args.model, args.dtype, args.tokens, args.context)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import torch
    source = (f"benchmarks/step_trace.py --model {args.model} --dtype {args.dtype} --tokens {args.tokens} "
              f"--context {args.context} on one {torch.cuda.get_device_name()}, commit {commit}, "
              f"{datetime.date.today().isoformat()}; kernels of {REPLAYS} graph replays in time order "
              f"(one step = {len(kernels) // REPLAYS} launches)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"source": source, "kernels": kernels}, indent=0) + "\n")
    print(f"{len(kernels) // REPLAYS} launches a step; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
