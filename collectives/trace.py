"""Per-rank communication timelines: the recorder and the tracing Communicator.

Every collective a rank makes passes through `TracingCommunicator`, which times it and hands a
record to the rank's `TraceRecorder`: op, group ranks, bytes, dtype, backend/algorithm, the
sequence number within the group (the same on every rank, since all ranks make the same calls
in the same order), the current layer / decode step / request, and start and end times.
Model stages (attention, MoE, MLP, LM head, sampling, draft, verify) are recorded as spans.

Records stream to `rank<r>.msgpack` in the trace directory: a header object, then one msgpack
map per record, flushed every `flush_every` records, so memory stays bounded however long the
run. Times are CLOCK_MONOTONIC nanoseconds (one clock for every process on a host); on a GPU
they come from CUDA events, resolved against a host timestamp taken at the start of each step.
Tracing off means no wrapper at all: the untraced path costs nothing.
"""
from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import msgpack
import torch

from collectives.communicator import Communicator

FORMAT = "dgx-emu-trace"
VERSION = 1


def boot_id() -> str:
    """Identifies the host's boot: CLOCK_MONOTONIC is shared by every process with the same one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


class TraceRecorder:
    def __init__(self, directory: str | Path, rank: int, world_size: int, backend: str, device: str = "cpu",
                 flush_every: int = 1024) -> None:
        self.path = Path(directory) / f"rank{rank}.msgpack"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "wb")
        self.rank, self.flush_every = rank, flush_every
        self.cuda = device.startswith("cuda")
        self.buffer: list[dict] = []
        self.pending_events: list[tuple[dict, object, object]] = []
        self.layer, self.step, self.requests = -1, -1, []
        self.ref_event, self.ref_ns = None, 0
        self.last_layer_end = None
        self._write({"type": "header", "format": FORMAT, "version": VERSION, "rank": rank,
                     "world_size": world_size, "backend": backend, "device": device, "pid": os.getpid(),
                     "host": socket.gethostname(), "boot_id": boot_id(), "clock": "CLOCK_MONOTONIC_ns"})

    # --- time -----------------------------------------------------------------------------
    def now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.monotonic_ns()

    def _emit(self, record: dict, start, end) -> None:
        if self.cuda:
            self.pending_events.append((record, start, end))
        else:
            record["t0"], record["t1"] = start, end
            self._append(record)

    def _append(self, record: dict) -> None:
        self.buffer.append(record)
        if len(self.buffer) >= self.flush_every:
            self.flush()

    def _resolve_events(self) -> None:
        if not self.pending_events:
            return
        torch.cuda.synchronize()
        for record, start, end in self.pending_events:
            record["t0"] = self.ref_ns + int(self.ref_event.elapsed_time(start) * 1e6)
            record["t1"] = self.ref_ns + int(self.ref_event.elapsed_time(end) * 1e6)
            self._append(record)
        self.pending_events = []

    # --- what is recorded -----------------------------------------------------------------
    def collective(self, op: str, group: list[int], seq: int, nbytes: int, dtype, algorithm: str, start, end,
                   received: int | None = None) -> None:
        """nbytes: the message (for uneven all-to-alls: what this rank sent; `received` what it got)."""
        record = {"k": "coll", "op": op, "g": group, "q": seq, "b": nbytes, "d": str(dtype).replace("torch.", ""),
                  "a": algorithm, "l": self.layer, "s": self.step}
        if received is not None:
            record["rb"] = received
        self._emit(record, start, end)

    @contextmanager
    def span(self, name: str):
        start = self.now()
        try:
            yield
        finally:
            self._emit({"k": "span", "n": name, "l": self.layer, "s": self.step}, start, self.now())

    def span_between(self, name: str, start, end) -> None:
        self._emit({"k": "span", "n": name, "l": self.layer, "s": self.step}, start, end)

    def step_begin(self, step: int, requests: list[str]) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.ref_event = torch.cuda.Event(enable_timing=True)
            self.ref_event.record()
            self.ref_ns = time.monotonic_ns()
        self.step, self.requests, self.layer = step, requests, -1
        self.step_start = self.now()

    def step_end(self, tokens: int, **fields) -> None:
        """fields: extra facts of the step (speculative decoding: drafts accepted per request)."""
        self._emit({"k": "step", "s": self.step, "r": self.requests, "tokens": tokens, **fields},
                   self.step_start, self.now())
        self._resolve_events()
        self.layer = -1

    def flush(self) -> None:
        for record in self.buffer:
            self._write(record)
        self.buffer = []
        self.file.flush()

    def _write(self, record: dict) -> None:
        self.file.write(msgpack.packb(record))

    def close(self) -> None:
        if not self.file.closed:
            if self.cuda:
                self._resolve_events()
            self.flush()
            self.file.close()


class TracingCommunicator(Communicator):
    """Wraps any Communicator; every call is recorded, then forwarded unchanged."""

    def __init__(self, inner: Communicator, recorder: TraceRecorder, group: list[int] | None = None) -> None:
        self.inner, self.recorder = inner, recorder
        self.rank, self.world_size, self.backend = inner.rank, inner.world_size, inner.backend
        self.group = group or list(range(inner.world_size))
        self.seq = 0

    def _traced(self, op: str, x: torch.Tensor, nbytes: int, call, received=None):
        """received(out) -> bytes this rank received, for the uneven (all-to-all) ops."""
        self.seq += 1
        algorithm = getattr(self.inner, "algorithm", lambda op, n: self.backend)(op, nbytes)
        start = self.recorder.now()
        out = call()
        self.recorder.collective(op, self.group, self.seq, nbytes, x.dtype, algorithm, start, self.recorder.now(),
                                 received(out) if received else None)
        return out

    def all_reduce(self, x):
        return self._traced("all_reduce", x, _nbytes(x), lambda: self.inner.all_reduce(x))

    def allreduce_add_rmsnorm(self, partial, residual, weight, eps, quant_scale=None):
        return self._traced("allreduce_add_rmsnorm", partial, _nbytes(partial), lambda: self.inner.allreduce_add_rmsnorm(
            partial, residual, weight, eps, quant_scale))

    def all_gather(self, x, dim: int = 0):
        return self._traced("all_gather", x, _nbytes(x) * self.world_size, lambda: self.inner.all_gather(x, dim))

    def all_to_all(self, x, send_counts):
        return self._traced("all_to_all", x, _nbytes(x), lambda: self.inner.all_to_all(x, send_counts),
                            lambda out: _nbytes(out[0]))

    def dispatch(self, x, expert_ids, send_counts):
        return self._traced("moe_dispatch", x, _nbytes(x) + _nbytes(expert_ids),
                            lambda: self.inner.dispatch(x, expert_ids, send_counts),
                            lambda out: _nbytes(out[0]) + _nbytes(out[1]))

    def combine(self, y, recv_counts, send_counts):
        return self._traced("moe_combine", y, _nbytes(y), lambda: self.inner.combine(y, recv_counts, send_counts),
                            _nbytes)

    def broadcast(self, x, src: int = 0):
        return self._traced("broadcast", x, _nbytes(x), lambda: self.inner.broadcast(x, src))

    def barrier(self) -> None:
        return self._traced("barrier", torch.empty(0), 0, self.inner.barrier)

    def close(self) -> None:
        self.recorder.close()
        self.inner.close()
