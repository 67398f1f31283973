"""`dgx-emu bench decode`: one GPU's decode and verify steps against their HBM floor.

    dgx-emu bench decode --device cuda --model medium --dtype bf16 [--tp 1] [--out FILE.json]

For each step (decode: 1 new token; verify: 4, a chain of 3 drafts and its root) it times the
replayed CUDA graph of the fused step and, for comparison in the same run, the same model's eager
step on the fused kernels and the reference torch ops; each as median / p90 over many steps and
as a multiple of the step's floor (workers/step_bench.py says how the floor is counted). `--profile
DIR` also writes a kernel trace of graph-replayed decode steps (Chrome JSON) and prints where the
time goes, kernel by kernel.
"""
from __future__ import annotations

import datetime
import json
import shlex
import sys
from pathlib import Path

from cluster.node import UserError
from model.embedded import ensure_default_model
from workers.step_bench import RANDOM_PRESETS, STEPS

PRESETS = ("embedded", *RANDOM_PRESETS)
MODES = ("graph", "eager-triton", "eager-torch")


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="time GPU steps against their memory floor")
    bsub = bench.add_subparsers(dest="bench_command", required=True, parser_class=type(bench))
    p = bsub.add_parser("decode", help="decode / verify steps of one GPU: CUDA graph vs eager, vs the HBM floor")
    p.add_argument("--model", default="embedded", help=f"a preset ({', '.join(PRESETS)}) or a checkpoint directory")
    p.add_argument("--device", default="cuda", choices=["cuda"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp8"])
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (1 for now)")
    p.add_argument("--steps", default="decode,verify", help=f"comma-separated: {', '.join(STEPS)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated: {', '.join(MODES)}")
    p.add_argument("--context", type=int, default=512, help="keys every step attends to")
    p.add_argument("--iters", type=int, default=300, help="timed steps per measurement (eager: a tenth)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--profile", default=None, metavar="DIR", help="also write a kernel trace of graph decode steps")


def _choices(text: str, allowed, what: str) -> list[str]:
    items = [s for s in text.split(",") if s]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise UserError(f"--{what}: unknown {bad[0] if bad else '(empty)'}; choose from {', '.join(allowed)}")
    return items


def _build(args, kernels: str):
    """The model for the run, on the GPU: a random preset or a loaded checkpoint (world of one)."""
    import torch

    from workers.step_bench import random_model
    if args.model in RANDOM_PRESETS:
        return random_model(RANDOM_PRESETS[args.model](), args.dtype, kernels), None
    from collectives.communicator import SingleRankCommunicator
    from model.config import load_model_config
    from model.parallel import layout
    from workers.model_build import build_model
    from workers.run_config import RunConfig
    path = ensure_default_model() if args.model == "embedded" else Path(args.model)
    if not path.is_dir():
        raise UserError(f"--model {args.model}: neither a preset ({', '.join(PRESETS)}) nor a directory")
    run = RunConfig(model_path=str(path), dtype=args.dtype, device="cuda", world_size=1, comm="gloo", kernels=kernels)
    cfg = load_model_config(path)
    model, _ = build_model(run, cfg, layout(cfg, 1, 0, "tp"), SingleRankCommunicator())
    return model.eval(), (torch.float8_e4m3fn if run.kv_dtype == "fp8" else None)


def run_bench(args) -> int:
    import torch

    from workers.step_bench import copy_bandwidth, measure_step
    steps, modes = _choices(args.steps, STEPS, "steps"), _choices(args.modes, MODES, "modes")
    if not torch.cuda.is_available():
        raise UserError("bench decode times GPU steps: no CUDA device is visible")
    if args.tp != 1:
        raise UserError(f"--tp {args.tp}: bench decode runs one GPU for now (multi-GPU steps come with the "
                        "peer-memory collectives)")
    if args.context < max(STEPS[s] for s in steps) or args.iters < 10:
        raise UserError("--context must cover the step's tokens and --iters must be >= 10")
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", file=sys.stderr)
    results = []
    for kernels in ("triton", "torch"):
        wanted = [m for m in modes if (m == "eager-torch") == (kernels == "torch")]
        if not wanted:
            continue
        model, kv_dtype = _build(args, kernels)
        for step in steps:
            for mode in wanted:
                timing = measure_step(model, step, STEPS[step], args.context, bandwidth,
                                      args.iters if mode == "graph" else max(10, args.iters // 10),
                                      mode="graph" if mode == "graph" else "eager", kv_dtype=kv_dtype)
                entry = {**timing.as_dict(), "name": f"{step}-{mode}", "model": args.model, "dtype": args.dtype,
                         "tp": args.tp, "context": args.context}
                results.append(entry)
                print(f"  {entry['name']}: {entry['median_us']:.1f} us ({entry['x_floor']:.2f}x floor)", file=sys.stderr)
        if args.profile and kernels == "triton":
            from launch.bench_profile import profile_graph_step
            profile_graph_step(model, args.context, kv_dtype, Path(args.profile))
        del model
        torch.cuda.empty_cache()
    _print(results, bandwidth)
    if args.out:
        payload = {"machine": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                   "command": "dgx-emu " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                   "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3), "results": results}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2))
    return 0


def _print(results: list[dict], bandwidth: float) -> None:
    print(f"{'step':<20} {'model':<15} {'dtype':<5} {'tok':>3} {'median us':>10} {'p90 us':>9} "
          f"{'floor us':>9} {'x floor':>8} {'MB read':>8}")
    for r in results:
        print(f"{r['name']:<20} {r['model']:<15} {r['dtype']:<5} {r['tokens']:>3} {r['median_us']:>10.1f} "
              f"{r['p90_us']:>9.1f} {r['floor_us']:>9.1f} {r['x_floor']:>8.2f} {r['bytes_read'] / 1e6:>8.1f}")
    print(f"(floor = bytes read / {bandwidth / 1e12:.2f} TB/s copy bandwidth measured in this run)")
