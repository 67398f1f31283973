"""Continuous batching without HTTP: one stream vs C concurrent streams through cluster/scheduler.py,
and what the control path costs per step (rank 0's command exchange: mailbox, msgpack, broadcasts).

    python benchmarks/serve_control.py [--world-size 8] [--concurrency 16] [--tokens 64] [--device cpu]
        [--spec chain3|tree] [--max-batch 16]

Prints a table and saves benchmarks/results/serve_control_w<N>.json. The issue's target on CPU actors:
aggregate tokens/s at 16 streams >= 6x one stream's. The control overhead is measured on the ranks
(ServeLoop.control_s / steps), so it holds whether the driver is near or far; the driver's polls are
off the ranks' critical path (they loop on their own between commands).
"""
from __future__ import annotations

import argparse
import time

from benchmarks.common import machine, median, percentile, print_table, save
from cluster.node import build_node
from cluster.scheduler import Scheduler
from model.embedded import default_draft_dir, default_model_dir
from model.sampling import SamplingParams
from model.spec import SpecConfig
from workers.run_config import RunConfig


def prompts(n: int, length: int = 48) -> list[list[int]]:
    text = (default_model_dir() / "heldout.txt").read_bytes()  # the embedded model's ids are its bytes
    return [list(text[i * 997: i * 997 + length]) for i in range(n)]


def run_level(scheduler: Scheduler, concurrency: int, tokens: int) -> dict:
    before = scheduler.metrics()
    params = SamplingParams(max_new_tokens=tokens, stop_on_eos=False)
    start = time.monotonic()
    handles = [scheduler.submit(p, params) for p in prompts(concurrency)]
    for h in handles:
        h.result(600)
    wall = time.monotonic() - start
    after = scheduler.metrics()
    steps = after["steps"] - before["steps"]
    itl = [b - a for h in handles for a, b in zip(h.token_times, h.token_times[1:])]
    spec = [h.spec["acceptance_length"] for h in handles if h.spec.get("acceptance_length")]
    return {"concurrency": concurrency, "tokens": concurrency * tokens, "wall_s": wall,
            "tokens_per_s": concurrency * tokens / wall, "per_stream_tokens_per_s": tokens / wall,
            "ttft_p50_s": median([h.ttft_s for h in handles]), "itl_p50_s": median(itl),
            "itl_p99_s": percentile(itl, 0.99),
            "rank0_steps": steps, "acceptance_length": median(spec) if spec else None,
            "control_per_step_s": (after["control_s_total"] - before["control_s_total"]) / max(steps, 1),
            "step_s": (after["step_s_total"] - before["step_s_total"]) / max(steps, 1)}


def loop_without_ray(comm, model_dir: str, concurrency: int, tokens: int, max_batch: int) -> dict:
    """The ranks' serve loop as local processes (cluster/procs.py, no Ray): rank 0 is also the
    driver (a thread pushing joins and a stop into its mailbox). Rank 0 returns its loop's stats."""
    import threading

    import torch

    from workers.run_config import RunConfig as Run
    from workers.serve_loop import Mailbox, run_serve
    from workers.worker import Worker
    worker = Worker(comm.rank, Run(model_dir, world_size=comm.world_size, max_context=512), comm)
    worker.load()
    mailbox = Mailbox() if comm.rank == 0 else None
    config = {"max_batch": max_batch, "max_context": 512, "prefill_chunk": 64}
    if mailbox is not None:
        def drive() -> None:
            params = {"max_new_tokens": tokens, "stop_on_eos": False}
            mailbox.push(0, [{"op": "join", "slot": i, "id": str(i), "prompt": p, "params": params}
                             for i, p in enumerate(prompts(concurrency))])
            since, done = 0, 0
            while done < concurrency:
                reply = mailbox.poll(since, 1.0)
                since, done = reply["next"], done + sum(1 for e in reply["events"] if e["finish"])
            mailbox.push(1, [{"op": "stop"}])
        threading.Thread(target=drive, daemon=True).start()
    stats = run_serve(worker, config, mailbox)
    return {k: torch.tensor(float(stats[k])) for k in ("steps", "control_s", "step_s")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--spec", choices=("chain3", "tree"), default=None)
    p.add_argument("--no-ray", action="store_true", help="only the ranks' loop, as local processes: "
                   "the control overhead per step without the driver")
    args = p.parse_args()
    if args.no_ray:
        from cluster.procs import run_world
        for c in (1, args.concurrency):
            out = run_world(args.world_size, loop_without_ray, str(default_model_dir()), c, args.tokens, args.max_batch,
                            backend="shm")
            steps = float(out["steps"])
            step_ms = float(out["step_s"]) / steps * 1e3
            print(f"world {args.world_size}, {c} streams: {steps:.0f} steps, step {step_ms:.1f} ms, "
                  f"control {float(out['control_s']) / steps * 1e6:.0f} us/step")
        return
    spec = {"chain3": SpecConfig(draft_len=3), "tree": SpecConfig(tree=True), None: None}[args.spec]
    comm = "shm" if args.device == "cpu" else "nccl"
    run = RunConfig(str(default_model_dir()), world_size=args.world_size, device=args.device, comm=comm,
                    max_context=512, draft_path=str(default_draft_dir()) if spec else None)
    node = build_node(run)
    node.load()
    with Scheduler(node, max_batch=args.max_batch, max_queue=4 * args.max_batch, spec=spec) as scheduler:
        run_level(scheduler, 1, 8)  # warm-up
        levels = [run_level(scheduler, c, args.tokens) for c in (1, args.concurrency)]
    ratio = levels[1]["tokens_per_s"] / levels[0]["tokens_per_s"]
    rows = [[lv["concurrency"], f"{lv['tokens_per_s']:.1f}", f"{lv['per_stream_tokens_per_s']:.1f}",
             f"{lv['ttft_p50_s'] * 1e3:.0f}", f"{lv['itl_p50_s'] * 1e3:.1f}", f"{lv['itl_p99_s'] * 1e3:.1f}",
             f"{lv['step_s'] * 1e3:.1f}", f"{lv['control_per_step_s'] * 1e6:.0f}", lv["acceptance_length"]]
            for lv in levels]
    print_table(["streams", "tok/s node", "tok/s stream", "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms",
                 "step ms", "control us/step", "AL"], rows)
    print(f"aggregate at {args.concurrency} streams = {ratio:.2f}x one stream's (target >= 6x on 8 CPU actors)")
    path = save(f"serve_control_w{args.world_size}{'_' + args.spec if args.spec else ''}",
                {"machine": machine(), "args": vars(args), "levels": levels, "ratio": ratio})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
