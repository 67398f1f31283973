"""Helpers for the FP8 tests: checkpoints written by hand in each format's own naming, and the
float32 weights each should load as.

A random high-precision Llama 4 state dict (HF names, fused experts) is turned into one of:
  * "modelopt": every Linear FP8 with a scalar `weight_scale` and `input_scale`, plus
    `self_attn.k_scale` / `v_scale`; experts per expert (`experts.{e}.gate_proj.weight`, ...);
  * "compressed-tensors" (Meta's FP8 Maverick layout): ONLY the routed experts FP8, per expert,
    `weight_scale` (out, 1) in bfloat16; attention, shared expert, dense MLP, router in BF16;
  * "block": every Linear FP8 with `weight_scale_inv` (ceil(out/128), ceil(in/128)).
`dequantized` holds, for every HF name, the float32 tensor the loader must reproduce (computed
here over whole tensors, independently of the loader's per-rank cuts).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import ModelConfig
from model.embedded import random_state_dict
from model.fp8 import quantize_weight

FORMATS = {
    "modelopt": {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8"},
    "compressed-tensors": {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False, "symmetric": True},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True,
                                  "symmetric": True}}},
        "ignore": ["re:.*self_attn.*", "re:.*router.*", "re:.*shared_expert.*", "lm_head"]},
    "block": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
}
GRANULARITY = {"modelopt": "tensor", "compressed-tensors": "channel", "block": "block"}
SCALE_NAME = {"modelopt": "weight_scale", "compressed-tensors": "weight_scale", "block": "weight_scale_inv"}


class FakeComm:
    """Just enough of a Communicator to build a rank's model and load it (no collectives)."""

    backend = "fake"

    def __init__(self, world_size: int, rank: int) -> None:
        self.world_size, self.rank = world_size, rank


def per_expert(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Fused HF experts -> one (out, in) Linear per expert, as quantized checkpoints name them."""
    out, inter = {}, cfg.intermediate_size
    for name, t in tensors.items():
        if name.endswith("experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :, :inter].t().contiguous()
                out[f"{base}{e}.up_proj.weight"] = t[e, :, inter:].t().contiguous()
        elif name.endswith("experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].t().contiguous()
        else:
            out[name] = t
    return out


def _quantized_names(fmt: str, tensors: dict) -> list[str]:
    linear = [n for n, t in tensors.items() if t.dim() == 2 and n.endswith("_proj.weight")]
    if fmt == "compressed-tensors":
        return [n for n in linear if ".experts." in n]
    return linear


def _expand_block(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]


def quantized_state_dict(cfg: ModelConfig, fmt: str, seed: int, std: float = 0.08):
    """(tensors to write, {HF name: float32 values the loader must produce})."""
    tensors = per_expert(random_state_dict(cfg, seed=seed, std=std), cfg)
    written, dequantized = {}, {}
    for i, name in enumerate(sorted(tensors)):
        t = tensors[name]
        if name not in _quantized_names(fmt, tensors):
            written[name] = t.bfloat16() if fmt == "compressed-tensors" else t
            dequantized[name] = written[name].float()
            continue
        w_q, scale = quantize_weight(t, GRANULARITY[fmt])
        base = name[: -len("weight")]
        written[name] = w_q
        if fmt == "compressed-tensors":
            scale = scale.bfloat16()  # llm-compressor stores the model dtype; the loader widens it
        written[base + SCALE_NAME[fmt]] = scale
        if fmt == "modelopt":
            written[base + "input_scale"] = torch.tensor(0.01 * (1 + i % 3))  # q/k/v differ: the max wins
        full = scale.float() if scale.dim() < 2 or scale.shape[1] == 1 else _expand_block(scale.float(), *t.shape)
        dequantized[name] = w_q.float() * full
    if fmt == "modelopt":
        for layer in range(cfg.n_layers):
            written[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(0.02 + 0.001 * layer)
            written[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(0.03 + 0.001 * layer)
    return written, dequantized


def write(path: Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor], quant_config: dict | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = cfg.to_hf_dict()
    if quant_config is not None:
        config["quantization_config"] = quant_config
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


def _per_row_groups(scale: torch.Tensor, k_offset: int, k: int) -> torch.Tensor:
    """(out, G) per-row group scales -> (out, k) per element, groups on global 128 boundaries."""
    lead = k_offset % 128
    return scale[:, (torch.arange(k) + lead) // 128]


def _effective(w_q: torch.Tensor, scale: torch.Tensor, k_offset: int) -> torch.Tensor:
    """float32 value of an FP8 (out, in) weight with our per-row (or per-row-and-group) scales."""
    full = scale[:, None] if scale.dim() == 1 else _per_row_groups(scale, k_offset, w_q.shape[1])
    return w_q.float() * full


def effective_weights(model) -> dict[str, torch.Tensor]:
    """For each FP8 module, the float32 weights it computes with, under the high-precision
    model's parameter names and layouts (Linear (out, in); experts (E, in, out))."""
    from model.fp8 import Fp8Linear
    from model.fp8_modules import Fp8Experts

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear):
            out[f"{name}.weight"] = _effective(module.weight, module.weight_scale, module.k_offset)
        elif isinstance(module, Fp8Experts):
            for part, offset in (("gate_up_proj", 0), ("down_proj", module.down_k_offset)):
                w, s = getattr(module, part), getattr(module, f"{part}_scale")
                out[f"{name}.{part}"] = torch.stack([_effective(w[e].mT, s[e], offset).t() for e in range(w.shape[0])])
    return out
