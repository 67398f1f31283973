"""Latency of the MoE dispatch and combine on GPUs: the kernels over symmetric memory, replayed from
a CUDA graph, next to NCCL in the same run.

Every rank routes `tokens` rows x 5120 bf16, top-1 to random experts spread over the ranks (each
row goes to a random rank), and times, per call:
  dispatch-symm-graph / combine-symm-graph   collectives/moe_all_to_all.py's kernels (world x tokens
                                             slots, no host sync), GRAPH_CALLS calls per graph replay
  dispatch-nccl-eager / combine-nccl-eager   Communicator.dispatch / combine over NCCL, the dynamic
                                             EP path (counts exchanged, split sizes on the host);
                                             it cannot be captured, so it runs eagerly
  nccl-padded-graph                          NCCL all_to_all_single of `tokens` rows to EVERY rank
                                             (static splits: the capturable NCCL way, rows only;
                                             dispatch and combine would each be one of these)
Times are CUDA-event medians (and p90) over `reps` windows of `iters` calls, ranks in step (a
barrier before each window); rank 0's numbers are reported.

    python benchmarks/moe_dispatch_bench.py --world 2 --out benchmarks/results/h200x2-moe-dispatch.json

`time_dispatch_combine(comm)` is the function a collectives benchmark calls on each rank of a
`symm` communicator (cluster.procs.run_world(..., backend="symm", device="cuda")).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import machine, median, percentile, print_table  # noqa: E402

HIDDEN = 5120
TOKENS = (1, 4, 16, 128)
GRAPH_CALLS = 10  # calls captured in one graph: a replay's launch cost spread over them
NAMES = ("dispatch-symm-graph", "combine-symm-graph", "dispatch-nccl-eager", "combine-nccl-eager",
         "nccl-padded-graph")


def _time_us(comm, fn, calls_per_fn: int, iters: int, reps: int) -> tuple[float, float]:
    """(median, p90) microseconds per call of fn() (which makes calls_per_fn calls)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        comm.barrier()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (iters * calls_per_fn))
    return median(times), percentile(times, 0.9)


def _graphed(fn, calls: int):
    """A replay function of a CUDA graph holding `calls` calls of fn (warm-ups on a side stream)."""
    from workers.cuda_graphs import capture

    def calls_of_fn() -> None:
        for _ in range(calls):
            fn()
    graph, _ = capture(calls_of_fn, lambda: None, torch.device("cuda", torch.cuda.current_device()), world_size=2)
    return graph.replay


def _cases(comm, moe, tokens: int, hidden: int) -> dict:
    """name -> (fn, calls per fn) for one token count."""
    import torch.distributed as dist
    world, dev = comm.world_size, comm.device
    gen = torch.Generator(device=dev).manual_seed(comm.rank)
    x = torch.randn(tokens, hidden, generator=gen, device=dev).to(torch.bfloat16)
    dest = torch.randint(0, world, (tokens,), generator=gen, device=dev)  # top-1 to a random rank's expert
    ids = torch.randint(0, 16 * world, (tokens,), generator=gen, device=dev)
    recv_x, recv_ids = moe.dispatch(x, dest, ids)
    order = torch.argsort(dest, stable=True)
    sorted_x, sorted_ids = x[order], ids[order]
    send_counts = torch.bincount(dest, minlength=world).tolist()
    rows, _, recv_counts = comm.nccl.dispatch(sorted_x, sorted_ids, send_counts)
    padded_in = x.repeat(world, 1)  # (world*tokens, H): every rank gets `tokens` slots
    padded_out = torch.empty_like(padded_in)
    padded = lambda: dist.all_to_all_single(padded_out, padded_in)  # noqa: E731
    return {
        "dispatch-symm-graph": (_graphed(lambda: moe.dispatch(x, dest, ids), GRAPH_CALLS), GRAPH_CALLS),
        "combine-symm-graph": (_graphed(lambda: moe.combine(recv_x, recv_ids, dest), GRAPH_CALLS), GRAPH_CALLS),
        "dispatch-nccl-eager": (lambda: comm.nccl.dispatch(sorted_x, sorted_ids, send_counts), 1),
        "combine-nccl-eager": (lambda: comm.nccl.combine(rows, recv_counts, send_counts), 1),
        "nccl-padded-graph": (_graphed(padded, GRAPH_CALLS), GRAPH_CALLS),
    }


def time_dispatch_combine(comm, tokens=TOKENS, hidden: int = HIDDEN, iters: int = 20,
                          reps: int = 15) -> list[dict]:
    """On every rank of a SymmMemCommunicator (its `nccl` group and device): rows {name, tokens, tp,
    median_us, p90_us} of this rank, for NAMES x tokens. Collective: every rank calls it alike."""
    from collectives.moe_all_to_all import MoeLayout, SymmetricMoeAllToAll
    moe = SymmetricMoeAllToAll(comm.nccl, MoeLayout(comm.world_size, max_rows=max(tokens), max_hidden=hidden))
    rows = []
    for n in tokens:
        for name, (fn, calls) in _cases(comm, moe, n, hidden).items():
            med, p90 = _time_us(comm.nccl, fn, calls, iters if calls == 1 else max(1, iters // calls), reps)
            rows.append({"name": name, "tokens": n, "tp": comm.world_size, "median_us": round(med, 2),
                         "p90_us": round(p90, 2)})
    torch.cuda.synchronize()
    comm.nccl.barrier()
    missing = moe.missing_ranks()
    moe.close()
    if missing:
        raise RuntimeError(f"rank {comm.rank}: MoE kernel waits timed out on rank(s) {missing}")
    return rows


def _entry(comm, tokens, iters, reps):
    rows = time_dispatch_combine(comm, tokens, iters=iters, reps=reps)
    return {"us": torch.tensor([[r["median_us"], r["p90_us"]] for r in rows], dtype=torch.float64)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = p.parse_args()
    if torch.cuda.device_count() < args.world:
        sys.exit(f"moe_dispatch_bench: needs {args.world} GPUs, this machine has {torch.cuda.device_count()}")
    from cluster.procs import run_world
    tokens = tuple(int(t) for t in args.tokens.split(","))
    us = run_world(args.world, _entry, tokens, args.iters, args.reps, backend="symm", device="cuda",
                   timeout_s=600)["us"].tolist()
    rows = [{"name": name, "tokens": n, "tp": args.world, "median_us": med, "p90_us": p90}
            for (n, name), (med, p90) in zip([(n, name) for n in tokens for name in NAMES], us)]
    print(f"machine: {machine()}")
    print_table(["name", "tokens", "tp", "median us", "p90 us"],
                [[r["name"], r["tokens"], r["tp"], r["median_us"], r["p90_us"]] for r in rows])
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine(), "command": " ".join(sys.argv),
                                              "hidden": HIDDEN, "dtype": "bfloat16", "results": rows}, indent=1))
        print("saved", args.out)


if __name__ == "__main__":
    main()
