"""Decode speed of the node: the 8-actor Ray run next to the single-process model, in one run.

For each layout it loads the embedded default (or --model), then generates --tokens greedy tokens
--repeats times for one prompt, and reports medians over all decode steps: step latency p50/p90,
decode tokens/s, TTFT, and the control overhead (driver wall time minus the slowest rank's own
time in the generation loop, per step). Writes benchmarks/results/decode_<tag>.json.

    python benchmarks/decode_bench.py [--worlds 1,8] [--moe tp,ep] [--tokens 32] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, median, percentile, print_table, save  # noqa: E402
from cluster.node import build_node  # noqa: E402
from model.embedded import ensure_default_model  # noqa: E402
from model.sampling import SamplingParams  # noqa: E402
from workers.engine import Request  # noqa: E402
from workers.run_config import RunConfig  # noqa: E402


def bench_layout(model: str, world: int, moe: str, comm: str, tokens: int, repeats: int, device: str = "cpu",
                 dtype: str = "fp32", trace_dir: str | None = None) -> dict:
    run = RunConfig(model_path=model, world_size=world, moe_mode=moe, comm=comm, device=device, dtype=dtype,
                    trace_dir=trace_dir)
    request = [Request((0, 300, 301, 302, 303, 304, 305, 306), SamplingParams(max_new_tokens=tokens, stop_on_eos=False))]
    t0 = time.perf_counter()
    with build_node(run) as node:
        node.load()
        startup = time.perf_counter() - t0
        node.generate(request)  # warm-up
        steps, ttfts, overheads = [], [], []
        for i in range(repeats):
            _, stats, info = node.generate(request)
            steps += stats.step_s
            ttfts.append(stats.ttft_s)
            overheads.append(info.get("control_overhead_per_step_s", 0.0))
            print(f"  world {world} {moe}: repeat {i + 1}/{repeats}, step p50 {median(stats.step_s) * 1e3:.2f} ms",
                  file=sys.stderr)
    return {"world_size": world, "moe": moe, "comm": comm if world > 1 else "none", "device": device, "dtype": dtype,
            "traced": trace_dir is not None,
            "startup_s": startup, "step_p50_ms": median(steps) * 1e3, "step_p90_ms": percentile(steps, 0.9) * 1e3,
            "decode_tok_s": 1.0 / median(steps), "ttft_ms": median(ttfts) * 1e3,
            "control_overhead_per_step_ms": median(overheads) * 1e3, "n_steps": len(steps)}


def build_random_checkpoint(name: str) -> str:
    """A random bf16 checkpoint of a preset shape, in a temporary directory (for GPU runs)."""

    import torch

    from model.config import preset
    from model.embedded import random_state_dict, write_checkpoint
    cfg = preset(name)
    path = tempfile.mkdtemp(prefix=f"dgx-emu-{name}-")
    tensors = {k: v.to(torch.bfloat16) for k, v in random_state_dict(cfg, seed=0, std=0.02).items()}
    write_checkpoint(Path(path), cfg, tensors)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--worlds", default="1,8")
    p.add_argument("--moe", default="tp,ep")
    p.add_argument("--comm", default="gloo")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tag", default="cpu")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--random-preset", default=None, help="benchmark a random model of this preset (e.g. medium)")
    p.add_argument("--comms", default=None, help="compare data-plane backends, e.g. shm,gloo (overrides --comm)")
    p.add_argument("--trace-overhead", action="store_true",
                   help="also run each multi-rank layout with tracing on, to measure what tracing costs")
    args = p.parse_args()
    model = args.model or str(ensure_default_model())
    if args.random_preset:
        model = build_random_checkpoint(args.random_preset)
    rows = []
    comms = (args.comms or args.comm).split(",")
    for world in [int(w) for w in args.worlds.split(",")]:
        for moe in (["tp"] if world == 1 else args.moe.split(",")):
            for comm in (comms[:1] if world == 1 else comms):
                rows.append(bench_layout(model, world, moe, comm, args.tokens, args.repeats, args.device, args.dtype))
                if args.trace_overhead and world > 1:
                    with tempfile.TemporaryDirectory() as trace_dir:
                        rows.append(bench_layout(model, world, moe, comm, args.tokens, args.repeats, args.device,
                                                 args.dtype, trace_dir))
    base = next((r for r in rows if r["world_size"] == 1), None)
    for r in rows:
        r["speed_vs_single_process"] = r["decode_tok_s"] / base["decode_tok_s"] if base else None
    headers = ["device", "dtype", "world", "moe", "comm", "traced", "step p50 ms", "step p90 ms", "decode tok/s", "TTFT ms",
               "ctrl ms/step", "vs 1 proc", "steps"]
    print(f"machine: {machine()}")
    print_table(headers, [[r["device"], r["dtype"], r["world_size"], r["moe"], r["comm"], r["traced"], r["step_p50_ms"], r["step_p90_ms"], r["decode_tok_s"],
                           r["ttft_ms"], r["control_overhead_per_step_ms"], r["speed_vs_single_process"], r["n_steps"]]
                          for r in rows])
    print("saved", save(f"decode_{args.tag}", {"machine": machine(), "model": model, "rows": rows,
                                               "command": " ".join(sys.argv)}))


if __name__ == "__main__":
    main()
