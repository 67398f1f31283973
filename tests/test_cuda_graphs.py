"""CUDA-graph decode (GPU only): replayed steps produce exactly the eager steps' tokens.

The embedded model (trained weights, so greedy text is not a degenerate loop) generates 128
tokens for prompts of lengths not seen before, once replaying captured decode steps and once
eagerly on the same kernels: the greedy tokens must be identical (bf16 and FP8), and sampling
with a seed must draw the same tokens. In fp32 the fused kernels must also agree with the torch
reference ops for all 128 greedy tokens. Bad settings are refused with a reason.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from collectives.communicator import SingleRankCommunicator
from model.config import load_model_config
from model.embedded import ensure_default_model
from model.parallel import layout
from model.sampling import SamplingParams
from workers.engine import Engine, Request, RequestError
from workers.model_build import build_model
from workers.run_config import RunConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NEW = 128


def _engine(dtype: str, kernels: str, graphs: str) -> Engine:
    path = ensure_default_model()
    run = RunConfig(model_path=str(path), dtype=dtype, device="cuda", world_size=1, comm="gloo", kernels=kernels)
    cfg = load_model_config(path)
    model, _ = build_model(run, cfg, layout(cfg, 1, 0, "tp"), SingleRankCommunicator())
    return Engine(model.eval(), kv_dtype=run.kv_torch_dtype, cuda_graphs=graphs)


def _requests(seed: int, params: SamplingParams, rows: int = 2) -> list[Request]:
    """Prompts of fresh lengths; the second row stops early (its end reaches the graph mid-run)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 90, (rows,), generator=gen).tolist()  # fresh lengths every run
    budgets = [params.max_new_tokens] + [max(1, params.max_new_tokens // 3)] * (rows - 1)
    return [Request(tuple(torch.randint(3, 500, (n,), generator=gen).tolist()),
                    dataclasses.replace(params, max_new_tokens=budget), str(i))
            for i, (n, budget) in enumerate(zip(lengths, budgets))]


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_graph_replay_gives_the_eager_tokens(dtype):
    graphs, eager = _engine(dtype, "triton", "on"), _engine(dtype, "triton", "off")
    greedy = SamplingParams(max_new_tokens=NEW, stop_on_eos=False)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_new_tokens=NEW, stop_on_eos=False)
    for seed, params in ((1, greedy), (2, sampled)):
        requests = _requests(seed, params)
        got, _ = graphs.generate(requests)
        want, _ = eager.generate(requests)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert [len(c.token_ids) for c in got] == [r.params.max_new_tokens for r in requests]
        assert len(set(got[0].token_ids)) > 8, "degenerate output proves little"
    assert graphs.graphs is not None and len(graphs.graphs.graphs) >= 1


def test_fused_graph_equals_torch_reference_in_fp32():
    requests = _requests(3, SamplingParams(max_new_tokens=NEW, stop_on_eos=False))
    got, _ = _engine("fp32", "triton", "on").generate(requests)
    want, _ = _engine("fp32", "torch", "off").generate(requests)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_graphs_on_refuses_what_it_cannot_capture():
    engine = _engine("bf16", "torch", "on")
    with pytest.raises(RequestError, match="fused kernels"):
        engine.generate(_requests(4, SamplingParams(max_new_tokens=4)))


def test_bench_decode_measures_graph_steps_against_their_floor():
    from workers.step_bench import copy_bandwidth, measure_step
    engine = _engine("bf16", "triton", "off")
    bandwidth = copy_bandwidth(gib=1, repeats=5)
    assert 1e12 < bandwidth < 2e13  # bytes/s, read + write
    for tokens in (1, 4):
        timing = measure_step(engine.model, "step", tokens, 256, bandwidth, 20)
        assert 0 < timing.floor_us < timing.median_us <= timing.p90_us
        assert timing.bytes_read == pytest.approx(timing.floor_us * 1e-6 * bandwidth, rel=1e-3)
