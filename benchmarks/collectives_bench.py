"""Latency of the collectives: shared memory against gloo, at 2, 4 and 8 ranks on this host.

For all_reduce, allreduce_add_rmsnorm and all_to_all, at 1, 4, 16 and 128 tokens x hidden 5120,
in fp32 and bf16: every rank runs --iters timed iterations after --warmup; the table shows the
median over iterations of the slowest rank's time (medians per rank, then the max over ranks).
For shm it also compares, at 1 token, the small-message algorithms (one-shot: every rank reduces;
reduce-once: rank 0 reduces, the others copy) under the four wait strategies (spin, yield, futex, hybrid).
Writes benchmarks/results/collectives_<tag>.json.

    python benchmarks/collectives_bench.py [--ranks 2,4,8] [--iters 200]

With --world N it benchmarks the GPUs instead (N processes, one GPU each, backend "symm"): the
fused symmetric-memory AllReduce(+RMSNorm) kernel, one-shot and two-shot, next to NCCL, inside
CUDA graphs and eagerly (workers/collectives_bench.py says how), a table, and JSON rows
{name, tokens, tp, median_us, p90_us, ...} written to --out:

    python benchmarks/collectives_bench.py --world 2 --out benchmarks/results/h200x2-collectives.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import machine, print_table, save  # noqa: E402
from cluster.procs import run_world  # noqa: E402
from collectives.shm import usable_cores  # noqa: E402

HIDDEN = 5120
OPS = ("all_reduce", "allreduce_add_rmsnorm", "all_to_all")


def _time_ops(comm, cases: list, iters: int, warmup: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(comm.rank)
    medians = []
    for op, tokens, dtype_name in cases:
        dtype = getattr(torch, dtype_name)
        x = torch.randn(tokens, HIDDEN).to(dtype)
        residual, weight = torch.randn(tokens, HIDDEN).to(dtype), torch.ones(HIDDEN, dtype=dtype)
        # all_to_all: each token goes to one rank (top-1 routing of `tokens` rows)
        dest = torch.arange(tokens) % comm.world_size
        counts = torch.bincount(dest, minlength=comm.world_size).tolist()
        times = []
        for i in range(warmup + iters):
            start = time.perf_counter()
            if op == "all_reduce":
                comm.all_reduce(x)
            elif op == "allreduce_add_rmsnorm":
                comm.allreduce_add_rmsnorm(x, residual, weight, 1e-5)
            else:
                comm.all_to_all(x, counts)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        medians.append(statistics.median(times))
    per_rank = torch.tensor(medians, dtype=torch.float64)
    return {"median_s": comm.all_gather(per_rank[None], dim=0)}  # (world, n_cases)


def run(backend: str, ranks: int, cases: list, iters: int, warmup: int, wait: str = "hybrid",
        algorithm: str = "auto") -> list[float]:
    import os
    os.environ["DGX_EMU_SHM_WAIT"], os.environ["DGX_EMU_SHM_ALGO"] = wait, algorithm
    got = run_world(ranks, _time_ops, cases, iters, warmup, backend=backend, timeout_s=600)
    return got["median_s"].max(dim=0).values.tolist()  # slowest rank's median, per case


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="2,4,8")
    p.add_argument("--tokens", default="1,4,16,128")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--gloo-iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--tag", default="cpu")
    p.add_argument("--world", type=int, default=0, help="GPU mode: this many GPUs (one process each)")
    p.add_argument("--out", default=None, help="GPU mode: JSON file for the rows")
    p.add_argument("--comm", default="symm", help="GPU mode: backend (symm: fused kernel and NCCL; nccl: NCCL only)")
    p.add_argument("--samples", type=int, default=100, help="GPU mode: timed samples per case")
    p.add_argument("--ops", type=int, default=20, help="GPU mode: back-to-back calls per sample")
    p.add_argument("--modes", default="graph,eager", help="GPU mode: graph and/or eager")
    args = p.parse_args()
    if args.world:
        gpu_main(args)
        return
    cases = [(op, int(t), d) for op in OPS for t in args.tokens.split(",") for d in args.dtypes.split(",")]
    host = machine()
    rows, results = [], []
    for ranks in [int(r) for r in args.ranks.split(",")]:
        print(f"{ranks} ranks: shm ...", file=sys.stderr)
        shm = run("shm", ranks, cases, args.iters, args.warmup)
        print(f"{ranks} ranks: gloo ...", file=sys.stderr)
        gloo = run("gloo", ranks, cases, args.gloo_iters, args.warmup)
        for (op, tokens, dtype), s, g in zip(cases, shm, gloo):
            rows.append([ranks, op, tokens, dtype, s * 1e3, g * 1e3, g / s])
            results.append({"ranks": ranks, "op": op, "tokens": tokens, "dtype": dtype, "shm_ms": s * 1e3,
                            "gloo_ms": g * 1e3, "speedup": g / s})
    waits = []
    one_token = [("allreduce_add_rmsnorm", 1, "float32")]
    for ranks in [int(r) for r in args.ranks.split(",")]:
        for algorithm in ("one-shot", "reduce-once"):
            for wait in ("hybrid", "futex", "yield", "spin"):
                print(f"{ranks} ranks: shm {algorithm} wait={wait} ...", file=sys.stderr)
                ms = run("shm", ranks, one_token, min(args.iters, 200), args.warmup, wait, algorithm)[0] * 1e3
                waits.append({"ranks": ranks, "algorithm": algorithm, "wait": wait, "ms": ms})
    print(f"machine: {host}")
    print_table(["ranks", "op", "tokens", "dtype", "shm ms", "gloo ms", "gloo/shm"], rows)
    print()
    print(f"default small-message algorithm here: {'reduce-once' if max(int(r) for r in args.ranks.split(',')) > usable_cores() else 'one-shot'} at the most ranks ({usable_cores()} usable cores)")
    print_table(["ranks", "algorithm", "wait strategy", "allreduce_add_rmsnorm 1x5120 fp32 ms"],
                [[w["ranks"], w["algorithm"], w["wait"], w["ms"]] for w in waits])
    print("saved", save(f"collectives_{args.tag}", {"machine": host, "rows": results, "wait_strategies": waits,
                                                    "iters": args.iters, "command": " ".join(sys.argv)}))


def gpu_main(args) -> None:
    """GPU mode is `dgx-emu bench collectives` (launch/bench_collectives.py); kept here for old commands."""
    from cluster.node import UserError
    from launch.bench_collectives import run_collectives
    args.tp = args.world
    try:
        sys.exit(run_collectives(args))
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
