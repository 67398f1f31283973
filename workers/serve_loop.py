"""The ranks' serving loop: lockstep steps of a BatchEngine, fed by the driver without a round trip
per token. Ray-agnostic: cluster/ray_node.py runs it inside each rank's actor, cluster/inprocess.py
in a thread.

Control path (DESIGN.md "Control plane vs data plane"):
  driver --push--> rank 0's Mailbox --broadcast (communicator)--> every rank --step--> rank 0's outbox
  driver <--poll-- rank 0's Mailbox
The driver pushes commands (join / cancel / stop) into rank 0's mailbox with small calls; rank 0
drains them between steps and broadcasts the list to the other ranks through the communicator
(one fixed 1 KiB message: the length and the msgpack bytes, plus a second broadcast for what does not
fit): the ranks never talk through Ray.
Every rank applies the same commands in the same order, then runs the same step. Rank 0 appends
the step's new tokens to its outbox, which the driver long-polls. With nothing to do, rank 0
waits for a command at most `heartbeat_s` before it broadcasts an empty list, so the other ranks
(waiting inside that broadcast) never reach the collective timeout.

Commands are dicts: {"op": "join", "slot", "id", "prompt", "params"}, {"op": "cancel", "slot", "id"},
{"op": "stop"}. The driver numbers its pushes (seq 0, 1, ...); a threaded actor may run two pushes
out of order, so the mailbox hands commands out in seq order only.
"""
from __future__ import annotations

import threading
import time

import torch

from collectives.communicator import Communicator
from model.sampling import SamplingParams
from model.spec import SpecConfig
from workers.batch_engine import BatchEngine
from workers.messages import pack, unpack

HEADER_BYTES = 1024  # the per-step command broadcast: an int64 length, then the msgpack bytes that fit


