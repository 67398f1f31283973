"""The checkpoint-name table, and loading one rank's slices from safetensors.

One table (`RULES`) maps every Hugging Face Llama 4 tensor name to the parameter it fills, the
full shape the checkpoint must have, and how this rank cuts it (`Cut`). Each rank opens the
safetensors files lazily and reads only its own slices (`get_slice`), never the whole tensor.
Fused parameters (QKV, gate|up) are filled piecewise from several checkpoint tensors.

Accepted layouts: a single `model.safetensors`, or shards listed by `model.safetensors.index.json`;
names with the `model.` prefix (Llama4ForCausalLM) or `language_model.` (the multimodal
Llama4ForConditionalGeneration, whose vision tensors are ignored). Anything wrong (a missing
tensor, a shape or dtype the config does not predict, a truncated file, an index pointing to a
missing shard) raises CheckpointError naming the tensor or file, before any weight is used.
Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from model.config import ModelConfig
from model.parallel import ShardLayout

LOADABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IGNORED_PREFIXES = ("vision_model.", "multi_modal_projector.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as the config says (the message names the tensor/file)."""


@dataclass(frozen=True)
class Cut:
    """This rank's piece of one checkpoint tensor: which slice to read, where it lands."""

    src: tuple[slice, ...]
    dest: tuple[slice, ...]


def _all(ndim: int) -> tuple[slice, ...]:
    return (slice(None),) * ndim


def _replicated(s: ShardLayout, shape) -> Cut:
    return Cut(_all(len(shape)), _all(len(shape)))


def _vocab_rows(s: ShardLayout, shape) -> Cut:
    rows = s.vocab_valid_per_rank
    return Cut((slice(s.vocab_start, s.vocab_start + rows), slice(None)), (slice(0, rows), slice(None)))


def _heads(first: int, count: int, head_dim: int) -> slice:
    return slice(first * head_dim, (first + count) * head_dim)


def _q_rows(s: ShardLayout, shape) -> Cut:
    d = s.model.head_dim
    return Cut((_heads(s.head_start, s.n_heads_per_rank, d), slice(None)),
               (_heads(0, s.n_heads_per_rank, d), slice(None)))


def _kv_rows(part: int) -> Callable:
    def cut(s: ShardLayout, shape) -> Cut:
        d, first = s.model.head_dim, s.n_heads_per_rank + part * s.n_kv_heads_per_rank
        return Cut((_heads(s.kv_head_start, s.n_kv_heads_per_rank, d), slice(None)),
                   (_heads(first, s.n_kv_heads_per_rank, d), slice(None)))
    return cut


def _o_cols(s: ShardLayout, shape) -> Cut:
    d = s.model.head_dim
    return Cut((slice(None), _heads(s.head_start, s.n_heads_per_rank, d)), _all(2))


def _column(part: int, per_rank: Callable[[ShardLayout], int]) -> Callable:
    """Rows of this rank's column-parallel slice, landing in part `part` of a fused gate|up."""
    def cut(s: ShardLayout, shape) -> Cut:
        n = per_rank(s)
        return Cut((s.rank_slice(shape[0], n), slice(None)), (slice(part * n, (part + 1) * n), slice(None)))
    return cut


def _row(per_rank: Callable[[ShardLayout], int]) -> Callable:
    def cut(s: ShardLayout, shape) -> Cut:
        return Cut((slice(None), s.rank_slice(shape[1], per_rank(s))), _all(2))
    return cut


def _experts(s: ShardLayout) -> slice:
    return slice(s.expert_start, s.expert_start + s.experts_per_rank)


def _expert_gate_up(part: int) -> Callable:
    """gate_up [E, H, 2I] is gate | up on the last dim: read this rank's slice of each half."""
    def cut(s: ShardLayout, shape) -> Cut:
        n, full = s.expert_intermediate_per_rank, shape[2] // 2
        src_cols = slice(part * full + s.parallel.rank * n, part * full + (s.parallel.rank + 1) * n)
        if s.expert_parallel:
            src_cols = slice(part * full, (part + 1) * full)
        return Cut((_experts(s), slice(None), src_cols), (slice(None), slice(None), slice(part * n, (part + 1) * n)))
    return cut


def _expert_down(s: ShardLayout, shape) -> Cut:
    inter = slice(None) if s.expert_parallel else s.rank_slice(shape[1], s.expert_intermediate_per_rank)
    return Cut((_experts(s), inter, slice(None)), _all(3))


