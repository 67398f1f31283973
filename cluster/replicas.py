"""Several copies of the node behind one submit(): requests spread over replicas, a dead one routed around.

Why: one node serves one batch; when the traffic needs more than one node can decode, the answer
is more nodes, each a complete copy (its own ranks, weights and KV cache), not a wider one. Ray
places every replica (one per host where the cluster has several: each replica's placement group
is hinted at a different node), each replica runs its own continuous-batching Scheduler
(cluster/scheduler.py), and a ReplicaSet puts them behind the Scheduler's interface, so the HTTP
front (launch/openai_api.py) serves N replicas exactly as it serves one.

Routing: a request goes to the replica that is up and has the fewest requests in flight (ties
rotate, so a trickle of requests alternates). A replica that is down or restarting refuses with
NodeUnavailable and the next is tried; a full queue, QueueFull, likewise; only when every replica
refuses does submit() raise (QueueFull if any replica merely was full).

When a replica dies, its Scheduler fails the requests it held. A request that had not yet
produced a token is sent again to another replica (its caller sees nothing but a later first
token); a request that had already streamed tokens fails with the replica's error, since its
caller holds a prefix the new replica would not continue bit for bit under sampling. The other
replicas keep serving throughout. Each replica restarts on its own if given max_restarts.
"""
from __future__ import annotations

import itertools
import os
import threading
import time

from cluster.request_handle import TokenEvent
from cluster.scheduler import NodeUnavailable, QueueFull

SUMMED = ("queue_length", "running", "completed", "failed", "cancelled", "tokens_total", "tokens_per_s", "steps",
          "restarts")
SAMPLES = ("ttft_s", "itl_s")


class ReplicaHandle:
    """A request as its caller sees it, whichever replica serves it now (same interface as
    cluster.request_handle.RequestHandle; attributes read through to the current replica's handle).
    A resend happens when the caller reads the dead replica's error event (events() or stream())."""

    def __init__(self, replica_set: "ReplicaSet", inner, replica: int, args: tuple) -> None:
        self._set, self._inner, self.replica, self._args = replica_set, inner, replica, args
        self.tried = [replica]  # every replica this request was sent to
        self._streamed = False  # a token reached the caller: no resend from here on
        self._final: TokenEvent | None = None

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def _resent(self, event: TokenEvent) -> bool:
        """For an event read from the current replica: True when it was an error that moved the
        request to another replica (the caller never sees it)."""
        return event.error is not None and not self._streamed and self._set._resend(self)

    def _seen(self, event: TokenEvent) -> TokenEvent:
        self._streamed = self._streamed or bool(event.token_ids)
        if event.final:
            self._final = event
        return event

    def events(self, timeout: float) -> TokenEvent:
        while True:
            event = self._inner.events(timeout)
            if not self._resent(event):
                return self._seen(event)

    async def stream(self):
        while True:
            events, resent = self._inner.stream(), False
            try:
                async for event in events:
                    if self._resent(event):
                        resent = True
                        break
                    yield self._seen(event)
            finally:
                await events.aclose()  # leaving early cancels the request on its replica
            if not resent:
                return

    def result(self, timeout: float) -> list[int]:
        """Blocks until the request ends (at most `timeout` s); its tokens, or RuntimeError with its error."""
        deadline = time.monotonic() + timeout
        while self._final is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"request {self._inner.request_id}: not finished within {timeout} s")
            self.events(left)
        if self._final.error is not None:
            raise RuntimeError(self._final.error)
        return list(self._inner.token_ids)

    def cancel(self) -> None:
        self._inner.cancel()


