"""Replicas of the node behind one endpoint (cluster/replicas.py).

Routing is checked on stand-in schedulers (no ranks, milliseconds): least loaded first, ties
rotating, a replica that is down skipped, refusals merged, a request that a dying replica held
before its first token sent to another one (blocking and asyncio), one that had streamed tokens
failed. Then the real thing: `dgx-emu serve --world-size 2 --replicas 2` (two Ray nodes of two CPU
actors each, on this machine) behind one HTTP endpoint: every request answered with the plain
engine's tokens, each replica served a share; SIGKILL a rank of one replica mid-stream: only the
requests it held fail, the others finish, and new requests are served by the survivor.
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import openai
import pytest

from cluster.faults import RankFailure
from cluster.replicas import ReplicaSet
from cluster.request_handle import RequestHandle, TokenEvent
from cluster.scheduler import NodeUnavailable, QueueFull
from collectives.shm_sync import process_alive
from model.sampling import SamplingParams

PARAMS = SamplingParams(max_new_tokens=4, stop_on_eos=False)


class StandIn:
    """The Scheduler's interface without a node: requests wait until the test delivers to them."""

    def __init__(self, name: str) -> None:
        self.name, self.state, self.full, self.handles = name, "up", False, []
        self.max_context, self.cfg = 100, None

    def submit(self, prompt_ids, params, request_id=None):
        if self.state != "up":
            raise NodeUnavailable(f"{self.name} is {self.state}")
        if self.full:
            raise QueueFull(f"{self.name} is full")
        handle = RequestHandle(request_id or f"{self.name}-{len(self.handles)}", tuple(prompt_ids), params, self)
        self.handles.append(handle)
        return handle

    def _cancel(self, handle) -> None:
        handle._deliver(TokenEvent((), "cancelled"))

    def die(self, error: str) -> None:
        self.state = "down"
        for h in self.handles:
            h._deliver(TokenEvent((), None, error=error))

    def metrics(self) -> dict:
        running = sum(not h.done for h in self.handles)
        return {"state": self.state, "queue_length": 0, "running": running, "completed": 0, "failed": 0,
                "cancelled": 0, "tokens_total": 0, "tokens_per_s": 1.5, "steps": 0, "restarts": 0,
                "ttft_s": [0.1] * running, "itl_s": []}

    def close(self, timeout_s: float = 30.0) -> None:
        self.state = "closed"


def test_requests_go_to_the_least_loaded_replica_and_ties_rotate():
    a, b = StandIn("a"), StandIn("b")
    replicas = ReplicaSet([a, b])
    first = [replicas.submit([1, 2], PARAMS) for _ in range(4)]
    assert [h.replica for h in first] in ([0, 1, 0, 1], [1, 0, 1, 0])  # equal load: they alternate
    for h in a.handles:
        h._deliver(TokenEvent((5,), "length"))  # replica a is idle again, b still holds two
    assert [replicas.submit([3], PARAMS).replica for _ in range(2)] == [0, 0]
    stats = replicas.metrics()
    assert stats["running"] == 4 and stats["tokens_per_s"] == 3.0 and len(stats["ttft_s"]) == 4
    assert [r["submitted"] for r in stats["replicas"]] == [4, 2] and stats["replicas_up"] == 2


def test_a_replica_that_is_down_or_full_is_routed_around():
    a, b = StandIn("a"), StandIn("b")
    replicas = ReplicaSet([a, b])
    a.state = "down"
    assert {replicas.submit([1], PARAMS).replica for _ in range(3)} == {1}
    b.full = True
    with pytest.raises(QueueFull, match="replica 1: b is full"):  # full beats down: worth a retry
        replicas.submit([1], PARAMS)
    b.state = "restarting"
    with pytest.raises(NodeUnavailable, match="replica 0: a is down; replica 1: b is restarting"):
        replicas.submit([1], PARAMS)
    assert replicas.metrics()["state"] != "up"
    replicas.close()
    assert (a.state, b.state) == ("closed", "closed")
    with pytest.raises(NodeUnavailable):
        replicas.submit([1], PARAMS)


