"""Per-rank communication timelines: the recorder and the tracing Communicator.

Every collective a rank makes passes through `TracingCommunicator`, which times it and appends a
row to the rank's `TraceRecorder`: op, group ranks, the sequence number within the group (the
same on every rank, since all ranks make the same calls in the same order), bytes, dtype, the
current layer / decode step, and start and end times; the backend's algorithm for (op, bytes)
and the step's requests are filled in once per batch and per step, off the hot path. Model
stages (attention, MoE, MLP, LM head, sampling, draft, verify) are recorded as spans.

The hot path is what limits tracing's cost (a decode step of the embedded model is ~10
collectives and ~12 stages in a few milliseconds of Python-driven torch ops), so a record is
one closure call with its references in cells, two clock reads and ONE C-level `list.extend`
of a flat row: no map, no counter, no flush check, no string work. Rows stay in two flat lists
(collectives, spans) that the recorder packs and empties at the end of a step once they hold
`flush_every` records, so memory is bounded by that plus one step. A record leaves behind no
new object that the garbage collector tracks, so tracing does not make Python's cyclic GC run
more often.

Records stream to `rank<r>.msgpack` in the trace directory: a header map, then batch maps whose
"coll" and "span" entries are flat rows of COLL_FIELDS / SPAN_FIELDS, whose "step" entry is a
list of maps, and whose "algorithms" entry lists [op, bytes, algorithm] for the collectives of
the batch. Times are CLOCK_MONOTONIC nanoseconds (one clock for every process on a host); on a
GPU the rows first hold CUDA events (from a reused pool), resolved at each step's end against a
reference event recorded next to a host clock read while the GPU was idle. Tracing off (or
paused) means no wrapper at all: the untraced path costs nothing.
"""
from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path

import msgpack
import torch

from collectives.communicator import Communicator

MODELED_DIR = "modeled"  # a trace directory's subdirectory of modeled tracks (workers/virtual_clock.py)
FORMAT = "dgx-emu-trace"
VERSION = 3
COLL_FIELDS = ("op", "g", "q", "b", "d", "l", "s", "t0", "t1", "rb")  # rb: received bytes (uneven all-to-alls)
SPAN_FIELDS = ("n", "l", "s", "t0", "t1")
COLL_WIDTH, SPAN_WIDTH = len(COLL_FIELDS), len(SPAN_FIELDS)
COLL_T0, SPAN_T0 = COLL_FIELDS.index("t0"), SPAN_FIELDS.index("t0")  # t1 follows t0
COLL_OP, COLL_BYTES, COLL_DTYPE = COLL_FIELDS.index("op"), COLL_FIELDS.index("b"), COLL_FIELDS.index("d")
_EMPTY = torch.empty(0)


