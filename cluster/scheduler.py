"""The driver side of continuous batching: admission, slots, request lifecycle, restarts.

Requests come in from any thread (an HTTP server's), wait in a bounded queue, and take one of
`max_batch` slots as one frees up; the ranks (workers/serve_loop.py) run them in lockstep, joining
and leaving at step boundaries. One "pump" thread long-polls rank 0 for new tokens and hands them
to each request's handle as TokenEvents; commands (join, cancel) go straight from the caller's
thread to rank 0's mailbox, numbered so that rank 0 applies them in the order they were made.

Faults: when a rank dies (or raises, or no step finishes within step_timeout_s while requests are
in flight), every request in flight gets a final error event and the node is taken down. With
max_restarts > 0 and make_node, a new node is built and loaded and the queued requests run on it;
meanwhile (and once restarts are spent) submit raises NodeUnavailable. Every wait has a timeout.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import asdict

from cluster.faults import RankFailure
from cluster.request_handle import RequestHandle, TokenEvent
from cluster.serve_session import open_session
from model.sampling import SamplingParams
from workers.engine import Request, RequestError, validate_requests

__all__ = ["NodeUnavailable", "QueueFull", "RequestHandle", "Scheduler", "TokenEvent"]

POLL_WAIT_S = 0.05  # a long poll returns at once when tokens come, else after this
FINISH = {"eos": "stop", "length": "length", "cancelled": "cancelled"}
HISTORY = 4096  # latencies kept for metrics()


class QueueFull(Exception):
    """max_queue requests are already waiting (an HTTP server answers 429)."""


class NodeUnavailable(Exception):
    """The node is down, restarting or closed (an HTTP server answers 503)."""


class Scheduler:
    def __init__(self, node, *, max_batch: int = 16, max_queue: int = 64, prefill_chunk: int = 64,
                 spec=None, max_restarts: int = 0, make_node=None, step_timeout_s: float = 60.0,
                 max_context: int | None = None, log=None, spec_max_batch: int | None = None) -> None:
        """node: a LOADED node from cluster.node.build_node (a Supervisor is unwrapped: its
        make_node and max_restarts apply unless given here). max_context: the longest prompt +
        max_new_tokens a request may ask for (default: the run's --max-context, else the model's).
        log: called with a line when the node fails and is restarted (default: nothing).
        spec_max_batch: with spec, decode plainly once more requests than this decode at once, until
        the batch empties (workers/batch_engine.py); None: always speculate."""
        if getattr(node, "node", None) is not None and hasattr(node, "make_node"):  # a cluster.faults.Supervisor
            make_node = make_node or node.make_node
            max_restarts = max_restarts or node.max_restarts
            node = node.node
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1 or step_timeout_s <= 0 or max_restarts < 0:
            raise ValueError(f"bad scheduler settings: max_batch={max_batch} max_queue={max_queue} "
                             f"prefill_chunk={prefill_chunk} step_timeout_s={step_timeout_s} "
                             f"max_restarts={max_restarts}")
        if spec_max_batch is not None and (spec is None or spec_max_batch < 1):
            raise ValueError(f"spec_max_batch={spec_max_batch} needs speculative decoding (spec) and must be >= 1")
        if spec is not None and not node.run.draft_path:
            raise ValueError("speculative decoding needs a node started with an EAGLE-3 draft (RunConfig.draft_path)")
        if max_restarts and make_node is None:
            raise ValueError("max_restarts > 0 needs make_node (how to build a fresh node)")
        self.node, self.make_node, self.max_restarts = node, make_node, max_restarts
        self.node_down, self.log = False, log or (lambda line: None)
        self.cfg = node.model_cfg
        limit = node.run.max_context or self.cfg.max_position_embeddings
        self.max_context = min(max_context or limit, limit)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.spec, self.spec_max_batch, self.step_timeout_s = spec, spec_max_batch, step_timeout_s
        self.lock = threading.RLock()
        self.queue: deque[RequestHandle] = deque()
        self.slots: list[RequestHandle | None] = [None] * max_batch
        self.state, self.down_reason = "up", ""
        self.restarts, self.failures = 0, []
        self.ids = itertools.count()
        self.completed = self.failed = self.cancelled = 0
        self.ttft: deque[float] = deque(maxlen=HISTORY)
        self.itl: deque[float] = deque(maxlen=HISTORY)
        self.recent_tokens: deque[tuple[float, int]] = deque()  # (time, tokens) of the last 10 s
        self.tokens_total = 0
        self.acceptance: deque[tuple[float, int]] = deque(maxlen=HISTORY)  # (acceptance length, steps) per request
        self.rank_stats: dict = {}
        self.started = time.monotonic()
        self._open()
        self.pump = threading.Thread(target=self._pump, name="scheduler-pump", daemon=True)
        self.pump.start()

    # --- the session with the node ------------------------------------------------------------
    def _open(self) -> None:
        config = {"max_batch": self.max_batch, "max_context": self.max_context, "prefill_chunk": self.prefill_chunk,
                  "spec": asdict(self.spec) if self.spec is not None else None, "spec_max_batch": self.spec_max_batch}
        self.session, self.seq, self.since, self.last_progress = open_session(self.node, config), 0, 0, time.monotonic()

    def _push(self, commands: list[dict]) -> None:
        """Under self.lock: numbered in the order made, applied by rank 0 in that order."""
        self.session.push(self.seq, commands)
        self.seq += 1

    # --- requests -----------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> RequestHandle:
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a model.sampling.SamplingParams, got {type(params).__name__}")
        request_id = request_id if request_id is not None else f"req-{next(self.ids)}"
        try:
            prompt = tuple(int(t) for t in prompt_ids)
        except (TypeError, ValueError):
            raise RequestError(f"request {request_id}: prompt_ids must be a list of integer token ids") from None
        validate_requests([Request(prompt, params, request_id)], self.cfg.vocab_size, self.max_context)
        with self.lock:
            if self.state != "up":
                reason = f": {self.down_reason}" if self.down_reason else ""
                raise NodeUnavailable(f"the node is {self.state}{reason}")
            if None not in self.slots and len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are already waiting (max_queue {self.max_queue})")
            handle = RequestHandle(request_id, prompt, params, self)
            self.queue.append(handle)
            self._admit()
        return handle

    def _admit(self) -> None:
        """Under self.lock: queued requests take the free slots (one push for all of them)."""
        joins = []
        while self.queue and self.state == "up" and None in self.slots:
            handle = self.queue.popleft()
            slot = self.slots.index(None)
            self.slots[slot], handle.slot = handle, slot
            joins.append({"op": "join", "slot": slot, "id": handle.request_id, "prompt": list(handle.prompt),
                          "params": asdict(handle.params)})
        if joins:
            self._push(joins)

    def _cancel(self, handle: RequestHandle) -> None:
        with self.lock:
            if handle.done:
                return
            if handle in self.queue:
                self.queue.remove(handle)
                self.cancelled += 1
                handle._deliver(TokenEvent((), "cancelled"))
            elif handle.slot is not None and self.state == "up":
                self._push([{"op": "cancel", "slot": handle.slot, "id": handle.request_id}])

    # --- the pump: tokens from rank 0 to the handles, failures, stalls ------------------------
    def _pump(self) -> None:
        while self.state != "closed":
            if self.state != "up":
                time.sleep(0.01)
                continue
            session = self.session
            try:
                reply = session.poll(self.since, POLL_WAIT_S)
                failure = session.failure() or self._stalled()
            except RankFailure as e:
                failure, reply = e, None
            except Exception as e:  # anything else from the node is a failure of it, never a silent hang
                failure, reply = RankFailure(0, f"{type(e).__name__}: {e}"), None
            if session is not self.session or self.state == "closed":
                continue  # closed or restarted meanwhile: this reply belongs to the old session
            if reply is not None:
                self._deliver(reply)
            if failure is not None:
                self._on_failure(failure)

    def _stalled(self) -> RankFailure | None:
        with self.lock:
            busy = any(h is not None for h in self.slots)
        if busy and time.monotonic() - self.last_progress > self.step_timeout_s:
            return RankFailure(-1, f"no step finished within {self.step_timeout_s:.0f} s (step_timeout_s)")
        return None

    def _deliver(self, reply: dict) -> None:
        now = time.monotonic()
        stepped = reply["stats"].get("steps", 0) != self.rank_stats.get("steps", 0)  # a long prefill emits nothing
        self.rank_stats = reply["stats"] or self.rank_stats
        with self.lock:
            if reply["events"] or stepped or not any(h is not None for h in self.slots):
                self.last_progress = now
            self.since = reply["next"]
            for event in reply["events"]:
                handle = self.slots[event["slot"]]
                if handle is None or handle.request_id != event["id"]:
                    continue  # a late event of a request already ended here
                finish = FINISH[event["finish"]] if event["finish"] else None
                if event.get("spec"):
                    handle.spec = event["spec"]
                    if event["spec"].get("acceptance_length") is not None:
                        self.acceptance.append((event["spec"]["acceptance_length"], event["spec"]["verify_steps"]))
                self._count(handle, len(event["tokens"]), now)
                if finish:
                    self.slots[event["slot"]] = None
                    self.completed += finish != "cancelled"
                    self.cancelled += finish == "cancelled"
                handle._deliver(TokenEvent(tuple(event["tokens"]), finish), now)
            self._admit()

    def _count(self, handle: RequestHandle, n_tokens: int, now: float) -> None:
        if not n_tokens:
            return
        if handle.ttft_s is None:
            self.ttft.append(now - handle.submitted_at)
        elif handle.token_times:
            self.itl.append((now - handle.token_times[-1]) / n_tokens)
        self.tokens_total += n_tokens
        self.recent_tokens.append((now, n_tokens))

    def _on_failure(self, failure: RankFailure) -> None:
        """Fails every request in flight, takes the node down, restarts it if allowed."""
        with self.lock:
            if self.state == "closed":
                return
            self.failures.append({"rank": failure.rank, "reason": failure.reason, "at": time.time()})
            restart = self.make_node is not None and self.restarts < self.max_restarts
            self.state, self.down_reason = ("restarting" if restart else "down"), str(failure)
            self._fail_running(str(failure))
            if not restart:
                self._fail_queued(f"the node is down: {failure}")
        self._teardown()
        if restart:
            self._restart()

    def _fail_running(self, error: str) -> None:
        for slot, handle in enumerate(self.slots):
            if handle is not None:
                self.slots[slot] = None
                self.failed += 1
                handle._deliver(TokenEvent((), None, error=error))

    def _fail_queued(self, error: str) -> None:
        while self.queue:
            self.failed += 1
            self.queue.popleft()._deliver(TokenEvent((), None, error=error))

    def _teardown(self) -> None:
        """Kills the failed node's ranks and shuts it down (once)."""
        node, self.node_down = self.node, True
        try:
            self.session.abort()
        finally:
            try:
                node.shutdown()
            except Exception:
                pass

    def _restart(self) -> None:
        self.restarts += 1
        self.log(f"{self.down_reason}; restarting the node ({self.restarts}/{self.max_restarts})")
        start = time.monotonic()
        try:
            node = self.make_node()
            node.load()
        except Exception as e:
            with self.lock:
                self.state, self.down_reason = "down", f"restart {self.restarts} failed: {type(e).__name__}: {e}"
                self._fail_queued(self.down_reason)
            self.log(self.down_reason)
            return
        self.failures[-1]["restart_s"] = time.monotonic() - start
        self.log(f"the node is back after {self.failures[-1]['restart_s']:.1f} s")
        with self.lock:
            if self.state == "closed":
                node.shutdown()
                return
            self.node, self.node_down = node, False
            self._open()
            self.state, self.down_reason = "up", ""
            self._admit()

    # --- metrics and shutdown -----------------------------------------------------------------
    def metrics(self) -> dict:
        now = time.monotonic()
        with self.lock:
            while self.recent_tokens and now - self.recent_tokens[0][0] > 10.0:
                self.recent_tokens.popleft()
            window = min(10.0, max(now - self.started, 1e-9)) if self.recent_tokens else 1.0
            stats = dict(self.rank_stats)
            steps = stats.get("steps", 0)
            return {"state": self.state, "queue_length": len(self.queue),
                    "running": sum(h is not None for h in self.slots), "completed": self.completed,
                    "failed": self.failed, "cancelled": self.cancelled, "tokens_total": self.tokens_total,
                    "ttft_s": list(self.ttft), "itl_s": list(self.itl),
                    "tokens_per_s": sum(n for _, n in self.recent_tokens) / window,
                    "acceptance_length": self._acceptance_length(), "steps": steps, "restarts": self.restarts,
                    "control_overhead_per_step_s": stats.get("control_s", 0.0) / steps if steps else None,
                    "step_s": stats.get("step_s", 0.0) / steps if steps else None,
                    "control_s_total": stats.get("control_s", 0.0), "step_s_total": stats.get("step_s", 0.0)}

    def _acceptance_length(self) -> float | None:
        """Speculative decoding: tokens per verification step over recent requests (None: no spec)."""
        steps = sum(n for _, n in self.acceptance)
        return sum(length * n for length, n in self.acceptance) / steps if steps else None

    def close(self, timeout_s: float = 30.0) -> None:
        """Stops the loop, fails what is still queued or running, shuts the node down."""
        with self.lock:
            if self.state == "closed":
                return
            was_up, self.state = self.state == "up", "closed"
            self._fail_running("the scheduler was closed")
            self._fail_queued("the scheduler was closed")
            session, seq = self.session, self.seq
            self.seq += 1
        self.pump.join(timeout_s)  # it finishes a restart under way (which then shuts its new node down)
        if self.node_down:
            return
        try:
            if was_up:
                self.rank_stats = session.stop(seq, timeout_s)[0] or self.rank_stats
        except Exception:
            session.abort()
        finally:
            self.node_down = True
            self.node.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
