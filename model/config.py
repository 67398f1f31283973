"""Frozen configuration dataclasses: what the model is, and how it is split.

`ModelConfig` is read from a Hugging Face Llama 4 `config.json` (either the multimodal
`Llama4ForConditionalGeneration` with a `text_config`, or a plain `llama4_text` config).
Every field that changes the math is read; a value this implementation does not support is
an error that names the field, never a silent default. Derived per-layer facts (which layers
are MoE, which use RoPE) are resolved once here so model code never re-derives them.

`ParallelConfig` says how one rank's shard is cut. Model code takes both at construction and
builds every module at its per-rank shape; nothing in `model/` reads a rank from anywhere else.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A configuration value that is missing, malformed or unsupported (the message names it)."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling (the only rope_scaling type Llama 4 uses)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int  # each routed expert and the shared expert
    intermediate_size_mlp: int  # dense (non-MoE) layers
    n_experts: int
    experts_per_token: int
    moe_layers: tuple[int, ...]
    rope_layers: tuple[bool, ...]  # True: RoPE + chunked local attention; False: NoPE, global
    attention_chunk_size: int | None
    use_qk_norm: bool
    attn_temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "llama4"

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                    "intermediate_size", "intermediate_size_mlp", "max_position_embeddings")
        for key in positive:
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"num_attention_heads ({self.n_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.n_kv_heads})")
        if self.moe_layers and not (1 <= self.experts_per_token <= self.n_experts):
            raise ConfigError(f"num_experts_per_tok ({self.experts_per_token}) must be in "
                              f"1..num_local_experts ({self.n_experts})")
        bad = [i for i in self.moe_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ConfigError(f"moe_layers has indices outside 0..{self.n_layers - 1}: {bad}")
        if len(self.rope_layers) != self.n_layers:
            raise ConfigError(f"no_rope_layers must have {self.n_layers} entries, got {len(self.rope_layers)}")
        if self.attention_chunk_size is not None and self.attention_chunk_size <= 0:
            raise ConfigError(f"attention_chunk_size must be positive, got {self.attention_chunk_size}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.floor_scale <= 0:
            raise ConfigError(f"floor_scale must be positive, got {self.floor_scale}")
        for tok in self.eos_token_ids + ((self.bos_token_id,) if self.bos_token_id is not None else ()):
            if not 0 <= tok < self.vocab_size:
                raise ConfigError(f"special token id {tok} is outside the vocabulary (size {self.vocab_size})")

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def n_params(self) -> int:
        """Total parameter count (all experts), as the checkpoint stores them."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.n_heads + 2 * self.n_kv_heads)
        per_layer = attn + 2 * h
        total = 0
        for layer in range(self.n_layers):
            if self.is_moe(layer):
                ffn = (self.n_experts + 1) * 3 * h * self.intermediate_size + h * self.n_experts
            else:
                ffn = 3 * h * self.intermediate_size_mlp
            total += per_layer + ffn
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total + embeddings + h

    def to_hf_dict(self) -> dict:
        """The `llama4_text` config.json that describes this model (round-trips through from_hf_dict)."""
        rope_params = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_params = {"rope_type": "llama3", "rope_theta": self.rope_theta,
                           **dataclasses.asdict(self.rope_scaling)}
        return {
            "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size, "intermediate_size_mlp": self.intermediate_size_mlp,
            "num_local_experts": self.n_experts, "num_experts_per_tok": self.experts_per_token,
            "moe_layers": list(self.moe_layers), "no_rope_layers": [int(r) for r in self.rope_layers],
            "attention_chunk_size": self.attention_chunk_size, "use_qk_norm": self.use_qk_norm,
            "attn_temperature_tuning": self.attn_temperature_tuning, "floor_scale": self.floor_scale,
            "attn_scale": self.attn_scale, "rope_parameters": rope_params, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings, "attention_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if self.eos_token_ids else None,
        }


@dataclass(frozen=True)
class ParallelConfig:
    """How one rank's shard is cut. `moe_mode` "tp" splits every expert's intermediate dimension
    across ranks (the record's min-latency layout); "ep" gives each rank whole experts."""

    world_size: int = 1
    rank: int = 0
    moe_mode: str = "tp"
    # every rank holds the whole embedding table (not its vocab slice): a decode step then embeds
    # without an all-reduce, for the table's bytes (Maverick: 2 GB bf16 a rank instead of 2 / world)
    replicate_embedding: bool = False

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside 0..{self.world_size - 1}")
        if self.moe_mode not in ("tp", "ep"):
            raise ConfigError(f"moe mode must be 'tp' or 'ep', got {self.moe_mode!r}")


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json -> ModelConfig
# ---------------------------------------------------------------------------------------------

_MISSING = object()


