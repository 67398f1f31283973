"""Training the embedded default (workers/train_target.py) and the checkpoint export it relies on:
the name table read backwards gives back exactly what the loader reads, a few optimizer steps on
a tiny corpus lower the loss through the served forward, and the saved checkpoint loads to the
same logits as the trained model."""
from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from collectives.communicator import SingleRankCommunicator
from model.checkpoint import export_state_dict, load_shard
from model.config import load_model_config
from model.embedded import default_config, ensure_default_model, random_state_dict, write_checkpoint
from model.llama4 import Llama4
from model.parallel import layout
from workers import train_target


def test_export_is_the_loader_inverted(tmp_path):
    cfg = default_config()
    tensors = random_state_dict(cfg, seed=int(torch.randint(0, 2**31, ())))  # fresh weights every run
    write_checkpoint(tmp_path, cfg, tensors)
    model = Llama4(cfg, layout(cfg), SingleRankCommunicator())
    load_shard(model, tmp_path)
    exported = export_state_dict(model)
    assert exported.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(exported[name], tensor), name


def test_a_few_steps_lower_the_loss_and_the_checkpoint_loads(tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 40
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps({"train": [text] * 4, "heldout": [text]}))
    args = SimpleNamespace(corpus=str(corpus), out=str(tmp_path / "model"), device="cpu", budget_s=600.0,
                           max_steps=12, calibrate_steps=1000, batch=4, seq=64, lr=3e-3, warmup=2, eval_every=6,
                           eval_batches=1, seed=3)
    record = train_target.train(args)
    losses = [row["heldout_loss"] for row in record["log"]]
    assert losses[-1] < losses[0] - 0.5, losses  # from ~ln(512) toward the repeated sentence
    path = tmp_path / "model"
    cfg = load_model_config(path)
    model = Llama4(cfg, layout(cfg), SingleRankCommunicator())
    load_shard(model, path)
    batch = train_target.token_stream([text], cfg)[None, :65]
    loss = float(train_target.lm_loss(model, batch))  # bf16 weights as saved
    assert abs(loss - record["heldout_loss"]) < 0.3, (loss, record["heldout_loss"])


def test_the_shipped_default_is_trained():
    """The shipped checkpoint predicts held-out documentation far better than chance (9 bits/byte)."""
    path = ensure_default_model()
    cfg = load_model_config(path)
    model = Llama4(cfg, layout(cfg), SingleRankCommunicator())
    load_shard(model, path)
    text = (path / "heldout.txt").read_text()[:4000]
    batch = train_target.token_stream([text], cfg)[None, :1025]
    bits_per_byte = float(train_target.lm_loss(model, batch)) / torch.log(torch.tensor(2.0))
    assert bits_per_byte < 2.0, bits_per_byte
