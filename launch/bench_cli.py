"""`dgx-emu bench decode`: decode and verify steps of one GPU, or of a TP group, against their HBM floor.

    dgx-emu bench decode --device cuda --model medium --dtype bf16 [--tp N [--moe tp|ep] [--comm nccl]] [--out FILE.json]

For each step (decode: 1 new token; verify: 4, a chain of 3 drafts and its root) it times the
replayed CUDA graph of the fused step and, for comparison in the same run, the same model's eager
step on the fused kernels and the reference torch ops; each as median / p90 over many steps and
as a multiple of the step's floor (workers/step_bench.py says how the floor is counted). At
--tp N, N processes (one per GPU) run the same steps in lockstep and rank 0 reports; the floor is
one rank's shard, since the ranks read theirs in parallel. `--profile
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
from launch.bench_collectives import add_collectives_parser, run_collectives
from launch.bench_serve import add_bench_serve_parser, run_bench_serve
from model.embedded import ensure_default_model
from workers.step_bench import RANDOM_PRESETS, STEPS

PRESETS = ("embedded", *RANDOM_PRESETS)
MODES = ("graph", "eager-triton", "eager-torch")
COMMS = ("symm", "nccl")  # GPU backends a TP run can use


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="time GPU steps against their memory floor; load a running server")
    bsub = bench.add_subparsers(dest="bench_command", required=True, parser_class=type(bench))
    p = bsub.add_parser("decode", help="decode / verify steps of one GPU: CUDA graph vs eager, vs the HBM floor")
    p.add_argument("--model", default="embedded", help=f"a preset ({', '.join(PRESETS)}) or a checkpoint directory")
    p.add_argument("--device", default="cuda", choices=["cuda"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp8"])
    p.add_argument("--fp8-scheme", default="channel", choices=["channel", "per-tensor"],
                   help="a random preset's FP8 scales: per-channel weights with dynamic per-token activations, "
                        "or per-tensor weights with static activation scales (TensorRT-LLM's FP8 recipe)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks, one process per GPU of this host")
    p.add_argument("--moe", default="tp", choices=["tp", "ep"], help="MoE layout at --tp > 1")
    p.add_argument("--replicate-embedding", action="store_true",
                   help="at --tp > 1 every rank holds the whole embedding (no all-reduce to embed)")
    p.add_argument("--comm", default="symm", help=f"collective backend at --tp > 1: {', '.join(COMMS)}")
    p.add_argument("--steps", default="decode,verify", help=f"comma-separated: {', '.join(STEPS)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated: {', '.join(MODES)}")
    p.add_argument("--context", type=int, default=512, help="keys every step attends to")
    p.add_argument("--iters", type=int, default=300, help="timed steps per measurement (eager: a tenth)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--profile", default=None, metavar="DIR", help="also write a kernel trace of graph decode steps")
    add_collectives_parser(bsub)
    add_bench_serve_parser(bsub)


def _choices(text: str, allowed, what: str) -> list[str]:
    items = [s for s in text.split(",") if s]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise UserError(f"--{what}: unknown {bad[0] if bad else '(empty)'}; choose from {', '.join(allowed)}")
    return items


def _settings(args) -> dict:
    """What every rank needs to build its model and time its steps (plain data: it crosses processes)."""
    steps, modes = _choices(args.steps, STEPS, "steps"), _choices(args.modes, MODES, "modes")
    if args.context < max(STEPS[s] for s in steps) or args.iters < 10:
        raise UserError("--context must cover the step's tokens and --iters must be >= 10")
    path = None
    if args.fp8_scheme != "channel" and (args.dtype != "fp8" or args.model not in RANDOM_PRESETS):
        raise UserError("--fp8-scheme sets the scales of a random preset's FP8 weights: it needs --dtype fp8 and a "
                        f"preset ({', '.join(RANDOM_PRESETS)}); a checkpoint brings its own")
    if args.model not in RANDOM_PRESETS:
        path = ensure_default_model() if args.model == "embedded" else Path(args.model)
        if not path.is_dir():
            raise UserError(f"--model {args.model}: neither a preset ({', '.join(PRESETS)}) nor a directory")
    return {"model": args.model, "path": str(path) if path else None, "dtype": args.dtype, "moe": args.moe,
            "fp8_scheme": args.fp8_scheme, "replicate_embedding": args.replicate_embedding,
            "steps": steps, "modes": modes, "context": args.context, "iters": args.iters,
            "profile": Path(args.profile) if args.profile else None}


def _check_gpus(tp: int, comm: str) -> None:
    import torch
    if not torch.cuda.is_available():
        raise UserError("bench decode times GPU steps: no CUDA device is visible")
    if tp < 1 or tp > torch.cuda.device_count():
        raise UserError(f"--tp {tp}: this host has {torch.cuda.device_count()} GPU(s)")
    if tp > 1 and comm not in COMMS:
        raise UserError(f"--comm {comm}: choose from {', '.join(COMMS)}")


def run_bench(args) -> int:
    if args.bench_command == "collectives":
        return run_collectives(args)
    if args.bench_command == "serve":
        return run_bench_serve(args)
    import torch

    from workers.step_bench import measure_all
    settings = _settings(args)
    _check_gpus(args.tp, args.comm)
    if args.tp == 1:
        results, bandwidth = measure_all(settings, log=lambda line: print(line, file=sys.stderr))
    else:  # one process per GPU, joined by the collective backend; rank 0 reports
        import tempfile

        from cluster.procs import run_world
        from workers.step_bench import bench_rank
        with tempfile.TemporaryDirectory() as scratch:
            settings["rows_path"] = str(Path(scratch) / "rows.json")
            run_world(args.tp, bench_rank, settings, timeout_s=600.0, backend=args.comm, device="cuda")
            report = json.loads(Path(settings["rows_path"]).read_text())
        results, bandwidth = report["rows"], report["bandwidth"]
    from collectives.factory import symm_programs, symm_protocol
    for row in results:
        row["comm"] = args.comm if args.tp > 1 else "none"
        if row["comm"] == "symm":
            row["symm_protocol"], row["symm_programs"] = symm_protocol(), symm_programs() or "default"
    _print(results, bandwidth)
    if args.out:
        payload = {"machine": f"{args.tp} x {torch.cuda.get_device_name()}" if args.tp > 1 else torch.cuda.get_device_name(),
                   "date": datetime.date.today().isoformat(),
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
