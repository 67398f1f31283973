"""Training an EAGLE-3 draft: the training-time-test forward is the inference forward (so what is
trained is what decodes), the reduced vocabulary follows token frequencies, and `train_draft` runs
end to end at a tiny scale: loss falls, the output is a loadable SafeAILab checkpoint that records
its layers, recipe, target fingerprint and a measured held-out acceptance length."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from collectives.communicator import SingleRankCommunicator
from model.checkpoint import load_shard
from model.config import ConfigError, tiny
from model.eagle3_checkpoint import load_draft, target_fingerprint
from model.embedded import random_state_dict, write_checkpoint
from model.llama4 import Llama4
from model.parallel import layout
from tests.spec_reference import random_draft
from tests.spec_reference import one_thread  # noqa: F401 (a fixture)
from workers.train_draft import TrainConfig, draft_vocabulary, train_draft

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread: see tests/spec_reference.py


def _small_config(vocab: int):
    return dataclasses.replace(tiny(vocab), hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=16,
                               intermediate_size=64, intermediate_size_mlp=128)


def test_training_time_test_equals_cached_inference():
    """Step i of the unrolled forward at row t is the depth-i node drafted after committing rows
    0..t: same token, feature, position (t + i) and visible keys."""
    draft = random_draft(_small_config(64), seed=1, draft_vocab=40, std=0.1, layer_ids=(0, 1, 2)).eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (2, 9), generator=gen)
    features = torch.randn(2, 9, 3 * 64, generator=gen)
    with torch.no_grad():
        steps = draft.unrolled(tokens, features, 3)
    step0 = draft(tokens, draft.new_cache(2, 16), target_features=features)
    assert (step0.logits - steps[0]).abs().max() < 1e-5
    for t in (0, 4, 6):
        cache = draft.new_cache(2, 16)
        draft(tokens[:, : t + 1], cache, target_features=features[:, : t + 1])  # committed rows 0..t
        hidden = step0.hidden[:, t:t + 1]
        for i in (1, 2):
            out = draft(tokens[:, t + i:t + i + 1], cache, hidden=hidden, positions=torch.full((2, 1), t + i))
            assert (out.logits[:, 0] - steps[i][:, t]).abs().max() < 1e-5, f"step {i}, row {t}"
            hidden = out.hidden


def test_draft_vocabulary_is_the_most_frequent_response_tokens():
    sequences = [[9, 9, 1, 1, 1, 2, 3], [9, 9, 3, 3, 5]]  # prompts of 2 tokens are not counted
    ids = draft_vocabulary(sequences, [2, 2], size=3, vocab=10)
    assert ids.tolist() == [1, 2, 3]  # counts 1:3, 3:3, then 2:1 and 5:1 tie, the lower id wins; sorted


def test_train_config_is_checked():
    with pytest.raises(ConfigError, match="ttt_steps"):
        TrainConfig(target="t", out="o", ttt_steps=0)
    with pytest.raises(ConfigError, match="prompt_len"):
        TrainConfig(target="t", out="o", prompt_len=(5, 2))


def test_train_draft_end_to_end(tmp_path):
    cfg = _small_config(64)
    target = tmp_path / "target"
    write_checkpoint(target, cfg, random_state_dict(cfg, seed=2, std=0.1))
    out = tmp_path / "draft"
    report = train_draft(TrainConfig(target=str(target), out=str(out), layer_ids=(0, 1, 3), draft_vocab=48,
                                     n_prompts=32, heldout_prompts=4, prompt_len=(2, 6), response_len=12,
                                     epochs=4, batch_size=8, lr=3e-3), log=lambda message: None)
    assert report["final_loss"] < report["initial_loss"]
    assert report["heldout"]["acceptance_length"] >= 1.0 and len(report["heldout"]["acceptance_per_position"]) == 3
    assert report["heldout"]["same_as_greedy"] == 1.0
    names = set(load_file(str(out / "model.safetensors")))
    assert {"fc.weight", "midlayer.self_attn.q_proj.weight", "lm_head.weight", "d2t", "t2d"} <= names
    raw = json.loads((out / "config.json").read_text())
    assert raw["eagle_aux_hidden_state_layer_ids"] == [0, 1, 3] and raw["draft_vocab_size"] == 48
    assert raw["dgx_emu"]["target_fingerprint"] == target_fingerprint(target)
    assert raw["dgx_emu"]["recipe"]["ttt_steps"] == 3
    model = Llama4(cfg, layout(cfg), SingleRankCommunicator()).eval()
    load_shard(model, target)
    draft, _ = load_draft(out, model)
    assert int(draft.t2d.sum()) == 48
