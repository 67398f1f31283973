"""EAGLE-3 draft checkpoints: reading one rank's slices with the draft rules of model/checkpoint.py,
writing the SafeAILab layout, and fingerprinting the target a draft was trained against.

Two published layouts load:
  * SafeAILab: `midlayer.*`, `fc`, `norm`, `lm_head`, `d2t`, `t2d`; config.json keys
    `draft_vocab_size`, `target_hidden_size` (layer ids: the reference rule, unless named).
  * ModelOpt export: `layers.0.*` for the layer; `lm_head` and `d2t` may be missing (then the
    draft drafts over the full vocabulary with the TARGET's LM head); `eagle_aux_hidden_state_layer_ids`
    (output convention) at the top level or under `eagle_config`.
`t2d` is redundant with `d2t` (it is derived when absent and checked when present). A stored
`embed_tokens.weight` is ignored: the draft embeds with the target's embedding. Only safetensors
and JSON are read; a `pytorch_model.bin` (a pickle) is refused with a message saying so.

The fingerprint is a SHA-256 over every tensor's name, dtype, shape and first 64 KiB: cheap at any
scale, and enough to tell the weights a draft was trained against from others. A draft whose
config records a fingerprint that the target does not match still works (speculative decoding is
lossless whatever the draft), but its acceptance will be poor, so loading warns.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.checkpoint import (_DTYPES, DRAFT_IGNORED, DRAFT_INDEX_TABLES, LOADABLE_DTYPES, CheckpointError,
                              index_files, match_draft)
from model.config import ConfigError, ModelConfig
from model.eagle3 import Eagle3Config, Eagle3Draft, SharedTargetParts, check_against_target, draft_layout

FINGERPRINT_BYTES = 64 * 1024


def draft_files(path: str | Path) -> dict[str, tuple[Path, str]]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"EAGLE-3 draft path {path} is not a directory")
    if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file() \
            and (path / "pytorch_model.bin").is_file():
        raise CheckpointError(f"draft {path} has only pytorch_model.bin, a pickle, which dgx-emu never loads; "
                              "convert it to model.safetensors")
    return {name: where for name, where in index_files(path).items() if not DRAFT_IGNORED.match(name)}


def read_draft_config(path: str | Path, target: ModelConfig | None = None) -> Eagle3Config:
    """The draft's Eagle3Config from config.json and its tensor names, checked against `target`."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"EAGLE-3 draft path {path} does not exist or is not a directory")
    file = path / "config.json"
    if not file.is_file():
        raise ConfigError(f"no config.json in EAGLE-3 draft directory {path}")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    try:
        cfg = Eagle3Config.from_hf_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    names = draft_files(path)
    if not any(n.startswith(("midlayer.", "layers.0.")) for n in names):
        raise CheckpointError(f"{path} holds no EAGLE-3 draft layer (neither midlayer.* nor layers.0.* tensors)")
    cfg = dataclasses.replace(cfg, has_lm_head="lm_head.weight" in names)
    if cfg.has_lm_head and cfg.draft_vocab_size < cfg.vocab_size and "d2t" not in names:
        raise CheckpointError(f"draft {path} has a {cfg.draft_vocab_size}-token lm_head but no d2t to map it to "
                              f"the {cfg.vocab_size}-token target vocabulary")
    if target is not None:
        check_against_target(cfg, target)
    return cfg


