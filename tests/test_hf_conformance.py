"""Our Llama 4 against transformers' Llama4ForCausalLM, on checkpoints transformers itself saved.

Random fp32 weights (std 0.2, norm weights ~ 1 +- 0.2), several small configs (see
hf_reference.CONFIGS), prompts that span at least two attention chunks. Logits must agree within
1e-4 max abs for full-sequence forwards, prefill + decode, chunked prefill and ragged batches;
64 greedy tokens must equal transformers' `generate`.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.hf_reference import (CONFIGS, hf_greedy, hf_logits, load_ours, make_hf_checkpoint,
                          make_hf_multimodal_checkpoint, make_multimodal_checkpoint, ours_logits,
                          ours_logits_stepwise, random_ids, read_tensors)
from model.config import load_model_config
from model.sampling import SamplingParams
from workers.engine import Engine, Request

ATOL = 1e-4
PROMPT_LEN = 20  # > 2 chunks of 8 (3+ chunks of 6)
NAMES = sorted(CONFIGS)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (hf model, checkpoint dir, our model), built once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            hf, path = make_hf_checkpoint(tmp_path_factory.mktemp(name), CONFIGS[name], seed=11)
            cache[name] = (hf, path, load_ours(path))
        return cache[name]

    return get


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


# ---------------------------------------------------------------------------------------------
# The configs exercise what they claim to
# ---------------------------------------------------------------------------------------------

def test_configs_cover_the_required_features(built):
    cfgs = {name: built(name)[0].config for name in NAMES}
    feats = {
        "moe_every_layer": any(c.moe_layers == list(range(c.num_hidden_layers)) for c in cfgs.values()),
        "moe_every_other": any(c.interleave_moe_layer_step == 2 and 0 < len(c.moe_layers) < c.num_hidden_layers
                               for c in cfgs.values()),
        "qk_norm_on": any(c.use_qk_norm for c in cfgs.values()),
        "qk_norm_off": any(not c.use_qk_norm for c in cfgs.values()),
        "top1": any(c.num_experts_per_tok == 1 for c in cfgs.values()),
        "top2": any(c.num_experts_per_tok == 2 for c in cfgs.values()),
        "tied": any(c.tie_word_embeddings for c in cfgs.values()),
        "untied": any(not c.tie_word_embeddings for c in cfgs.values()),
        "llama3": any(c.rope_parameters["rope_type"] == "llama3" for c in cfgs.values()),
        # floor((pos + 1) / floor_scale) > 0 within the prompt, so the NoPE query scale is not 1.
        "temperature_tuning": any(c.attn_temperature_tuning and c.floor_scale < PROMPT_LEN for c in cfgs.values()),
    }
    assert all(feats.values()), feats
    for name, c in cfgs.items():
        # Every config mixes chunked RoPE layers with NoPE (global) layers, chunk < prompt / 2.
        assert 0 in c.no_rope_layers and 1 in c.no_rope_layers, name
        assert c.attention_chunk_size * 2 <= PROMPT_LEN, name
        assert "chunked_attention" in c.layer_types and "full_attention" in c.layer_types, name


@pytest.mark.parametrize("name", NAMES)
def test_config_read_from_hf_checkpoint(built, name):
    hf, path, ours = built(name)
    c, m = hf.config, ours.cfg
    assert m.moe_layers == tuple(c.moe_layers)
    assert m.rope_layers == tuple(bool(x) for x in c.no_rope_layers)
    assert (m.n_layers, m.hidden_size, m.n_heads, m.n_kv_heads, m.head_dim) == (
        c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    assert (m.n_experts, m.experts_per_token) == (c.num_local_experts, c.num_experts_per_tok)
    assert (m.use_qk_norm, m.tie_word_embeddings, m.attn_temperature_tuning) == (
        c.use_qk_norm, c.tie_word_embeddings, c.attn_temperature_tuning)
    assert (m.attention_chunk_size, m.floor_scale, m.attn_scale) == (
        c.attention_chunk_size, c.floor_scale, c.attn_scale)
    assert (m.rope_scaling is not None) == (c.rope_parameters["rope_type"] == "llama3")
    # The tied checkpoint really has no lm_head tensor: the loader must use the embedding.
    assert ("lm_head.weight" in read_tensors(path)) == (not c.tie_word_embeddings)
    # RoPE inverse frequencies (llama3 scaling included) as transformers computes them.
    assert torch.allclose(ours.inv_freq, hf.model.rotary_emb.inv_freq.float(), rtol=1e-6, atol=0)


def test_reference_checkpoints_are_seeded(tmp_path):
    knobs = CONFIGS["moe_every_layer"]
    a = read_tensors(make_hf_checkpoint(tmp_path / "a", knobs, seed=5)[1])
    b = read_tensors(make_hf_checkpoint(tmp_path / "b", knobs, seed=5)[1])
    c = read_tensors(make_hf_checkpoint(tmp_path / "c", knobs, seed=6)[1])
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)
    norm = a["model.layers.0.input_layernorm.weight"]
    assert not torch.equal(norm, torch.ones_like(norm))  # norm weights are random too


# ---------------------------------------------------------------------------------------------
# Logits
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_full_sequence_logits_match(built, name):
    hf, _, ours = built(name)
    ids = random_ids(PROMPT_LEN, hf.config.vocab_size, seed=100, batch=2)
    want = hf_logits(hf, ids)
    assert want.abs().max() > 1.0  # random weights give logits well above the tolerance
    assert _max_err(ours_logits(ours, ids), want) < ATOL


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps", [
    [5] + [1] * (PROMPT_LEN - 5),  # prefill then one-token decode across chunk boundaries
    [1] * PROMPT_LEN,  # decode from an empty cache
    [3, 9, 4] + [1] * (PROMPT_LEN - 16),  # multi-token steps after a cached prefix (chunked prefill)
], ids=["prefill5+decode", "decode-only", "chunked-prefill"])
def test_incremental_logits_match_full_forward(built, name, steps):
    hf, _, ours = built(name)
    ids = random_ids(PROMPT_LEN, hf.config.vocab_size, seed=200)
    want = hf_logits(hf, ids)
    assert _max_err(ours_logits_stepwise(ours, ids, steps), want) < ATOL


@pytest.mark.parametrize("name", NAMES)
def test_ragged_batch_rows_match_running_alone(built, name):
    """Right-padded prompts of different lengths (padding holds random tokens, so a leak would
    show), then decode steps where one row pauses (n_new = 0) for a step, as a finished row does."""
    hf, _, ours = built(name)
    vocab = hf.config.vocab_size
    lengths = [PROMPT_LEN, 7, 13, 1]
    n_decode = 5
    full = random_ids(PROMPT_LEN + n_decode, vocab, seed=300, batch=len(lengths))  # row b: prompt + its decode
    batch = len(lengths)
    cache = ours.new_cache(batch, PROMPT_LEN + n_decode + 1)
    padded = full[:, :PROMPT_LEN].clone()  # positions >= lengths[b] are padding (random junk)
    prefill = ours(padded, cache, n_new=torch.tensor(lengths)).logits
    assert cache.lengths.tolist() == lengths
    got = [[prefill[b, : lengths[b]]] for b in range(batch)]

    # last_only picks each row's last real position.
    cache2 = ours.new_cache(batch, PROMPT_LEN)
    last = ours(padded, cache2, n_new=torch.tensor(lengths), last_only=True).logits
    assert last.shape[1] == 1
    for b in range(batch):
        assert _max_err(last[b, 0], prefill[b, lengths[b] - 1]) < 1e-5

    fed = list(lengths)  # tokens of row b consumed so far
    junk = random_ids(n_decode + 1, vocab, seed=301)  # what an inactive row is fed (must not matter)
    for step in range(n_decode + 1):
        active = [0 if (b == 2 and step == 1) else 1 for b in range(batch)]  # row 2 pauses at step 1
        if step == n_decode:  # only row 2 still has a token left
            active = [0 if fed[b] >= lengths[b] + n_decode else 1 for b in range(batch)]
        tokens = torch.stack([full[b, fed[b]] if active[b] else junk[step] for b in range(batch)])
        logits = ours(tokens[:, None], cache, n_new=torch.tensor(active)).logits
        for b in range(batch):
            if active[b]:
                got[b].append(logits[b])
                fed[b] += 1
        assert cache.lengths.tolist() == fed
    assert fed == [n + n_decode for n in lengths]

    for b in range(batch):
        row = full[b, : fed[b]]
        mine = torch.cat(got[b], dim=0)
        assert _max_err(mine, hf_logits(hf, row)[0]) < ATOL, f"row {b} vs transformers"
        assert _max_err(mine, ours_logits(ours, row)[0]) < ATOL, f"row {b} vs ours alone"


# ---------------------------------------------------------------------------------------------
# Greedy generation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_64_greedy_tokens_match_transformers_generate(built, name):
    hf, _, ours = built(name)
    prompt = random_ids(PROMPT_LEN, hf.config.vocab_size, seed=400).tolist()
    want = hf_greedy(hf, prompt, 64)
    assert len(want) == 64
    assert len(set(want)) >= 8, f"weak test: greedy output has few distinct tokens {want}"
    completions, stats = Engine(ours).generate(
        [Request(tuple(prompt), SamplingParams(max_new_tokens=64, stop_on_eos=False))])
    assert completions[0].token_ids == want
    assert completions[0].finish_reason == "length"
    assert len(stats.step_s) == 63


@pytest.mark.parametrize("name", NAMES)
def test_batched_greedy_requests_match_transformers(built, name):
    """Several requests of different prompt lengths and budgets in one Engine batch: each gets the
    tokens transformers generates for it alone (rows that finish early ride along)."""
    hf, _, ours = built(name)
    vocab = hf.config.vocab_size
    specs = [(PROMPT_LEN, 12), (5, 20), (11, 3)]
    prompts = [random_ids(n, vocab, seed=500 + i).tolist() for i, (n, _) in enumerate(specs)]
    requests = [Request(tuple(p), SamplingParams(max_new_tokens=k, stop_on_eos=False), str(i))
                for i, (p, (_, k)) in enumerate(zip(prompts, specs))]
    completions, _ = Engine(ours).generate(requests)
    for i, (p, (_, k)) in enumerate(zip(prompts, specs)):
        assert completions[i].request_id == str(i)
        assert completions[i].token_ids == hf_greedy(hf, p, k), f"request {i}"


def test_stop_on_eos_matches_transformers(built, tmp_path):
    """EOS taken from config.json: the engine stops a row at the first EOS (included), as
    transformers' generate does; a row that ignores EOS in the same batch runs to its budget."""
    probe, _, _ = built("moe_every_layer")  # seed 11, EOS never generated
    prompt = random_ids(PROMPT_LEN, probe.config.vocab_size, seed=450).tolist()
    free_run = hf_greedy(probe, prompt, 20)
    stop_at = next(i for i in range(4, 20) if free_run[i] not in free_run[:i])  # a first occurrence
    eos = free_run[stop_at]
    # The same weights (same seed), with that token as EOS in config.json.
    hf, path = make_hf_checkpoint(tmp_path / "ckpt", dict(CONFIGS["moe_every_layer"], eos_token_id=eos), seed=11)
    ours = load_ours(path)
    assert ours.cfg.eos_token_ids == (eos,)
    want = hf_greedy(hf, prompt, 20, eos_token_id=eos)
    assert want == free_run[: stop_at + 1]
    done, _ = Engine(ours).generate([
        Request(tuple(prompt), SamplingParams(max_new_tokens=20), "stops"),
        Request(tuple(prompt), SamplingParams(max_new_tokens=20, stop_on_eos=False), "runs"),
    ])
    assert (done[0].token_ids, done[0].finish_reason) == (want, "eos")
    assert (done[1].token_ids, done[1].finish_reason) == (free_run, "length")


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts: multimodal names and config, sharded index
# ---------------------------------------------------------------------------------------------

