"""Model configuration (HF config.json in both shapes, presets, round trip) and sampling
(parameter validation, top-k / top-p filters, distributed argmax)."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import Llama4ForCausalLM, Llama4TextConfig

from collectives.communicator import SingleRankCommunicator
from model.config import ModelConfig, RopeScaling, from_hf_dict, maverick, preset, scout, tiny
from model.sampling import SamplingError, SamplingParams, distributed_argmax, filter_logits, next_tokens, sample_row
from tests.hf_reference import CONFIGS, hf_text_config, multimodal_config

HYP = settings(max_examples=60, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow])


def _unnamed(cfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(cfg, name="")


def _as_transformers_reads_it(h: Llama4TextConfig) -> dict:
    """The ModelConfig fields as transformers resolves them from its own config object."""
    rp = h.rope_parameters
    scaling = None
    if rp["rope_type"] == "llama3":
        scaling = RopeScaling(float(rp["factor"]), float(rp["low_freq_factor"]), float(rp["high_freq_factor"]),
                              int(rp["original_max_position_embeddings"]))
    return dict(
        vocab_size=h.vocab_size, hidden_size=h.hidden_size, n_layers=h.num_hidden_layers,
        n_heads=h.num_attention_heads, n_kv_heads=h.num_key_value_heads, head_dim=h.head_dim,
        intermediate_size=h.intermediate_size, intermediate_size_mlp=h.intermediate_size_mlp,
        n_experts=h.num_local_experts, experts_per_token=h.num_experts_per_tok, moe_layers=tuple(h.moe_layers),
        rope_layers=tuple(bool(x) for x in h.no_rope_layers), attention_chunk_size=h.attention_chunk_size,
        use_qk_norm=h.use_qk_norm, attn_temperature_tuning=h.attn_temperature_tuning,
        floor_scale=float(h.floor_scale), attn_scale=float(h.attn_scale), rope_theta=float(rp["rope_theta"]),
        rope_scaling=scaling, rms_norm_eps=h.rms_norm_eps, tie_word_embeddings=h.tie_word_embeddings,
        max_position_embeddings=h.max_position_embeddings,
    )


def _assert_reads_like_transformers(cfg: ModelConfig, h: Llama4TextConfig) -> None:
    want = _as_transformers_reads_it(h)
    got = {k: getattr(cfg, k) for k in want}
    assert got == want


# ---------------------------------------------------------------------------------------------
# Reading config.json
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_both_hf_config_shapes_read_the_same(name):
    h = hf_text_config(CONFIGS[name])
    text = json.loads(json.dumps(h.to_dict()))  # exactly what config.json holds
    full = json.loads(json.dumps(multimodal_config(h)))
    assert text["model_type"] == "llama4_text" and full["model_type"] == "llama4"
    a, b = from_hf_dict(text), from_hf_dict(full)
    assert _unnamed(a) == _unnamed(b)
    _assert_reads_like_transformers(a, h)
    assert a.bos_token_id == h.bos_token_id and a.eos_token_ids == (h.eos_token_id,)


@HYP
@given(n_layers=st.integers(1, 12), step=st.integers(1, 4), interval=st.integers(1, 5),
       chunk=st.one_of(st.none(), st.integers(1, 64)), qk=st.booleans(), tie=st.booleans(),
       llama3=st.booleans(), top_k=st.integers(1, 4), temp=st.booleans(), wrapped=st.booleans())
def test_derived_layer_sets_match_transformers(n_layers, step, interval, chunk, qk, tie, llama3, top_k, temp,
                                               wrapped):
    """moe_layers from interleave_moe_layer_step and NoPE layers from no_rope_layer_interval
    (only those two are given), resolved as transformers resolves them."""
    rope = {"rope_type": "default", "rope_theta": 250000.0}
    if llama3:
        rope = {"rope_type": "llama3", "rope_theta": 250000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    knobs = dict(vocab_size=100, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, intermediate_size=16, intermediate_size_mlp=24,
                 num_local_experts=4, num_experts_per_tok=top_k, interleave_moe_layer_step=step,
                 no_rope_layer_interval=interval, attention_chunk_size=chunk, use_qk_norm=qk,
                 tie_word_embeddings=tie, rope_parameters=rope, attn_temperature_tuning=temp, floor_scale=16)
    raw = {"model_type": "llama4_text", **knobs}  # no moe_layers / no_rope_layers keys: derived
    h = Llama4TextConfig(**knobs)
    if wrapped:
        raw = {"model_type": "llama4", "text_config": raw}
    _assert_reads_like_transformers(from_hf_dict(raw), h)


def test_scout_style_legacy_rope_scaling_keys():
    """Released checkpoints write `rope_theta` + `rope_scaling` (not rope_parameters), nest the
    text config, and leave no_rope_layers empty (derived from the interval)."""
    text = {"model_type": "llama4_text", "vocab_size": 202048, "hidden_size": 5120, "num_hidden_layers": 48,
            "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192,
            "intermediate_size_mlp": 16384, "num_local_experts": 16, "num_experts_per_tok": 1,
            "interleave_moe_layer_step": 1, "no_rope_layers": [], "use_qk_norm": True, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "attention_chunk_size": 8192, "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1,
            "max_position_embeddings": 1048576, "rms_norm_eps": 1e-5, "bos_token_id": 200000,
            "eos_token_id": [200001, 200007, 200008], "tie_word_embeddings": False}
    cfg = from_hf_dict({"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
                        "text_config": text, "vision_config": {"model_type": "llama4_vision_model"}})
    assert _unnamed(cfg) == _unnamed(scout())
    maverick_text = dict(text, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
                         rope_scaling=None)
    assert _unnamed(from_hf_dict({"model_type": "llama4", "text_config": maverick_text})) == _unnamed(maverick())


def test_omitted_attention_chunk_size_means_transformers_default():
    """A config.json without attention_chunk_size: transformers chunks RoPE layers at 8192."""
    raw = {"model_type": "llama4_text", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 16}
    h = Llama4TextConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    assert h.attention_chunk_size == 8192 and "chunked_attention" in h.layer_types
    assert from_hf_dict(raw).attention_chunk_size == h.attention_chunk_size


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

def test_maverick_anchor_values():
    m = maverick()
    assert (m.hidden_size, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim) == (5120, 48, 40, 8, 128)
    assert (m.n_experts, m.experts_per_token, m.vocab_size) == (128, 1, 202048)
    assert m.moe_layers == tuple(range(1, 48, 2))
    assert [i for i in range(48) if not m.rope_layers[i]] == list(range(3, 48, 4))
    assert (m.intermediate_size, m.intermediate_size_mlp) == (8192, 16384)
    assert not m.use_qk_norm and m.rope_scaling is None and not m.tie_word_embeddings
    assert m.attention_chunk_size == 8192 and m.attn_temperature_tuning
    assert math.isclose(m.n_params(), 400.7e9, rel_tol=0.03)
    assert preset("maverick") == m


def test_scout_anchor_values():
    s = scout()
    assert (s.hidden_size, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, s.vocab_size) == (
        5120, 48, 40, 8, 128, 202048)
    assert s.n_experts == 16 and s.moe_layers == tuple(range(48))
    assert s.use_qk_norm
    assert s.rope_scaling == RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                                         original_max_position_embeddings=8192)
    assert [i for i in range(48) if not s.rope_layers[i]] == list(range(3, 48, 4))
    assert math.isclose(s.n_params(), 109e9, rel_tol=0.03)  # "109B total" (text tower ~107.8B)
    assert preset("scout") == s


def test_tiny_has_every_feature():
    t = tiny()
    assert (t.n_layers, t.hidden_size, t.n_experts) == (4, 256, 8)
    assert 0 < len(t.moe_layers) < t.n_layers  # dense and MoE layers
    assert any(t.rope_layers) and not all(t.rope_layers)  # RoPE and NoPE layers
    assert t.attention_chunk_size is not None and t.attention_chunk_size < 128
    assert t.use_qk_norm and t.n_kv_heads < 8 and t.n_heads % 8 == 0
    assert tiny(vocab_size=509).vocab_size == 509
    with pytest.raises(Exception, match="unknown preset"):
        preset("llama2")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_n_params_equals_transformers_parameter_count(name):
    h = hf_text_config(CONFIGS[name])
    with torch.device("meta"):
        model = Llama4ForCausalLM(h)
    model.tie_weights()
    count = sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once
    assert from_hf_dict(h.to_dict()).n_params() == count


# ---------------------------------------------------------------------------------------------
# to_hf_dict
# ---------------------------------------------------------------------------------------------

@st.composite
def model_configs(draw) -> ModelConfig:
    n_layers = draw(st.integers(1, 10))
    n_kv = draw(st.sampled_from([1, 2, 4]))
    n_experts = draw(st.integers(1, 8))
    scaling = draw(st.one_of(st.none(), st.builds(
        RopeScaling, st.floats(1.0, 32.0), st.floats(0.5, 2.0), st.floats(2.0, 8.0), st.integers(16, 8192))))
    vocab = draw(st.integers(8, 1000))
    return ModelConfig(
        vocab_size=vocab, hidden_size=draw(st.integers(1, 64)), n_layers=n_layers,
        n_heads=n_kv * draw(st.integers(1, 4)), n_kv_heads=n_kv, head_dim=2 * draw(st.integers(1, 64)),
        intermediate_size=draw(st.integers(1, 100)), intermediate_size_mlp=draw(st.integers(1, 100)),
        n_experts=n_experts, experts_per_token=draw(st.integers(1, n_experts)),
        moe_layers=tuple(sorted(draw(st.sets(st.integers(0, n_layers - 1), min_size=1)))),
        rope_layers=tuple(draw(st.lists(st.booleans(), min_size=n_layers, max_size=n_layers))),
        attention_chunk_size=draw(st.one_of(st.none(), st.integers(1, 10000))), use_qk_norm=draw(st.booleans()),
        attn_temperature_tuning=draw(st.booleans()), floor_scale=draw(st.floats(1.0, 10000.0)),
        attn_scale=draw(st.floats(0.0, 1.0)), rope_theta=draw(st.floats(100.0, 1e7)), rope_scaling=scaling,
        rms_norm_eps=draw(st.floats(1e-8, 1e-3)), tie_word_embeddings=draw(st.booleans()),
        max_position_embeddings=draw(st.integers(1, 10 ** 7)),
        bos_token_id=draw(st.one_of(st.none(), st.integers(0, vocab - 1))),
        eos_token_ids=tuple(draw(st.lists(st.integers(0, vocab - 1), max_size=3))), name="x",
    )


@pytest.mark.parametrize("cfg", [maverick(), scout(), tiny(), tiny(509)], ids=["maverick", "scout", "tiny", "tiny509"])
def test_to_hf_dict_round_trips_presets(cfg):
    d = json.loads(json.dumps(cfg.to_hf_dict()))  # it is written as config.json
    assert from_hf_dict(d, name=cfg.name) == cfg


@HYP
@given(cfg=model_configs())
def test_to_hf_dict_round_trips(cfg):
    d = json.loads(json.dumps(cfg.to_hf_dict()))
    assert from_hf_dict(d, name="x") == cfg


@pytest.mark.parametrize("cfg", [maverick(), scout(), tiny()], ids=["maverick", "scout", "tiny"])
def test_transformers_reads_to_hf_dict_the_same_way(cfg):
    d = json.loads(json.dumps(cfg.to_hf_dict()))
    h = Llama4TextConfig(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
    _assert_reads_like_transformers(cfg, h)


# ---------------------------------------------------------------------------------------------
# Sampling parameters
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.2), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-3), "max_new_tokens"),
])
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**kwargs)
    assert field in str(e.value)


def test_valid_sampling_params():
    assert SamplingParams().greedy
    p = SamplingParams(temperature=0.7, top_k=5, top_p=1.0, seed=1, max_new_tokens=1)
    assert not p.greedy and p.top_k == 5


def _distinct_logits(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.randn(n, generator=gen) * 3.0  # continuous: no ties


@pytest.mark.parametrize("k", [1, 2, 7, 49, 50])
def test_top_k_keeps_exactly_k(k):
    gen = torch.Generator().manual_seed(k)
    for _ in range(20):
        logits = _distinct_logits(gen, 50)
        out = filter_logits(logits, SamplingParams(temperature=0.5, top_k=k))
        kept = torch.isfinite(out)
        assert int(kept.sum()) == k
        assert set(kept.nonzero().flatten().tolist()) == set(torch.topk(logits, k).indices.tolist())
        assert torch.allclose(out[kept], logits[kept] / 0.5)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    gen = torch.Generator().manual_seed(7)
    checked = 0
    while checked < 200:
        n = int(torch.randint(2, 40, (1,), generator=gen))
        temperature = float(torch.empty(1).uniform_(0.3, 2.0, generator=gen))
        logits = _distinct_logits(gen, n)
        p = float(torch.empty(1).uniform_(0.01, 0.999, generator=gen))
        probs = torch.softmax(logits.double() / temperature, dim=-1)
        order = torch.argsort(probs, descending=True)
        cum = probs[order].cumsum(0)
        if bool(((cum - p).abs() < 1e-5).any()):
            continue  # p on a boundary: fp32 rounding decides, skip this draw (not this check)
        n_keep = int((cum < p).sum()) + 1  # smallest prefix whose mass >= p
        out = filter_logits(logits, SamplingParams(temperature=temperature, top_p=p))
        kept = torch.isfinite(out)
        assert set(kept.nonzero().flatten().tolist()) == set(order[:n_keep].tolist()), (p, cum)
        checked += 1


def test_top_p_small_example():
    logits = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    kept = lambda p: torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_p=p))).tolist()
    assert kept(0.4) == [False, True, False]
    assert kept(0.6) == [False, True, True]
    assert kept(0.9) == [True, True, True]
    assert kept(1.0) == [True, True, True]


def test_top_k_then_top_p_combined():
    logits = torch.log(torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15]))
    out = filter_logits(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.7))
    # top-3 = {1, 3, 4} renormalised: 0.4/0.85, 0.3/0.85 -> mass 0.82 >= 0.7 after two tokens
    assert torch.isfinite(out).tolist() == [False, True, False, True, False]


# ---------------------------------------------------------------------------------------------
# Picking tokens
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab_start", [0, 1000])
def test_distributed_argmax_single_rank_equals_argmax_with_ties(vocab_start):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 4, (64, 37), generator=gen).float()  # many ties per row
    logits[5] = 2.0  # a row that is all one value
    logits[6, [3, 30]] = 10.0  # two-way tie for the max
    got = distributed_argmax(logits, vocab_start, SingleRankCommunicator())
    assert got.dtype == torch.long
    assert torch.equal(got, torch.argmax(logits, dim=-1) + vocab_start)
    assert int(got[5]) == vocab_start and int(got[6]) == vocab_start + 3
    big = torch.randn(3, 202048, generator=gen)
    assert torch.equal(distributed_argmax(big, 0, SingleRankCommunicator()), torch.argmax(big, dim=-1))


def test_next_tokens_greedy_and_seeded_sampling():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 300, generator=gen)
    comm = SingleRankCommunicator()
    greedy, sampled = SamplingParams(), SamplingParams(temperature=0.9, top_k=20, seed=4)

    def run(seed):
        gens = [None, torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)]
        return [next_tokens(logits, 0, 300, comm, [greedy, sampled, sampled], gens).tolist() for _ in range(30)]

    a, b = run(4), run(4)
    assert a == b  # same seeds, same draws
    assert all(row[0] == int(torch.argmax(logits[0])) for row in a)
    top20 = [set(torch.topk(logits[i], 20).indices.tolist()) for i in range(3)]
    assert all(row[1] in top20[1] and row[2] in top20[2] for row in a)
    assert len({row[1] for row in a}) > 1  # it does sample
    assert run(5) != a


def test_sample_row_respects_filters():
    logits = torch.log(torch.tensor([0.02, 0.5, 0.08, 0.3, 0.1]))
    gen = torch.Generator().manual_seed(0)
    draws = {sample_row(logits, SamplingParams(temperature=1.0, top_p=0.75), gen) for _ in range(300)}
    assert draws == {1, 3}
    draws = {sample_row(logits, SamplingParams(temperature=5.0, top_k=1), gen) for _ in range(50)}
    assert draws == {1}
