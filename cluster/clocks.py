"""Clock offsets between the driver and each rank, for merging per-rank timelines.

Each rank stamps its trace with its own CLOCK_MONOTONIC. The driver estimates every rank's
offset by round trips (Cristian's method): it reads its clock (t0), asks the rank for its clock
(t1), reads its clock again (t2); offset = t1 - (t0 + t2) / 2 with uncertainty (t2 - t0) / 2,
keeping the tightest of several samples. Ranks that share the driver's boot share its
CLOCK_MONOTONIC, so their offset is exactly zero; the measured value is still stored as a
check. Offsets are measured at the start and at the end of a run and written to clock.json;
the trace tools refuse to merge ranks whose offsets are missing.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from collectives.trace import boot_id


def estimate_offset(read_remote_clock, samples: int = 7) -> dict:
    """read_remote_clock() -> (monotonic ns, boot id) of the rank."""
    best = None
    for _ in range(samples):
        t0 = time.monotonic_ns()
        remote, remote_boot = read_remote_clock()
        t2 = time.monotonic_ns()
        sample = {"offset_ns": remote - (t0 + t2) // 2, "uncertainty_ns": (t2 - t0) // 2}
        if best is None or sample["uncertainty_ns"] < best["uncertainty_ns"]:
            best = sample
    best["measured_offset_ns"] = best["offset_ns"]
    best["same_clock"] = remote_boot == boot_id()
    if best["same_clock"]:
        best["offset_ns"], best["uncertainty_ns"] = 0, 0
    return best


def write_clock_file(trace_dir: str | Path, offsets: dict[str, list[dict]]) -> Path:
    """offsets: {"start": [per-rank dicts], "end": [...]}; each dict has rank, offset_ns, uncertainty_ns."""
    path = Path(trace_dir) / "clock.json"
    path.write_text(json.dumps({"driver_boot_id": boot_id(), "clock": "CLOCK_MONOTONIC_ns", **offsets}, indent=1))
    return path


def local_clock() -> tuple[int, str]:
    return time.monotonic_ns(), boot_id()
