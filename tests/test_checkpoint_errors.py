"""Bad input is refused with the specific error class, and the message names what is at fault.

Every broken checkpoint is derived from one that transformers saved (hf_reference): a tensor
removed, reshaped, retyped or poisoned, a file truncated, an index pointing nowhere, a config
value this implementation does not support. Token ids outside the vocabulary are RequestErrors.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from collectives.communicator import SingleRankCommunicator
from model.checkpoint import CheckpointError, load_shard
from model.config import ConfigError, load_model_config
from model.llama4 import Llama4
from model.parallel import layout
from model.sampling import SamplingParams
from tests.hf_reference import (CONFIGS, load_ours, make_hf_checkpoint, ours_logits, random_ids, read_tensors,
                                write_tensors)
from workers.engine import Engine, Request, RequestError, validate_requests


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A valid checkpoint saved by transformers (MoE on every layer, untied)."""
    _, path = make_hf_checkpoint(tmp_path_factory.mktemp("good"), CONFIGS["moe_every_layer"], seed=21)
    return path


@pytest.fixture(scope="module")
def good_sharded(tmp_path_factory) -> Path:
    _, path = make_hf_checkpoint(tmp_path_factory.mktemp("sharded"), CONFIGS["moe_every_layer"], seed=21,
                                 max_shard_size="100KB")
    return path


@pytest.fixture(scope="module")
def ours(good):
    return load_ours(good)


def _variant(src: Path, dst: Path, tensors=None, config=None) -> Path:
    """A copy of checkpoint `src` at `dst` as one safetensors file, after tensors(dict) / config(dict)
    edit the tensors and the config in place."""
    t = read_tensors(src)
    c = json.loads((src / "config.json").read_text())
    if tensors:
        tensors(t)
    if config:
        config(c)
    return write_tensors(dst, t, c)


def _load(path: Path) -> Llama4:
    cfg = load_model_config(path)
    model = Llama4(cfg, layout(cfg), SingleRankCommunicator())
    load_shard(model, path)
    return model


