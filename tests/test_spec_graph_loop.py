"""Speculative decoding's graph path on CPU: the static buffers, shapes and control flow that the
CUDA graphs of workers/spec_graphs.py replay, with each step run on its buffers instead of
replayed (StaticStep without capture; a CUDA graph only runs on a GPU: tests/test_spec_cuda_graphs.py).

The embedded target and its shipped draft, fp32, rows with their own prompt lengths, budgets and
EOS: through the graph path, speculative output must equal plain greedy token for token, for a
chain and a tree, with drafts really accepted: greedy batches on the one-graph step (tree growth,
static verify, acceptance, compaction and catch-up in one function), batches that sample on the
per-forward steps (static verify with the argmax inside the step, catch-up at the graph's width,
one draft step per tree depth restoring the draft cache itself), each of them used; and so at
world size 2 (shared-memory collectives, the draft's top-k gathered inside the step). Sampled rows
run on the graphs' logits and reproduce with their seeds.
"""
from __future__ import annotations

import pytest
import torch

from collectives.communicator import SingleRankCommunicator
from model.sampling import SamplingParams
from model.spec import SpecConfig
from tests.spec_reference import load_pair, random_prompts, shipped_draft, default_target
from tests.spec_reference import one_thread  # noqa: F401 (a fixture)
from workers.cuda_graphs import cache_slots
from workers.engine import Engine, Request, RequestError
from workers.spec_graphs import SpecGraphs, StaticStep

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = {"chain3": SpecConfig(draft_len=3), "tree": SpecConfig(tree=True, top_k=3, depth=3, tree_tokens=5)}


@pytest.fixture(scope="module")
def pair():
    return load_pair(SingleRankCommunicator(), str(default_target()), str(shipped_draft()))


def _requests(params: dict | None = None) -> list[Request]:
    prompts = random_prompts(4, 512, seed=23)
    budgets = (14, 5, 11, 1)
    return [Request(p, SamplingParams(max_new_tokens=b, stop_on_eos=i != 0, **(params or {})), str(i))
            for i, (p, b) in enumerate(zip(prompts, budgets))]


def _graph_engine(model, draft):
    """An engine whose speculative batches run on StaticSteps that do not capture."""
    engine = Engine(model, draft=draft, cuda_graphs="auto")
    made = []

    def spec_graph(decoder, batch, needed):
        made.append(SpecGraphs(model, draft, None, batch, cache_slots(needed, engine.max_context + decoder.margin),
                               decoder.spec.shape, decoder.layer_ids, capture_it=False))
        return made[-1]
    engine._spec_graph = spec_graph
    return engine, made


@pytest.mark.parametrize("name", list(SPECS))
def test_graph_path_equals_plain_greedy(pair, name):
    model, draft = pair
    plain, _ = Engine(model).generate(_requests())
    engine, made = _graph_engine(model, draft)
    got, stats = engine.generate(_requests(), spec=SPECS[name])
    assert [c.token_ids for c in got] == [c.token_ids for c in plain]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in plain]
    graphs = made[0]
    steps = stats.spec["steps"]
    assert graphs.step.calls == steps and graphs._per_forward is None  # greedy: each step is the one-graph step
    assert all(c.spec["one_graph_steps"] == c.spec["verify_steps"] for c in got)
    accepted = [c.spec["acceptance_length"] for c in got if c.spec["acceptance_length"] is not None]
    assert max(accepted) > 1.0, "no draft was accepted: the padded catch-up and the compaction went untested"
    eager, _ = Engine(model, draft=draft).generate(_requests(), spec=SPECS[name])
    eager_accepted = [c.spec["acceptance_length"] for c in eager if c.spec["acceptance_length"] is not None]
    assert accepted == pytest.approx(eager_accepted, abs=0.2)  # the draft drafts alike (static vs sliced cache)