class Mailbox:
    """Rank 0's two queues: commands in (ordered by the driver's seq), events out (indexed, so a
    poll that is lost costs nothing: the next poll asks again from the same index)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.pending: dict[int, list[dict]] = {}  # seq -> commands, until every earlier seq arrived
        self.next_seq = 0
        self.events: list = []
        self.base = 0  # index of events[0]
        self.stats: dict = {}
        self.closed = False

    def push(self, seq: int, commands: list[dict]) -> None:
        with self.cond:
            self.pending[seq] = commands
            self.cond.notify_all()

    def take(self, wait_s: float) -> list[dict]:
        """Commands ready in seq order; waits up to wait_s for the first (0: never waits)."""
        with self.cond:
            if self.next_seq not in self.pending and wait_s > 0:
                self.cond.wait_for(lambda: self.next_seq in self.pending, timeout=wait_s)
            ready = []
            while self.next_seq in self.pending:
                ready += self.pending.pop(self.next_seq)
                self.next_seq += 1
            return ready

    def emit(self, events: list, stats: dict) -> None:
        with self.cond:
            self.events += events
            self.stats = stats
            self.cond.notify_all()

    def close(self, stats: dict) -> None:
        with self.cond:
            self.stats, self.closed = stats, True
            self.cond.notify_all()

    def poll(self, since: int, wait_s: float) -> dict:
        """Events from index `since` on (waiting up to wait_s for one); drops those before it."""
        with self.cond:
            if self.base + len(self.events) <= since and not self.closed and wait_s > 0:
                self.cond.wait_for(lambda: self.base + len(self.events) > since or self.closed, timeout=wait_s)
            drop = max(0, min(since - self.base, len(self.events)))
            del self.events[:drop]
            self.base += drop
            return {"events": self.events[since - self.base:] if since >= self.base else list(self.events),
                    "next": self.base + len(self.events), "stats": dict(self.stats), "closed": self.closed}


class ServeLoop:
    def __init__(self, engine: BatchEngine, comm: Communicator, mailbox: Mailbox | None,
                 heartbeat_s: float = 0.25) -> None:
        """mailbox: rank 0's (None on the other ranks). heartbeat_s: the longest an idle rank 0
        waits before the next (possibly empty) broadcast; keep it well under the collective timeout."""
        if (comm.rank == 0) != (mailbox is not None):
            raise ValueError("rank 0, and only rank 0, reads the driver's mailbox")
        self.engine, self.comm, self.mailbox, self.heartbeat_s = engine, comm, mailbox, heartbeat_s
        self.control_s = 0.0  # command exchange: mailbox, msgpack, broadcasts
        self.step_s = 0.0  # engine steps
        self.steps = 0

    def _exchange(self) -> list[dict]:
        """Rank 0's new commands, on every rank (the same list everywhere)."""
        payload, start = b"", time.perf_counter()
        if self.mailbox is not None:
            wait = 0.0 if self.engine.busy else self.heartbeat_s
            commands = self.mailbox.take(wait)
            payload = pack(commands) if commands else b""
            if wait:  # an idle wait for work is not overhead
                start = time.perf_counter()
        if self.comm.world_size > 1:
            payload = self._broadcast(payload)
        commands = unpack(payload) if payload else []
        self.control_s += time.perf_counter() - start
        return commands

    def _broadcast(self, payload: bytes) -> bytes:
        """Rank 0's payload on every rank: one broadcast of a fixed header (length + the first bytes),
        a second one only for what does not fit (a batch of long prompts). On the engine's device
        (NCCL broadcasts device tensors)."""
        fits = HEADER_BYTES - 8
        header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
        if self.mailbox is not None:
            header[:8] = torch.tensor([len(payload)], dtype=torch.int64).view(torch.uint8)
            if payload:
                head = payload[:fits]
                header[8: 8 + len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        header = self.comm.broadcast(header.to(self.engine.device)).cpu()  # (HEADER_BYTES,)
        size = int(header[:8].view(torch.int64)[0])
        data = header[8: 8 + min(size, fits)].numpy().tobytes()
        if size > fits:
            rest = (torch.frombuffer(bytearray(payload[fits:]), dtype=torch.uint8) if self.mailbox is not None
                    else torch.empty(size - fits, dtype=torch.uint8))
            data += self.comm.broadcast(rest.to(self.engine.device)).cpu().numpy().tobytes()
        return data

    def _apply(self, commands: list[dict]) -> tuple[list, bool]:
        """Applies join / cancel commands; returns rank 0's events for them and whether to stop."""
        events, stop = [], False
        for cmd in commands:
            if cmd["op"] == "join":
                self.engine.add(cmd["slot"], cmd["id"], cmd["prompt"], SamplingParams(**cmd["params"]))
            elif cmd["op"] == "cancel":
                row = self.engine.rows[cmd["slot"]] if 0 <= cmd["slot"] < self.engine.max_batch else None
                if row is not None and row.request_id == cmd["id"]:  # else it already finished: nothing to free
                    self.engine.retire(cmd["slot"])
                    events.append({"id": cmd["id"], "slot": cmd["slot"], "tokens": [], "finish": "cancelled"})
            elif cmd["op"] == "stop":
                stop = True
            else:
                raise ValueError(f"unknown serve command {cmd['op']!r}")
        return events, stop

    def stats(self) -> dict:
        return {"steps": self.steps, "control_s": self.control_s, "step_s": self.step_s,
                "running": self.engine.running, "rank": self.comm.rank}

    def run(self) -> dict:
        """Loops until a stop command; returns this rank's stats."""
        while True:
            events, stop = self._apply(self._exchange())
            if stop:
                break
            if self.engine.busy:
                start = time.perf_counter()
                rows = self.engine.step()
                self.step_s += time.perf_counter() - start
                self.steps += 1
                events += [{"id": e.request_id, "slot": e.slot, "tokens": e.tokens, "finish": e.finish,
                            **({"spec": e.spec} if e.spec else {})} for e in rows]
            if self.mailbox is not None and (events or self.steps % 16 == 0):
                self.mailbox.emit(events, self.stats())
        if self.mailbox is not None:
            self.mailbox.close(self.stats())
        return self.stats()


def run_serve(worker, config: dict, mailbox: Mailbox | None) -> dict:
    """One serving session on this rank (a loaded workers.worker.Worker): builds the batch engine
    from `config` (max_batch, max_context, prefill_chunk, spec: a SpecConfig as a dict or None,
    spec_max_batch, heartbeat_s) and loops until stopped."""
    if worker.model is None:
        raise RuntimeError(f"rank {worker.rank}: serving before the model is loaded")
    spec = SpecConfig(**config["spec"]) if config.get("spec") else None
    engine = BatchEngine(worker.model, config["max_batch"], config["max_context"], config["prefill_chunk"],
                         kv_dtype=worker.run.kv_torch_dtype, draft=getattr(worker, "draft", None), spec=spec,
                         spec_max_batch=config.get("spec_max_batch"))
    try:
        return ServeLoop(engine, worker.comm, mailbox, config.get("heartbeat_s", 0.25)).run()
    except BaseException:
        if mailbox is not None:
            mailbox.close({"rank": worker.rank, "failed": True})
        raise