def test_unmodified_copy_loads(good, tmp_path):
    """The variant machinery itself yields a loadable checkpoint (so the failures below are caused
    by the one edit each makes)."""
    path = _variant(good, tmp_path / "copy")
    ids = random_ids(12, 256, seed=1)
    assert torch.equal(ours_logits(_load(path), ids), ours_logits(load_ours(good), ids))


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "model.layers.2.feed_forward.router.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.3.feed_forward.experts.down_proj",
    "model.norm.weight",
    "lm_head.weight",
])
def test_missing_tensor(good, tmp_path, name):
    path = _variant(good, tmp_path / "ckpt", tensors=lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as e:
        _load(path)
    assert name in str(e.value)
    assert "missing" in str(e.value)


@pytest.mark.parametrize("name,shape", [
    ("model.layers.1.self_attn.k_proj.weight", (16, 64)),  # one KV head short
    ("model.layers.0.feed_forward.experts.gate_up_proj", (4, 64, 32)),  # gate only, no up
    ("model.embed_tokens.weight", (255, 64)),  # vocabulary one short
    ("model.layers.2.post_attention_layernorm.weight", (65,)),
])
def test_wrong_shape(good, tmp_path, name, shape):
    def edit(t):
        t[name] = torch.zeros(shape)
    path = _variant(good, tmp_path / "ckpt", tensors=edit)
    with pytest.raises(CheckpointError) as e:
        _load(path)
    msg = str(e.value)
    assert name in msg
    assert str(list(shape)) in msg  # what it found


@pytest.mark.parametrize("dtype,tag", [(torch.int32, "I32"), (torch.int64, "I64"), (torch.float64, "F64")])
def test_wrong_dtype(good, tmp_path, dtype, tag):
    name = "model.layers.1.self_attn.o_proj.weight"

    def edit(t):
        t[name] = t[name].to(dtype)
    path = _variant(good, tmp_path / "ckpt", tensors=edit)
    with pytest.raises(CheckpointError) as e:
        _load(path)
    assert name in str(e.value)
    assert tag in str(e.value)


def test_bf16_tensors_load(good, tmp_path):
    """A loadable dtype other than fp32: the same as loading the bf16-rounded values in fp32."""
    rounded = _variant(good, tmp_path / "rounded", tensors=lambda t: t.update(
        {k: v.to(torch.bfloat16).float() for k, v in t.items()}))
    bf16 = _variant(good, tmp_path / "bf16", tensors=lambda t: t.update(
        {k: v.to(torch.bfloat16) for k, v in t.items()}))
    ids = random_ids(12, 256, seed=2)
    assert torch.equal(ours_logits(_load(bf16), ids), ours_logits(_load(rounded), ids))


@pytest.mark.parametrize("name,value", [
    ("model.layers.3.feed_forward.experts.down_proj", float("nan")),
    ("model.layers.0.self_attn.q_proj.weight", float("nan")),
    ("model.layers.1.input_layernorm.weight", float("inf")),
    ("lm_head.weight", float("-inf")),
])
def test_non_finite_weight(good, tmp_path, name, value):
    def edit(t):
        flat = t[name].reshape(-1)
        flat[flat.numel() // 3] = value
    path = _variant(good, tmp_path / "ckpt", tensors=edit)
    with pytest.raises(CheckpointError) as e:
        _load(path)
    assert name in str(e.value)
    assert "NaN" in str(e.value) or "inf" in str(e.value)


@pytest.mark.parametrize("name", [
    "model.layers.0.self_attn.q_norm.weight",  # not a Llama 4 tensor at all
    "model.layers.7.input_layernorm.weight",  # a layer this 4-layer config does not have
])
def test_unexpected_tensor(good, tmp_path, name):
    def edit(t):
        t[name] = torch.ones(64)
    path = _variant(good, tmp_path / "ckpt", tensors=edit)
    with pytest.raises(CheckpointError) as e:
        _load(path)
    assert name.removeprefix("model.") in str(e.value)


def test_vision_tensors_are_ignored(good, tmp_path):
    path = _variant(good, tmp_path / "ckpt", tensors=lambda t: t.update(
        {"vision_model.patch.weight": torch.ones(3), "multi_modal_projector.linear_1.weight": torch.ones(2, 2)}))
    ids = random_ids(12, 256, seed=3)
    assert torch.equal(ours_logits(_load(path), ids), ours_logits(load_ours(good), ids))


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [lambda n: 4, lambda n: n // 2, lambda n: n - 1000, lambda n: n - 1],
                         ids=["header-length-only", "half", "minus-1000", "minus-1"])
def test_truncated_single_file(good, tmp_path, keep):
    dst = tmp_path / "ckpt"
    shutil.copytree(good, dst)
    f = dst / "model.safetensors"
    os.truncate(f, keep(f.stat().st_size))
    with pytest.raises(CheckpointError) as e:
        _load(dst)
    assert "model.safetensors" in str(e.value)


def test_truncated_shard(good_sharded, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(good_sharded, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.2.feed_forward.experts.gate_up_proj"]
    f = dst / shard
    os.truncate(f, f.stat().st_size - 512)
    with pytest.raises(CheckpointError) as e:
        _load(dst)
    assert shard in str(e.value)


def test_index_points_to_missing_shard(good_sharded, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(good_sharded, dst)
    index_file = dst / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.layers.1.self_attn.q_proj.weight"] = "model-00099-of-00099.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        _load(dst)
    assert "model-00099-of-00099.safetensors" in str(e.value)


def test_index_is_not_json(good_sharded, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(good_sharded, dst)
    (dst / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        _load(dst)
    assert "model.safetensors.index.json" in str(e.value)


def test_no_weights_at_all(good, tmp_path):
    dst = tmp_path / "ckpt"
    dst.mkdir()
    shutil.copy(good / "config.json", dst / "config.json")
    with pytest.raises(CheckpointError) as e:
        _load(dst)
    assert "model.safetensors" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Config values
# ---------------------------------------------------------------------------------------------

def _set(**kv):
    return lambda c: c.update(kv)


@pytest.mark.parametrize("edit,words", [
    (_set(hidden_act="gelu"), ["hidden_act", "gelu"]),
    (_set(attention_bias=True), ["attention_bias"]),
    (_set(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}), ["rope", "yarn"]),
    (_set(rope_parameters=None, rope_scaling={"type": "yarn", "factor": 4.0}), ["rope_scaling", "yarn"]),
    (_set(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}), ["factor"]),
    (_set(num_experts_per_tok=5), ["num_experts_per_tok"]),
    (_set(model_type="llama"), ["model_type", "llama"]),
    (_set(head_dim=15), ["head_dim"]),
    (_set(num_key_value_heads=3), ["num_key_value_heads"]),
    (_set(vocab_size=0), ["vocab_size"]),
    (_set(hidden_size=None), ["hidden_size"]),
    (_set(no_rope_layers=[1, 0]), ["no_rope_layers"]),
    (_set(moe_layers=[1, 9]), ["moe_layers"]),
    (_set(num_attention_heads="four"), ["num_attention_heads"]),  # malformed: names the field too
    (_set(rms_norm_eps="tiny"), ["rms_norm_eps"]),
], ids=["gelu", "attention_bias", "yarn", "yarn-legacy", "llama3-no-factor", "top-k>experts", "model_type",
        "odd-head_dim", "kv-heads", "vocab0", "no-hidden", "short-no_rope", "moe-layer-range",
        "heads-not-int", "eps-not-float"])
def test_unsupported_config_value(good, tmp_path, edit, words):
    dst = tmp_path / "ckpt"
    dst.mkdir()
    cfg = json.loads((good / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        load_model_config(dst)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_unsupported_value_inside_multimodal_text_config(good, tmp_path):
    dst = tmp_path / "ckpt"
    dst.mkdir()
    text = json.loads((good / "config.json").read_text())
    text["hidden_act"] = "gelu"
    (dst / "config.json").write_text(json.dumps({"model_type": "llama4", "text_config": text}))
    with pytest.raises(ConfigError, match="hidden_act"):
        load_model_config(dst)


def test_config_json_missing_or_invalid(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text("{ nope")
    with pytest.raises(ConfigError, match="config.json"):
        load_model_config(tmp_path)


@pytest.mark.parametrize("world,field", [(3, "num_attention_heads"), (8, "intermediate_size")])
def test_impossible_layout_names_the_field(good, world, field):
    cfg = load_model_config(good)  # 4 heads; experts/shared intermediate 32 -> only world 8 breaks those
    if field == "intermediate_size":
        cfg = dataclasses.replace(cfg, n_heads=8, n_kv_heads=8, intermediate_size=36, intermediate_size_mlp=48)
    with pytest.raises(ConfigError) as e:
        layout(cfg, world, 0)
    assert re.search(rf"\b{field}\b", str(e.value)), str(e.value)


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [256, 10_000, -1])
def test_out_of_range_token_id(ours, bad):
    prompt = (5, 9, bad, 7)
    with pytest.raises(RequestError) as e:
        validate_requests([Request(prompt, SamplingParams(max_new_tokens=4), "r7")], 256, 512)
    assert str(bad) in str(e.value) and "r7" in str(e.value)
    with pytest.raises(RequestError) as e:
        Engine(ours).generate([Request((3, 4), SamplingParams(max_new_tokens=2), "ok"),
                               Request(prompt, SamplingParams(max_new_tokens=2), "r8")])
    assert str(bad) in str(e.value) and "r8" in str(e.value)


def test_boundary_token_ids_are_accepted(ours):
    done, _ = Engine(ours).generate([Request((0, 255), SamplingParams(max_new_tokens=2, stop_on_eos=False))])
    assert len(done[0].token_ids) == 2 and all(0 <= t < 256 for t in done[0].token_ids)


def test_empty_prompt_and_context_overflow(ours):
    with pytest.raises(RequestError, match="empty"):
        Engine(ours).generate([Request((), SamplingParams(max_new_tokens=2), "e")])
    with pytest.raises(RequestError) as e:
        Engine(ours, max_context=30).generate([Request(tuple(range(3, 23)), SamplingParams(max_new_tokens=11))])
    assert "31" in str(e.value) and "30" in str(e.value)
    with pytest.raises(RequestError):
        Engine(ours).generate([])


def test_refused_request_leaves_the_model_usable(ours):
    """A refused request leaves the model usable and unchanged."""
    ids = random_ids(10, 256, seed=4)
    before = ours_logits(ours, ids)
    with pytest.raises(RequestError):
        Engine(ours).generate([Request((1, 2, 999), SamplingParams(max_new_tokens=2))])
    assert torch.equal(ours_logits(ours, ids), before)