def _get(d: dict, key: str, default=_MISSING, kind=None):
    """d[key] converted by `kind` (int, float, bool); a missing key gives `default` (or an error if
    there is none). A value `kind` cannot take is an error that names the field."""
    value = d.get(key)
    if value is None:
        if default is _MISSING:
            raise ConfigError(f"config field {key!r} is required")
        return default
    if kind is None:
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config field {key!r} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ConfigError(f"config field {key!r} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _int_list(d: dict, key: str, default: list[int]) -> list[int]:
    value = d.get(key) or default
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"config field {key!r} must be a list of integers, got {value!r}")
    return value


def _rope_from_hf(d: dict) -> tuple[float, RopeScaling | None]:
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"rope_scaling must be an object, got {params!r}")
    theta = _get(params, "rope_theta", _get(d, "rope_theta", 500000.0, float), float)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(f"rope_scaling type {rope_type!r} is not supported (only 'llama3' or none)")
    scaling = RopeScaling(*(_get(params, k, kind=float) for k in ("factor", "low_freq_factor", "high_freq_factor")),
                          _get(params, "original_max_position_embeddings", kind=int))
    return theta, scaling


MAX_LAYERS = 1024  # decoder layers a config may declare (Llama 3.1 405B, the deepest Llama, has 126)