def _mlp(s: ShardLayout) -> int:
    return s.mlp_intermediate_per_rank


def _shared(s: ShardLayout) -> int:
    return s.shared_intermediate_per_rank


# (checkpoint name pattern, our parameter, full checkpoint shape, this rank's cut)
Rule = tuple[str, str, Callable[[ModelConfig], tuple[int, ...]], Callable]
L = r"layers\.(\d+)\."
RULES: list[Rule] = [
    (r"embed_tokens\.weight", "embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size), _vocab_rows),
    (r"lm_head\.weight", "lm_head.weight", lambda c: (c.vocab_size, c.hidden_size), _vocab_rows),
    (r"norm\.weight", "norm.weight", lambda c: (c.hidden_size,), _replicated),
    (L + r"(input_layernorm|post_attention_layernorm)\.weight", r"layers.\1.\2.weight",
     lambda c: (c.hidden_size,), _replicated),
    (L + r"self_attn\.q_proj\.weight", r"layers.\1.self_attn.qkv_proj.weight",
     lambda c: (c.n_heads * c.head_dim, c.hidden_size), _q_rows),
    (L + r"self_attn\.k_proj\.weight", r"layers.\1.self_attn.qkv_proj.weight",
     lambda c: (c.n_kv_heads * c.head_dim, c.hidden_size), _kv_rows(0)),
    (L + r"self_attn\.v_proj\.weight", r"layers.\1.self_attn.qkv_proj.weight",
     lambda c: (c.n_kv_heads * c.head_dim, c.hidden_size), _kv_rows(1)),
    (L + r"self_attn\.o_proj\.weight", r"layers.\1.self_attn.o_proj.weight",
     lambda c: (c.hidden_size, c.n_heads * c.head_dim), _o_cols),
    (L + r"feed_forward\.gate_proj\.weight", r"layers.\1.feed_forward.gate_up_proj.weight",
     lambda c: (c.intermediate_size_mlp, c.hidden_size), _column(0, _mlp)),
    (L + r"feed_forward\.up_proj\.weight", r"layers.\1.feed_forward.gate_up_proj.weight",
     lambda c: (c.intermediate_size_mlp, c.hidden_size), _column(1, _mlp)),
    (L + r"feed_forward\.down_proj\.weight", r"layers.\1.feed_forward.down_proj.weight",
     lambda c: (c.hidden_size, c.intermediate_size_mlp), _row(_mlp)),
    (L + r"feed_forward\.router\.weight", r"layers.\1.feed_forward.router.weight",
     lambda c: (c.n_experts, c.hidden_size), _replicated),
    (L + r"feed_forward\.shared_expert\.gate_proj\.weight", r"layers.\1.feed_forward.shared_expert.gate_up_proj.weight",
     lambda c: (c.intermediate_size, c.hidden_size), _column(0, _shared)),
    (L + r"feed_forward\.shared_expert\.up_proj\.weight", r"layers.\1.feed_forward.shared_expert.gate_up_proj.weight",
     lambda c: (c.intermediate_size, c.hidden_size), _column(1, _shared)),
    (L + r"feed_forward\.shared_expert\.down_proj\.weight", r"layers.\1.feed_forward.shared_expert.down_proj.weight",
     lambda c: (c.hidden_size, c.intermediate_size), _row(_shared)),
    (L + r"feed_forward\.experts\.gate_up_proj", r"layers.\1.feed_forward.experts.gate_up_proj",
     lambda c: (c.n_experts, c.hidden_size, 2 * c.intermediate_size), None),  # two cuts, see below
    (L + r"feed_forward\.experts\.down_proj", r"layers.\1.feed_forward.experts.down_proj",
     lambda c: (c.n_experts, c.intermediate_size, c.hidden_size), _expert_down),
]
_COMPILED = [(re.compile(p + r"$"), dest, shape, cut) for p, dest, shape, cut in RULES]


def canonical_name(name: str) -> str | None:
    """Strips `language_model.` / `model.` prefixes; None for tensors of other towers (vision)."""
    while True:
        for prefix in ("language_model.", "model."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        else:
            break
    return None if name.startswith(IGNORED_PREFIXES) else name


def checkpoint_names(cfg: ModelConfig) -> list[str]:
    """Every tensor a Llama4ForCausalLM checkpoint of this config holds, in canonical form."""
    names = ["embed_tokens.weight", "norm.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        if cfg.is_moe(i):
            names += [p + "feed_forward.router.weight", p + "feed_forward.experts.gate_up_proj",
                      p + "feed_forward.experts.down_proj"]
            names += [p + f"feed_forward.shared_expert.{x}_proj.weight" for x in ("gate", "up", "down")]
        else:
            names += [p + f"feed_forward.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names


def hf_name(canonical: str) -> str:
    """The name Llama4ForCausalLM's save_pretrained gives a canonical tensor."""
    return canonical if canonical.startswith("lm_head.") else "model." + canonical


def match(cfg: ModelConfig, name: str) -> tuple[str, tuple[int, ...], list[Callable]]:
    """(our parameter, expected full shape, cuts) for a canonical checkpoint name."""
    for pattern, dest, shape, cut in _COMPILED:
        m = pattern.match(name)
        if m:
            cuts = [_expert_gate_up(0), _expert_gate_up(1)] if cut is None else [cut]
            return m.expand(dest), tuple(shape(cfg)), cuts
    raise CheckpointError(f"unexpected tensor {name!r}: no Llama 4 parameter has this name")


def index_files(path: str | Path) -> dict[str, tuple[Path, str]]:
    """Canonical tensor name -> (safetensors file, name in that file), single file or sharded index."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e!r}") from None
        files = {}
        for shard_file in sorted(set(weight_map.values())):
            if not (path / shard_file).is_file():
                raise CheckpointError(f"{index} lists shard {shard_file!r}, which does not exist")
        for name, shard_file in weight_map.items():
            canon = canonical_name(name)
            if canon is not None:
                files[canon] = (path / shard_file, name)
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")
    try:
        with safe_open(str(single), framework="pt") as f:
            names = list(f.keys())
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise CheckpointError(f"{single} is not a readable safetensors file: {e}") from None
    return {canon: (single, n) for n in names if (canon := canonical_name(n)) is not None}


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
           "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool}


def load_shard(model: torch.nn.Module, path: str | Path, progress: Callable[[int, int], None] | None = None) -> int:
    """Fills `model` (built at this rank's shapes) with its slices of the checkpoint at `path`.
    Returns the number of checkpoint bytes read. Validates names, shapes, dtypes and values."""
    cfg: ModelConfig = model.cfg
    files = index_files(path)
    expected = checkpoint_names(cfg)
    missing = [n for n in expected if n not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint {path} is missing tensor {hf_name(missing[0])!r}{more}")
    wanted = set(expected)
    extra = [n for n in files if n not in wanted and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    for name in extra:
        match(cfg, name)  # raises for names that are not Llama 4 parameters at all
    if extra:
        raise CheckpointError(f"checkpoint {path} has tensor {extra[0]!r}, which this config does not use")
    params = dict(model.named_parameters())
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for canon in expected:
        file, stored = files[canon]
        by_file.setdefault(file, []).append((canon, stored))
    done, nbytes = 0, 0
    for file, names in by_file.items():
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as e:
            raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None
        with handle as f:
            for canon, stored in names:
                nbytes += _load_tensor(f, model.shard, params, canon, stored, file)
                done += 1
                if progress:
                    progress(done, len(expected))
    return nbytes


def _load_tensor(f, shard: ShardLayout, params: dict, canon: str, stored: str, file: Path) -> int:
    dest, shape, cuts = match(shard.model, canon)
    sl = f.get_slice(stored)
    got_shape, got_dtype = tuple(sl.get_shape()), _DTYPES.get(sl.get_dtype())
    if got_shape != shape:
        raise CheckpointError(f"tensor {stored!r} in {file.name} has shape {list(got_shape)}, "
                              f"the config expects {list(shape)}")
    if got_dtype not in LOADABLE_DTYPES:
        raise CheckpointError(f"tensor {stored!r} in {file.name} has dtype {sl.get_dtype()}, "
                              "expected F32, BF16 or F16")
    param = params[dest]
    nbytes = 0
    for cut_fn in cuts:
        cut = cut_fn(shard, shape)
        try:
            piece = sl[cut.src]
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {stored!r} from {file.name} (truncated?): {e}") from None
        if not bool(torch.isfinite(piece).all()):
            raise CheckpointError(f"tensor {stored!r} in {file.name} holds NaN or inf values")
        param.data[cut.dest].copy_(piece)
        nbytes += piece.numel() * piece.element_size()
    return nbytes
