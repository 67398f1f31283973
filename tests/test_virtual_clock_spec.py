"""The virtual clock of EAGLE-3 speculative decoding (generate --emulate-node with a draft): a real
run's clock equals the shape-only walk of the same steps op by op (the draft's root pick, its depth
forwards and picks, the target's verification, the draft's catch-up; tests/spec_clock_session.py),
at one rank and at two, for a chain and a tree; the clock changes no token; the CLI runs it."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cluster.procs import run_world
from collectives.communicator import SingleRankCommunicator
from collectives.triton_support import INTERPRETED
from launch.cli import main
from tests.spec_clock_session import NEW_TOKENS, spec_rank


def _check(out: dict) -> None:
    assert len(out["tokens"]) == NEW_TOKENS
    assert torch.equal(out["tokens"], out["unclocked_tokens"])  # the clock changes no token
    assert int(out["accepted"].max()) >= 1 and int(out["draft_ops"]) > 0  # drafts were accepted, and costed
    assert len(out["real_steps"]) == 1 + len(out["accepted"])
    assert torch.allclose(out["real_steps"], out["walk_steps"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("which", ["chain", "tree"])
def test_one_rank_spec_clock_equals_the_walk(which):
    _check(spec_rank(SingleRankCommunicator(), which))


def test_two_rank_spec_clock_equals_the_walk():
    """At two ranks the draft's embedding + fc all-reduce, its fused norms and its top-k all-gathers
    are planned collectives the run must meet, and the verify's argmax all-gathers every row."""
    _check(run_world(2, spec_rank, "chain"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_one_gpu_spec_clock_equals_the_walk():
    """On a GPU the draft and the target take the fused kernels (the plans' own path, no optional
    all-reduce made) and the unclocked run replays its one-graph steps: the same tokens."""
    _check(spec_rank(SingleRankCommunicator(), "chain", "cuda", "bf16"))


def test_a_draft_step_costs_more_than_nothing_and_more_with_depth():
    """The walk's step grows with the chain: each further depth is one more draft forward and pick."""
    from cluster.hardware import node_spec
    from model.config import maverick
    from workers.emulate import default_draft_config, estimate_spec_step, estimate_step, shape_only_draft, \
        shape_only_model
    cfg = maverick(n_layers=4)
    model = shape_only_model(cfg, 8, "tp", "fp8")
    draft, node = shape_only_draft(default_draft_config(cfg), model), node_spec("dgx-b200")
    steps = [estimate_spec_step(model, draft, node, 1, (1, n, n), 1024) for n in (1, 2, 3)]
    forwards = [sum(op.name == "draft qkv_proj" for op in s.ops) for s in steps]
    assert forwards == [1, 2, 3]  # the catch-up, then one per depth past the first
    assert steps[0].seconds < steps[1].seconds < steps[2].seconds
    verify = estimate_step(model, node, 1, 4, 1024 + 4).seconds
    draft_part = sum(op.seconds for op in steps[2].ops if op.part == "draft")
    assert steps[2].seconds == pytest.approx(verify + draft_part, rel=0.05)  # verify + draft, no feedback copies


@pytest.mark.skipif(not INTERPRETED, reason="counts the kernels CPU tensors launch under Triton's interpreter")
@pytest.mark.parametrize("step,tokens,features", [("catch_up", 4, True), ("depth", 2, False)])
def test_draft_plan_launches_what_the_fused_draft_forward_launches(step, tokens, features):
    """The plan of one fused draft forward has the launches benchmarks/launch_count.py counts in the
    real one (the forwards benchmarks/draft_step_bench.py times on the H200)."""
    from benchmarks.launch_count import draft_launches
    from cluster.hardware import node_spec
    from model.eagle3 import Eagle3Config, Eagle3Draft, SharedTargetParts, draft_layout
    from model.llama4 import VocabEmbedding
    from model.parallel import layout
    from workers.cost_model import CostModel
    from workers.draft_plan import draft_forward_plan
    from workers.emulate import ShapeOnlyCommunicator
    from workers.launch_plan import flatten
    cfg = Eagle3Config(hidden_size=32, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=32, vocab_size=64,
                       draft_vocab_size=48, target_hidden_size=32)  # launch_count's draft
    target = dataclasses.replace(cfg.attention_config(), vocab_size=cfg.vocab_size)
    with torch.device("meta"):
        embed = VocabEmbedding(layout(target), cfg.hidden_size).to(torch.bfloat16)
        draft = Eagle3Draft(cfg, draft_layout(cfg, 1, 0), ShapeOnlyCommunicator(1), SharedTargetParts(embed),
                            "triton").to(torch.bfloat16)
    cost = CostModel(node_spec("h200"), 1)
    plan = flatten(cost, draft_forward_plan(cost, draft, 1, tokens, 20 + tokens, features, logit_rows=1))
    counted = draft_launches(step, "triton", context=20)
    assert sum(op.launches for op in plan) == sum(counted.values()), (counted, [op.name for op in plan])


def test_generate_with_spec_and_emulate_node_prints_modeled_times(capsys):
    args = ["generate", "--prompt", "The DGX B200 node", "--max-new-tokens", "6", "--world-size", "1",
            "--emulate-node", "dgx-b200"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "modeled on DGX B200" in err and "acceptance length" in err  # speculative, with the modeled times
    assert main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["spec"] is not None and result["acceptance_length"] >= 1.0  # the shipped draft, by default
    emulated = result["emulated"]
    assert emulated["node"] == "DGX B200"
    for key in ("ttft_s", "step_time_s", "tokens_per_s_per_user"):
        assert emulated[key]["modeled"] > 0
