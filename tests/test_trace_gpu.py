"""Tracing on real GPUs: times from CUDA events, resolved against the host clock at each step.
The recorder alone (resolution across flushes and clock rebases), one GPU in-process, and two GPUs over NCCL as Ray actors (the same checks as on CPU actors:
every collective on every rank with the same sequence number and bytes, the merged JSON's
nesting). Skips itself without a GPU (the two-GPU case without two GPUs or Ray)."""
from __future__ import annotations

import importlib.util
import time
from collections import defaultdict

import pytest
import torch

from cluster.inprocess import InProcessNode
from cluster.timeline import read_trace
from collectives.trace import CudaEventClock, TraceRecorder
from cluster.trace_export import chrome_trace
from cluster.trace_summary import summarize
from launch.trace_cli import finish_trace_dir, prepare_trace_dir
from model.sampling import SamplingParams
from tests.test_sharded import checkpoint  # noqa: F401 (fixture: a tiny random checkpoint)
from tests.test_trace import _check_nesting
from workers.engine import Request
from workers.run_config import RunConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
TOKENS = 6


def _requests() -> list[Request]:
    return [Request((0, 5, 9, 300), SamplingParams(max_new_tokens=TOKENS, stop_on_eos=False), "a")]


def _check_rank_times(rank_trace) -> None:
    """Event times resolved to integer ns, ordered on the one stream, spans inside their steps."""
    steps = {s["s"]: s for s in rank_trace.steps}
    assert sorted(steps) == list(range(TOKENS))
    for s in steps.values():
        assert isinstance(s["t0"], int) and s["t0"] < s["t1"]
    ends = [c["t1"] for c in rank_trace.collectives]
    for c in rank_trace.collectives:
        assert isinstance(c["t0"], int) and c["t0"] <= c["t1"]
    starts = [c["t0"] for c in rank_trace.collectives]
    assert all(a <= b for a, b in zip(ends, starts[1:])), "collectives on one stream overlap"
    for span in rank_trace.spans:
        step = steps[span["s"]]
        assert step["t0"] - 1000 <= span["t0"] <= span["t1"] <= step["t1"] + 1000, span


@pytest.mark.parametrize("rebase_every_step", [False, True])
def test_recorder_resolves_events_across_flushes_and_rebases(tmp_path, monkeypatch, rebase_every_step):
    """A step's events are resolved at its end, and a flush (every few records here) finds
    them resolved; renewing the reference event (every 250 ms, or every step here) must not
    move any time. No synchronization in the loop: the recorder waits where it has to."""
    if rebase_every_step:
        monkeypatch.setattr(CudaEventClock, "REBASE_AFTER_NS", 0)
    recorder = TraceRecorder(tmp_path, 0, 1, "none", "cuda", flush_every=7)
    x = torch.randn(1024, 1024, device="cuda")
    start = time.monotonic_ns()
    for step in range(9):
        recorder.step_begin(step, ["r"])
        for _ in range(3):
            with recorder.span("attention"):
                x = torch.tanh(x @ x)
        recorder.step_end(1)
    recorder.close()
    end = time.monotonic_ns()
    rank0 = read_trace(tmp_path, assume_same_clock=True).ranks[0]
    assert [s["s"] for s in rank0.steps] == list(range(9)) and len(rank0.spans) == 27
    times = [t for s in rank0.steps for t in (s["t0"], s["t1"])]
    assert all(isinstance(t, int) for t in times) and times == sorted(times)
    assert start <= times[0] and times[-1] <= end
    spans = [t for s in rank0.spans for t in (s["t0"], s["t1"])]
    assert spans == sorted(spans) and spans[-1] - spans[0] > 27 * 1000  # 27 matmuls of 1024^2: > 1 us each
    for span in rank0.spans:
        step = rank0.steps[span["s"]]
        assert step["t0"] <= span["t0"] < span["t1"] <= step["t1"]


def test_one_gpu_trace_has_event_times_inside_each_step(checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "trace"
    prepare_trace_dir(str(out))
    run = RunConfig(str(checkpoint), world_size=1, device="cuda", comm="nccl", dtype="bf16", trace_dir=str(out))
    with InProcessNode(run) as node:
        node.load()
        start = time.monotonic_ns()
        node.generate(_requests())
        end = time.monotonic_ns()
    finish_trace_dir(str(out))
    rank0 = read_trace(out).ranks[0]
    _check_rank_times(rank0)
    assert {s["n"] for s in rank0.spans} >= {"attention", "moe", "mlp", "lm_head", "sampling"}
    first, last = min(s["t0"] for s in rank0.steps), max(s["t1"] for s in rank0.steps)
    assert start <= first < last <= end  # device times land on the host clock, inside the call


@pytest.mark.skipif(torch.cuda.device_count() < 2 or importlib.util.find_spec("ray") is None,
                    reason="needs 2 GPUs and Ray")
def test_two_gpus_over_nccl_trace_every_collective_on_both_ranks(checkpoint, tmp_path):  # noqa: F811
    from cluster.ray_node import RayNode
    out = tmp_path / "trace"
    prepare_trace_dir(str(out))
    run = RunConfig(str(checkpoint), world_size=2, device="cuda", comm="nccl", dtype="bf16", moe_mode="ep",
                    trace_dir=str(out))
    with RayNode(run) as node:
        node.load()
        node.generate(_requests())
    finish_trace_dir(str(out))
    trace = read_trace(out)
    seen = defaultdict(dict)
    for rank, rank_trace in trace.ranks.items():
        _check_rank_times(rank_trace)
        for c in rank_trace.collectives:
            seen[(tuple(c["g"]), c["q"])][rank] = c
    assert {"allreduce_add_rmsnorm", "moe_dispatch", "moe_combine"} <= {c["op"] for c in trace.ranks[0].collectives}
    for key, per_rank in seen.items():
        assert sorted(per_rank) == [0, 1], f"collective {key} missing on a rank"
        assert len({(r["op"], r["d"]) for r in per_rank.values()}) == 1, per_rank
    _check_nesting(chrome_trace(trace)["traceEvents"])
    summary = summarize(trace)
    assert sum(summary["last_arrival_counts"].values()) == len(seen)
