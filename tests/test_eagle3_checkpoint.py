"""EAGLE-3 draft checkpoints: both published layouts load (written here to their names and
shapes), the tensor-parallel draft equals the unsharded one, and bad input gets an error that
names what is wrong, before any weight is used."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster.procs import run_world
from collectives.communicator import SingleRankCommunicator
from model.checkpoint import CheckpointError, load_shard
from model.config import ConfigError, load_model_config, tiny
from model.eagle3 import draft_layout
from model.eagle3_checkpoint import (checkpoint_tensors, fingerprint_warning, load_draft, read_draft_config,
                                     save_draft, target_fingerprint)
from model.embedded import random_state_dict, write_checkpoint
from model.llama4 import Llama4
from model.parallel import layout
from tests.spec_reference import random_draft, write_modelopt
from tests.spec_reference import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread: see tests/spec_reference.py

VOCAB = 509  # no world size divides it


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = tmp_path_factory.mktemp("target")
    cfg = tiny(VOCAB)
    write_checkpoint(path, cfg, random_state_dict(cfg, seed=21, std=0.08))
    model = Llama4(cfg, layout(cfg), SingleRankCommunicator()).eval()
    load_shard(model, path)
    return path, model


@pytest.fixture(scope="module")
def source(target):
    """A random draft with a 203-token draft vocabulary (no world size divides it), on the target's embedding."""
    _, model = target
    draft = random_draft(model.cfg, seed=5, draft_vocab=203, std=0.05, layer_ids=(0, 2, 3))
    draft.target.embed = model.embed_tokens
    return draft.eval()


def _inputs(cfg, hidden: int):
    gen = torch.Generator().manual_seed(9)
    return torch.randint(0, VOCAB, (2, 6), generator=gen), torch.randn(2, 6, 3 * hidden, generator=gen)


def _run(draft, tokens, features):
    out = draft(tokens, draft.new_cache(2, 8), target_features=features)
    full = draft.comm.all_gather(out.logits, dim=-1)[..., : draft.cfg.draft_vocab_size]
    return full, out.hidden


def test_safeailab_layout_round_trips(target, source, tmp_path):
    path, model = target
    save_draft(tmp_path, source.cfg, checkpoint_tensors(source), dtype=torch.float32)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert {"fc.weight", "midlayer.hidden_norm.weight", "midlayer.self_attn.q_proj.weight", "d2t", "t2d",
            "lm_head.weight", "norm.weight"} <= names
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["draft_vocab_size"] == 203 and raw["target_hidden_size"] == model.cfg.hidden_size
    loaded, _ = load_draft(tmp_path, model)
    assert loaded.cfg.layer_ids == (0, 2, 3)
    tokens, features = _inputs(model.cfg, model.cfg.hidden_size)
    for got, want in zip(_run(loaded, tokens, features), _run(source, tokens, features)):
        assert torch.equal(got, want)
    assert torch.equal(loaded.d2t, source.d2t) and torch.equal(loaded.t2d, source.t2d)


def test_modelopt_layout_without_lm_head_uses_the_targets(target, source, tmp_path):
    path, model = target
    full_vocab = random_draft(model.cfg, seed=6, draft_vocab=VOCAB, std=0.05)
    full_vocab.target.embed = model.embed_tokens
    write_modelopt(tmp_path, full_vocab, layer_ids=(1, 2, 3), lm_head=False)
    assert not {"lm_head.weight", "d2t"} & set(load_file(str(tmp_path / "model.safetensors")))
    assert "layers.0.self_attn.q_proj.weight" in load_file(str(tmp_path / "model.safetensors"))
    loaded, _ = load_draft(tmp_path, model)
    assert loaded.cfg.layer_ids == (1, 2, 3) and not loaded.cfg.has_lm_head
    assert loaded.lm_head_weight() is model.lm_head_weight()
    assert torch.equal(loaded.to_target_ids(torch.arange(VOCAB)), torch.arange(VOCAB))
    tokens, features = _inputs(model.cfg, model.cfg.hidden_size)
    with torch.no_grad():
        full_vocab.lm_head.weight.copy_(model.lm_head_weight())
    for got, want in zip(_run(loaded, tokens, features), _run(full_vocab, tokens, features)):
        assert torch.equal(got, want)


def test_modelopt_layout_with_lm_head_and_d2t(target, source, tmp_path):
    _, model = target
    write_modelopt(tmp_path, source, layer_ids=(0, 2, 3), lm_head=True)
    loaded, _ = load_draft(tmp_path, model)
    tokens, features = _inputs(model.cfg, model.cfg.hidden_size)
    for got, want in zip(_run(loaded, tokens, features), _run(source, tokens, features)):
        assert torch.equal(got, want)


