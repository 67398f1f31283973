"""Per-rank communication timelines: the recorder and the tracing Communicator.

Every collective a rank makes passes through `TracingCommunicator`, which times it and hands a
record to the rank's `TraceRecorder`: op, group ranks, bytes, dtype, backend/algorithm, the
sequence number within the group (the same on every rank, since all ranks make the same calls
in the same order), the current layer / decode step / request, and start and end times.
Model stages (attention, MoE, MLP, LM head, sampling, draft, verify) are recorded as spans.

Records stream to `rank<r>.msgpack` in the trace directory: a header object, then batches of at
most `flush_every` records, so memory stays bounded however long the run. A batch is one msgpack
map whose "coll" and "span" entries are lists of rows (fields in COLL_FIELDS / SPAN_FIELDS
order) and whose "step" entry is a list of maps: recording a collective appends one small list,
and packing is one call per batch, which keeps tracing within a few percent of the step time. Times are CLOCK_MONOTONIC nanoseconds (one clock for every process on a host); on a GPU
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
VERSION = 2
COLL_FIELDS = ("op", "g", "q", "b", "d", "a", "l", "s", "t0", "t1", "rb")  # rb: received bytes (all-to-alls)
SPAN_FIELDS = ("n", "l", "s", "t0", "t1")
T0 = {"coll": COLL_FIELDS.index("t0"), "span": SPAN_FIELDS.index("t0")}


def boot_id() -> str:
    """Identifies the host's boot: CLOCK_MONOTONIC is shared by every process with the same one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


_EMPTY = torch.empty(0)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


class TraceRecorder:
    def __init__(self, directory: str | Path, rank: int, world_size: int, backend: str, device: str = "cpu",
                 flush_every: int = 1024) -> None:
        self.path = Path(directory) / f"rank{rank}.msgpack"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "wb")
        self.rank, self.flush_every = rank, flush_every
        self.cuda = device.startswith("cuda")
        self.batch: dict[str, list] = {"coll": [], "span": [], "step": []}
        self.n_buffered = 0
        self.pending_events: list[tuple[str, list]] = []
        self.layer, self.step, self.requests = -1, -1, []
        self.ref_event, self.ref_ns = None, 0
        self.last_comm_end = None
        self.dtype_names: dict = {}
        if not self.cuda:
            self.now = time.monotonic_ns  # the hot path: no method, no branch
        self._write({"type": "header", "format": FORMAT, "version": VERSION, "rank": rank,
                     "world_size": world_size, "backend": backend, "device": device, "pid": os.getpid(),
                     "host": socket.gethostname(), "boot_id": boot_id(), "clock": "CLOCK_MONOTONIC_ns"})

    # --- time -----------------------------------------------------------------------------
    def now(self):
        """A timestamp: CLOCK_MONOTONIC ns on the CPU, a recorded CUDA event on a GPU."""
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _emit(self, kind: str, row) -> None:
        """row: the record's fields (a list; a map for steps); t0/t1 are ns, or on a GPU CUDA
        events, resolved at the step's end."""
        if self.cuda:
            self.pending_events.append((kind, row))
        else:
            self._buffer(kind, row)

    def _buffer(self, kind: str, row) -> None:
        self.batch[kind].append(row)
        self.n_buffered += 1
        if self.n_buffered >= self.flush_every:
            self.flush()

    def _resolve_events(self) -> None:
        if not self.pending_events:
            return
        torch.cuda.synchronize()
        pending, self.pending_events = self.pending_events, []
        for kind, row in pending:
            t0, t1 = ("t0", "t1") if kind == "step" else (T0[kind], T0[kind] + 1)
            row[t0] = self.ref_ns + int(self.ref_event.elapsed_time(row[t0]) * 1e6)
            row[t1] = self.ref_ns + int(self.ref_event.elapsed_time(row[t1]) * 1e6)
            self._buffer(kind, row)

    # --- what is recorded -----------------------------------------------------------------
    def collective(self, op: str, group: list[int], seq: int, nbytes: int, dtype, algorithm: str, start, end,
                   received: int | None = None) -> None:
        """nbytes: the message (for uneven all-to-alls: what this rank sent; `received` what it got)."""
        name = self.dtype_names.get(dtype)
        if name is None:
            name = self.dtype_names[dtype] = _dtype_name(dtype)
        self.last_comm_end = end
        self._emit("coll", [op, group, seq, nbytes, name, algorithm, self.layer, self.step, start, end, received])

    @contextmanager
    def span(self, name: str):
        start = self.now()
        try:
            yield
        finally:
            self._emit("span", [name, self.layer, self.step, start, self.now()])

    def span_between(self, name: str, start, end) -> None:
        self._emit("span", [name, self.layer, self.step, start, end])

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
        self._emit("step", {"s": self.step, "r": self.requests, "tokens": tokens, **fields,
                            "t0": self.step_start, "t1": self.now()})
        self._resolve_events()
        self.layer = -1

    def flush(self) -> None:
        if self.n_buffered:
            self._write({"type": "batch", **self.batch})
            self.batch = {"coll": [], "span": [], "step": []}
            self.n_buffered = 0
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
        self._algorithm = getattr(inner, "algorithm", None)

    def _record(self, op: str, x: torch.Tensor, nbytes: int, start, received: int | None = None) -> None:
        self.seq += 1
        algorithm = self._algorithm(op, nbytes) if self._algorithm else self.backend
        self.recorder.collective(op, self.group, self.seq, nbytes, x.dtype, algorithm, start, self.recorder.now(),
                                 received)

    def all_reduce(self, x):
        start = self.recorder.now()
        out = self.inner.all_reduce(x)
        self._record("all_reduce", x, _nbytes(x), start)
        return out

    def allreduce_add_rmsnorm(self, partial, residual, weight, eps, quant_scale=None):
        start = self.recorder.now()
        out = self.inner.allreduce_add_rmsnorm(partial, residual, weight, eps, quant_scale)
        self._record("allreduce_add_rmsnorm", partial, _nbytes(partial), start)
        return out

    def all_gather(self, x, dim: int = 0):
        start = self.recorder.now()
        out = self.inner.all_gather(x, dim)
        self._record("all_gather", x, _nbytes(x) * self.world_size, start)
        return out

    def all_to_all(self, x, send_counts):
        start = self.recorder.now()
        out = self.inner.all_to_all(x, send_counts)
        self._record("all_to_all", x, _nbytes(x), start, _nbytes(out[0]))
        return out

    def dispatch(self, x, expert_ids, send_counts):
        start = self.recorder.now()
        out = self.inner.dispatch(x, expert_ids, send_counts)
        self._record("moe_dispatch", x, _nbytes(x) + _nbytes(expert_ids), start, _nbytes(out[0]) + _nbytes(out[1]))
        return out

    def combine(self, y, recv_counts, send_counts):
        start = self.recorder.now()
        out = self.inner.combine(y, recv_counts, send_counts)
        self._record("moe_combine", y, _nbytes(y), start, _nbytes(out))
        return out

    def broadcast(self, x, src: int = 0):
        start = self.recorder.now()
        out = self.inner.broadcast(x, src)
        self._record("broadcast", x, _nbytes(x), start)
        return out

    def barrier(self) -> None:
        start = self.recorder.now()
        self.inner.barrier()
        self._record("barrier", _EMPTY, 0, start)

    def close(self) -> None:
        self.recorder.close()
        self.inner.close()