def test_a_dying_replica_resends_what_had_no_token_and_fails_what_had():
    a, b = StandIn("a"), StandIn("b")
    replicas = ReplicaSet([a, b])
    started = replicas.submit([1], PARAMS)  # -> one replica
    waiting = replicas.submit([2], PARAMS)  # -> the other
    dying, other = (a, b) if started.replica == 0 else (b, a)
    waiting_too = replicas.submit([3], PARAMS, request_id="w2")
    assert waiting_too.replica == started.replica  # tie: rotation brings it back to `dying`
    dying.handles[0]._deliver(TokenEvent((7,)))
    assert started.events(1) == TokenEvent((7,))
    dying.die("rank 1 failed: killed")
    assert started.events(1).error == "rank 1 failed: killed"  # its caller had a token: no resend
    got = []
    reader = threading.Thread(target=lambda: got.append(waiting_too.events(30)))
    reader.start()  # reading the dead replica's error moves the request
    deadline = time.monotonic() + 10
    while other.handles[-1].prompt != (3,):
        assert time.monotonic() < deadline, "the request was not sent to the other replica"
        time.sleep(0.01)
    other.handles[-1]._deliver(TokenEvent((8, 9), "length"))
    reader.join(10)
    assert got == [TokenEvent((8, 9), "length")] and waiting_too.tried == [started.replica, 1 - started.replica]
    assert waiting_too.result(1) == [8, 9] and replicas.metrics()["resent"] == 1
    assert not waiting.done  # the other replica's own request never noticed
    with pytest.raises(RuntimeError, match="killed"):
        started.result(1)


def test_the_asyncio_stream_follows_a_resent_request():
    a, b = StandIn("a"), StandIn("b")
    replicas = ReplicaSet([a, b])
    handle = replicas.submit([1], PARAMS)
    dying, other = (a, b) if handle.replica == 0 else (b, a)

    async def answer_from_the_other() -> None:
        while not other.handles:  # the resend happens when the stream reads the error
            await asyncio.sleep(0.01)
        other.handles[-1]._deliver(TokenEvent((4,)))
        other.handles[-1]._deliver(TokenEvent((5,), "length"))

    async def read() -> list:
        events, answering = [], None
        async for event in handle.stream():
            events.append(event)
            if answering is None:  # after the first event the replica dies
                dying.die("boom")
                answering = asyncio.ensure_future(answer_from_the_other())
        await answering
        return events
    dying.handles[0]._deliver(TokenEvent(()))  # an empty event (prefill progress): no token yet
    events = asyncio.run(asyncio.wait_for(read(), 10))
    assert events == [TokenEvent(()), TokenEvent((4,)), TokenEvent((5,), "length")]
    assert handle.tried == [0, 1] or handle.tried == [1, 0]


# --- generate: a batch split over replicas ---------------------------------------------------
class BatchStandIn:
    """A node's generate(): each prompt's tokens are its ids + 100, or the replica fails."""

    def __init__(self, fails: bool = False) -> None:
        self.fails, self.seen, self.model_cfg, self.closed = fails, [], None, False

    def generate(self, requests, on_tokens=None, spec=None):
        from workers.engine import Completion, GenerationStats
        self.seen.append([r.request_id for r in requests])
        if self.fails:
            raise RankFailure(1, "killed")
        completions = [Completion(r.request_id, [t + 100 for t in r.prompt_ids], "length") for r in requests]
        return completions, GenerationStats(ttft_s=0.1, step_s=[0.01] * len(requests), total_s=1.0), {}

    def shutdown(self) -> None:
        self.closed = True


def _batch(n: int) -> list:
    from workers.engine import Request
    return [Request((i, i + 1), PARAMS, str(i)) for i in range(n)]


def test_a_batch_is_split_over_replicas_and_a_failed_part_runs_again():
    from cluster.replica_batch import ReplicaNodes
    nodes = [BatchStandIn(), BatchStandIn(fails=True), BatchStandIn()]
    replicas = ReplicaNodes(nodes)
    completions, stats, info = replicas.generate(_batch(7))
    assert [c.request_id for c in completions] == [str(i) for i in range(7)]  # the batch's order
    assert [c.token_ids for c in completions] == [[i + 100, i + 101] for i in range(7)]
    assert [n.seen for n in nodes] == [[["0", "3", "6"], ["1", "4"]], [["1", "4"]], [["2", "5"]]]
    assert info["replica_failures"] == [{"replica": 1, "error": "rank 1 failed: killed"}]
    assert stats.step_s == [0.01] * 3 and stats.total_s == 1.0  # the longest replica's steps
    replicas.shutdown()
    assert all(n.closed for n in nodes)
    with pytest.raises(RankFailure):
        ReplicaNodes([BatchStandIn(fails=True), BatchStandIn(fails=True)]).generate(_batch(3))


def test_replica_flags_that_cannot_work_are_refused_before_any_node(tmp_path):
    from cluster.node import UserError
    from cluster.replicas import replica_makers
    from workers.run_config import RunConfig
    with pytest.raises(UserError, match="--replicas must be >= 1, got 0"):
        replica_makers(RunConfig("m", world_size=2), 0, {})
    with pytest.raises(UserError, match="--trace .* --replicas"):
        replica_makers(RunConfig("m", world_size=2, trace_dir=str(tmp_path)), 2, {})


