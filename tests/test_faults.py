"""Faults: ranks killed during decode and inside a collective, a rank hung past the collective
timeout, recovery by restart, and what is left behind (nothing). Plus byte-level damage to the
files we read, fuzzed with hypothesis: every bad input must be a clear, specific error."""
from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.drills import drill
from cluster.inprocess import InProcessNode
from cluster.timeline import TraceError, read_trace
from model.checkpoint import CheckpointError, load_shard
from model.config import ConfigError, from_hf_dict, tiny
from model.embedded import random_state_dict, write_checkpoint
from model.llama4 import Llama4
from model.parallel import layout
from collectives.communicator import SingleRankCommunicator
from workers.run_config import RunConfig
from cluster.drills import _requests

NOTHING_LEFT = {"processes": [], "shm": [], "scratch": []}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("fault_ckpt")
    cfg = tiny(vocab_size=509)
    write_checkpoint(path, cfg, random_state_dict(cfg, seed=8, std=0.08))
    return path


def _run(checkpoint, world=4, timeout=2.0):
    return RunConfig(str(checkpoint), world_size=world, collective_timeout_s=timeout)


def test_rank_killed_during_decode_is_named_within_10_s(checkpoint):
    report = drill(_run(checkpoint), "kill-decode", rank=2)
    assert report["outcome"] == "error" and report["failed_rank"] == 2, report
    assert "rank 2 failed" in report["error"] and "died" in report["error"]
    assert report["detected_after_s"] < 10
    assert report["leftovers"] == NOTHING_LEFT


def test_rank_killed_inside_a_collective_is_named_within_10_s(checkpoint):
    report = drill(_run(checkpoint), "kill-in-collective", rank=1)
    assert report["outcome"] == "error" and report["failed_rank"] == 1, report
    assert report["detected_after_s"] < 10
    assert report["leftovers"] == NOTHING_LEFT


def test_hung_rank_becomes_an_error_naming_it(checkpoint):
    report = drill(_run(checkpoint, timeout=2.0), "hang", rank=3)
    assert report["outcome"] == "error" and report["failed_rank"] == 3, report
    assert "did not arrive within 2.0 s" in report["error"]
    assert report["detected_after_s"] < 2.0 + 10
    assert report["leftovers"] == NOTHING_LEFT


def test_restart_reruns_the_batch_and_the_output_is_whole(checkpoint):
    with InProcessNode(RunConfig(str(checkpoint), world_size=1)) as ref:
        ref.load()
        expected, _, _ = ref.generate(_requests(60))
    report = drill(_run(checkpoint), "kill-decode", rank=1, max_restarts=1, n_tokens=60)
    assert report["outcome"] == "completed", report
    assert report["restarts"] == 1 and report["failures"][0]["rank"] == 1
    assert report["tokens"] == [c.token_ids for c in expected]
    assert report["streamed_steps"] == 60  # every step streamed once: none lost, none repeated
    assert report["leftovers"] == NOTHING_LEFT


# --- damaged files ---------------------------------------------------------------------------

def _load(path):
    cfg = tiny(vocab_size=509)
    model = Llama4(cfg, layout(cfg), SingleRankCommunicator())
    load_shard(model, path)


def test_flipped_header_byte_is_a_clear_error(checkpoint, tmp_path):
    data = bytearray((checkpoint / "model.safetensors").read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    data[8 + header_len // 2] ^= 0xFF  # inside the JSON header
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        _load(tmp_path)


def test_flipped_exponent_byte_is_caught_as_a_non_finite_weight(checkpoint, tmp_path):
    data = bytearray((checkpoint / "model.safetensors").read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8: 8 + header_len])
    name = "model.layers.0.self_attn.q_proj.weight"
    offset = 8 + header_len + header[name]["data_offsets"][0]
    data[offset + 3] |= 0x7F  # fp32 little endian: byte 3 holds sign + exponent -> all ones
    data[offset + 2] |= 0x80
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="q_proj.weight.*NaN or inf"):
        _load(tmp_path)


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzzed_checkpoint_bytes_give_checkpoint_errors(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz_ckpt")
    (path / "config.json").write_text(json.dumps(tiny(vocab_size=509).to_hf_dict()))
    (path / "model.safetensors").write_bytes(blob)
    with pytest.raises(CheckpointError):
        _load(path)


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzzed_trace_bytes_give_trace_errors(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz_trace")
    (path / "rank0.msgpack").write_bytes(blob)
    with pytest.raises(TraceError):
        read_trace(path, assume_same_clock=True)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=12)
CONFIG_KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "intermediate_size_mlp", "num_local_experts", "num_experts_per_tok",
               "moe_layers", "no_rope_layers", "attention_chunk_size", "rope_scaling", "rms_norm_eps",
               "eos_token_id", "tie_word_embeddings", "use_qk_norm", "hidden_act", "text_config"]


def test_a_config_of_absurdly_many_layers_is_refused_before_its_layer_lists():
    """num_hidden_layers of 2**40 (one value the config fuzz can draw) is a ConfigError at once: building
    its per-layer defaults (moe_layers, no_rope_layers) first took the test process past 24 GB."""
    for layers in (2 ** 40, 1025):
        with pytest.raises(ConfigError, match="num_hidden_layers"):
            from_hf_dict({**tiny().to_hf_dict(), "num_hidden_layers": layers, "moe_layers": None,
                          "no_rope_layers": None})
    assert from_hf_dict({**tiny().to_hf_dict(), "num_hidden_layers": 1024, "moe_layers": None,
                         "no_rope_layers": None}).n_layers == 1024


@FUZZ
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON, max_size=10))
def test_fuzzed_configs_parse_or_give_config_errors(overrides):
    raw = {**tiny().to_hf_dict(), **overrides}
    try:
        cfg = from_hf_dict(raw)
    except ConfigError:
        return
    assert cfg.n_layers == len(cfg.rope_layers)  # whatever parsed is a consistent config
