"""Reference checkpoints made by transformers itself, and helpers to load them into our model.

Test files import this module as `tests.hf_reference` (it is not a test file). Everything here is
deterministic: the same knobs and seed give the same checkpoint, and the global RNG is untouched.

Typical use::

    hf, path = make_hf_checkpoint(tmp_path / "ckpt", CONFIGS["moe_every_layer"], seed=0)
    ours = load_ours(path)                              # world of one, fp32
    ids = random_ids(20, hf.config.vocab_size, seed=1)
    want = hf_logits(hf, ids)                           # (1, T, V) from transformers
    got = ours_logits(ours, ids)                        # (1, T, V) from our model

For sharded runs, `load_ours(path, world_size=W, rank=r, comm=...)` builds and fills one rank's
shard (its logits are that rank's slice of the padded vocabulary). The CONFIGS shapes have 4
query heads, so W must be 1, 2 or 4 for them; pass other knobs for larger worlds.

Checkpoint layouts the loader must accept, all written by transformers or derived from its files:
`make_hf_checkpoint` (Llama4ForCausalLM, one file, or shards + model.safetensors.index.json with
max_shard_size), `make_multimodal_checkpoint` (the same tensors renamed language_model.*, a vision
tensor, and a Llama4Config config.json with text_config) and `make_hf_multimodal_checkpoint`
(a Llama4ForConditionalGeneration with a tiny vision tower, saved by transformers).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (GenerationConfig, Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration,
                          Llama4TextConfig, Llama4VisionConfig)

from collectives.communicator import Communicator, SingleRankCommunicator
from model.checkpoint import load_shard
from model.config import load_model_config
from model.llama4 import Llama4
from model.parallel import layout

# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------

#: Small Llama 4 text shape every named config starts from (HF `Llama4TextConfig` keyword names).
BASE_KNOBS: dict = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, intermediate_size=32, intermediate_size_mlp=48, num_local_experts=4, num_experts_per_tok=1,
    interleave_moe_layer_step=1, no_rope_layer_interval=2, attention_chunk_size=8, use_qk_norm=True,
    attn_temperature_tuning=True, floor_scale=4, attn_scale=0.1,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=512,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

#: llama3 frequency scaling whose bands all occur at head_dim 16 / theta 1e4: the shortest
#: wavelength (2*pi) is above high_wavelen (16/4 = 4), so the medium (smoothed) band and the
#: low-frequency (divided by `factor`) band are both populated.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

#: Named knob sets (overrides of BASE_KNOBS). Together they cover: MoE on every layer and on every
#: other layer; RoPE layers with chunked attention (chunk 6 or 8, shorter than the test prompts)
#: and NoPE layers; QK-norm on and off; top-1 and top-2 routing; tied and untied embeddings;
#: llama3 RoPE scaling and plain RoPE; attention-temperature tuning with a floor_scale small
#: enough to change the NoPE queries within a few tokens, and with tuning off; GQA, MQA and MHA.
CONFIGS: dict[str, dict] = {
    # MoE on all 4 layers, top-1, QK-norm, llama3 scaling, NoPE on layers 1 and 3, GQA 4:2.
    "moe_every_layer": dict(interleave_moe_layer_step=1, num_experts_per_tok=1, use_qk_norm=True,
                            rope_parameters=LLAMA3_ROPE, no_rope_layer_interval=2, floor_scale=4,
                            tie_word_embeddings=False),
    # MoE on layers 1, 3 (dense 0, 2, 4), top-2, no QK-norm, tied embeddings, plain RoPE,
    # NoPE on layer 2 only, MQA (one KV head), stronger temperature tuning.
    "moe_every_other_tied": dict(num_hidden_layers=5, interleave_moe_layer_step=2, num_experts_per_tok=2,
                                 use_qk_norm=False, tie_word_embeddings=True, no_rope_layer_interval=3,
                                 num_key_value_heads=1, floor_scale=2, attn_scale=0.25),
    # MoE on layers 1, 3, top-2, QK-norm, llama3 scaling, chunk 6, NoPE on layer 3, MHA,
    # temperature tuning off.
    "top2_qknorm_mha": dict(interleave_moe_layer_step=2, num_experts_per_tok=2, use_qk_norm=True,
                            rope_parameters=LLAMA3_ROPE, attention_chunk_size=6, no_rope_layer_interval=4,
                            num_key_value_heads=4, attn_temperature_tuning=False, num_local_experts=6),
}


def hf_text_config(knobs: dict | None = None) -> Llama4TextConfig:
    """A `Llama4TextConfig` from BASE_KNOBS updated with `knobs` (eager attention, fp32)."""
    kw = copy.deepcopy(BASE_KNOBS)
    kw.update(copy.deepcopy(knobs or {}))
    cfg = Llama4TextConfig(**kw)
    cfg._attn_implementation = "eager"
    return cfg


# ---------------------------------------------------------------------------------------------
# Building and saving the transformers reference
# ---------------------------------------------------------------------------------------------

def randomize_(model: torch.nn.Module, seed: int, std: float = 0.2, norm_std: float = 0.2) -> None:
    """Overwrites every parameter from a private seeded generator: weights ~ N(0, std), norm
    weights ~ 1 + N(0, norm_std) (so that a norm weight that is not loaded shows up).
    `std` is large enough that greedy decoding of a random model visits many distinct tokens."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name.split(".")[-2]:
                p.copy_(1.0 + norm_std * noise)
            else:
                p.copy_(std * noise)


