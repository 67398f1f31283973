"""The engine's one-step-ahead loop over a decode graph, on CPU.

`Engine._graph_steps` queues step k+1 before it reads step k, lets a finished row decode one step
too many and tells the graph about it in stream order. A CUDA graph only runs on a GPU
(tests/test_cuda_graphs.py), so here a stand-in with DecodeGraph's interface runs each queued
step eagerly at launch, in queue order, with the same feedback of its choice (the argmax, or the
device sampler's draw) into its input: the tokens must be exactly plain eager decoding's, for
rows that stop at different steps, by budget and by end-of-sequence token, and, sampling, for
the same seeds (the graph's sampler must draw in the order an eager run draws).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from collectives.communicator import SingleRankCommunicator
from model.checkpoint import load_shard
from model.config import load_model_config, tiny
from model.embedded import random_state_dict, write_checkpoint
from model.llama4 import Llama4
from model.parallel import layout
from model.sampling import DeviceSampler, SamplingParams
from workers.engine import Engine, Request


class EagerGraph:
    """DecodeGraph's interface (prepare, pick, set_inputs, set_active, launch, read, cache), each
    launch run now."""

    def __init__(self, model: Llama4, batch: int, slots: int) -> None:
        self.model, self.cache = model, model.new_cache(batch, slots)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long)
        self.n_new = torch.ones(batch, dtype=torch.long)
        self.sampler = DeviceSampler(batch, 0, model.cfg.vocab_size, model.comm, "cpu")
        self.sampling = False
        self.results, self.launches = {}, 0

    def prepare(self, params: list[SamplingParams]) -> None:
        self.sampling = any(not p.greedy for p in params)
        self.sampler.reset(params)

    def pick(self, local_logits: torch.Tensor) -> torch.Tensor:
        return self.sampler.pick(local_logits, self.sampling)

    def set_inputs(self, tokens: list[int], active: list[int]) -> None:
        self.tokens[:, 0] = torch.tensor(tokens)
        self.set_active(active)

    def set_active(self, active: list[int]) -> None:
        self.n_new.copy_(torch.tensor(active))

    def launch(self) -> int:
        logits = self.model(self.tokens, self.cache, n_new=self.n_new, static=True).logits
        next_ids = self.pick(logits[:, -1])
        self.tokens[:, 0] = next_ids  # the graph's feedback
        self.launches += 1
        self.results[self.launches] = next_ids.tolist()
        return self.launches

    def read(self, handle: int) -> list[int]:
        return self.results.pop(handle)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph_loop_ckpt")
    cfg = dataclasses.replace(tiny(vocab_size=300), eos_token_ids=(48,))  # row 0 meets it early
    write_checkpoint(path, cfg, random_state_dict(cfg, seed=31, std=0.08))
    m = Llama4(load_model_config(path), layout(cfg, 1, 0, "tp"), SingleRankCommunicator()).eval()
    load_shard(m, path)
    return m


def _requests(sampled: bool) -> list[Request]:
    gen = torch.Generator().manual_seed(3)
    budgets = (40, 9, 1, 23)
    settings = [{"temperature": 0.8, "top_p": 0.9, "seed": 5}, {}, {"temperature": 1.1, "top_k": 20, "seed": 6},
                {"temperature": 0.7}] if sampled else [{}] * 4
    return [Request(tuple(torch.randint(8, 300, (n,), generator=gen).tolist()),
                    SamplingParams(max_new_tokens=b, stop_on_eos=i != 3, **settings[i]), str(i))
            for i, (n, b) in enumerate(zip((12, 30, 5, 17), budgets))]


def _graph_run(model, requests):
    engine = Engine(model, cuda_graphs="auto", device_sampling=True)
    graphs = []
    engine._graph = lambda batch, slots: graphs.append(EagerGraph(model, batch, slots)) or graphs[-1]
    got, stats = engine.generate(requests)
    return got, stats, graphs[0]


def test_one_step_ahead_loop_gives_eager_tokens(model):
    requests = _requests(sampled=False)
    want, _ = Engine(model).generate(requests)
    got, stats, graph = _graph_run(model, requests)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in want] == ["eos", "length", "length", "length"]
    longest = max(len(c.token_ids) for c in want)
    assert graph.launches == longest  # one step past the last needed one, none more
    assert len(stats.step_s) == longest - 1
    for b, (r, c) in enumerate(zip(requests, got)):  # a finished row stops advancing its cache
        assert int(graph.cache.lengths[b]) <= len(r.prompt_ids) + len(c.token_ids), f"row {b}"


def test_sampled_rows_draw_in_the_graph_as_eager_steps_do(model):
    requests = _requests(sampled=True)
    want, _ = Engine(model, device_sampling=True).generate(requests)
    got, _, graph = _graph_run(model, requests)
    assert graph.sampling
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
    assert len(got[3].token_ids) == 23  # no end-of-sequence stop: the graph ran 23 sampled steps for it
    greedy, _ = Engine(model, device_sampling=True).generate(_requests(sampled=False))
    assert got[3].token_ids != greedy[3].token_ids, "the sampled row decoded greedily"
    assert got[1].token_ids == greedy[1].token_ids, "a greedy row beside sampled ones must stay greedy"
    again, _, _ = _graph_run(model, requests)
    assert [c.token_ids for c in again] == [c.token_ids for c in got]


def test_only_capturable_collectives_are_captured():
    from workers.cuda_graphs import comm_blocker
    assert comm_blocker(SingleRankCommunicator()) is None
    two = SingleRankCommunicator()
    two.world_size, two.backend = 2, "shm"
    assert comm_blocker(two) == ("the SingleRankCommunicator (shm) collectives cannot be captured in a CUDA graph "
                                 "(NCCL's can)")
    two.graph_capturable = True  # what a graph-safe backend (symmetric memory) declares
    assert comm_blocker(two) is None