def _sharded_logits(comm, target_path: str, draft_path: str) -> dict:
    cfg = load_model_config(target_path)
    model = Llama4(cfg, layout(cfg, comm.world_size, comm.rank), comm).eval()
    load_shard(model, target_path)
    draft, _ = load_draft(draft_path, model)
    logits, hidden = _run(draft, *_inputs(cfg, cfg.hidden_size))
    return {"logits": logits, "hidden": hidden}


def test_tensor_parallel_draft_equals_unsharded(target, source, tmp_path):
    path, model = target
    save_draft(tmp_path, source.cfg, checkpoint_tensors(source), dtype=torch.float32)
    want = _sharded_logits(SingleRankCommunicator(), str(path), str(tmp_path))
    got = run_world(4, _sharded_logits, str(path), str(tmp_path), backend="shm")
    for key in ("logits", "hidden"):
        assert (got[key] - want[key]).abs().max().item() < 1e-5, key


# --- bad input ----------------------------------------------------------------------------------

def _write(tmp_path, source, edit_config=None, edit_tensors=None):
    tensors = checkpoint_tensors(source)
    if edit_tensors:
        edit_tensors(tensors)
    save_draft(tmp_path, source.cfg, tensors, dtype=torch.float32)
    if edit_config:
        raw = json.loads((tmp_path / "config.json").read_text())
        edit_config(raw)
        (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


BAD = {
    "hidden_size": (lambda c: c.update(hidden_size=128, head_dim=32), None, ConfigError, "hidden_size (128)"),
    "vocab_size": (lambda c: c.update(vocab_size=600), None, ConfigError, "vocab_size (600) differs"),
    "target_hidden": (lambda c: c.update(target_hidden_size=512), None, ConfigError, "target_hidden_size (512)"),
    "layer_ids": (lambda c: c.update(eagle_aux_hidden_state_layer_ids=[0, 2, 9]), None, ConfigError, "layer id 9"),
    "two_layers": (lambda c: c.update(num_hidden_layers=2), None, ConfigError, "num_hidden_layers=2"),
    "missing": (None, lambda t: t.pop("midlayer.mlp.up_proj.weight"), CheckpointError, "midlayer.mlp.up_proj.weight"),
    "shape": (None, lambda t: t.update({"fc.weight": torch.zeros(256, 512)}), CheckpointError, "'fc.weight' has shape"),
    "unknown": (None, lambda t: t.update({"midlayer.extra.weight": torch.zeros(3)}), CheckpointError, "midlayer.extra"),
    "d2t_dup": (None, lambda t: t.update({"d2t": -torch.arange(203)}), CheckpointError, "same target"),
    "d2t_dtype": (None, lambda t: t.update({"d2t": t["d2t"].float()}), CheckpointError, "'d2t' has dtype F32"),
    "t2d": (None, lambda t: t.update({"t2d": torch.ones(VOCAB, dtype=torch.bool)}), CheckpointError, "t2d disagrees"),
    "no_d2t": (None, lambda t: (t.pop("d2t"), t.pop("t2d")), CheckpointError, "no d2t"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_draft_names_the_fault(target, source, tmp_path, case):
    path, model = target
    edit_config, edit_tensors, error, words = BAD[case]
    _write(tmp_path, source, edit_config, edit_tensors)
    with pytest.raises(error, match=re.escape(words)):
        load_draft(tmp_path, model)


def test_pickles_are_refused_and_layouts_checked(target, source, tmp_path):
    path, model = target
    (tmp_path / "config.json").write_text(json.dumps(source.cfg.to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        read_draft_config(tmp_path, model.cfg)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_draft_config(tmp_path / "nowhere", model.cfg)
    with pytest.raises(ConfigError, match="fc input"):
        draft_layout(dataclasses.replace(source.cfg, target_hidden_size=250, hidden_size=250), 8, 0)


def test_fingerprint_mismatch_warns(target, source, tmp_path):
    path, model = target
    save_draft(tmp_path / "draft", source.cfg, checkpoint_tensors(source),
               extra={"dgx_emu": {"target_fingerprint": target_fingerprint(path)}})
    assert fingerprint_warning(tmp_path / "draft", path) is None
    other = tmp_path / "other"
    shutil.copytree(path, other)
    tensors = load_file(str(other / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, str(other / "model.safetensors"))
    assert "fingerprint mismatch" in fingerprint_warning(tmp_path / "draft", other)
