"""A serving session on a node: the ranks loop in lockstep (workers/serve_loop.py) while the driver
pushes commands to rank 0 and long-polls its events. The scheduler (cluster/scheduler.py) talks to
either kind of node through this one interface:

    push(seq, commands)    hand commands to rank 0 (returns at once; the mailbox orders by seq)
    poll(since, wait_s)    rank 0's events from index `since` ({"events", "next", "stats", "closed"})
    failure()              a RankFailure if a rank has left the loop (died, raised), else None
    stop(seq, timeout_s)   ends the loop on every rank; returns each rank's stats
    abort()                kills the ranks (a failed node; the caller then shuts it down)

World 1 (InProcessNode) runs the loop in a thread of the driver's process; a RayNode runs one
long `serve` call per rank actor, so a session costs one Ray call per rank, plus small calls for
commands and polls, never one per token.
"""
from __future__ import annotations

import threading
import uuid

from cluster.faults import RankFailure
from workers.messages import pack, unpack
from workers.serve_loop import Mailbox, run_serve


def open_session(node, config: dict):
    """config: max_batch, max_context, prefill_chunk (and optionally heartbeat_s)."""
    if hasattr(node, "actors"):
        return RaySession(node, config)
    return InProcessSession(node, config)


class InProcessSession:
    def __init__(self, node, config: dict) -> None:
        self.node, self.mailbox = node, Mailbox()
        self.error: BaseException | None = None
        self.stats: dict | None = None
        self.thread = threading.Thread(target=self._run, args=(config,), name="serve-loop-rank0", daemon=True)
        self.thread.start()

    def _run(self, config: dict) -> None:
        try:
            self.stats = run_serve(self.node.worker, config, self.mailbox)
        except BaseException as e:  # reported by failure(); the loop is gone
            self.error = e

    def push(self, seq: int, commands: list[dict]) -> None:
        self.mailbox.push(seq, commands)

    def poll(self, since: int, wait_s: float) -> dict:
        reply = self.mailbox.poll(since, wait_s)
        if reply["closed"] and self.error is not None:
            raise self.failure()
        return reply

    def failure(self) -> RankFailure | None:
        if self.error is None:
            return None
        return RankFailure(0, f"{type(self.error).__name__}: {self.error}")

    def stop(self, seq: int, timeout_s: float) -> list[dict]:
        self.mailbox.push(seq, [{"op": "stop"}])
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise TimeoutError(f"the serving loop did not stop within {timeout_s:.0f} s")
        if self.error is not None:
            raise self.failure()
        return [self.stats]

    def abort(self) -> None:
        pass  # the thread ends with its loop; nothing else to kill


# --- the rank side of a Ray session: run inside each RankActor through __ray_call__ (so the actor
# class needs no serving methods of its own); module state is per process, i.e. per rank.
_MAILBOXES: dict[str, Mailbox] = {}
_MAILBOX_LOCK = threading.Lock()


def _mailbox(session: str) -> Mailbox:
    with _MAILBOX_LOCK:
        if session not in _MAILBOXES:
            _MAILBOXES.clear()  # one session at a time: an older one has ended
            _MAILBOXES[session] = Mailbox()
        return _MAILBOXES[session]


def _rank_serve(actor, session: str, message: bytes) -> bytes:
    actor._on_own_gpu()
    return pack(run_serve(actor.worker, unpack(message), _mailbox(session) if actor.rank == 0 else None))


def _rank_push(actor, session: str, seq: int, message: bytes) -> None:
    _mailbox(session).push(seq, unpack(message))


def _rank_poll(actor, session: str, since: int, wait_s: float) -> bytes:
    return pack(_mailbox(session).poll(since, wait_s))


class RaySession:
    def __init__(self, node, config: dict) -> None:
        import ray
        self.ray, self.node, self.actors = ray, node, list(node.actors)
        self.session = uuid.uuid4().hex[:12]
        message = pack(config)
        self.futures = [actor.__ray_call__.remote(_rank_serve, self.session, message) for actor in self.actors]
        self.rank_of = {ref: rank for rank, ref in enumerate(self.futures)}
        self.stopping = False

    def push(self, seq: int, commands: list[dict]) -> None:
        self.actors[0].__ray_call__.remote(_rank_push, self.session, seq, pack(commands))

    def poll(self, since: int, wait_s: float) -> dict:
        ray = self.ray
        try:
            ref = self.actors[0].__ray_call__.remote(_rank_poll, self.session, since, wait_s)
            return unpack(ray.get(ref, timeout=wait_s + self.node.timeout))
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            raise self.failure() or RankFailure(0, "stopped answering the driver's polls") from None

    def failure(self) -> RankFailure | None:
        from cluster.faults import diagnose
        done, _ = self.ray.wait(self.futures, num_returns=len(self.futures), timeout=0)
        if not done:
            return None
        found = diagnose(done, self.rank_of)
        if found is None and not self.stopping:
            found = RankFailure(self.rank_of[done[0]], "left the serving loop without being told to stop")
        return found

    def stop(self, seq: int, timeout_s: float) -> list[dict]:
        self.stopping = True
        self.push(seq, [{"op": "stop"}])
        return [unpack(r) for r in self.ray.get(self.futures, timeout=timeout_s)]

    def abort(self) -> None:
        self.node.abort()