def from_hf_dict(raw: dict, name: str = "llama4") -> ModelConfig:
    """Reads a HF `Llama4Config` (with text_config) or `Llama4TextConfig` dict. Missing optional
    fields take transformers' Llama4TextConfig defaults, except the size defaults (KV heads,
    head_dim) which follow from the other sizes."""
    if not isinstance(raw, dict):
        raise ConfigError("config.json must hold a JSON object")
    d = raw.get("text_config", raw) if raw.get("model_type") != "llama4_text" else raw
    if not isinstance(d, dict):
        raise ConfigError("text_config must be a JSON object")
    model_type = d.get("model_type", "llama4_text")
    if model_type != "llama4_text":
        raise ConfigError(f"model_type {model_type!r} is not a Llama 4 text model (expected 'llama4_text')")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported (only 'silu')")
    if d.get("attention_bias", False):
        raise ConfigError("attention_bias=true is not supported (Llama 4 has no attention biases)")
    n_layers = _get(d, "num_hidden_layers", kind=int)
    if n_layers > MAX_LAYERS:  # refused before the per-layer lists below are built (2**40 layers: terabytes)
        raise ConfigError(f"num_hidden_layers {n_layers} is more than {MAX_LAYERS}")
    n_heads = _get(d, "num_attention_heads", kind=int)
    hidden = _get(d, "hidden_size", kind=int)
    step = _get(d, "interleave_moe_layer_step", 1, int)
    if step < 1:
        raise ConfigError(f"interleave_moe_layer_step must be >= 1, got {step}")
    moe_layers = _int_list(d, "moe_layers", list(range(step - 1, n_layers, step)))
    interval = _get(d, "no_rope_layer_interval", 4, int)
    if interval < 1:
        raise ConfigError(f"no_rope_layer_interval must be >= 1, got {interval}")
    no_rope = _int_list(d, "no_rope_layers", [int((i + 1) % interval != 0) for i in range(n_layers)])
    if len(no_rope) < n_layers:
        raise ConfigError(f"no_rope_layers has {len(no_rope)} entries for {n_layers} layers")
    theta, scaling = _rope_from_hf(d)
    eos = d.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if not all(isinstance(e, int) for e in eos_ids):
        raise ConfigError(f"config field 'eos_token_id' must be an integer or a list of integers, got {eos!r}")
    # transformers reads tying from text_config; the top level only when text_config says nothing
    tie = d["tie_word_embeddings"] if "tie_word_embeddings" in d else raw.get("tie_word_embeddings", False)
    return ModelConfig(
        vocab_size=_get(d, "vocab_size", kind=int), hidden_size=hidden, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=_get(d, "num_key_value_heads", n_heads, int),
        head_dim=_get(d, "head_dim", hidden // n_heads, int),
        intermediate_size=_get(d, "intermediate_size", kind=int),
        intermediate_size_mlp=_get(d, "intermediate_size_mlp", 16384, int),
        n_experts=_get(d, "num_local_experts", 16, int), experts_per_token=_get(d, "num_experts_per_tok", 1, int),
        moe_layers=tuple(moe_layers), rope_layers=tuple(bool(r) for r in no_rope[:n_layers]),
        # an absent key means transformers' default (8192); an explicit null means no chunking
        attention_chunk_size=_get(d, "attention_chunk_size", None, int) if "attention_chunk_size" in d else 8192,
        use_qk_norm=_get(d, "use_qk_norm", True, bool),
        attn_temperature_tuning=_get(d, "attn_temperature_tuning", True, bool),
        floor_scale=_get(d, "floor_scale", 8192.0, float), attn_scale=_get(d, "attn_scale", 0.1, float),
        rope_theta=theta, rope_scaling=scaling, rms_norm_eps=_get(d, "rms_norm_eps", 1e-5, float),
        tie_word_embeddings=bool(tie), max_position_embeddings=_get(d, "max_position_embeddings", 4096 * 32, int),
        bos_token_id=_get(d, "bos_token_id", None, int), eos_token_ids=tuple(eos_ids), name=name,
    )


def load_model_config(path: str | Path) -> ModelConfig:
    """Reads `config.json` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"no config.json at {file}")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    try:
        return from_hf_dict(raw, name=path.name if path.is_dir() else path.parent.name)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise ConfigError(f"{file}: {e}") from None
        raise ConfigError(f"{file}: malformed value: {e}") from None


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

def _llama4_shape(n_experts: int, step: int, qk_norm: bool, scaling: RopeScaling | None,
                  n_layers: int = 48, name: str = "") -> ModelConfig:
    return ModelConfig(
        vocab_size=202048, hidden_size=5120, n_layers=n_layers, n_heads=40, n_kv_heads=8, head_dim=128,
        intermediate_size=8192, intermediate_size_mlp=16384, n_experts=n_experts, experts_per_token=1,
        moe_layers=tuple(range(step - 1, n_layers, step)),
        rope_layers=tuple((i + 1) % 4 != 0 for i in range(n_layers)), attention_chunk_size=8192,
        use_qk_norm=qk_norm, attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1,
        rope_theta=500000.0, rope_scaling=scaling, rms_norm_eps=1e-5, tie_word_embeddings=False,
        max_position_embeddings=1048576, bos_token_id=200000, eos_token_ids=(200001, 200007, 200008),
        name=name,
    )


def maverick(n_layers: int = 48) -> ModelConfig:
    """Llama-4-Maverick-17B-128E: 128 experts on every other layer, no QK-norm."""
    return _llama4_shape(128, 2, False, None, n_layers, "maverick")


def scout(n_layers: int = 48) -> ModelConfig:
    """Llama-4-Scout-17B-16E: 16 experts on every layer, QK-norm, llama3 RoPE scaling."""
    return _llama4_shape(16, 1, True, RopeScaling(16.0, 1.0, 1.0, 8192), n_layers, "scout")


def tiny(vocab_size: int = 512) -> ModelConfig:
    """A test shape that still has every feature: dense + MoE layers, RoPE + NoPE layers, chunked
    attention with a small chunk, QK-norm, GQA with fewer KV heads than 8 ranks."""
    n_layers = 4
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=256, n_layers=n_layers, n_heads=8, n_kv_heads=2, head_dim=32,
        intermediate_size=256, intermediate_size_mlp=512, n_experts=8, experts_per_token=1,
        moe_layers=(1, 3), rope_layers=tuple((i + 1) % 4 != 0 for i in range(n_layers)),
        attention_chunk_size=64, use_qk_norm=True, attn_temperature_tuning=True, floor_scale=32,
        attn_scale=0.1, rope_theta=500000.0, rope_scaling=RopeScaling(16.0, 1.0, 4.0, 64),
        rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=4096,
        bos_token_id=0, eos_token_ids=(1, 2), name="tiny",
    )


def medium() -> ModelConfig:
    """A mid-size shape (~1.1B parameters, 8 layers) for benchmarks on one or a few GPUs, with the
    same mix of features as Maverick: MoE on every other layer, NoPE every fourth, chunked attention."""
    n_layers = 8
    return ModelConfig(
        vocab_size=32768, hidden_size=2048, n_layers=n_layers, n_heads=16, n_kv_heads=8, head_dim=128,
        intermediate_size=2048, intermediate_size_mlp=4096, n_experts=16, experts_per_token=1,
        moe_layers=tuple(range(1, n_layers, 2)), rope_layers=tuple((i + 1) % 4 != 0 for i in range(n_layers)),
        attention_chunk_size=8192, use_qk_norm=False, attn_temperature_tuning=True, floor_scale=8192,
        attn_scale=0.1, rope_theta=500000.0, rope_scaling=None, rms_norm_eps=1e-5, tie_word_embeddings=False,
        max_position_embeddings=131072, bos_token_id=0, eos_token_ids=(1,), name="medium",
    )


PRESETS = {"maverick": maverick, "scout": scout, "tiny": tiny, "medium": medium}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["ConfigError", "ModelConfig", "ParallelConfig", "RopeScaling", "from_hf_dict", "load_model_config",
           "maverick", "scout", "tiny", "medium", "preset", "PRESETS", "ceil_div"]