def test_multimodal_prefix_renamed_checkpoint(built, tmp_path):
    """language_model.model.* / language_model.lm_head.weight names, a vision tensor to ignore,
    and a Llama4Config-style config.json (model_type llama4, text_config)."""
    hf, path, ours = built("moe_every_layer")
    mm = make_multimodal_checkpoint(path, tmp_path / "mm")
    raw = json.loads((mm / "config.json").read_text())
    assert raw["model_type"] == "llama4" and "text_config" in raw
    names = set(read_tensors(mm))
    assert "language_model.lm_head.weight" in names and "vision_model.x.weight" in names
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in names
    assert dataclasses.replace(load_model_config(mm), name="") == dataclasses.replace(ours.cfg, name="")
    model = load_ours(mm)
    ids = random_ids(PROMPT_LEN, hf.config.vocab_size, seed=600)
    assert _max_err(ours_logits(model, ids), hf_logits(hf, ids)) < ATOL


@pytest.mark.parametrize("name", ["moe_every_layer", "moe_every_other_tied"])
def test_checkpoint_saved_by_llama4_for_conditional_generation(tmp_path, name):
    """The multimodal model saved by transformers itself (tiny vision tower). transformers ties the
    language model's embeddings according to text_config.tie_word_embeddings (its top-level
    Llama4Config.tie_word_embeddings stays false), and then saves no lm_head tensor."""
    lm, path = make_hf_multimodal_checkpoint(tmp_path / "mm", CONFIGS[name], seed=12)
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == "llama4"
    tied = raw["text_config"]["tie_word_embeddings"]
    assert ("language_model.lm_head.weight" in read_tensors(path)) == (not tied)
    assert load_model_config(path).tie_word_embeddings == tied
    model = load_ours(path)
    ids = random_ids(PROMPT_LEN, lm.config.vocab_size, seed=700)
    assert _max_err(ours_logits(model, ids), hf_logits(lm, ids)) < ATOL


@pytest.mark.parametrize("name", ["moe_every_layer", "moe_every_other_tied"])
def test_sharded_checkpoint_with_index(tmp_path, name):
    hf, path = make_hf_checkpoint(tmp_path / "sharded", CONFIGS[name], seed=13, max_shard_size="100KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3 and not (path / "model.safetensors").exists()
    model = load_ours(path)
    ids = random_ids(PROMPT_LEN, hf.config.vocab_size, seed=800)
    assert _max_err(ours_logits(model, ids), hf_logits(hf, ids)) < ATOL
