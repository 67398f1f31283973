"""The checkpoint-name table: which checkpoint tensor fills which parameter, and how a rank cuts it.

One table (`RULES`) maps every Hugging Face Llama 4 tensor name to the parameter it fills, the
full shape the checkpoint must have, and how this rank cuts it (`Cut`). Fused parameters (QKV,
gate|up) are filled piecewise from several checkpoint tensors. model/loading.py reads the slices
(and is re-exported here as `load_shard`).

FP8 (model/fp8_checkpoint.py describes the formats): the table also names the per-expert tensors
quantized checkpoints use (`experts.{e}.gate_proj.weight`, (out, in) each, landing transposed in
the fused (E, in, out) parameter), the KV-cache scales, and the scale suffixes: `X.weight_scale`,
`X.weight_scale_inv` and `X.input_scale` belong to checkpoint tensor `X.weight` and are cut the
way it is cut.

EAGLE-3 drafts: a second rule list (`DRAFT_RULES`) maps SafeAILab (`midlayer.*`, `fc`, `d2t`,
`t2d`) and ModelOpt (`layers.0.*`) draft names onto model/eagle3.py's parameters with the same
`Cut` helpers; model/eagle3_checkpoint.py reads a draft with it.

Accepted layouts: a single `model.safetensors`, or shards listed by `model.safetensors.index.json`;
names with the `model.` prefix (Llama4ForCausalLM) or `language_model.` (the multimodal
Llama4ForConditionalGeneration, whose vision tensors are ignored). Anything wrong (a missing
tensor, a shape or dtype the config does not predict, a truncated file, an index pointing to a
missing shard) raises CheckpointError naming the tensor or file, before any weight is used.
Nothing is ever unpickled.
"""
from __future__ import annotations

import functools
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
    dest: tuple  # slices (an int picks one expert)
    transpose: bool = False  # the piece lands transposed: (out, in) checkpoint -> (in, out) parameter


def _all(ndim: int) -> tuple[slice, ...]:
    return (slice(None),) * ndim


def _replicated(s: ShardLayout, shape) -> Cut:
    return Cut(_all(len(shape)), _all(len(shape)))


def _embedding_rows(s: ShardLayout, shape) -> Cut:
    """The embedding: this rank's vocab rows, or every row where ShardLayout.embedding_replicated."""
    return _replicated(s, shape) if s.embedding_replicated else _vocab_rows(s, shape)


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


def _expert_linear(part: int | None) -> Callable:
    """One expert's (out, in) Linear weight, as quantized checkpoints store experts: gate (part 0)
    and up (1) land in gate_up (E, H, 2I), down (None) in down (E, I, H); None if not held here."""
    def cut(s: ShardLayout, shape, expert: int) -> Cut | None:
        local = expert - s.expert_start
        if not 0 <= local < s.experts_per_rank:
            return None
        n, whole = s.expert_intermediate_per_rank, slice(None)
        if part is None:  # (H, I): this rank's input columns
            cols = whole if s.expert_parallel else s.rank_slice(shape[1], n)
            return Cut((whole, cols), (local, whole, whole), transpose=True)
        rows = whole if s.expert_parallel else s.rank_slice(shape[0], n)  # (I, H): this rank's rows
        return Cut((rows, whole), (local, whole, slice(part * n, (part + 1) * n)), transpose=True)
    return cut


def _mlp(s: ShardLayout) -> int:
    return s.mlp_intermediate_per_rank


def _shared(s: ShardLayout) -> int:
    return s.shared_intermediate_per_rank