def build_hf_model(knobs: dict | None = None, seed: int = 0, std: float = 0.2) -> Llama4ForCausalLM:
    """A random fp32 `Llama4ForCausalLM` (eval mode, eager attention) from BASE_KNOBS + knobs."""
    cfg = hf_text_config(knobs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Llama4ForCausalLM(cfg)
    model = model.float().eval()
    if cfg.tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    randomize_(model, seed, std)
    # Greedy generation that never stops on EOS (the tests compare fixed-length outputs).
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0,
                                               bos_token_id=cfg.bos_token_id)
    return model


def save_hf_checkpoint(model: Llama4ForCausalLM, path: str | Path, max_shard_size: str | int | None = None) -> Path:
    """`save_pretrained` as safetensors (sharded with an index when max_shard_size is small)."""
    path = Path(path)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), safe_serialization=True, **kwargs)
    return path


def make_hf_checkpoint(path: str | Path, knobs: dict | None = None, seed: int = 0, std: float = 0.2,
                       max_shard_size: str | int | None = None) -> tuple[Llama4ForCausalLM, Path]:
    """Builds a random reference model and saves it at `path`. Returns (model, path)."""
    model = build_hf_model(knobs, seed, std)
    return model, save_hf_checkpoint(model, path, max_shard_size)


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or sharded), by stored name."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Writes config.json and one model.safetensors (no index) into a fresh directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=False)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


def multimodal_config(text_config: Llama4TextConfig) -> dict:
    """A Llama4ForConditionalGeneration config.json dict (model_type "llama4", with text_config)."""
    full = Llama4Config(text_config=text_config.to_dict()).to_dict()
    full["architectures"] = ["Llama4ForConditionalGeneration"]
    assert full["model_type"] == "llama4" and full["text_config"]["model_type"] == "llama4_text"
    return full


