"""Fault drills: break a running node on purpose and check that it fails cleanly.

Each drill starts a node on CPU actors, injects one fault, and reports how long the driver took
to notice, what the user got (a clear error naming the rank, or a completed batch after a
restart), and what was left behind afterwards: shared-memory segments, node scratch
directories and Ray processes. The tests assert on these reports; `dgx-emu drill` prints them.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

from cluster.faults import RankFailure
from cluster.node import build_node
from collectives.factory import SHM_PREFIX
from model.sampling import SamplingParams
from workers.engine import Request
from workers.run_config import RunConfig

RAY_PROCESSES = ("gcs_server", "raylet", "ray::RankActor", "ray::IDLE")


def snapshot() -> dict:
    """What a node can leave behind on this host."""
    procs = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(name in cmd for name in RAY_PROCESSES):
                procs.add(f"{pid} {cmd[:60]}")
    shm = {n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIX)} if os.path.isdir("/dev/shm") else set()
    scratch = {p.name for p in Path("/tmp").glob("dgx-emu-node-*")}
    return {"processes": procs, "shm": shm, "scratch": scratch}


def leftovers(before: dict, timeout_s: float = 20.0) -> dict:
    """What appeared since `before` and is still there after up to timeout_s of waiting."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = snapshot()
        extra = {k: sorted(now[k] - before[k]) for k in now}
        if not any(extra.values()) or time.monotonic() > deadline:
            return extra
        time.sleep(0.25)


def _requests(n_tokens: int) -> list[Request]:
    params = SamplingParams(max_new_tokens=n_tokens, stop_on_eos=False)
    return [Request((0, 300, 301, 302), params, "a"), Request((0, 400, 401), params, "b")]


def _kill(node, rank: int, marks: dict) -> None:
    marks["fault_at"] = time.monotonic()
    os.kill(node.node_pids()[rank], signal.SIGKILL)


def _kill_when(node, rank: int, after_tokens: int, seen: list, done: threading.Event, marks: dict) -> None:
    while not done.is_set():
        if len(seen) >= after_tokens:
            return _kill(node, rank, marks)
        time.sleep(0.005)


def drill(run: RunConfig, fault: str, rank: int = 1, max_restarts: int = 0, n_tokens: int = 400) -> dict:
    """fault: "kill-decode" (SIGKILL a rank after some tokens), "kill-in-collective" (SIGKILL a
    rank while its peers wait for a late rank inside a collective), or "hang" (a rank arrives
    later than the collective timeout)."""
    before = snapshot()
    if fault == "hang":
        run = replace(run, delay_rank=rank, delay_s=3 * run.collective_timeout_s)
    elif fault == "kill-in-collective":
        # Everyone else waits for the late rank inside the collective, and the timeout is pushed
        # well past the kill so that the death (seen by the peers' liveness check), not the
        # timeout, is what ends the wait; otherwise the two race on a loaded machine.
        late = (rank + 1) % run.world_size
        run = replace(run, delay_rank=late, delay_s=60.0,
                      collective_timeout_s=max(run.collective_timeout_s, 30.0))
    report = {"fault": fault, "rank": rank, "world_size": run.world_size, "max_restarts": max_restarts}
    seen: list = []
    done = threading.Event()
    marks: dict = {}
    try:
        with build_node(run, max_restarts=max_restarts) as node:
            node.load()
            if fault == "kill-decode":
                threading.Thread(target=_kill_when, args=(node, rank, 5, seen, done, marks), daemon=True).start()
            elif fault == "kill-in-collective":
                threading.Timer(2.0, _kill, args=(node, rank, marks)).start()
            marks["start"] = time.monotonic()
            if fault == "hang":
                marks["fault_at"] = marks["start"]
            completions, _, _ = node.generate(_requests(n_tokens), lambda step, new: seen.append(new))
            report.update(outcome="completed", tokens=[c.token_ids for c in completions],
                          restarts=getattr(node, "restarts", 0), failures=getattr(node, "failures", []))
    except (RankFailure, TimeoutError) as e:
        caught = time.monotonic()
        report.update(outcome="error", error=str(e), failed_rank=getattr(e, "rank", None))
        if "fault_at" in marks:
            report["detected_after_s"] = caught - marks["fault_at"]
    finally:
        done.set()
    if report["outcome"] == "completed" and report.get("failures"):
        report["detected_after_s"] = report["failures"][0]["detected_after_s"] - (
            marks.get("fault_at", marks["start"]) - marks["start"])
    report["streamed_steps"] = len(seen)
    report["leftovers"] = leftovers(before)
    return report