# (checkpoint name pattern, our parameter, full checkpoint shape, this rank's cut)
Rule = tuple[str, str, Callable[[ModelConfig], tuple[int, ...]], Callable]
L = r"layers\.(\d+)\."
RULES: list[Rule] = [
    (r"embed_tokens\.weight", "embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size), _embedding_rows),
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
    # quantized checkpoints: one Linear per expert (named group "expert" picks the expert)
    (L + r"feed_forward\.experts\.(?P<expert>\d+)\.gate_proj\.weight", r"layers.\1.feed_forward.experts.gate_up_proj",
     lambda c: (c.intermediate_size, c.hidden_size), _expert_linear(0)),
    (L + r"feed_forward\.experts\.(?P<expert>\d+)\.up_proj\.weight", r"layers.\1.feed_forward.experts.gate_up_proj",
     lambda c: (c.intermediate_size, c.hidden_size), _expert_linear(1)),
    (L + r"feed_forward\.experts\.(?P<expert>\d+)\.down_proj\.weight", r"layers.\1.feed_forward.experts.down_proj",
     lambda c: (c.hidden_size, c.intermediate_size), _expert_linear(None)),
    # FP8 KV-cache scales (ModelOpt: self_attn.k_scale; vLLM also reads k_proj.k_scale / attn.k_scale)
    (L + r"self_attn\.(?:k_proj\.|attn\.)?k_scale", r"layers.\1.self_attn.k_scale", lambda c: (), _replicated),
    (L + r"self_attn\.(?:v_proj\.|attn\.)?v_scale", r"layers.\1.self_attn.v_scale", lambda c: (), _replicated),
]
# `X.<suffix>` is a scale of checkpoint tensor `X.weight`; it lands in the scale parameter next to
# X.weight's destination (ours: `m.weight` -> `m.weight_scale` / `m.input_scale`; fused experts:
# `gate_up_proj` -> `gate_up_proj_scale` / `gate_up_proj_input_scale`).
SCALE_SUFFIXES = {"weight_scale": "weight", "weight_scale_inv": "weight", "input_scale": "input"}
_COMPILED = [(re.compile(p + r"$"), dest, shape, cut) for p, dest, shape, cut in RULES]
_PER_EXPERT = re.compile(L + r"feed_forward\.experts\.\d+\.")
_KV_SCALE = re.compile(L + r"self_attn\.(?:[kv]_proj\.|attn\.)?[kv]_scale$")


# --- EAGLE-3 draft heads (model/eagle3.py), the second rule list of this table -----------------
# SafeAILab names the decoder layer `midlayer.*`, ModelOpt exports `layers.0.*`; both land in our
# `midlayer.*`. Shapes come from the draft's Eagle3Config, cuts from the draft's ShardLayout (its
# heads, MLP and DRAFT vocabulary split like the target's). d2t (target = draft + d2t[draft]) and
# the t2d membership mask are replicated index tables, not weights.
def _fc_cols(s: ShardLayout, shape) -> Cut:
    """fc (H, n_aux*H_t) is row-parallel: this rank's contiguous block of input columns."""
    return Cut((slice(None), s.rank_slice(shape[1], shape[1] // s.parallel.world_size)), _all(2))


D = r"(?:midlayer|layers\.0)\."
DRAFT_RULES: list[Rule] = [
    (r"fc\.weight", "fc.weight", lambda d: (d.hidden_size, d.n_aux * d.target_hidden_size), _fc_cols),
    (D + r"self_attn\.q_proj\.weight", "midlayer.self_attn.qkv_proj.weight",
     lambda d: (d.n_heads * d.head_dim, 2 * d.hidden_size), _q_rows),
    (D + r"self_attn\.k_proj\.weight", "midlayer.self_attn.qkv_proj.weight",
     lambda d: (d.n_kv_heads * d.head_dim, 2 * d.hidden_size), _kv_rows(0)),
    (D + r"self_attn\.v_proj\.weight", "midlayer.self_attn.qkv_proj.weight",
     lambda d: (d.n_kv_heads * d.head_dim, 2 * d.hidden_size), _kv_rows(1)),
    (D + r"self_attn\.o_proj\.weight", "midlayer.self_attn.o_proj.weight",
     lambda d: (d.hidden_size, d.n_heads * d.head_dim), _o_cols),
    (D + r"mlp\.gate_proj\.weight", "midlayer.mlp.gate_up_proj.weight",
     lambda d: (d.intermediate_size, d.hidden_size), _column(0, _mlp)),
    (D + r"mlp\.up_proj\.weight", "midlayer.mlp.gate_up_proj.weight",
     lambda d: (d.intermediate_size, d.hidden_size), _column(1, _mlp)),
    (D + r"mlp\.down_proj\.weight", "midlayer.mlp.down_proj.weight",
     lambda d: (d.hidden_size, d.intermediate_size), _row(_mlp)),
    (D + r"(hidden_norm|input_layernorm|post_attention_layernorm)\.weight", r"midlayer.\1.weight",
     lambda d: (d.hidden_size,), _replicated),
    (r"norm\.weight", "norm.weight", lambda d: (d.hidden_size,), _replicated),
    (r"lm_head\.weight", "lm_head.weight", lambda d: (d.draft_vocab_size, d.hidden_size), _vocab_rows),
    (r"d2t", "d2t", lambda d: (d.draft_vocab_size,), _replicated),
    (r"t2d", "t2d", lambda d: (d.vocab_size,), _replicated),
]
_DRAFT_COMPILED = [(re.compile(p + r"$"), dest, shape, cut) for p, dest, shape, cut in DRAFT_RULES]
DRAFT_IGNORED = re.compile(r"(embed_tokens\.weight|.*rotary_emb\.inv_freq)$")  # the target's embedding is used
DRAFT_INDEX_TABLES = {"d2t": (torch.int64, torch.int32), "t2d": (torch.bool,)}


def draft_checkpoint_names(layer_prefix: str = "midlayer.", lm_head: bool = True) -> list[str]:
    """The tensors of an EAGLE-3 draft checkpoint (SafeAILab: "midlayer.", ModelOpt: "layers.0.")."""
    names = ["fc.weight", "norm.weight"] + (["lm_head.weight", "d2t", "t2d"] if lm_head else [])
    names += [layer_prefix + f"self_attn.{x}_proj.weight" for x in "qkvo"]
    names += [layer_prefix + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names + [layer_prefix + f"{n}.weight" for n in ("hidden_norm", "input_layernorm", "post_attention_layernorm")]


def match_draft(cfg, name: str) -> tuple[str, tuple[int, ...], list[Callable]]:
    """(our draft parameter, expected full shape, cuts) for a draft checkpoint name; cfg: Eagle3Config."""
    for pattern, dest, shape, cut in _DRAFT_COMPILED:
        m = pattern.match(name)
        if m:
            return m.expand(dest), tuple(shape(cfg)), [cut]
    raise CheckpointError(f"unexpected tensor {name!r}: no EAGLE-3 draft parameter has this name")


def split_scale_name(name: str) -> tuple[str, str] | None:
    """"X.weight_scale" -> ("X.weight", "weight_scale"); None if `name` is not a scale."""
    base, _, suffix = name.rpartition(".")
    return (base + ".weight", suffix) if suffix in SCALE_SUFFIXES and base else None


def scale_param(weight_param: str, kind: str) -> str:
    """Our scale parameter for a weight parameter: kind "weight" or "input"."""
    if weight_param.endswith(".weight"):
        return weight_param[: -len("weight")] + ("weight_scale" if kind == "weight" else "input_scale")
    return weight_param + ("_scale" if kind == "weight" else "_input_scale")


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


def checkpoint_names(cfg: ModelConfig, per_expert: bool = False) -> list[str]:
    """Every weight a Llama4ForCausalLM checkpoint of this config holds, in canonical form (routed
    experts fused as HF saves them, or one Linear per expert as quantized checkpoints store them)."""
    names = ["embed_tokens.weight", "norm.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        if cfg.is_moe(i):
            names.append(p + "feed_forward.router.weight")
            if per_expert:
                names += [p + f"feed_forward.experts.{e}.{x}_proj.weight"
                          for e in range(cfg.n_experts) for x in ("gate", "up", "down")]
            else:
                names += [p + "feed_forward.experts.gate_up_proj", p + "feed_forward.experts.down_proj"]
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
            if "expert" in m.groupdict():
                expert = int(m.group("expert"))
                if expert >= cfg.n_experts:
                    raise CheckpointError(f"tensor {name!r} names expert {expert}, the config has {cfg.n_experts}")
                cuts = [functools.partial(c, expert=expert) for c in cuts]
            return m.expand(dest), tuple(shape(cfg)), cuts
    raise CheckpointError(f"unexpected tensor {name!r}: no Llama 4 parameter has this name")


def export_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An unsharded (world size 1) high-precision model's weights under Hugging Face names: the
    table read backwards (every cut of every checkpoint tensor copied out of its parameter), so a
    trained model saves exactly what load_shard reads back."""
    shard: ShardLayout = model.shard
    if shard.parallel.world_size != 1:
        raise ValueError("export_state_dict needs the unsharded model (world size 1)")
    params = dict(model.named_parameters())
    out = {}
    for name in checkpoint_names(model.cfg):
        dest, shape, cuts = match(model.cfg, name)
        param = params[dest].detach()
        full = torch.empty(shape, dtype=param.dtype, device=param.device)
        for cut in cuts:
            piece = cut(shard, shape)
            value = param[piece.dest]
            full[piece.src] = value.transpose(-1, -2) if piece.transpose else value
        out[hf_name(name)] = full.cpu()
    return out


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


# The loader builds on this table; it lives in model/loading.py and is re-exported here, where
# callers find it.
from model.loading import check_fp8_scales, load_shard  # noqa: E402,F401
