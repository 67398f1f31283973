"""The embedded default model: a small random Llama 4, built deterministically at first use.

It is written as a real Hugging Face checkpoint (config.json, model.safetensors with HF tensor
names, tokenizer.json) and then loaded through the same path as any other checkpoint, so the
default run exercises the real loader. Its shape keeps every feature of the architecture (dense
and MoE layers, RoPE and NoPE layers, chunked attention with a small chunk, QK-norm, fewer KV
heads than eight ranks) at a size that eight CPU actors on two cores decode interactively.
The weights are random until a trained model replaces them: the text it writes is noise.

It ships with an EAGLE-3 draft (model/assets/eagle3-default-<VERSION>/, SafeAILab layout, bf16,
~2 MB), toy-trained against exactly these weights by `dgx-emu train-draft --embedded`, so that
`dgx-emu generate` decodes speculatively out of the box. Committing it beats training at first use
(minutes of CPU) and the draft records a fingerprint of the target's weights: if the deterministic
build ever produced other weights, loading warns (output stays exact; only acceptance would drop).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.checkpoint import checkpoint_names, hf_name, match
from model.config import ModelConfig, tiny
from model.tokenizer import byte_level_tokenizer

VERSION = "v2"
SEED = 20260428
INIT_STD = 0.08  # larger than HF's 0.02 so that greedy text from random weights does not collapse to one token


def default_config() -> ModelConfig:
    return tiny(vocab_size=512)


def default_draft_dir(must_exist: bool = True) -> Path | None:
    """The shipped EAGLE-3 draft of the default model (None if it is missing and must_exist)."""
    path = Path(__file__).resolve().parent / "assets" / f"eagle3-default-{VERSION}"
    return path if not must_exist or (path / "model.safetensors").is_file() else None


def default_model_dir() -> Path:
    root = Path(os.environ.get("DGX_EMU_HOME", Path.home() / ".cache" / "dgx-emu"))
    return root / f"default-{VERSION}"


def random_state_dict(cfg: ModelConfig, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Every tensor of a Llama4ForCausalLM checkpoint of `cfg`, HF names, normal(0, std) (norms: 1)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in checkpoint_names(cfg):
        _, shape, _ = match(cfg, name)
        if "norm" in name:
            tensors[hf_name(name)] = torch.ones(shape)
        else:
            tensors[hf_name(name)] = torch.randn(shape, generator=gen) * std
    return tensors


def write_checkpoint(path: Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})


def ensure_default_model() -> Path:
    """Returns the default model's directory, building it first if it is not there yet."""
    target = default_model_dir()
    if (target / "COMPLETE").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        cfg = default_config()
        write_checkpoint(staging, cfg, random_state_dict(cfg, SEED, std=INIT_STD))
        byte_level_tokenizer().inner.save(str(staging / "tokenizer.json"))
        (staging / "COMPLETE").write_text(VERSION + "\n")
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "COMPLETE").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