def boot_id() -> str:
    """Identifies the host's boot: CLOCK_MONOTONIC is shared by every process with the same one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


class _Span:
    """`with recorder.span(name):` (a class: no generator object and frame per use)."""

    __slots__ = ("recorder", "name", "start")

    def __init__(self, recorder: "TraceRecorder", name: str) -> None:
        self.recorder, self.name = recorder, name

    def __enter__(self) -> None:
        self.start = self.recorder.now()

    def __exit__(self, *exc) -> None:
        r = self.recorder
        r.add_span((self.name, r.layer, r.step, self.start, r.now()))


class CudaEventClock:
    """Device-event timestamps for a GPU rank, cheap enough for ~30 per decode step. Creating a
    CUDA event costs several times more than recording one, so events come from a pool that is
    reused once they are resolved; they are recorded on the stream that was current at the last
    rebase (asking torch for the current stream builds a Python object per call). An event
    becomes CLOCK_MONOTONIC ns through its elapsed time from a reference event, recorded while
    the GPU was idle, next to a host clock read; the reference is renewed once it is older than
    REBASE_AFTER_NS (a fresh one per step would cost a stream lookup and an event per step, and
    an old one loses precision: elapsed times are float32 milliseconds)."""

    REBASE_AFTER_NS = 250_000_000

    def __init__(self) -> None:
        self.pool: list = []
        self.used = 0
        self.ref_event = torch.cuda.Event(enable_timing=True)
        self.rebase()

    def now(self):
        used = self.used
        if used == len(self.pool):
            self.pool.append(torch.cuda.Event(enable_timing=True))
        event = self.pool[used]
        self.used = used + 1
        event.record(self.stream)
        return event

    def times_ns(self) -> dict:
        """CLOCK_MONOTONIC ns of every event handed out since the pool was last reused, which it
        now is; waits for the last of them (they are on one stream, in order)."""
        if self.used:
            self.pool[self.used - 1].synchronize()
        elapsed_ms, ref_ns = self.ref_event.elapsed_time, self.ref_ns
        times = {event: ref_ns + int(elapsed_ms(event) * 1e6) for event in self.pool[:self.used]}
        if time.monotonic_ns() - ref_ns > self.REBASE_AFTER_NS:
            self.rebase()
        self.used = 0
        return times

    def rebase(self) -> None:
        """Pairs a new reference event with the host clock while the stream is idle, and frees
        the pool (call only when no unresolved event is held)."""
        self.stream = torch.cuda.current_stream()
        if not self.stream.query():
            torch.cuda.synchronize()
        self.ref_event.record(self.stream)
        self.ref_ns = time.monotonic_ns()
        self.used = 0


class TraceRecorder:
    def __init__(self, directory: str | Path, rank: int, world_size: int, backend: str, device: str = "cpu",
                 flush_every: int = 1024, now=None, header: dict | None = None) -> None:
        """now: the clock rows are stamped with (default: CLOCK_MONOTONIC ns, or CUDA events on a
        GPU); header: extra header fields (a modeled timeline says so: workers/virtual_clock.py)."""
        self.path = Path(directory) / f"rank{rank}.msgpack"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "wb")
        self.rank, self.backend, self.flush_every = rank, backend, flush_every
        self.coll_rows: list = []  # flat rows of COLL_FIELDS; emptied in place, never replaced
        self.span_rows: list = []  # flat rows of SPAN_FIELDS; likewise
        self.steps: list[dict] = []
        self.add_collective, self.add_span = self.coll_rows.extend, self.span_rows.extend  # the hot path
        self.algorithm_of = lambda op, nbytes: backend  # a TracingCommunicator installs its backend's
        self.layer, self.step, self.requests = -1, -1, []
        self.unresolved = (0, 0, 0)  # GPU: where the rows still holding CUDA events start
        self.cuda_clock = CudaEventClock() if device.startswith("cuda") else None
        # now(): a timestamp, CLOCK_MONOTONIC ns on the CPU, a recorded CUDA event on a GPU
        self.now = now or (self.cuda_clock.now if self.cuda_clock else time.monotonic_ns)
        self._write({"type": "header", "format": FORMAT, "version": VERSION, "rank": rank,
                     "world_size": world_size, "backend": backend, "device": device, "pid": os.getpid(),
                     "host": socket.gethostname(), "boot_id": boot_id(), "clock": "CLOCK_MONOTONIC_ns",
                     **(header or {})})

    def _resolve_events(self) -> None:
        """GPU: every CUDA event recorded since the last call becomes CLOCK_MONOTONIC ns (each
        event once: a stage boundary shares its event with a collective's start or end)."""
        times = self.cuda_clock.times_ns()
        coll_from, span_from, step_from = self.unresolved
        for rows, start, width, t0 in ((self.coll_rows, coll_from, COLL_WIDTH, COLL_T0),
                                       (self.span_rows, span_from, SPAN_WIDTH, SPAN_T0)):
            for column in (start + t0, start + t0 + 1):  # t0, t1: C-level slice reads and writes
                rows[column::width] = list(map(times.__getitem__, rows[column::width]))
        for step in self.steps[step_from:]:
            step["t0"], step["t1"] = times[step["t0"]], times[step["t1"]]
        self.unresolved = (len(self.coll_rows), len(self.span_rows), len(self.steps))

    # --- what is recorded (collectives: TracingCommunicator) --------------------------------
    def span(self, name: str) -> _Span:
        return _Span(self, name)

    def span_between(self, name: str, start, end) -> None:
        self.add_span((name, self.layer, self.step, start, end))

    def step_begin(self, step: int, requests: list[str]) -> None:
        self.step, self.requests, self.layer = step, requests, -1
        self.step_start = self.now()

    def step_end(self, tokens: int, **fields) -> None:
        """fields: extra facts of the step (speculative decoding: drafts accepted per request)."""
        self.steps.append({"s": self.step, "r": self.requests, "tokens": tokens, **fields,
                           "t0": self.step_start, "t1": self.now()})
        if self.cuda_clock:
            self._resolve_events()
        self.layer = -1
        if len(self.coll_rows) // COLL_WIDTH + len(self.span_rows) // SPAN_WIDTH + len(self.steps) >= self.flush_every:
            self.flush()

    def add_resolved(self, step: dict, coll_rows: list, span_rows: list) -> None:
        """A step whose times are already CLOCK_MONOTONIC ns (a graph-replayed step, timed by the
        GPU stamps of workers/graph_trace.py): flat rows of COLL_FIELDS / SPAN_FIELDS and the step's
        map, appended after any rows still holding CUDA events are resolved."""
        if self.cuda_clock and self.unresolved != (len(self.coll_rows), len(self.span_rows), len(self.steps)):
            self._resolve_events()
        self.add_collective(coll_rows)
        self.add_span(span_rows)
        self.steps.append(step)
        self.unresolved = (len(self.coll_rows), len(self.span_rows), len(self.steps))
        if len(self.coll_rows) // COLL_WIDTH + len(self.span_rows) // SPAN_WIDTH + len(self.steps) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Packs the buffered rows as one batch and empties the buffers (in place: the hot path
        holds their `extend`). Dtypes become names and each (op, bytes) its algorithm here."""
        coll = self.coll_rows
        if coll or self.span_rows or self.steps:
            if self.cuda_clock and self.unresolved != (len(coll), len(self.span_rows), len(self.steps)):
                self._resolve_events()  # (at a step's end they already are)
            dtypes = coll[COLL_DTYPE::COLL_WIDTH]
            names = {d: str(d).replace("torch.", "") for d in set(dtypes)}
            coll[COLL_DTYPE::COLL_WIDTH] = [names[d] for d in dtypes]
            pairs = set(zip(coll[COLL_OP::COLL_WIDTH], coll[COLL_BYTES::COLL_WIDTH]))
            algorithms = [[op, nbytes, self.algorithm_of(op, nbytes)] for op, nbytes in sorted(pairs)]
            self._write({"type": "batch", "coll": coll, "span": self.span_rows, "step": self.steps,
                         "algorithms": algorithms})
            del coll[:], self.span_rows[:]
            self.steps = []
            self.unresolved = (0, 0, 0)
        self.file.flush()

    def _write(self, record: dict) -> None:
        self.file.write(msgpack.packb(record))

    def close(self) -> None:
        if not self.file.closed:
            self.flush()
            self.file.close()


# method -> (op as recorded, bytes sent from the arguments, bytes received from the result); None: the
# first argument's bytes, nothing received (the even collectives)
_TRACED = {
    "all_reduce": ("all_reduce", None, None),
    "allreduce_add_rmsnorm": ("allreduce_add_rmsnorm", None, None),
    "all_gather": ("all_gather", lambda comm, args: args[0].nbytes * comm.world_size, None),
    "all_to_all": ("all_to_all", None, lambda out: out[0].nbytes),
    "dispatch": ("moe_dispatch", lambda comm, args: args[0].nbytes + args[1].nbytes,
                 lambda out: out[0].nbytes + out[1].nbytes),
    "combine": ("moe_combine", None, lambda out: out.nbytes),
    "broadcast": ("broadcast", None, None),
    "barrier": ("barrier", lambda comm, args: 0, None),  # no tensor
}


def describe_call(comm, method: str, args: tuple, out) -> tuple:
    """(op as recorded, bytes sent, dtype, bytes received or None) of one call of `comm`, the
    fields a TracingCommunicator records (the virtual clock's modeled rows reuse them)."""
    op, sent, received = _TRACED[method]
    x = args[0] if args else _EMPTY
    return op, x.nbytes if sent is None else sent(comm, args), x.dtype, None if received is None else received(out)


class TracingCommunicator:
    """Wraps any Communicator; every call is recorded, then forwarded unchanged. Its collectives
    are per-instance closures (built by set_enabled), so it is registered as a Communicator
    rather than inheriting the abstract methods."""

    TRACED = tuple(_TRACED)

    def __init__(self, inner: Communicator, recorder: TraceRecorder, group: list[int] | None = None) -> None:
        self.inner, self.recorder = inner, recorder
        self.rank, self.world_size, self.backend = inner.rank, inner.world_size, inner.backend
        self.group = list(group or range(inner.world_size))
        self.next_seq = itertools.count(1).__next__  # shared by all ops of the group, kept across pauses
        self._algorithm = getattr(inner, "algorithm", None)
        recorder.algorithm_of = self.algorithm_of
        self.set_enabled(True)

    def algorithm_of(self, op: str, nbytes: int) -> str:
        return self._algorithm(op, nbytes) if self._algorithm else self.backend

    def _traced(self, method: str):
        """The recording version of one method: the hot path of tracing."""
        op, sent, received = _TRACED[method]
        forward, recorder, group, next_seq = getattr(self.inner, method), self.recorder, self.group, self.next_seq
        now, add = recorder.now, recorder.add_collective

        def call(*args, **kwargs):
            start = now()
            out = forward(*args, **kwargs)
            end = now()
            values = args or tuple(kwargs.values())
            x = values[0] if values else _EMPTY
            add((op, group, next_seq(), x.nbytes if sent is None else sent(self, values), x.dtype,
                 recorder.layer, recorder.step, start, end, None if received is None else received(out)))
            return out
        call.__name__ = call.__qualname__ = method
        return call

    def set_enabled(self, enabled: bool) -> None:
        """Paused, every call goes straight to the wrapped communicator (its bound methods are
        this instance's attributes), so a paused tracer costs what no tracer costs."""
        for name in self.TRACED:
            setattr(self, name, self._traced(name) if enabled else getattr(self.inner, name))

    def norm_quantizes_rows(self, x) -> bool:
        return self.inner.norm_quantizes_rows(x)  # the traced call forwards fp8_rows unchanged

    def close(self) -> None:
        self.recorder.close()
        self.inner.close()


Communicator.register(TracingCommunicator)