class ReplicaSet:
    def __init__(self, schedulers: list, resend: bool = True, on_close=None) -> None:
        """schedulers: one per replica (each owns its node). resend: move a request that a dying
        replica held before its first token to another replica. on_close: called after every
        scheduler closed (e.g. to stop a Ray instance started for the replicas)."""
        if not schedulers:
            raise ValueError("a ReplicaSet needs at least one scheduler")
        self.schedulers, self.resend, self.on_close = list(schedulers), resend, on_close
        self.lock = threading.Lock()
        self.in_flight: list[list[ReplicaHandle]] = [[] for _ in self.schedulers]
        self.submitted = [0] * len(self.schedulers)  # requests each replica accepted (resends included)
        self.resent = 0
        self.turn = itertools.count()
        self.closed = False

    @property
    def cfg(self):
        return self.schedulers[0].cfg

    @property
    def max_context(self) -> int:
        return min(s.max_context for s in self.schedulers)

    def _order(self, exclude=()) -> list[int]:
        """Replicas to try, least loaded first; ties rotate."""
        with self.lock:
            for handles in self.in_flight:
                handles[:] = [h for h in handles if not h._inner.done]
            start = next(self.turn)
            n = len(self.schedulers)
            rotation = [(start + i) % n for i in range(n)]
            return sorted((r for r in rotation if r not in exclude), key=lambda r: len(self.in_flight[r]))

    def _submit_somewhere(self, args: tuple, exclude=()) -> tuple[object, int]:
        errors = []
        for r in self._order(exclude):
            try:
                inner = self.schedulers[r].submit(*args)
            except (NodeUnavailable, QueueFull) as e:
                errors.append((r, e))
                continue
            with self.lock:
                self.submitted[r] += 1
            return inner, r
        if any(isinstance(e, QueueFull) for _, e in errors):
            raise QueueFull("every replica is full or down: " + "; ".join(f"replica {r}: {e}" for r, e in errors))
        raise NodeUnavailable("no replica is up: " + "; ".join(f"replica {r}: {e}" for r, e in errors))

    def submit(self, prompt_ids, params, request_id: str | None = None) -> ReplicaHandle:
        if self.closed:
            raise NodeUnavailable("the replica set was closed")
        args = (prompt_ids, params, request_id)
        inner, r = self._submit_somewhere(args)
        handle = ReplicaHandle(self, inner, r, args)
        with self.lock:
            self.in_flight[r].append(handle)
        return handle

    def _resend(self, handle: ReplicaHandle) -> bool:
        if not self.resend or self.closed:
            return False
        try:
            inner, r = self._submit_somewhere(handle._args, exclude=handle.tried)
        except (NodeUnavailable, QueueFull):
            return False
        with self.lock:
            handle._inner, handle.replica = inner, r
            handle.tried.append(r)
            self.in_flight[r].append(handle)
            self.resent += 1
        return True

    def metrics(self) -> dict:
        per_replica = [s.metrics() for s in self.schedulers]
        total = {key: sum((m.get(key) or 0) for m in per_replica) for key in SUMMED}
        for key in SAMPLES:
            total[key] = [v for m in per_replica for v in m.get(key, [])]
        states = [m["state"] for m in per_replica]
        total["state"] = "up" if "up" in states else ("closed" if self.closed else states[0])
        total["replicas_up"] = states.count("up")
        accepted = [m["acceptance_length"] for m in per_replica if m.get("acceptance_length") is not None]
        total["acceptance_length"] = sum(accepted) / len(accepted) if accepted else None
        total["resent"] = self.resent
        total["replicas"] = [{"state": m["state"], "submitted": n, "running": m["running"],
                              "completed": m["completed"], "failed": m["failed"]}
                             for m, n in zip(per_replica, self.submitted)]
        return total

    def close(self, timeout_s: float = 30.0) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            for s in self.schedulers:
                s.close(timeout_s)
        finally:
            if self.on_close is not None:
                self.on_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_replicas(run, n: int, build_kwargs: dict, scheduler_kwargs: dict, log=None) -> ReplicaSet:
    """Starts and loads n nodes of `run`, each under its own Scheduler (which restarts it, so
    build_kwargs' max_restarts is left out), and returns them as a ReplicaSet."""
    from cluster.scheduler import Scheduler
    makers, on_close = replica_makers(run, n, {k: v for k, v in build_kwargs.items() if k != "max_restarts"})
    schedulers = []
    try:
        for i, make in enumerate(makers):
            node = make()
            try:
                node.load()
                schedulers.append(Scheduler(node, make_node=make, **scheduler_kwargs))
            except BaseException:
                node.shutdown()
                raise
            if log:
                log(f"replica {i + 1}/{n} loaded")
    except BaseException:
        for s in schedulers:
            s.close()
        if on_close:
            on_close()
        raise
    return ReplicaSet(schedulers, on_close=on_close)


def replica_makers(run, n: int, build_kwargs: dict) -> tuple[list, object]:
    """One build_node() closure per replica, each hinted at its own Ray node where the cluster has
    several, and what to call once every replica is shut down (stops a Ray started here, else None).
    build_kwargs: cluster.node.build_node's (address, placement, dashboard, comm_auto, max_restarts).
    Without an address (and world size > 1) one local Ray holds every replica (n x world CPUs).
    Refuses, before any actor starts, more replicas than the cluster can ever hold."""
    from cluster.node import UserError, build_node
    if n < 1:
        raise UserError(f"--replicas must be >= 1, got {n}")
    if n > 1 and run.trace_dir:  # every replica's rank r would write the same timeline file
        raise UserError("--trace records one node; it cannot be combined with --replicas (yet)")
    targets, on_close = [None] * n, None
    if run.world_size > 1 or build_kwargs.get("address"):
        targets, on_close = _ray_for_replicas(run, n, build_kwargs)
    return [lambda target=target: build_node(run, **build_kwargs, target_node=target) for target in targets], on_close


def _ray_for_replicas(run, n: int, build: dict):
    """Joins the cluster (or starts a local Ray for all replicas); returns a target node per replica
    (None: no hint) and what close() must call."""
    import ray
    from cluster.placement import check_replicas_fit
    from cluster.ray_node import GPU_ENV, RayNode
    started = False
    if not ray.is_initialized():
        if build.get("address"):
            RayNode.join(build["address"])
        else:
            if run.device == "cuda":
                os.environ.update(GPU_ENV)
            RayNode._start_local_ray(n * run.world_size, build.get("dashboard", False))
            started = True
    try:
        bundle = {"CPU": 1, "GPU": 1} if run.device == "cuda" else {"CPU": 1}
        targets = check_replicas_fit(ray.nodes(), bundle, run.world_size, n, build.get("placement", "STRICT_PACK"))
    except BaseException:
        if started:
            ray.shutdown()
        raise
    return targets, (ray.shutdown if started else None)