def test_generate_with_replicas_prints_what_one_node_prints(capsys):
    """`generate --replicas 2` (world 1: two in-process nodes, no Ray) equals one node, prompt by prompt."""
    import json
    from launch.cli import main
    argv = ["generate", "--world-size", "1", "--no-spec", "--max-new-tokens", "6", "--ignore-eos", "--json",
            "--prompt", "The list", "--prompt", "def f(x):", "--prompt", "import os"]
    summaries = []
    for extra in ([], ["--replicas", "2"]):
        assert main(argv + extra) == 0
        summaries.append(json.loads(capsys.readouterr().out.splitlines()[-1]))
    one, two = summaries
    assert [c["token_ids"] for c in two["completions"]] == [c["token_ids"] for c in one["completions"]]
    assert two["replicas"] == 2 and two["replica_failures"] == []


# --- two real replicas behind one endpoint ---------------------------------------------------
@pytest.fixture(scope="module")
def two_replicas():
    import ray
    from tests.serve_server import serving
    with serving("--world-size", "2", "--replicas", "2", "--max-batch", "4", "--collective-timeout", "20") as s:
        pids = [pid for sched in s.scheduler.schedulers for pid in sched.node.node_pids()]
        yield s
    assert not ray.is_initialized()  # the Ray started for the replicas stopped with them
    deadline = time.monotonic() + 30
    while (alive := [p for p in pids if process_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive == [], "ranks of the replicas outlived the server"


def _complete(client, prompt_ids: list[int], n: int) -> str:
    return client.completions.create(model="default-v3", prompt=prompt_ids, max_tokens=n, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text


def test_two_replicas_answer_every_request_and_share_them(two_replicas):
    from cluster.inprocess import InProcessNode
    from workers.engine import Request
    from workers.run_config import RunConfig
    from model.embedded import ensure_default_model
    replicas = two_replicas.scheduler
    assert isinstance(replicas, ReplicaSet) and len(replicas.schedulers) == 2
    prompts = [[0, *range(40 + 7 * i, 46 + 7 * i)] for i in range(6)]
    client, answers = two_replicas.client(), [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, _complete(client, prompts[i], 6)))
               for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    with InProcessNode(RunConfig(str(ensure_default_model()), world_size=1)) as node:
        node.load()
        params = SamplingParams(max_new_tokens=6, stop_on_eos=False)
        want, _, _ = node.generate([Request(tuple(p), params, str(i)) for i, p in enumerate(prompts)])
    assert answers == [two_replicas.served.tokenizer.decode(c.token_ids) for c in want]
    shares = [r["submitted"] for r in replicas.metrics()["replicas"]]
    assert sum(shares) == len(prompts) and min(shares) >= 2, shares


def test_killing_one_replica_mid_stream_fails_only_its_requests(two_replicas):
    replicas, client = two_replicas.scheduler, two_replicas.client()
    outcome, ids, streaming = {}, {}, threading.Barrier(5, timeout=120)

    def stream(i: int) -> None:
        try:
            chunks = client.completions.create(model="default-v3", prompt=[0, 50 + i, 60 + i], max_tokens=400,
                                               temperature=0, stream=True, extra_body={"ignore_eos": True})
            for k, chunk in enumerate(chunks):
                ids[i] = chunk.id
                if k == 0:
                    streaming.wait()
            outcome[i] = "finished"
        except openai.APIError as e:
            outcome[i] = f"error: {e}"
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    streaming.wait()  # every request has a token
    held = {r: {h.request_id for h in replicas.in_flight[r] if not h._inner.done} for r in (0, 1)}
    assert held[0] and held[1], held  # both replicas are serving
    os.kill(replicas.schedulers[0].node.node_pids()[1], signal.SIGKILL)
    for t in threads:
        t.join(180)
    assert len(outcome) == 4 and not any(t.is_alive() for t in threads)
    for i, result in outcome.items():
        on_killed = ids[i] in held[0]
        assert result.startswith("error") == on_killed, (i, result, held)
        if on_killed:
            assert "rank 1" in result
    stats = replicas.metrics()
    assert [r["state"] for r in stats["replicas"]] == ["down", "up"] and stats["state"] == "up"
    before = stats["replicas"][1]["submitted"]
    assert _complete(client, [0, 5, 6, 7], 4)  # the survivor serves new requests
    assert replicas.metrics()["replicas"][1]["submitted"] == before + 1
