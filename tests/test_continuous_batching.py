"""Continuous batching (cluster/scheduler.py over workers/batch_engine.py): requests joining while
others decode, slots reused, chunked prefill that never stalls the running rows, cancel, a full
queue, bad requests, the asyncio stream, EAGLE-3 rows, and a killed rank (world 2 on Ray): its
requests fail with an error naming it, and with max_restarts the scheduler serves again.
Every output is checked against workers.engine's greedy generation of the request alone."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch

from cluster.inprocess import InProcessNode
from cluster.scheduler import NodeUnavailable, QueueFull, Scheduler
from model.embedded import default_draft_dir, default_model_dir
from model.sampling import SamplingParams
from model.spec import SpecConfig
from workers.batch_engine import BatchEngine
from workers.engine import Request, RequestError
from workers.run_config import RunConfig

MAX_CONTEXT = 256
MODEL = str(default_model_dir())


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _params(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, stop_on_eos=False)


@pytest.fixture(scope="module")
def reference():
    """workers.engine on its own in-process node: tokens of one request generated alone."""
    node = InProcessNode(RunConfig(MODEL, world_size=1))
    node.load()
    cache = {}

    def alone(prompt: list[int], params: SamplingParams) -> list[int]:
        key = (tuple(prompt), params)
        if key not in cache:
            cache[key] = node.generate([Request(tuple(prompt), params)])[0][0].token_ids
        return cache[key]
    alone.model = node.worker.model
    yield alone
    node.shutdown()


@pytest.fixture(scope="module")
def sched():
    node = InProcessNode(RunConfig(MODEL, world_size=1, max_context=MAX_CONTEXT))
    node.load()
    scheduler = Scheduler(node, max_batch=4, max_queue=4, prefill_chunk=16)
    yield scheduler
    scheduler.close()


def _wait_tokens(handle, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(handle.token_ids) < n:
        assert time.monotonic() < deadline and not handle.done, "the request made no progress"
        time.sleep(0.005)


def test_requests_join_while_others_decode_and_match_engine_alone(sched, reference):
    long = sched.submit(_prompt(20, 0), _params(60))
    _wait_tokens(long, 3)
    later = [sched.submit(_prompt(n, i + 1), _params(m)) for i, (n, m) in enumerate(
        [(5, 12), (40, 8), (1, 10), (17, 6), (33, 9), (3, 7)])]
    outputs = [h.result(120) for h in [long] + later]
    for handle, out in zip([long] + later, outputs):
        assert out == reference(list(handle.prompt), handle.params), handle.request_id
        assert handle.finish_reason == "length" and len(handle.token_times) == len(out)
    assert later[0].token_times[0] < long.token_times[-1]  # joined while the long one decoded
    slots = [h.slot for h in [long] + later]
    assert len(slots) > len(set(slots)), slots  # 7 requests over 4 slots: slots were reused


def test_long_prompt_prefill_is_chunked_and_never_stalls_running_rows(reference):
    engine = BatchEngine(reference.model, max_batch=2, max_context=MAX_CONTEXT, prefill_chunk=8)
    engine.add(0, "a", _prompt(4, 7), _params(40))
    while not engine.rows[0].out:
        engine.step()
    engine.add(1, "b", _prompt(60, 8), _params(5))
    steps_to_first, a_tokens = 0, 0
    while not engine.rows[1].out:
        events = {e.request_id: e for e in engine.step()}
        steps_to_first += 1
        a_tokens += len(events["a"].tokens)  # the running row got its token in every step
        assert engine.rows[1] is None or engine.rows[1].prefilled <= 8 * steps_to_first
    assert steps_to_first == 8 and a_tokens == 8  # ceil(60 / 8) chunks, one per step


def test_cancel_frees_the_slot_at_once(sched, reference):
    running = [sched.submit(_prompt(6, 20 + i), _params(200)) for i in range(4)]
    waiting = sched.submit(_prompt(9, 30), _params(5))
    queued_then_cancelled = sched.submit(_prompt(9, 31), _params(5))
    for h in running:
        _wait_tokens(h, 1)
    assert waiting.slot is None and not waiting.token_ids
    queued_then_cancelled.cancel()
    assert queued_then_cancelled.events(1).finish_reason == "cancelled"  # never ran: ends at once
    start = time.monotonic()
    running[0].cancel()
    assert waiting.result(60) == reference(list(waiting.prompt), waiting.params)
    assert running[0].finish_reason == "cancelled" and time.monotonic() - start < 30
    assert not any(h.done for h in running[1:])  # the freed slot, not a finished one, took it
    for h in running[1:]:
        h.cancel()
    for h in running[1:]:
        assert h.result(30) == h.token_ids and h.finish_reason == "cancelled"
    deadline = time.monotonic() + 10
    while sched.metrics()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sched.metrics()["running"] == 0 and sched.metrics()["cancelled"] >= 5


def test_a_full_queue_refuses_with_queue_full(sched):
    handles = [sched.submit(_prompt(5, 40 + i), _params(200)) for i in range(8)]  # 4 slots + 4 queued
    try:
        with pytest.raises(QueueFull, match="max_queue 4"):
            sched.submit(_prompt(5, 50), _params(5))
    finally:
        for h in handles:
            h.cancel()
        for h in handles:
            h.result(30)
    assert all(h.finish_reason == "cancelled" for h in handles)


@pytest.mark.parametrize("prompt, params, message", [
    ([], _params(4), "the prompt is empty"),
    ([5, 512], _params(4), "token id 512 is outside the vocabulary"),
    ([5] * 250, _params(10), "exceeds the context limit of 256"),
    ([5, -1], _params(4), "token id -1 is outside"),
    ([5, "x"], _params(4), "list of integer token ids"),
])
def test_bad_requests_are_refused_with_the_reason(sched, prompt, params, message):
    with pytest.raises(RequestError, match=message):
        sched.submit(prompt, params)


def test_sampling_params_must_be_sampling_params(sched):
    with pytest.raises(RequestError, match="SamplingParams"):
        sched.submit([1, 2], {"max_new_tokens": 4})


def test_async_stream_delivers_every_token_then_ends(sched, reference):
    prompt, params = _prompt(11, 60), _params(9)

    async def collect():
        handle = sched.submit(prompt, params)
        return [event async for event in handle.stream()]
    events = asyncio.run(collect())
    assert [t for e in events for t in e.token_ids] == reference(prompt, params)
    assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])


def test_a_closed_scheduler_is_unavailable():
    node = InProcessNode(RunConfig(MODEL, world_size=1, max_context=64))
    node.load()
    scheduler = Scheduler(node, max_batch=1)
    handle = scheduler.submit(_prompt(4, 70), _params(50))
    scheduler.close()
    event = handle.events(5)
    while not event.final:
        event = handle.events(5)
    assert event.error == "the scheduler was closed"
    with pytest.raises(NodeUnavailable, match="closed"):
        scheduler.submit([1, 2], _params(2))


@pytest.mark.parametrize("spec", [SpecConfig(draft_len=3), SpecConfig(tree=True, top_k=2, depth=3, tree_tokens=4)],
                         ids=["chain", "tree"])
def test_eagle3_rows_accept_their_own_drafts_and_match_plain_greedy(reference, spec):
    run = RunConfig(MODEL, world_size=1, max_context=MAX_CONTEXT, draft_path=str(default_draft_dir()))
    node = InProcessNode(run)
    node.load()
    text = (default_model_dir() / "heldout.txt").read_bytes()
    prompts = [list(text[i * 400: i * 400 + n]) for i, n in enumerate((30, 5, 60, 12, 2))]  # byte-level ids
    with Scheduler(node, max_batch=3, prefill_chunk=16, spec=spec) as scheduler:
        handles = [scheduler.submit(p, _params(16)) for p in prompts]
        outputs = [h.result(120) for h in handles]
        metrics = scheduler.metrics()
    assert outputs == [reference(p, _params(16)) for p in prompts]
    lengths = [h.spec["acceptance_length"] for h in handles]
    assert all(1.0 <= a <= spec.shape[1] + 1 for a in lengths) and len(set(lengths)) > 1  # each row its own
    assert metrics["acceptance_length"] > 1.0


def test_eagle3_decodes_plainly_above_spec_max_batch_and_speculates_again_once_empty(reference):
    """spec_max_batch=1: once two rows decode at once, every step is plain (greedy output unchanged:
    the rows' target caches hold all but their last token either way) until the batch is empty; a
    request that then runs alone drafts again."""
    run = RunConfig(MODEL, world_size=1, max_context=MAX_CONTEXT, draft_path=str(default_draft_dir()))
    node = InProcessNode(run)
    node.load()
    text = (default_model_dir() / "heldout.txt").read_bytes()
    prompts = [list(text[i * 400: i * 400 + n]) for i, n in enumerate((30, 5, 60))]  # byte-level ids
    with Scheduler(node, max_batch=3, prefill_chunk=64, spec=SpecConfig(draft_len=3), spec_max_batch=1) as sched:
        together = [sched.submit(p, _params(16)) for p in prompts]
        outputs = [h.result(120) for h in together]
        alone = sched.submit(prompts[0], _params(16))
        alone_out = alone.result(120)
    assert outputs == [reference(p, _params(16)) for p in prompts] and alone_out == outputs[0]
    plain_only = [h for h in together if h.spec["verify_steps"] == 0]
    assert len(plain_only) >= 2 and all(h.spec["acceptance_length"] is None for h in plain_only)  # never drafted
    assert alone.spec["verify_steps"] > 0 and alone.spec["acceptance_length"] > 1.0  # drafting again
    with pytest.raises(ValueError, match="spec_max_batch=0"):
        Scheduler(node, spec=SpecConfig(draft_len=3), spec_max_batch=0)


def test_a_failing_rank_fails_its_requests_and_a_restart_serves_again(reference, monkeypatch):
    """World 1, fault injected in the loop (its engine raises mid-decode): the in-flight requests
    end with the error, queued ones wait, the scheduler builds a new node and serves them."""
    real_step, calls = BatchEngine.step, {"n": 0}

    def failing_step(engine):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected fault")
        return real_step(engine)
    monkeypatch.setattr(BatchEngine, "step", failing_step)

    def make():
        return InProcessNode(RunConfig(MODEL, world_size=1, max_context=MAX_CONTEXT))
    node = make()
    node.load()
    with Scheduler(node, max_batch=1, max_restarts=1, make_node=make) as scheduler:
        running = scheduler.submit(_prompt(5, 110), _params(20))
        queued = scheduler.submit(_prompt(7, 111), _params(6))
        with pytest.raises(RuntimeError, match="rank 0 failed: RuntimeError: injected fault"):
            running.result(30)
        assert queued.result(60) == reference(list(queued.prompt), queued.params)  # on the new node
        metrics = scheduler.metrics()
        assert metrics["restarts"] == 1 and metrics["failed"] == 1 and metrics["state"] == "up"
        calls["n"] = 0  # a second fault: no restart is left
        running = scheduler.submit(_prompt(5, 112), _params(20))
        queued = scheduler.submit(_prompt(7, 113), _params(6))
        with pytest.raises(RuntimeError, match="injected fault"):
            running.result(30)
        with pytest.raises(RuntimeError, match="the node is down"):
            queued.result(30)
        with pytest.raises(NodeUnavailable, match="down"):
            scheduler.submit([1], _params(1))


def test_world2_killed_rank_fails_its_requests_and_a_restart_serves_again(reference):
    """Ray, 2 CPU actors: outputs equal the engine alone; SIGKILL rank 1 mid-decode -> every request
    in flight ends with an error naming rank 1 (none hangs), the scheduler rebuilds the node
    (max_restarts=1) and serves a new request, whose output is again the engine's alone."""
    from cluster.node import build_node
    run = RunConfig(MODEL, world_size=2, max_context=MAX_CONTEXT, collective_timeout_s=20.0)
    node = build_node(run)
    try:
        node.load()
    except BaseException:
        node.shutdown()
        raise
    with Scheduler(node, max_batch=4, prefill_chunk=16, max_restarts=1, make_node=lambda: build_node(run)) as sched2:
        first = [sched2.submit(_prompt(n, 80 + n), _params(8)) for n in (3, 25, 50)]
        assert [h.result(120) for h in first] == [reference(list(h.prompt), h.params) for h in first]
        doomed = [sched2.submit(_prompt(6, 90 + i), _params(200)) for i in range(2)]
        for h in doomed:
            _wait_tokens(h, 2)
        killed_at = time.monotonic()
        os.kill(sched2.node.node_pids()[1], signal.SIGKILL)
        for h in doomed:
            with pytest.raises(RuntimeError, match="rank 1 failed"):
                h.result(30)
        assert time.monotonic() - killed_at < 30
        deadline, refused = time.monotonic() + 300, 0  # a new Ray instance, 2 actors, the load
        while sched2.metrics()["state"] != "up":
            assert time.monotonic() < deadline and sched2.metrics()["state"] == "restarting", sched2.metrics()
            try:
                sched2.submit([1, 2, 3], _params(2)).cancel()
            except NodeUnavailable as e:
                refused += 1
                assert "restarting" in str(e) and "rank 1 failed" in str(e)
            time.sleep(0.2)
        assert refused > 0  # while the node was rebuilt, new requests were told so
        again = sched2.submit(_prompt(12, 99), _params(10))
        assert again.result(120) == reference(list(again.prompt), again.params)
        metrics = sched2.metrics()
        assert metrics["restarts"] == 1 and metrics["failed"] == 2


def serve_loop_world(comm, model_dir: str, prompts: list[list[int]], tokens: int) -> dict:
    """Every rank runs the serve loop (local processes, no Ray); rank 0's thread is the driver:
    one push with every join (its msgpack is over the 1 KiB header: a second broadcast), then stop."""
    import threading

    from workers.serve_loop import Mailbox, run_serve
    from workers.worker import Worker
    worker = Worker(comm.rank, RunConfig(model_dir, world_size=comm.world_size, max_context=1024), comm)
    worker.load()
    mailbox = Mailbox() if comm.rank == 0 else None
    out: dict[str, list[int]] = {}
    if mailbox is not None:
        def drive() -> None:
            params = {"max_new_tokens": tokens, "stop_on_eos": False}
            mailbox.push(0, [{"op": "join", "slot": i, "id": str(i), "prompt": p, "params": params}
                             for i, p in enumerate(prompts)])
            since, done = 0, 0
            while done < len(prompts):
                reply = mailbox.poll(since, 1.0)
                for event in reply["events"]:
                    out.setdefault(event["id"], []).extend(event["tokens"])
                    done += event["finish"] is not None
                since = reply["next"]
            mailbox.push(1, [{"op": "stop"}])
        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
    stats = run_serve(worker, {"max_batch": 4, "max_context": 1024, "prefill_chunk": 64}, mailbox)
    if mailbox is not None:
        driver.join(10)
        return {**{f"tokens.{k}": torch.tensor(v) for k, v in out.items()}, "steps": torch.tensor(stats["steps"])}
    return None


def test_world2_serve_loop_over_shared_memory_matches_engine_alone(reference):
    from cluster.procs import run_world
    prompts = [_prompt(600, 100), _prompt(3, 101), _prompt(70, 102)]  # ~1.3 KiB of commands in one step
    out = run_world(2, serve_loop_world, MODEL, prompts, 6, backend="shm", timeout_s=60)
    for i, prompt in enumerate(prompts):
        assert out[f"tokens.{i}"].tolist() == reference(prompt, _params(6)), i
    assert int(out["steps"]) >= 600 // 64  # the long prompt took one chunk per step
