"""Calibrating static FP8 scales: per-tensor input scales and KV-cache scales from a sample text.

A checkpoint quantized at load has no input scales, and one without `k_scale` / `v_scale` has no
KV-cache scales. Both are `amax / 448` of what the quantizer will see, measured by running the
model on a fixed calibration text (ModelOpt's recipe: max calibration, no headroom, so values
beyond the calibrated range saturate).

Input amax is measured on the HIGH-PRECISION model with observers swapped in for the modules
that will become FP8 (module swap again, no hooks); KV amax is read from a high-precision cache
after the same forward. The amax of a row-parallel input (o_proj, every down projection) seen by
one rank covers only its slice, so every amax is reduced with a max over ranks (all_gather through
the Communicator): each rank then holds the unsharded model's scales. Routed experts in
expert-parallel mode are the exception: each rank already sees every token of the experts it owns.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.ffn import MLP, Experts
from model.fp8 import scale_from_amax
from model.fp8_modules import fp8_targets

# Held out from benchmarks/fp8_accuracy.py's evaluation text on purpose.
CALIBRATION_TEXT = (
    "A node of eight accelerators serves one large model by splitting every layer across them. "
    "Attention heads are divided evenly, and each expert's hidden dimension is cut into eight "
    "slices, so that a single token touches all of the devices at once. After each sub-layer the "
    "partial results are summed, the residual is added and the sum is normalized before the next "
    "matrix product begins. Weights stored in eight-bit floating point halve the bytes read per "
    "step, which is what bounds the speed of decoding one token at a time. The scales that map "
    "the narrow format back to real numbers are chosen from the largest magnitudes observed."
)


def calibration_ids(tokenizer, vocab_size: int, bos: int | None, n_random: int = 256) -> list[int]:
    """The calibration text's ids (BOS first) or, without a tokenizer, seeded random ids."""
    if tokenizer is not None:
        ids = tokenizer.encode(CALIBRATION_TEXT)
        return ([bos] if bos is not None else []) + ids
    gen = torch.Generator().manual_seed(20260501)
    return torch.randint(0, vocab_size, (n_random,), generator=gen).tolist()


def _amax(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().amax().float() if x.numel() else torch.zeros((), device=x.device)


class LinearObserver(nn.Module):
    def __init__(self, inner: nn.Linear, key: str) -> None:
        super().__init__()
        self.inner, self.amax = inner, {key: torch.zeros((), device=inner.weight.device)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = next(iter(self.amax))
        self.amax[key] = torch.maximum(self.amax[key], _amax(x))
        return self.inner(x)


class MLPObserver(nn.Module):
    """An MLP that records the amax of its input (FC13's) and of SwiGLU's output (FC2's input)."""

    input_quant_scale = None  # calibration runs in high precision

    def __init__(self, inner: MLP, path: str) -> None:
        super().__init__()
        self.inner = inner
        self.keys = (f"{path}.gate_up_proj.input_scale", f"{path}.down_proj.input_scale")
        self.amax = {k: torch.zeros((), device=inner.gate_up_proj.weight.device) for k in self.keys}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.inner.gate_up_proj(x).chunk(2, dim=-1)
        h = F.silu(gate) * up
        for key, seen in zip(self.keys, (x, h)):
            self.amax[key] = torch.maximum(self.amax[key], _amax(seen))
        return self.inner.down_proj(h)


class ExpertsObserver(nn.Module):
    """Experts that record, per local expert, the amax of each expert's two GEMM inputs."""

    def __init__(self, inner: Experts, path: str) -> None:
        super().__init__()
        self.inner = inner
        self.keys = (f"{path}.gate_up_proj_input_scale", f"{path}.down_proj_input_scale")
        self.amax = {k: torch.zeros(inner.gate_up_proj.shape[0], device=inner.gate_up_proj.device) for k in self.keys}

    def forward(self, x: torch.Tensor, local_expert: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for expert in torch.unique(local_expert).tolist():
            rows = (local_expert == expert).nonzero().flatten()
            gate, up = (x[rows] @ self.inner.gate_up_proj[expert]).chunk(2, dim=-1)  # (n, I_r) each
            h = F.silu(gate) * up
            for key, seen in zip(self.keys, (x[rows], h)):
                self.amax[key][expert] = torch.maximum(self.amax[key][expert], _amax(seen))
            out[rows] = h @ self.inner.down_proj[expert]
        return out


def _observe(model: nn.Module, paths: list[str]) -> list[nn.Module]:
    observers = []
    for path in paths:
        parent_path, name = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        inner = getattr(parent, name)
        kind = {nn.Linear: lambda: LinearObserver(inner, f"{path}.input_scale"),
                MLP: lambda: MLPObserver(inner, path), Experts: lambda: ExpertsObserver(inner, path)}
        observer = kind[type(inner)]()
        setattr(parent, name, observer)
        observers.append(observer)
    return observers


def _max_over_ranks(comm, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Element-wise max over ranks of every tensor (same keys and shapes on every rank)."""
    keys = sorted(values)
    if not keys or comm.world_size == 1:
        return values
    flat = torch.cat([values[k].reshape(-1).float() for k in keys])
    gathered = comm.all_gather(flat[None], dim=0).amax(dim=0)  # (n,)
    out, offset = {}, 0
    for k in keys:
        n = values[k].numel()
        out[k] = gathered[offset: offset + n].view_as(values[k])
        offset += n
    return out


@torch.inference_mode()
def calibrate(model: nn.Module, token_ids: list[int], paths: list[str] | None = None) -> tuple[dict, list]:
    """Runs `token_ids` through the high-precision `model` (left with observers: discard it after).
    Returns ({input-scale parameter name: amax}, [(k amax, v amax) per layer]), maxed over ranks.
    `paths`: the modules that will become FP8 with static input scales (default: all targets)."""
    paths = fp8_targets(model) if paths is None else paths
    observers = _observe(model, paths)
    ids = torch.tensor([token_ids], device=model.embed_tokens.weight.device)
    cache = model.new_cache(1, len(token_ids))
    model(ids, cache)
    replicated, per_rank_experts = {}, {}
    for obs in observers:
        bucket = per_rank_experts if isinstance(obs, ExpertsObserver) and model.shard.expert_parallel else replicated
        bucket.update(obs.amax)
    for i in range(len(model.layers)):
        replicated[f"kv.{i}.k"], replicated[f"kv.{i}.v"] = _amax(cache.k[i]), _amax(cache.v[i])
    reduced = _max_over_ranks(model.comm, replicated)
    kv = [(reduced.pop(f"kv.{i}.k"), reduced.pop(f"kv.{i}.v")) for i in range(len(model.layers))]
    return {**reduced, **per_rank_experts}, kv


def set_kv_scales(model: nn.Module, kv_amax: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """k_scale / v_scale of every layer from calibrated amax (scale = amax / 448)."""
    for layer, (k_amax, v_amax) in zip(model.layers, kv_amax):
        layer.self_attn.k_scale.copy_(scale_from_amax(k_amax))
        layer.self_attn.v_scale.copy_(scale_from_amax(v_amax))