def make_multimodal_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Re-saves the HF Llama4ForCausalLM checkpoint at `src` the way the multimodal model names
    it: `language_model.model.*`, `language_model.lm_head.weight`, plus vision tensors that the
    loader must ignore, with a config.json that nests the text config under "text_config"."""
    src = Path(src)
    renamed = {}
    for name, t in read_tensors(src).items():
        renamed["language_model." + name] = t
    renamed["vision_model.x.weight"] = torch.ones(3, 5)
    renamed["multi_modal_projector.linear_1.weight"] = torch.ones(2, 2)
    text = Llama4TextConfig(**json.loads((src / "config.json").read_text()))
    return write_tensors(dst, renamed, multimodal_config(text))


def tiny_vision_config() -> Llama4VisionConfig:
    """The smallest vision tower transformers accepts (its weights only need to exist on disk)."""
    return Llama4VisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                              vision_output_dim=16, image_size=28, patch_size=14, projector_input_dim=16,
                              projector_output_dim=16)


def make_hf_multimodal_checkpoint(path: str | Path, knobs: dict | None = None, seed: int = 0,
                                  std: float = 0.2) -> tuple[Llama4ForCausalLM, Path]:
    """A random `Llama4ForConditionalGeneration` (tiny vision tower) saved by transformers itself.
    Returns (its language model, a Llama4ForCausalLM to compare text logits against; path).
    The config is transformers' own Llama4Config: top-level tie_word_embeddings stays at its
    default (false) while text_config carries the knob, as transformers writes it."""
    text = hf_text_config(knobs)
    cfg = Llama4Config(text_config=text.to_dict(), vision_config=tiny_vision_config().to_dict())
    cfg.text_config._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        full = Llama4ForConditionalGeneration(cfg)
    full = full.float().eval()
    randomize_(full, seed, std)
    full.save_pretrained(str(path), safe_serialization=True)
    lm = full.language_model
    lm.config._attn_implementation = "eager"
    return lm, Path(path)


# ---------------------------------------------------------------------------------------------
# Our model
# ---------------------------------------------------------------------------------------------

def load_ours(path: str | Path, dtype: torch.dtype = torch.float32, *, world_size: int = 1, rank: int = 0,
              moe_mode: str = "tp", comm: Communicator | None = None) -> Llama4:
    """Reads config.json, builds one rank's shard of our Llama4 and fills it with load_shard.
    Defaults: a world of one on a SingleRankCommunicator (the full, unsharded model)."""
    cfg = load_model_config(path)
    shard = layout(cfg, world_size, rank, moe_mode)
    comm = comm if comm is not None else SingleRankCommunicator()
    model = Llama4(cfg, shard, comm).to(dtype)
    load_shard(model, Path(path))
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Running both
# ---------------------------------------------------------------------------------------------

def random_ids(n: int, vocab_size: int, seed: int, batch: int | None = None, low: int = 3) -> torch.Tensor:
    """Seeded token ids in [low, vocab_size) (skipping pad/bos/eos), shape (n,) or (batch, n)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n,) if batch is None else (batch, n)
    return torch.randint(low, vocab_size, shape, generator=gen)


@torch.no_grad()
def hf_logits(model: Llama4ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits (B, T, V) from transformers, no cache."""
    ids = ids if ids.dim() == 2 else ids[None]
    return model(input_ids=ids, use_cache=False).logits.float()


def ours_logits(model: Llama4, ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits (B, T, V) from our model, one forward into a fresh cache."""
    ids = ids if ids.dim() == 2 else ids[None]
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    return model(ids, cache).logits.float()


def ours_logits_stepwise(model: Llama4, ids: torch.Tensor, steps: list[int]) -> torch.Tensor:
    """Logits (1, T, V) from feeding `ids` (T,) in consecutive pieces of the given sizes into one
    cache: e.g. [5, 1, 1, ...] is a 5-token prefill followed by one-token decode steps."""
    ids = ids.reshape(-1)
    assert sum(steps) == ids.numel(), (steps, ids.numel())
    cache = model.new_cache(1, ids.numel())
    out, pos = [], 0
    for n in steps:
        out.append(model(ids[None, pos: pos + n], cache).logits.float())
        pos += n
        assert int(cache.lengths[0]) == pos
    return torch.cat(out, dim=1)


@torch.no_grad()
def hf_greedy(model: Llama4ForCausalLM, prompt: list[int] | tuple[int, ...], max_new_tokens: int,
              eos_token_id: int | list[int] | None = None) -> list[int]:
    """New token ids from transformers' greedy `generate` (stops only on `eos_token_id` if given)."""
    ids = torch.tensor([list(prompt)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


__all__ = ["BASE_KNOBS", "CONFIGS", "LLAMA3_ROPE", "hf_text_config", "randomize_", "build_hf_model",
           "save_hf_checkpoint", "make_hf_checkpoint", "read_tensors", "write_tensors", "multimodal_config",
           "make_multimodal_checkpoint", "tiny_vision_config",
           "make_hf_multimodal_checkpoint", "load_ours", "random_ids", "hf_logits", "ours_logits",
           "ours_logits_stepwise", "hf_greedy"]
