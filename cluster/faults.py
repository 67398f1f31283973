"""Rank failures as the driver sees them, and the supervisor that recovers from them.

A rank can die (its actor is killed, its process crashes or runs out of memory) or hang. The
driver learns of a death from Ray within about a second (the rank's future fails with an actor
error); the ranks that were waiting for it learn it from the data plane (a shared-memory waiter
checks its peers' processes every 0.2 s; gloo/NCCL fail on the broken connection or at the
collective timeout). A hung rank shows up when its peers' collective times out naming it.

`diagnose` turns the errors of the finished futures into one RankFailure that names the rank at
fault and why. `Supervisor` wraps a node: on a RankFailure it tears the node down, brings a fresh
one up (up to `max_restarts` times) and reruns the whole batch from its prompts. Tokens already
streamed to the caller are not sent again; the rerun must reproduce them exactly (greedy and
seeded sampling are deterministic), otherwise the request fails rather than return a spliced,
corrupted output.
"""
from __future__ import annotations

import re
import time



class NodeStartError(RuntimeError):
    """The node could not be brought up (Ray did not start, or the ranks could not be placed)."""


class RankFailure(RuntimeError):
    """A rank failed; the message says which and why."""

    def __init__(self, rank: int, reason: str, detected_after_s: float | None = None) -> None:
        self.rank, self.reason, self.detected_after_s = rank, reason, detected_after_s
        after = f" (noticed {detected_after_s:.1f} s after the batch started)" if detected_after_s is not None else ""
        super().__init__(f"rank {rank} failed: {reason}{after}")


_NAMED_RANK = re.compile(r"rank\(s\) \[(\d+)|rank (\d+) \(pid")


def _root_rank(message: str) -> int | None:
    """The rank a peer's error blames (a collective timeout or a dead peer names it)."""
    m = _NAMED_RANK.search(message)
    return int(m.group(1) or m.group(2)) if m else None


def diagnose(done: list, rank_of: dict) -> RankFailure | None:
    import ray  # here, not at import: the CLI's commands that start no node never load Ray
    """done: finished ObjectRefs; rank_of: ObjectRef -> rank. Returns the failure to report, or None."""
    dead, blamed, errors = [], [], []
    for ref in done:
        try:
            ray.get(ref, timeout=5)
        except ray.exceptions.RayActorError as e:
            dead.append((rank_of[ref], f"its process died ({type(e).__name__}: {str(e).splitlines()[0][:200]})"))
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            text = f"{type(cause).__name__}: {str(cause).splitlines()[-1][:300]}"
            root = _root_rank(str(cause))
            (blamed if root is not None else errors).append((root if root is not None else rank_of[ref], text))
        except ray.exceptions.GetTimeoutError:
            continue
    for group in (dead, blamed, errors):  # a death explains the peers' errors, a named rank explains timeouts
        if group:
            rank, reason = min(group)
            return RankFailure(rank, reason)
    return None


class Supervisor:
    """Runs batches on a node, restarting it after a rank failure (at most max_restarts times)."""

    def __init__(self, make_node, max_restarts: int = 0, log=print) -> None:
        self.make_node, self.max_restarts, self.log = make_node, max_restarts, log
        self.node = make_node()
        self.model_cfg = self.node.model_cfg
        self.restarts = 0
        self.failures: list[dict] = []

    def load(self, progress=None):
        return self.node.load(progress)

    def validate(self, requests) -> None:
        self.node.validate(requests)

    def generate(self, requests, on_tokens=None, **kw):
        delivered: dict[int, list[list[int]]] = {}  # step -> tokens already given to the caller

        def forward(step: int, new: list[list[int]]) -> None:
            if step in delivered:
                if delivered[step] != new:
                    raise RankFailure(-1, f"the rerun after a restart diverged at step {step}; "
                                          "refusing to splice two different outputs")
                return
            delivered[step] = new
            if on_tokens:
                on_tokens(step, new)

        while True:
            start = time.monotonic()
            try:
                return self.node.generate(requests, forward, **kw)
            except RankFailure as failure:
                failure.detected_after_s = failure.detected_after_s or time.monotonic() - start
                self.failures.append({"rank": failure.rank, "reason": failure.reason,
                                      "detected_after_s": failure.detected_after_s})
                if failure.rank < 0 or self.restarts >= self.max_restarts:
                    raise
                self.restarts += 1
                self.log(f"{failure}; restarting the node ({self.restarts}/{self.max_restarts}) and "
                         "rerunning the batch from its prompts")
                self.node.shutdown()
                self.node = self.make_node()
                self.node.load()

    def node_pids(self) -> list[int]:
        return self.node.node_pids()

    def shutdown(self) -> None:
        self.node.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
