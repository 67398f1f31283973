"""Per-rank communication timelines: the recorder and the tracing Communicator.

Every collective a rank makes passes through `TracingCommunicator`, which times it and hands a
record to the rank's `TraceRecorder`: op, group ranks, bytes, dtype, backend/algorithm, the
sequence number within the group (the same on every rank, since all ranks make the same calls
in the same order), the current layer / decode step / request, and start and end times.
Model stages (attention, MoE, MLP, LM head, sampling, draft, verify) are recorded as spans.

Records stream to `rank<r>.msgpack` in the trace directory: a header object, then batches of at
most `flush_every` records, so memory stays bounded however long the run. A batch is one msgpack
map whose "coll" and "span" entries are flat lists of values (rows of COLL_FIELDS / SPAN_FIELDS,
one after another) and whose "step" entry is a list of maps: recording a collective extends one
list, and packing is one call per batch, which keeps tracing within a few percent of the step. Times are CLOCK_MONOTONIC nanoseconds (one clock for every process on a host); on a GPU
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
        if not self.cuda:  # the hot path: no method wrapper, no branch
            self.now, self.emit = time.monotonic_ns, self._store
        self._write({"type": "header", "format": FORMAT, "version": VERSION, "rank": rank,
                     "world_size": world_size, "backend": backend, "device": device, "pid": os.getpid(),
                     "host": socket.gethostname(), "boot_id": boot_id(), "clock": "CLOCK_MONOTONIC_ns"})

    # --- time -----------------------------------------------------------------------------
    def now(self):
        """A timestamp: CLOCK_MONOTONIC ns on the CPU, a recorded CUDA event on a GPU."""
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def emit(self, kind: str, fields) -> None:
        """fields: the record's values in COLL_FIELDS / SPAN_FIELDS order (a map for steps); t0/t1
        are ns, or on a GPU CUDA events, resolved at the step's end. On the CPU `emit` IS `_store`
        (bound in __init__: one call frame per record); this method is the GPU's."""
        self.pending_events.append((kind, list(fields) if kind != "step" else fields))

    def _store(self, kind: str, fields) -> None:
        """Rows are stored flat (one list per kind and batch, extended): a record allocates no
        object the garbage collector tracks, so tracing never makes Python's cyclic GC run more
        often (it counts such objects)."""
        if kind == "step":
            self.batch[kind].append(fields)
        else:
            self.batch[kind].extend(fields)
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
            self._store(kind, row)

    # --- what is recorded (collectives: TracingCommunicator._record) -------------------------
    @contextmanager
    def span(self, name: str):
        start = self.now()
        try:
            yield
        finally:
            self.emit("span", (name, self.layer, self.step, start, self.now()))

    def span_between(self, name: str, start, end) -> None:
        self.emit("span", (name, self.layer, self.step, start, end))

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
        self.emit("step", {"s": self.step, "r": self.requests, "tokens": tokens, **fields,
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


def _traced(method: str, op: str, sent=None, received=None):
    """A TracingCommunicator method: forwards the call to the wrapped communicator, then appends
    one row. The message is the first argument unless sent(self, args) says otherwise; received(out)
    gives the bytes this rank got, for the uneven ops. This is the hot path of tracing: one call
    frame, no map, no string work after the first call of a kind."""
    def call(self, *args, **kwargs):
        start = self.now()
        out = getattr(self.inner, method)(*args, **kwargs)
        end = self.now()
        x = args[0] if args else next(iter(kwargs.values()), _EMPTY)
        nbytes = x.nbytes if sent is None else sent(self, args or tuple(kwargs.values()))
        described = self._described.get((op, nbytes, x.dtype))
        if described is None:
            described = self._describe(op, nbytes, x.dtype)
        self.seq += 1
        recorder = self.recorder
        recorder.last_comm_end = end
        recorder.emit("coll", (op, self.group, self.seq, nbytes, described[0], described[1], recorder.layer,
                                recorder.step, start, end, None if received is None else received(out)))
        return out
    call.__name__ = call.__qualname__ = method
    return call


class TracingCommunicator(Communicator):
    """Wraps any Communicator; every call is recorded, then forwarded unchanged."""

    def __init__(self, inner: Communicator, recorder: TraceRecorder, group: list[int] | None = None) -> None:
        self.inner, self.recorder = inner, recorder
        self.rank, self.world_size, self.backend = inner.rank, inner.world_size, inner.backend
        self.group = group or list(range(inner.world_size))
        self.seq = 0
        self._algorithm = getattr(inner, "algorithm", None)
        self._described: dict = {}  # (op, bytes, dtype) -> (dtype name, algorithm)
        self.now = recorder.now

    def _describe(self, op: str, nbytes: int, dtype) -> tuple[str, str]:
        algorithm = self._algorithm(op, nbytes) if self._algorithm else self.backend
        described = self._described[op, nbytes, dtype] = (_dtype_name(dtype), algorithm)
        return described

    all_reduce = _traced("all_reduce", "all_reduce")
    allreduce_add_rmsnorm = _traced("allreduce_add_rmsnorm", "allreduce_add_rmsnorm")
    all_gather = _traced("all_gather", "all_gather", sent=lambda self, args: args[0].nbytes * self.world_size)
    all_to_all = _traced("all_to_all", "all_to_all", received=lambda out: out[0].nbytes)
    dispatch = _traced("dispatch", "moe_dispatch", sent=lambda self, args: args[0].nbytes + args[1].nbytes,
                       received=lambda out: out[0].nbytes + out[1].nbytes)
    combine = _traced("combine", "moe_combine", received=lambda out: out.nbytes)
    broadcast = _traced("broadcast", "broadcast")
    barrier = _traced("barrier", "barrier")  # no tensor: 0 bytes
    TRACED = ("all_reduce", "allreduce_add_rmsnorm", "all_gather", "all_to_all", "dispatch", "combine",
              "broadcast", "barrier")

    def set_enabled(self, enabled: bool) -> None:
        """Paused, every call goes straight to the wrapped communicator: its bound methods shadow
        the tracing ones on this instance, so a paused tracer costs what no tracer costs."""
        for name in self.TRACED:
            if enabled:
                self.__dict__.pop(name, None)
            else:
                setattr(self, name, getattr(self.inner, name))

    def close(self) -> None:
        self.recorder.close()
        self.inner.close()
