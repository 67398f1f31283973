"""Batch invariance with fp32 on CPU: a request's output does not depend on what else is batched
with it. Two levels:
  * the engine: every logit row a request's tokens came from has the SAME BITS alone and among
    others that join and leave around it (world 1 in-process, world 2 as two processes over
    shared memory), greedy and seeded sampling;
  * the served node: 32 concurrent greedy requests of different lengths on a world-2 Ray node give
    each request the tokens it gets when it runs alone on the same scheduler.
workers/batch_engine.py says what it takes (and model/ffn.py's MIN_GEMM_ROWS).
"""
from __future__ import annotations

import time

import pytest
import torch

from cluster.procs import run_world
from collectives.communicator import SingleRankCommunicator
from model.embedded import default_model_dir
from model.sampling import SamplingParams
from workers.batch_engine import BatchEngine
from workers.run_config import RunConfig
from workers.worker import Worker

MAX_CONTEXT = 192
# prompt lengths around the chunk size (16) and under 4 tokens (the small-GEMM kernel), and budgets
LENGTHS = (1, 2, 3, 5, 16, 17, 33, 64, 90, 7, 40, 12)


def _requests() -> list[tuple[str, list[int], SamplingParams]]:
    gen = torch.Generator().manual_seed(5)
    out = []
    for i, n in enumerate(LENGTHS):
        prompt = torch.randint(3, 512, (n,), generator=gen).tolist()
        sampled = i % 4 == 3  # a few seeded sampling rows: same logits + same seed -> same draws
        params = SamplingParams(temperature=0.8 if sampled else 0.0, top_p=0.9, seed=100 + i,
                                max_new_tokens=4 + i % 7, stop_on_eos=False)
        out.append((f"r{i}", prompt, params))
    return out


def _run(engine: BatchEngine, requests, max_rows: int, join_every: int) -> tuple[dict, dict]:
    """Runs `requests` through the engine, at most max_rows at once, one joining every
    `join_every` steps while a slot is free. Returns {id: [logit rows]}, {id: tokens}."""
    logits: dict[str, list[torch.Tensor]] = {}
    tokens: dict[str, list[int]] = {}
    engine.logits_hook = lambda rid, row: logits.setdefault(rid, []).append(row.clone())
    queue, step = list(requests), 0
    while queue or engine.busy:
        free = [s for s in range(max_rows) if engine.rows[s] is None]
        if queue and free and step % join_every == 0:
            rid, prompt, params = queue.pop(0)
            engine.add(free[0], rid, prompt, params)
        for event in engine.step():
            tokens.setdefault(event.request_id, []).extend(event.tokens)
        step += 1
    return logits, tokens


