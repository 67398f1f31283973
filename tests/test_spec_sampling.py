"""Speculative sampling is lossless in distribution, and the test can tell when it is not.

A tiny-vocabulary target (8 tokens) and a deliberately different random draft (6 of the 8 tokens
in its vocabulary, so q is zero where p is not): 2000 requests of one prompt, each with its own
seed, sample 3 tokens at temperature 1. The exact distribution of (x1, x2) and (x2, x3) is computed
from the target's own probabilities (all 8 + 64 continuations in one batch), and a chi-square
goodness-of-fit test compares the samples with it:
  * plain sampling and speculative sampling (a chain of 2, Leviathan's rule with q; a tree, whose
    top-k picks are point-mass proposals) all pass (p-value > 0.001);
  * a wrong rule, resampling from p instead of norm(max(0, p - q)) after a rejection, is caught
    (p-value < 1e-6): the test has the power to see the bug it exists for.
Seeds are fixed, so every outcome is deterministic.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import model.acceptance
from collectives.communicator import SingleRankCommunicator
from model.config import tiny
from model.llama4 import Llama4
from model.parallel import layout
from model.sampling import SamplingParams
from model.spec import SpecConfig
from tests.spec_reference import random_draft
from tests.spec_reference import one_thread  # noqa: F401 (a fixture)
from workers.engine import Engine, Request

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread: see tests/spec_reference.py

VOCAB, N_SAMPLES, PROMPT = 8, 2000, (0, 5, 3, 6, 4)


def _target() -> Llama4:
    cfg = dataclasses.replace(tiny(VOCAB), hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=16,
                              intermediate_size=64, intermediate_size_mlp=128)
    model = Llama4(cfg, layout(cfg), SingleRankCommunicator()).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=gen) * 0.25)
    return model


@pytest.fixture(scope="module")
def setup():
    target = _target()
    draft = random_draft(target.cfg, seed=4, draft_vocab=6, std=0.3, layer_ids=(0, 1, 2))
    draft.target.embed = target.embed_tokens  # the draft embeds with this target's embedding
    return target, draft.eval(), _exact(target)


def _exact(target: Llama4) -> dict[str, torch.Tensor]:
    """Exact P(x1, x2) and P(x2, x3) of three sampled tokens, (V, V) each."""
    def next_probs(prefixes: torch.Tensor) -> torch.Tensor:
        cache = target.new_cache(len(prefixes), prefixes.shape[1])
        return torch.softmax(target(prefixes, cache).logits[:, -1].double(), dim=-1)  # (N, V)
    prompt = torch.tensor(PROMPT)[None]
    p1 = next_probs(prompt)[0]  # (V,)
    firsts = torch.cat([prompt.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], dim=1)
    p2 = next_probs(firsts)  # (V, V): P(x2 | x1)
    pairs = torch.cat([firsts.repeat_interleave(VOCAB, 0), torch.arange(VOCAB).repeat(VOCAB)[:, None]], dim=1)
    p3 = next_probs(pairs).view(VOCAB, VOCAB, VOCAB)  # P(x3 | x1, x2)
    joint = p1[:, None, None] * p2[:, :, None] * p3  # (V, V, V)
    return {"x1x2": joint.sum(2), "x2x3": joint.sum(0)}


def _samples(target: Llama4, draft, spec: SpecConfig | None) -> torch.Tensor:
    requests = [Request(PROMPT, SamplingParams(temperature=1.0, seed=s, max_new_tokens=3, stop_on_eos=False), str(s))
                for s in range(N_SAMPLES)]
    done, _ = Engine(target, draft=draft).generate(requests, spec=spec)
    return torch.tensor([c.token_ids for c in done])  # (N, 3)


def _p_value(samples: torch.Tensor, exact: dict[str, torch.Tensor]) -> float:
    """Chi-square goodness of fit over both pair tables; cells expecting < 5 are pooled."""
    stat, cells = 0.0, 0
    for key, (i, j) in (("x1x2", (0, 1)), ("x2x3", (1, 2))):
        counts = torch.bincount(samples[:, i] * VOCAB + samples[:, j], minlength=VOCAB * VOCAB).double()
        expected = exact[key].flatten() * len(samples)
        small = expected < 5
        observed = torch.cat([counts[~small], counts[small].sum()[None]])
        wanted = torch.cat([expected[~small], expected[small].sum()[None]])
        keep = wanted > 0
        stat += float((((observed - wanted) ** 2)[keep] / wanted[keep]).sum())
        cells += int(keep.sum())
    dof = cells - 2  # each table's cells sum to N
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


SPECS = {"plain": None, "chain": SpecConfig(draft_len=2),
         "tree": SpecConfig(tree=True, top_k=2, depth=2, tree_tokens=3)}


@pytest.mark.parametrize("name", list(SPECS))
def test_sampling_matches_the_target_distribution(setup, name):
    target, draft, exact = setup
    p = _p_value(_samples(target, draft, SPECS[name]), exact)
    assert p > 1e-3, f"{name}: samples deviate from the target's distribution (chi-square p = {p:.2e})"


def _resample_from_p(p, q, token):  # the bug: forget what the rejected draft token took away
    return p


@pytest.mark.parametrize("name", ["chain", "tree"])
def test_a_wrong_acceptance_rule_is_caught(setup, monkeypatch, name):
    target, draft, exact = setup
    monkeypatch.setattr(model.acceptance, "residual_distribution", _resample_from_p)
    p = _p_value(_samples(target, draft, SPECS[name]), exact)
    assert p < 1e-6, f"{name}: the chi-square test missed a wrong acceptance rule (p = {p:.2e})"
