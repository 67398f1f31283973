"""Probe of a multi-GPU host before the fused collective exists (issue 15): NVLink topology, peer
access, and the baselines the fused AllReduce + RMSNorm must beat, all in one process group.

Times NCCL all-reduce (eager and replayed from a CUDA graph) and torch's symmetric-memory
one-shot all-reduce for tokens x 5120 bf16, plus whether a Triton kernel can read a peer's
symmetric buffer through a raw pointer (the mechanism our kernel uses). Run without Ray:
    python benchmarks/tp_probe.py --world 2 --out probe.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HIDDEN = 5120


def _time_us(fn, iters: int = 50, reps: int = 15) -> tuple[float, float]:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def _graphed(fn):
    from workers.cuda_graphs import capture
    graph, _ = capture(fn, lambda: None, torch.device("cuda", torch.cuda.current_device()), world_size=2)
    return graph.replay


def _peer_read_check(handle, world: int, rank: int) -> str:
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def read_peer(ptr_table, out, n, peer: tl.constexpr, BLOCK: tl.constexpr):
            base = tl.load(ptr_table + peer).to(tl.pointer_type(tl.bfloat16))
            offs = tl.arange(0, BLOCK)
            tl.store(out + offs, tl.load(base + offs, mask=offs < n), mask=offs < n)

        peer = (rank + 1) % world
        out = torch.empty(128, dtype=torch.bfloat16, device="cuda")
        read_peer[(1,)](handle.buffer_ptrs_dev, out, 128, peer=peer, BLOCK=128)
        torch.cuda.synchronize()
        return "ok" if bool((out == float(peer + 1)).all()) else f"wrong values {out[:4].tolist()}"
    except Exception as exc:  # the probe reports, it does not stop
        return f"failed: {type(exc).__name__}: {exc}"[:300]


def _entry(rank: int, world: int, store_path: str, out_path: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    rows, info = [], {"rank": rank, "device_count": torch.cuda.device_count(),
                      "peer_access": [torch.cuda.can_device_access_peer(rank, p) for p in range(world) if p != rank]}
    import torch.distributed._symmetric_memory as symm_mem
    group = dist.group.WORLD.group_name
    try:
        symm = symm_mem.empty(128 * HIDDEN, dtype=torch.bfloat16, device="cuda")
        handle = symm_mem.rendezvous(symm, group)
        symm.fill_(float(rank + 1))
        dist.barrier()
        torch.cuda.synchronize()
        info["triton_peer_read"] = _peer_read_check(handle, world, rank)
    except Exception as exc:
        symm, info["symm_mem"] = None, f"failed: {type(exc).__name__}: {exc}"[:300]
    for tokens in (1, 4, 16, 128):
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
        cases = {"nccl-eager": lambda: dist.all_reduce(x)}
        try:
            cases["nccl-graph"] = _graphed(lambda: dist.all_reduce(x))
        except Exception as exc:
            info[f"nccl-graph-{tokens}"] = f"failed: {exc}"[:200]
        if symm is not None:
            view = symm[: tokens * HIDDEN].view(tokens, HIDDEN)
            cases["symm-one-shot-eager"] = lambda: torch.ops.symm_mem.one_shot_all_reduce(view, "sum", group)
            try:
                cases["symm-one-shot-graph"] = _graphed(
                    lambda: torch.ops.symm_mem.one_shot_all_reduce(view, "sum", group))
            except Exception as exc:
                info[f"symm-graph-{tokens}"] = f"failed: {exc}"[:200]
        for name, fn in cases.items():
            median, p90 = _time_us(fn)
            rows.append({"name": name, "tokens": tokens, "tp": world, "median_us": round(median, 2),
                         "p90_us": round(p90, 2)})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"machine": f"{world} x {torch.cuda.get_device_name()}", "torch": torch.__version__,
                       "command": " ".join(sys.argv), "info": info, "results": rows}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--out", default="tp_probe.json")
    args = parser.parse_args()
    if torch.cuda.device_count() < args.world:
        sys.exit(f"tp_probe: needs {args.world} GPUs, this machine has {torch.cuda.device_count()}")
    store = f"/tmp/tp_probe_store_{os.getpid()}"
    mp.start_processes(_entry, args=(args.world, store, args.out), nprocs=args.world, start_method="spawn")
    with open(args.out) as f:
        data = json.load(f)
    print(json.dumps(data["info"]))
    print(f"{'name':22s} {'tokens':>6s} {'median_us':>10s} {'p90_us':>8s}")
    for row in data["results"]:
        print(f"{row['name']:22s} {row['tokens']:6d} {row['median_us']:10.2f} {row['p90_us']:8.2f}")


if __name__ == "__main__":
    main()