@pytest.mark.parametrize("name", list(SPECS))
def test_greedy_rows_beside_sampled_ones_on_per_forward_steps(pair, name):
    """A batch that samples replays the forwards one by one, with the glue (and the sampled rows'
    acceptance) between them: its greedy rows still decode exactly as plain greedy, every
    per-forward step is used once per step, and the one-graph step never runs."""
    model, draft = pair
    greedy, requests = _requests(), _requests()
    greedy[1] = Request(greedy[1].prompt_ids, SamplingParams(max_new_tokens=14, stop_on_eos=False), "1")
    sampled = SamplingParams(temperature=0.8, top_k=40, seed=11, max_new_tokens=14, stop_on_eos=False)
    requests[1] = Request(requests[1].prompt_ids, sampled, "1")
    plain, _ = Engine(model).generate(greedy)
    engine, made = _graph_engine(model, draft)
    got, stats = engine.generate(requests, spec=SPECS[name])
    assert [c.token_ids for i, c in enumerate(got) if i != 1] == [c.token_ids for i, c in enumerate(plain) if i != 1]
    assert len(got[1].token_ids) == 14 and got[1].token_ids != plain[1].token_ids, "the sampled row decoded greedily"
    graphs, steps = made[0], stats.spec["steps"]
    assert graphs.step.calls == 0 and graphs.verify.calls == steps and graphs.catch_up.calls == steps
    k, depth, _ = SPECS[name].shape
    assert sorted(graphs.nodes) == [k * d for d in range(1, depth)]
    assert all(step.calls == steps for step in graphs.nodes.values())
    assert max(c.spec["acceptance_length"] for c in got if c.spec["acceptance_length"] is not None) > 1.0


def test_sampled_rows_reproduce_on_the_graph_path(pair):
    model, draft = pair
    params = {"temperature": 0.8, "top_k": 40, "seed": 11}
    engine, _ = _graph_engine(model, draft)
    first, _ = engine.generate(_requests(params), spec=SPECS["chain3"])
    again, _ = engine.generate(_requests(params), spec=SPECS["chain3"])
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [len(c.token_ids) for c in first][1:] == [5, 11, 1] or any(c.finish_reason == "eos" for c in first)
    greedy, _ = engine.generate(_requests(), spec=SPECS["chain3"])
    assert [c.token_ids for c in first] != [c.token_ids for c in greedy], "sampling decoded greedily"


def _world2_tokens(comm, target_path: str, draft_path: str) -> dict:
    """Rank's tokens: plain greedy, and each spec on the graph path and eagerly (sharded draft top-k)."""
    from tests.spec_reference import token_table
    model, draft = load_pair(comm, target_path, draft_path)
    plain, _ = Engine(model).generate(_requests())
    out = {"plain": token_table(plain, 14)}
    for name, spec in SPECS.items():
        engine, _ = _graph_engine(model, draft)
        out[name] = token_table(engine.generate(_requests(), spec=spec)[0], 14)
        done, _ = Engine(model, draft=draft).generate(_requests(), spec=spec)
        out[name + "/eager"] = token_table(done, 14)
        out[name + "/al"] = torch.tensor([c.spec["acceptance_length"] or 0.0 for c in done])
    return out


def test_world2_graph_path_equals_plain_greedy():
    """Tensor parallel over 2 ranks: the one-graph step gathers the draft's top-k across ranks
    inside the step (and the target's argmax), and still decodes exactly as plain greedy."""
    from cluster.procs import run_world
    got = run_world(2, _world2_tokens, str(default_target()), str(shipped_draft()), backend="shm", timeout_s=300.0)
    assert got, "rank 0 returned nothing"
    for name in SPECS:
        assert torch.equal(got[name], got["plain"]), f"{name}: the world-2 graph path differs from plain greedy"
        assert torch.equal(got[name + "/eager"], got["plain"]), f"{name}: world-2 eager differs from plain greedy"
        assert float(got[name + "/al"].max()) > 1.0


def test_static_step_refuses_a_buffer_of_another_shape():
    step = StaticStep(lambda x: x * 2, {"x": torch.zeros(2, 3)}, lambda: None, False, 1)
    assert torch.equal(step(x=torch.ones(2, 3)), torch.full((2, 3), 2.0))
    with pytest.raises(ValueError, match=r"x: \(2, 4\) torch.float32 for a static buffer of \(2, 3\)"):
        step(x=torch.ones(2, 4))


def test_graphs_on_says_why_a_cpu_model_cannot(pair):
    model, draft = pair
    with pytest.raises(RequestError, match="not on a CUDA device"):
        Engine(model, draft=draft, cuda_graphs="on").generate(_requests(), spec=SPECS["chain3"])
    wide = SpecConfig(tree=True, top_k=4, depth=5, tree_tokens=8)  # 4 rows x 9 tokens > 16
    with pytest.raises(RequestError, match="36 rows x tokens is over the 16"):
        Engine(model, draft=draft, cuda_graphs="on").generate(_requests(), spec=wide)


@pytest.mark.parametrize("name", list(SPECS))
def test_each_static_step_equals_its_eager_forward(pair, name):
    from tests.spec_graph_checks import check_static_steps
    model, draft = pair
    check_static_steps(model, draft, SPECS[name], capture_it=False, tol=1e-4, seed=len(name))
