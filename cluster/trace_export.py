"""Exports an aligned trace: one merged Chrome Trace Event JSON, and per-rank JSON for HTA.

Merged trace (Perfetto UI, chrome://tracing): one process per rank with two tracks, "compute"
(decode steps, and inside them the model stages) and "communication" (each collective, with a
nested "wait" slice from the rank's arrival to the last arrival). Slices on one track nest
strictly. Flow arrows run from the last rank to arrive, the one that released the collective,
to the same collective on every other rank of its group. Args carry bytes, algorithm, sequence
number, dtype, group, layer and step.

A run with --emulate-node adds the modeled timeline (trace.modeled) as a second set of processes,
"rank r (modeled on <node>)", pid MODELED_PID + r, with the same two tracks, wait slices and flow
arrows on the virtual clock, shifted so that its first step starts with the measured first step.

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
MODELED_PID = 1000  # + rank: the modeled processes
HTA_CPU_TID, HTA_COMPUTE_STREAM, HTA_COMM_STREAM = 1, 7, 20


def _us(ns: int) -> float:
    return round(ns / 1e3, 3)


def _slice(name, cat, pid, tid, t0, t1, args=None) -> dict:
    start, end = _us(t0), _us(t1)  # round the ends, not the length, so nested slices stay nested
    return {"name": name, "cat": cat, "ph": "X", "pid": pid, "tid": tid, "ts": start, "dur": round(end - start, 3),
            "args": args or {}}


def _rank_events(trace: Trace, pid, label: str, sort_base: int, shift: int) -> list[dict]:
    """Each rank's process, its compute track (steps, stages) and communication track (collectives,
    waits), and the flow arrows from each collective's last arrival; pid(rank) names its process."""
    events = []
    for rank, rt in sorted(trace.ranks.items()):
        events.append({"name": "process_name", "ph": "M", "pid": pid(rank), "args": {"name": f"rank {rank}{label}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": pid(rank),
                       "args": {"sort_index": sort_base + rank}})
        for tid, name in ((COMPUTE_TID, "compute"), (COMM_TID, "communication")):
            events.append({"name": "thread_name", "ph": "M", "pid": pid(rank), "tid": tid, "args": {"name": name}})
        for s in rt.steps:
            events.append(_slice(f"step {s['s']}", "step", pid(rank), COMPUTE_TID, s["t0"] + shift, s["t1"] + shift,
                                 {"step": s["s"], "requests": s["r"], "tokens": s["tokens"]}))
        for s in rt.spans:
            events.append(_slice(s["n"], "stage", pid(rank), COMPUTE_TID, s["t0"] + shift, s["t1"] + shift,
                                 {"layer": s["l"], "step": s["s"]}))
    flow_id = 0
    for inst in trace.instances():
        release = inst.last_arrival
        for rank, r in inst.per_rank.items():
            args = {"bytes": inst.nbytes, "algorithm": inst.algorithm, "seq": inst.seq, "dtype": r["d"],
                    "group": list(inst.group), "layer": r["l"], "step": r["s"], "wait_us": _us(release - r["t0"])}
            events.append(_slice(inst.op, "collective", pid(rank), COMM_TID, r["t0"] + shift, r["t1"] + shift, args))
            if release > r["t0"]:
                events.append(_slice("wait", "wait", pid(rank), COMM_TID, r["t0"] + shift,
                                     min(release, r["t1"]) + shift))
        src = inst.last_rank
        for rank, r in inst.per_rank.items():
            if rank == src:
                continue
            flow_id += 1
            common = {"name": inst.op, "cat": "collective", "id": f"{label}{flow_id}" if label else flow_id}
            events.append({**common, "ph": "s", "pid": pid(src), "tid": COMM_TID,
                           "ts": _us(inst.per_rank[src]["t0"] + shift)})
            middle = _us((r["t0"] + r["t1"]) // 2 + shift)  # strictly inside the receiver's slice
            events.append({**common, "ph": "f", "bp": "e", "pid": pid(rank), "tid": COMM_TID, "ts": middle})
    return events


def _first_step_t0(trace: Trace) -> int:
    return min((s["t0"] for rt in trace.ranks.values() for s in rt.steps), default=0)


def chrome_trace(trace: Trace) -> dict:
    events = _rank_events(trace, lambda rank: rank, "", 0, 0)
    metadata = {"world_size": trace.world_size, "clock_offsets": {str(k): v for k, v in trace.offsets.items()}}
    if trace.modeled is not None:
        shift = _first_step_t0(trace) - _first_step_t0(trace.modeled)
        events += _rank_events(trace.modeled, lambda rank: MODELED_PID + rank, f" (modeled on {trace.modeled.node})",
                               trace.world_size, shift)
        metadata["modeled"] = {"node": trace.modeled.node, "pid_base": MODELED_PID, "shift_ns": shift}
    return {"traceEvents": events, "displayTimeUnit": "ns", "metadata": metadata}


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
