"""Sharded equals unsharded: world sizes 1, 2, 4, 8 with MoE in tp and ep modes.

The test model (the `tiny` preset with a vocabulary that no world size divides) has MoE and
dense layers, chunked RoPE layers and a NoPE layer, a chunk smaller than the longest prompt, and
2 KV heads, fewer than 4 or 8 ranks. A batch of 3 prompts of different lengths runs through
(a) one full forward, compared as fp32 logits within 1e-4, and (b) 64 greedy tokens each.
Each world size starts its processes once and runs both MoE modes on them, and the tp mode again
with the embedding replicated on every rank (no all-reduce to embed).
"""
from __future__ import annotations

import pytest
import torch

from collectives.communicator import SingleRankCommunicator
from model.checkpoint import load_shard
from model.config import load_model_config, tiny
from model.embedded import random_state_dict, write_checkpoint
from model.llama4 import Llama4
from model.parallel import layout
from model.sampling import SamplingParams
from cluster.procs import run_world
from workers.engine import Engine, Request

PROMPT_LENGTHS = (70, 45, 9)  # the first spans two 64-token chunks
NEW_TOKENS = 64
MOE_MODES = ("tp", "ep")
LAYOUTS = (*MOE_MODES, "tp+replicated-embedding")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded_ckpt")
    cfg = tiny(vocab_size=509)
    write_checkpoint(path, cfg, random_state_dict(cfg, seed=11, std=0.08))
    return path


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def _run_model(comm, path: str, moe_mode: str, device: str = "cpu",
               replicate_embedding: bool = False) -> dict[str, torch.Tensor]:
    cfg = load_model_config(path)
    with torch.device(device):
        model = Llama4(cfg, layout(cfg, comm.world_size, comm.rank, moe_mode, replicate_embedding), comm).eval()
    load_shard(model, path)
    embedding_rows = model.embed_tokens.weight.shape[0]
    prompts = _prompts(cfg.vocab_size)
    ids = torch.zeros(len(prompts), max(PROMPT_LENGTHS), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    cache = model.new_cache(len(prompts), max(PROMPT_LENGTHS))
    local = model(ids, cache, n_new=torch.tensor(PROMPT_LENGTHS, device=device)).logits  # (B, T, V_r)
    logits = comm.all_gather(local, dim=-1)[..., : cfg.vocab_size]
    params = SamplingParams(max_new_tokens=NEW_TOKENS, stop_on_eos=False)
    done, _ = Engine(model).generate([Request(tuple(p), params, str(i)) for i, p in enumerate(prompts)])
    return {"logits": logits, "tokens": torch.tensor([c.token_ids for c in done]),
            "embedding_rows": torch.tensor(embedding_rows)}


def _run_both_modes(comm, path: str) -> dict[str, torch.Tensor]:
    """_run_model with the MoE in tp, then in ep, then tp with the embedding replicated, on one world;
    keys 'layout/logits', 'layout/tokens', 'layout/embedding_rows'."""
    runs = {mode: _run_model(comm, path, mode) for mode in MOE_MODES}
    runs[LAYOUTS[-1]] = _run_model(comm, path, "tp", replicate_embedding=True)
    return {f"{name}/{key}": value for name, run in runs.items() for key, value in run.items()}


@pytest.fixture(scope="module")
def reference(checkpoint):
    return _run_model(SingleRankCommunicator(), str(checkpoint), "tp")


@pytest.fixture(scope="module", params=[2, 4, 8], ids=lambda world: f"world{world}")
def sharded(request, checkpoint):
    """Both MoE modes of one world size, from one set of processes (their start-up is most of the cost)."""
    return run_world(request.param, _run_both_modes, str(checkpoint))


def test_reference_is_not_degenerate(reference):
    """Greedy tokens of a weak random model can collapse to one id; then the checks below prove little."""
    for row in reference["tokens"]:
        assert len(set(row.tolist())) >= 8


@pytest.mark.parametrize("name", LAYOUTS)
def test_sharded_matches_unsharded(sharded, reference, name):
    got = {key: sharded[f"{name}/{key}"] for key in ("logits", "tokens", "embedding_rows")}
    vocab = reference["embedding_rows"].item()  # a world of one holds every row
    if name.endswith("replicated-embedding"):
        assert got["embedding_rows"].item() == vocab
    else:  # its vocab slice
        assert got["embedding_rows"].item() < vocab
    for b, n in enumerate(PROMPT_LENGTHS):  # padded rows past each prompt's length are garbage
        diff = (got["logits"][b, :n] - reference["logits"][b, :n]).abs().max().item()
        assert diff < 1e-4, f"row {b}: max abs logit difference {diff}"
    assert torch.equal(got["tokens"], reference["tokens"])


def test_replicated_embedding_partials_sum_to_the_rows_and_tied_heads_are_refused():
    """VocabEmbedding.partial (what the EAGLE-3 draft all-reduces with its fc): a replicated table
    gives rank 0 every row and the other ranks zeros, so the sum is the rows; sharded tables give
    each rank its own ids' rows. A tied LM head cannot go with a replicated table."""
    from model.config import ConfigError
    from model.llama4 import VocabEmbedding
    cfg = tiny(vocab_size=509)
    table = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[0, 254, 255, 508]])
    for replicated in (False, True):
        parts = []
        for rank in range(2):
            embed = VocabEmbedding(layout(cfg, 2, rank, replicate_embedding=replicated), cfg.hidden_size)
            start, valid = embed.vocab_start, embed.vocab_valid  # the last slice ends in padding rows
            embed.weight.data[:valid].copy_(table[start:start + valid])
            parts.append(embed.partial(ids))
            assert embed.replicated == replicated and embed.owns_every_id == replicated
        assert torch.equal(parts[0] + parts[1], table[ids])
        if replicated:
            assert torch.equal(parts[0], table[ids]) and not parts[1].any()
    tied = tiny(vocab_size=509)
    tied = type(tied)(**{**tied.__dict__, "tie_word_embeddings": True})
    with pytest.raises(ConfigError, match="replicated embedding needs an untied LM head"):
        layout(tied, 2, 0, replicate_embedding=True)
