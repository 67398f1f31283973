"""Exports an aligned trace: one merged Chrome Trace Event JSON, and per-rank JSON for HTA.

Merged trace (Perfetto UI, chrome://tracing): one process per rank with two tracks, "compute"
(decode steps, and inside them the model stages) and "communication" (each collective, with a
nested "wait" slice from the rank's arrival to the last arrival). Slices on one track nest
strictly. Flow arrows run from the last rank to arrive, the one that released the collective,
to the same collective on every other rank of its group. Args carry bytes, algorithm, sequence
number, dtype, group, layer and step.

HTA traces: Holistic Trace Analysis expects PyTorch-profiler-shaped files: `distributedInfo`,
`ProfilerStep#N` annotations on a CPU thread, device "kernel" events on streams, each with a
`cuda_runtime` launch event sharing its correlation id. Model stages become kernels on a compute
stream and collectives become `nccl...` kernels on a communication stream, which is how HTA
tells them apart.
"""
from __future__ import annotations

import json
from pathlib import Path

from cluster.timeline import Trace

COMPUTE_TID, COMM_TID = 1, 2
HTA_CPU_TID, HTA_COMPUTE_STREAM, HTA_COMM_STREAM = 1, 7, 20


def _us(ns: int) -> float:
    return round(ns / 1e3, 3)


def _slice(name, cat, pid, tid, t0, t1, args=None) -> dict:
    start, end = _us(t0), _us(t1)  # round the ends, not the length, so nested slices stay nested
    return {"name": name, "cat": cat, "ph": "X", "pid": pid, "tid": tid, "ts": start, "dur": round(end - start, 3),
            "args": args or {}}


def chrome_trace(trace: Trace) -> dict:
    events = []
    for rank, rt in sorted(trace.ranks.items()):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}})
        for tid, name in ((COMPUTE_TID, "compute"), (COMM_TID, "communication")):
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": name}})
        for s in rt.steps:
            events.append(_slice(f"step {s['s']}", "step", rank, COMPUTE_TID, s["t0"], s["t1"],
                                 {"step": s["s"], "requests": s["r"], "tokens": s["tokens"]}))
        for s in rt.spans:
            events.append(_slice(s["n"], "stage", rank, COMPUTE_TID, s["t0"], s["t1"], {"layer": s["l"], "step": s["s"]}))
    flow_id = 0
    for inst in trace.instances():
        release = inst.last_arrival
        for rank, r in inst.per_rank.items():
            args = {"bytes": inst.nbytes, "algorithm": inst.algorithm, "seq": inst.seq, "dtype": r["d"],
                    "group": list(inst.group), "layer": r["l"], "step": r["s"], "wait_us": _us(release - r["t0"])}
            events.append(_slice(inst.op, "collective", rank, COMM_TID, r["t0"], r["t1"], args))
            if release > r["t0"]:
                events.append(_slice("wait", "wait", rank, COMM_TID, r["t0"], min(release, r["t1"])))
        src = inst.last_rank
        for rank, r in inst.per_rank.items():
            if rank == src:
                continue
            flow_id += 1
            common = {"name": inst.op, "cat": "collective", "id": flow_id}
            events.append({**common, "ph": "s", "pid": src, "tid": COMM_TID, "ts": _us(inst.per_rank[src]["t0"])})
            middle = _us((r["t0"] + r["t1"]) // 2)  # strictly inside the receiver's slice
            events.append({**common, "ph": "f", "bp": "e", "pid": rank, "tid": COMM_TID, "ts": middle})
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "metadata": {"world_size": trace.world_size, "clock_offsets": {str(k): v for k, v in trace.offsets.items()}}}


def hta_rank_trace(trace: Trace, rank: int) -> dict:
    rt = trace.ranks[rank]
    events, correlation = [], 0
    for s in rt.steps:
        events.append(_slice(f"ProfilerStep#{s['s']}", "user_annotation", rank, HTA_CPU_TID, s["t0"], s["t1"]))

    def kernel(name: str, stream: int, t0: int, t1: int) -> None:
        nonlocal correlation
        correlation += 1
        launch_end = min(t1, t0 + 1000)
        events.append(_slice("cudaLaunchKernel", "cuda_runtime", rank, HTA_CPU_TID, t0, launch_end,
                             {"correlation": correlation}))
        events.append(_slice(name, "kernel", 0, stream, t0, t1, {"stream": stream, "correlation": correlation,
                                                                  "device": 0}))

    for s in rt.spans:
        kernel(f"dgxemu_{s['n']}", HTA_COMPUTE_STREAM, s["t0"], s["t1"])
    for c in rt.collectives:
        kernel(f"ncclDevKernel_{c['op']}", HTA_COMM_STREAM, c["t0"], c["t1"])
    events.sort(key=lambda e: e["ts"])
    backend = rt.header.get("backend", "shm")
    return {"distributedInfo": {"backend": "nccl" if backend == "nccl" else backend, "rank": rank,
                                "world_size": trace.world_size},
            "traceEvents": events}


def export(trace: Trace, directory: str | Path) -> dict[str, Path]:
    """Writes timeline.json (merged) and hta/rank<r>.json into `directory`."""
    directory = Path(directory)
    merged = directory / "timeline.json"
    merged.write_text(json.dumps(chrome_trace(trace)))
    hta_dir = directory / "hta"
    hta_dir.mkdir(exist_ok=True)
    for rank in trace.ranks:
        (hta_dir / f"rank{rank}.json").write_text(json.dumps(hta_rank_trace(trace, rank)))
    return {"merged": merged, "hta": hta_dir}