def load_draft_shard(draft: Eagle3Draft, path: str | Path) -> int:
    """Fills `draft` (built at this rank's shapes) with its slices; returns the bytes read."""
    cfg, files = draft.cfg, draft_files(path)
    prefix = "midlayer." if any(n.startswith("midlayer.") for n in files) else "layers.0."
    required = {"fc.weight", "norm.weight"}
    required |= {prefix + f"self_attn.{x}_proj.weight" for x in "qkvo"}
    required |= {prefix + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
    required |= {prefix + f"{n}.weight" for n in ("hidden_norm", "input_layernorm", "post_attention_layernorm")}
    missing = sorted(required - set(files))
    if missing:
        raise CheckpointError(f"EAGLE-3 draft {path} is missing tensor {missing[0]!r}")
    owned = {**dict(draft.named_parameters()), **dict(draft.named_buffers())}
    nbytes = 0
    for name in sorted(files):
        if not name.startswith(prefix) and name.startswith(("midlayer.", "layers.0.")):
            raise CheckpointError(f"draft {path} mixes midlayer.* and layers.0.* names ({name!r})")
        dest, shape, cuts = match_draft(cfg, name)
        file, stored = files[name]
        with safe_open(str(file), framework="pt") as f:
            sl = f.get_slice(stored)
            got, dtype = tuple(sl.get_shape()), _DTYPES.get(sl.get_dtype())
            if got != shape:
                raise CheckpointError(f"draft tensor {stored!r} has shape {list(got)}, "
                                      f"the draft config expects {list(shape)}")
            allowed = DRAFT_INDEX_TABLES.get(name, LOADABLE_DTYPES)
            if dtype not in allowed:
                raise CheckpointError(f"draft tensor {stored!r} has dtype {sl.get_dtype()}, expected one of "
                                      f"{[str(a).replace('torch.', '') for a in allowed]}")
            for cut in (c(draft.shard, shape) for c in cuts):
                piece = sl[cut.src]
                if piece.is_floating_point() and not bool(torch.isfinite(piece).all()):
                    raise CheckpointError(f"draft tensor {stored!r} holds NaN or inf values")
                owned[dest].data[cut.dest].copy_(piece)
                nbytes += piece.numel() * piece.element_size()
    _check_vocab_map(draft, "t2d" in files, path)
    draft.forget_kernel_copies()  # written through .data, which moves no version counter
    return nbytes


def load_draft(path: str | Path, target, kernels: str | None = None) -> tuple[Eagle3Draft, int]:
    """Builds this rank's shard of the draft at `path` beside `target` (a Llama4: same ranks,
    communicator, device and dtype) and reads its slices. kernels: "torch" / "triton", default the
    target's. Returns (draft, bytes read)."""
    cfg = read_draft_config(path, target.cfg)
    shard = draft_layout(cfg, target.shard.parallel.world_size, target.shard.parallel.rank)
    weight = target.embed_tokens.weight
    shared = SharedTargetParts(target.embed_tokens, None if cfg.has_lm_head else target.lm_head_weight())
    with torch.device(weight.device):
        draft = Eagle3Draft(cfg, shard, target.comm, shared, kernels or target.kernels).to(weight.dtype)
    return draft.eval(), load_draft_shard(draft, path)


def _check_vocab_map(draft: Eagle3Draft, has_t2d: bool, path) -> None:
    """d2t must map the draft vocabulary onto distinct target ids; t2d must agree with it."""
    target_ids = draft.to_target_ids(torch.arange(draft.cfg.draft_vocab_size, device=draft.d2t.device))
    if bool((target_ids < 0).any() | (target_ids >= draft.cfg.vocab_size).any()):
        raise CheckpointError(f"draft {path}: d2t maps a draft token outside the target vocabulary")
    if len(torch.unique(target_ids)) != len(target_ids):
        raise CheckpointError(f"draft {path}: d2t maps two draft tokens to the same target token")
    membership = torch.zeros_like(draft.t2d)
    membership[target_ids] = True
    if has_t2d and not torch.equal(membership, draft.t2d):
        raise CheckpointError(f"draft {path}: t2d disagrees with d2t")
    draft.t2d.copy_(membership)


def save_draft(path: str | Path, cfg: Eagle3Config, tensors: dict[str, torch.Tensor], extra: dict | None = None,
               dtype: torch.dtype = torch.bfloat16) -> None:
    """Writes config.json and model.safetensors in the SafeAILab layout (floats stored as `dtype`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    stored = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(stored, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**cfg.to_hf_dict(), **(extra or {})}, indent=2) + "\n")


def checkpoint_tensors(draft: Eagle3Draft, layer_prefix: str = "midlayer.") -> dict[str, torch.Tensor]:
    """An unsharded (world size 1) draft's weights under checkpoint names: fused QKV and gate|up
    split back into q/k/v and gate/up. layer_prefix "layers.0." gives ModelOpt's names."""
    if draft.shard.parallel.world_size != 1:
        raise ValueError("checkpoint_tensors needs the unsharded draft (world size 1)")
    cfg, layer = draft.cfg, draft.midlayer
    q, k, v = layer.self_attn.qkv_proj.weight.detach().split(
        [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim])
    gate, up = layer.mlp.gate_up_proj.weight.detach().chunk(2)
    tensors = {"fc.weight": draft.fc.weight, "norm.weight": draft.norm.weight,
               "self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
               "self_attn.o_proj.weight": layer.self_attn.o_proj.weight, "mlp.gate_proj.weight": gate,
               "mlp.up_proj.weight": up, "mlp.down_proj.weight": layer.mlp.down_proj.weight,
               **{f"{n}.weight": getattr(layer, n).weight
                  for n in ("hidden_norm", "input_layernorm", "post_attention_layernorm")}}
    out = {(name if name in ("fc.weight", "norm.weight") else layer_prefix + name): t.detach().clone()
           for name, t in tensors.items()}
    if draft.lm_head is not None:
        out.update({"lm_head.weight": draft.lm_head.weight.detach().clone(), "d2t": draft.d2t.clone(),
                    "t2d": draft.t2d.clone()})
    return out


def target_fingerprint(path: str | Path) -> str:
    """SHA-256 over (name, dtype, shape, first 64 KiB) of every tensor of a safetensors checkpoint."""
    digest = hashlib.sha256()
    entries = []
    for file in sorted({file for file, _ in index_files(path).values()}):
        with open(file, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(header_len))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                f.seek(8 + header_len + begin)
                entries.append((name, info["dtype"], info["shape"], f.read(min(end - begin, FINGERPRINT_BYTES))))
    for name, dtype, shape, head in sorted(entries):
        digest.update(f"{name}|{dtype}|{shape}|".encode())
        digest.update(head)
    return digest.hexdigest()


def fingerprint_warning(draft_path: str | Path, target_path: str | Path) -> str | None:
    """A warning when the draft records the fingerprint of other target weights; else None."""
    try:
        raw = json.loads((Path(draft_path) / "config.json").read_text())
        recorded = raw.get("dgx_emu", {}).get("target_fingerprint")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if not recorded or recorded == target_fingerprint(target_path):
        return None
    return (f"EAGLE-3 draft {draft_path} was trained against other target weights than {target_path} "
            "(fingerprint mismatch): output stays exact, but few drafts will be accepted; "
            "retrain it with `dgx-emu train-draft`")
