"""The device sampler (model.sampling.DeviceSampler) against the CPU reference, on CPU tensors.

The sampler runs on whatever device its logits live on, so its math is checked here with CPU
generators; on the GPU it is the same code with CUDA generators (tests/test_spec_cuda_graphs.py
checks capture and reproducibility there). Fresh random logits every case:
  * the per-row filter keeps exactly the tokens `filter_logits` keeps, with the same values, for
    rows mixing temperature, top-k (ties included) and top-p;
  * temperature 0 and top-k 1 give the argmax; a draw never picks a filtered-out token;
  * the draws follow the reference distribution (frequencies within 4.5 sigma on 24,000 draws);
  * the same seeds give the same tokens, other seeds others; a row's draws do not depend on
    the other rows' settings.
"""
from __future__ import annotations

import pytest
import torch

from collectives.communicator import SingleRankCommunicator
from model.sampling import DeviceSampler, SamplingParams, filter_logits, filter_logits_rows, sample_rows

VOCAB = 50


def _settings(params: list[SamplingParams]):
    return (torch.tensor([p.temperature for p in params]), torch.tensor([p.top_k for p in params]),
            torch.tensor([p.top_p for p in params]))


def _sampler(params: list[SamplingParams], vocab: int = VOCAB) -> DeviceSampler:
    sampler = DeviceSampler(len(params), 0, vocab, SingleRankCommunicator(), "cpu")
    sampler.reset(params)
    return sampler


PARAMS = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=5),
          SamplingParams(temperature=0.9, top_p=0.6), SamplingParams(temperature=1.0, top_k=12, top_p=0.8),
          SamplingParams(temperature=0.5, top_k=VOCAB), SamplingParams(temperature=2.0, top_k=1),
          SamplingParams(temperature=1.0, top_p=0.05)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_row_filter_matches_the_reference(seed):
    logits = torch.randn(len(PARAMS), VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    logits[1, :4] = logits[1].max() + 1.0  # a 4-way tie at the top, and the 5th best ties with a copy
    logits[1, 10] = logits[1, 11] = torch.topk(logits[1], 5).values[-1]
    got = filter_logits_rows(logits, *_settings(PARAMS))
    for b, params in enumerate(PARAMS):
        want = filter_logits(logits[b], params)
        assert torch.equal(torch.isinf(got[b]), torch.isinf(want)), f"row {b}: a different set of tokens kept"
        kept = ~torch.isinf(want)
        torch.testing.assert_close(got[b][kept], want[kept], rtol=0, atol=0)
        assert int(kept.sum()) >= 1


def test_greedy_rows_and_top_k_one_take_the_argmax():
    params = [SamplingParams(), SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=0.0, top_k=3)]
    sampler = _sampler(params)
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        logits = torch.randn(len(params), VOCAB, generator=gen)
        assert torch.equal(sampler.pick(logits, sampling=True), logits.argmax(-1))
        assert torch.equal(sampler.pick(logits, sampling=False), logits.argmax(-1))


def test_draws_follow_the_reference_distribution():
    vocab, rows, draws = 8, 8, 3000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(11)) * 1.5
    params = SamplingParams(temperature=0.9, top_k=6, top_p=0.9)
    want = torch.softmax(filter_logits(logits, params), dim=-1)  # (V,)
    assert int((want == 0).sum()) >= 2, "the filter should drop some tokens here"
    sampler = _sampler([SamplingParams(temperature=0.9, top_k=6, top_p=0.9, seed=100 + b) for b in range(rows)], vocab)
    batch = logits.expand(rows, vocab)
    counts = torch.zeros(vocab)
    for _ in range(draws):
        counts += torch.bincount(sampler.pick(batch, sampling=True), minlength=vocab)
    n = rows * draws
    assert torch.all(counts[want == 0] == 0), "a filtered-out token was drawn"
    sigma = (want * (1 - want) / n).sqrt()
    assert torch.all((counts / n - want).abs() <= 4.5 * sigma + 1e-12), (counts / n, want)


def test_same_seeds_same_tokens_and_rows_independent():
    gen = torch.Generator().manual_seed(3)
    steps = [torch.randn(3, VOCAB, generator=gen) for _ in range(12)]
    params = [SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=0.8, top_p=0.9, seed=8),
              SamplingParams(temperature=1.2, top_k=10, seed=9)]

    def run(params):
        sampler = _sampler(params)
        return torch.stack([sampler.pick(logits, sampling=True) for logits in steps])  # (steps, B)

    first, again = run(params), run(params)
    assert torch.equal(first, again)
    reseeded = run([SamplingParams(temperature=1.0, seed=70)] + params[1:])
    assert not torch.equal(reseeded[:, 0], first[:, 0]), "another seed drew the same 12 tokens"
    assert torch.equal(reseeded[:, 1:], first[:, 1:]), "one row's seed changed another row's draws"
    greedy_neighbour = run(params[:2] + [SamplingParams()])
    assert torch.equal(greedy_neighbour[:, :2], first[:, :2])


def test_sample_rows_is_the_sampler_without_its_state():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.6, top_k=4, seed=2)]
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    assert torch.equal(sample_rows(logits, *_settings(params), generators), _sampler(params).pick(logits, True))


def test_reset_refuses_the_wrong_batch():
    with pytest.raises(ValueError, match="2 rows of settings for a sampler of 3"):
        DeviceSampler(3, 0, VOCAB, SingleRankCommunicator(), "cpu").reset([SamplingParams()] * 2)