def invariance_case(comm, model_dir: str, device: str = "cpu", dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """On every rank: each request alone (one engine, slots reused), then all of them together
    (staggered joins, 8 slots). Rank 0 returns both logit stacks per request and the tokens.
    (benchmarks/batch_invariance.py runs it on GPUs and in other dtypes, to measure.)"""
    run = RunConfig(model_dir, world_size=comm.world_size, max_context=MAX_CONTEXT, device=device, dtype=dtype,
                    comm="shm" if device == "cpu" else "nccl")
    worker = Worker(comm.rank, run, comm)
    worker.load()
    engine = BatchEngine(worker.model, max_batch=8, max_context=MAX_CONTEXT, prefill_chunk=16)
    alone_logits, alone_tokens = {}, {}
    for request in _requests():
        logits, tokens = _run(engine, [request], max_rows=8, join_every=1)
        alone_logits.update(logits)
        alone_tokens.update(tokens)
    batch_logits, batch_tokens = _run(engine, _requests(), max_rows=8, join_every=2)
    out = {}
    for rid in alone_logits:
        out[f"alone.{rid}"] = torch.stack(alone_logits[rid])  # (tokens, V_r)
        out[f"batch.{rid}"] = torch.stack(batch_logits[rid])
        out[f"alone_tokens.{rid}"] = torch.tensor(alone_tokens[rid])
        out[f"batch_tokens.{rid}"] = torch.tensor(batch_tokens[rid])
    return out


def _check_same_bits(out: dict[str, torch.Tensor]) -> None:
    ids = [k.split(".", 1)[1] for k in out if k.startswith("alone.")]
    assert len(ids) == len(LENGTHS)
    for rid in ids:
        alone, batch = out[f"alone.{rid}"], out[f"batch.{rid}"]
        assert alone.shape == batch.shape and alone.shape[0] >= 4, rid
        diff = (alone - batch).abs().max().item()
        assert torch.equal(alone, batch), f"request {rid}: logits differ by up to {diff:.3g} in a batch"
        assert torch.equal(out[f"alone_tokens.{rid}"], out[f"batch_tokens.{rid}"]), rid


def test_engine_rows_have_the_same_bits_alone_and_batched_world1():
    _check_same_bits(invariance_case(SingleRankCommunicator(), str(default_model_dir())))


def test_the_row_probe_tells_a_count_dependent_op_from_a_row_wise_one():
    """workers/gemm_rows.py: an op whose rows round by the row count is caught; a row-wise one passes."""
    from workers.gemm_rows import row_keeps_bits
    cpu = torch.device("cpu")
    assert row_keeps_bits(lambda x: x * 3.0, 16, range(4, 10), torch.float32, cpu)
    assert not row_keeps_bits(lambda x: x * (0.1 * len(x)) / (0.1 * len(x)), 16, range(4, 10), torch.float32, cpu)
    by_position = lambda x: x + (torch.arange(len(x))[:, None] == 0) * 1e-3  # noqa: E731  row 0 differs
    assert not row_keeps_bits(by_position, 16, range(4, 10), torch.float32, cpu)


def test_engine_rows_have_the_same_bits_with_all_rows_in_every_forward(monkeypatch):
    """The engine's choice on a CPU whose GEMM rows round by count (an Intel host's, see
    workers/gemm_rows.py): every decode forward over all rows, expert groups padded to them; still
    the same bits alone and batched."""
    import workers.batch_engine as batch_engine
    from model.ffn import Experts
    monkeypatch.setattr(batch_engine, "decode_rows_policy", lambda model, lo, hi: batch_engine.FIXED)
    seen = []
    real_forward = Experts.forward
    monkeypatch.setattr(Experts, "forward", lambda self, x, ids: seen.append(self.gemm_rows) or real_forward(self, x, ids))
    _check_same_bits(invariance_case(SingleRankCommunicator(), str(default_model_dir())))
    assert seen and set(seen) == {9}  # 8 slots + the ruler


def test_engine_rows_have_the_same_bits_alone_and_batched_world2():
    _check_same_bits(run_world(2, invariance_case, str(default_model_dir()), backend="shm", timeout_s=60))


@pytest.fixture(scope="module")
def world2_scheduler():
    from cluster.node import build_node
    from cluster.scheduler import Scheduler
    node = build_node(RunConfig(str(default_model_dir()), world_size=2, max_context=MAX_CONTEXT))
    try:
        node.load()
    except BaseException:
        node.shutdown()
        raise
    scheduler = Scheduler(node, max_batch=32, max_queue=64, prefill_chunk=32)
    yield scheduler
    scheduler.close()


def test_32_concurrent_greedy_requests_get_their_alone_tokens(world2_scheduler):
    gen = torch.Generator().manual_seed(11)
    requests = []
    for i in range(32):
        n = int(torch.randint(1, 80, (1,), generator=gen))
        prompt = torch.randint(3, 512, (n,), generator=gen).tolist()
        requests.append((prompt, SamplingParams(max_new_tokens=4 + i % 9, stop_on_eos=False)))
    alone = [world2_scheduler.submit(p, params).result(60) for p, params in requests]
    start = time.monotonic()
    handles = [world2_scheduler.submit(p, params) for p, params in requests]
    together = [h.result(120) for h in handles]
    batched_s = time.monotonic() - start
    assert together == alone
    assert len({h.slot for h in handles}) > 8  # they really ran side by side
    assert batched_s < 120


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_batching_stays_close_to_alone(dtype):
    """On a GPU nothing forces one kernel per row count, so bits may move with the batch (measured by
    benchmarks/batch_invariance.py --device cuda). What must hold: the engine is right there too, so
    a request's logits alone and batched agree to the dtype's rounding, and fp32 keeps its tokens."""
    torch.cuda.set_device(0)
    out = invariance_case(SingleRankCommunicator(), str(default_model_dir()), "cuda", dtype)
    tolerance = 1e-3 if dtype == "fp32" else 0.25  # logits of the embedded model are O(10)
    for key in (k for k in out if k.startswith("alone.")):
        rid = key.split(".", 1)[1]
        alone, batch = out[key].float(), out[f"batch.{rid}"].float()
        assert alone.shape == batch.shape
        first = min(len(alone), len(batch))
        tokens_alone, tokens_batch = out[f"alone_tokens.{rid}"], out[f"batch_tokens.{rid}"]
        same_prefix = 0  # rows after a token flip see other inputs: compare up to the first flip
        while same_prefix < first and tokens_alone[same_prefix] == tokens_batch[same_prefix]:
            same_prefix += 1
        rows = slice(0, min(same_prefix + 1, first))
        assert (alone[rows] - batch[rows]).abs().max().item() < tolerance, rid
        if dtype == "fp32":
            assert torch.equal(tokens_alone, tokens_batch), rid
