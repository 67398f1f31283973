"""The embedded default model: a small Llama 4 trained on Python's documentation, shipped in the repo.

model/assets/default-<VERSION>/ is a real Hugging Face checkpoint (config.json, model.safetensors
with HF tensor names in bf16, tokenizer.json) loaded through the same path as any other
checkpoint, so the default run exercises the real loader. Its shape keeps every feature of the
architecture (dense and MoE layers, RoPE and NoPE layers, chunked attention with a small chunk,
QK-norm, fewer KV heads than eight ranks) at a size that eight CPU actors on two cores decode
interactively (5.2M parameters, 10 MB).

It was trained by workers/train_target.py (next-byte prediction on the Python reference and the
docstrings of the standard library, numpy and torch; training.json holds the run: 4000 steps on
one H200, 1.29 bits per byte on held-out documents) so that its text, FP8's accuracy (perplexity,
greedy agreement) and speculative decoding's acceptance mean something. heldout.txt is the start
of its held-out documents, for perplexity and FP8 accuracy.

It ships with an EAGLE-3 draft (model/assets/eagle3-default-<VERSION>/, SafeAILab layout, bf16),
trained against exactly these weights by `dgx-emu train-draft --embedded`, so that `dgx-emu
generate` decodes speculatively out of the box; the draft records a fingerprint of the target's
weights and loading warns if they differ (output stays exact; only acceptance would drop).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.checkpoint import checkpoint_names, hf_name, match
from model.config import ModelConfig, tiny

VERSION = "v3"
ASSETS = Path(__file__).resolve().parent / "assets"


def default_config() -> ModelConfig:
    return tiny(vocab_size=512)


def default_draft_dir(must_exist: bool = True) -> Path | None:
    """The shipped EAGLE-3 draft of the default model (None if it is missing and must_exist)."""
    path = ASSETS / f"eagle3-default-{VERSION}"
    return path if not must_exist or (path / "model.safetensors").is_file() else None


def default_model_dir() -> Path:
    """The shipped checkpoint of the default model."""
    return ASSETS / f"default-{VERSION}"


def heldout_text() -> str:
    """Held-out documents of the default model's corpus (never trained on)."""
    return (default_model_dir() / "heldout.txt").read_text()


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
    """The default model's directory; a clear error if the package was installed without it."""
    path = default_model_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"the embedded default model is incomplete: {path / name} is missing "
                                    "(reinstall dgx-emu, or pass --model)")
    return path
