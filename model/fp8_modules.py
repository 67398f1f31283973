"""FP8 versions of the feed-forward blocks, and the function that swaps FP8 modules in.

FP8 is a module swap: `to_fp8(model, plan)` replaces the modules the plan names with FP8 modules of
the same per-rank shapes, BEFORE the checkpoint is read (the loader then fills FP8 weights and
their scales directly; there is never a high-precision copy). Llama4 and the decoder layer never
look at dtypes: they ask a module for its `input_quant_scale` and hand it to the fused
AllReduce+RMSNorm, which then emits the next GEMM's FP8 input (static per-tensor scheme only).

`Fp8MLP` and `Fp8Experts` make the FC13 + SwiGLU fusion explicit: the gate|up GEMM's output goes
through SwiGLU and is quantized with FC2's input quantizer, and FC2 consumes the FP8 tensor. A
GPU kernel does this in one epilogue; here it is three lines with the same numbers.

Fp8Experts keeps HF's (in, out) layout per expert for the loader, but stores each expert's weight
out-major, so `W[e].mT` is a contiguous (out, in) matrix: column-major B, as `torch._scaled_mm`
wants it, without a copy per call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import CheckpointError, match
from model.ffn import MLP, Experts
from model.fp8 import FP8, Fp8Linear, Fp8Scheme, fp8_gemm, n_groups, quantize_activation
from model.parallel import ShardLayout


class Fp8MLP(nn.Module):
    """SwiGLU MLP with FP8 gate|up (FC13) and down (FC2); SwiGLU's output is quantized for FC2."""

    def __init__(self, hidden: int, intermediate_per_rank: int, scheme: Fp8Scheme, out_dtype: torch.dtype,
                 down_k_offset: int) -> None:
        super().__init__()
        self.intermediate_per_rank = intermediate_per_rank
        self.gate_up_proj = Fp8Linear(hidden, 2 * intermediate_per_rank, scheme, out_dtype)
        self.down_proj = Fp8Linear(intermediate_per_rank, hidden, scheme, out_dtype, k_offset=down_k_offset)

    @property
    def input_quant_scale(self) -> torch.Tensor | None:
        return self.gate_up_proj.static_input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (..., I_r) each
        h_q, h_scale = self.down_proj.quantize_input(F.silu(gate) * up)  # FC13 + SwiGLU -> FP8 for FC2
        return self.down_proj.matmul(h_q, h_scale)


def _out_major(n_experts: int, d_in: int, d_out: int) -> nn.Parameter:
    """An FP8 (E, in, out) parameter whose memory is (E, out, in): W[e].mT is contiguous."""
    return nn.Parameter(torch.empty(n_experts, d_out, d_in, dtype=FP8).transpose(1, 2), requires_grad=False)


class Fp8Experts(nn.Module):
    """The routed experts held by this rank, FP8. Scales per expert and output channel: (E, out) for
    tensor/channel schemes, (E, out, G) for blocks; static input scales per expert, (E,)."""

    def __init__(self, n_experts_per_rank: int, hidden: int, intermediate_per_rank: int, scheme: Fp8Scheme,
                 out_dtype: torch.dtype, down_k_offset: int) -> None:
        super().__init__()
        e, h, i = n_experts_per_rank, hidden, intermediate_per_rank
        self.scheme, self.out_dtype, self.down_k_offset = scheme, out_dtype, down_k_offset % 128
        self.gate_up_proj = _out_major(e, h, 2 * i)  # logical (E, H, 2I)
        self.down_proj = _out_major(e, i, h)  # logical (E, I, H)
        block = scheme.weight == "block"
        self.gate_up_proj_scale = nn.Parameter(
            torch.zeros((e, 2 * i, n_groups(0, h)) if block else (e, 2 * i), dtype=torch.float32), requires_grad=False)
        self.down_proj_scale = nn.Parameter(
            torch.zeros((e, h, n_groups(down_k_offset, i)) if block else (e, h), dtype=torch.float32),
            requires_grad=False)
        static = scheme.static_input
        per_expert = (lambda: nn.Parameter(torch.zeros(e, dtype=torch.float32), requires_grad=False))
        self.gate_up_proj_input_scale = per_expert() if static else None
        self.down_proj_input_scale = per_expert() if static else None

    def _input_scale(self, scales: nn.Parameter | None, expert: int) -> torch.Tensor | None:
        return None if scales is None else scales[expert]

    def expert_forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """x: (n, H) high precision for one local expert. Returns (n, H) in out_dtype."""
        x_q, x_scale = quantize_activation(x, self.scheme, self._input_scale(self.gate_up_proj_input_scale, expert))
        gate_up = fp8_gemm(x_q, x_scale, self.gate_up_proj[expert].mT, self.gate_up_proj_scale[expert],
                           out_dtype=self.out_dtype)
        gate, up = gate_up.chunk(2, dim=-1)  # (n, I_r) each
        h_q, h_scale = quantize_activation(F.silu(gate) * up, self.scheme,  # SwiGLU -> FP8 for FC2
                                           self._input_scale(self.down_proj_input_scale, expert), self.down_k_offset)
        return fp8_gemm(h_q, h_scale, self.down_proj[expert].mT, self.down_proj_scale[expert], self.down_k_offset,
                        self.out_dtype)

    def forward(self, x: torch.Tensor, local_expert: torch.Tensor) -> torch.Tensor:
        """x: (M, H) rows, each for local expert `local_expert[m]`. Returns (M, H)."""
        out = torch.empty(x.shape, dtype=self.out_dtype, device=x.device)
        order = torch.argsort(local_expert, stable=True)
        counts = torch.bincount(local_expert, minlength=self.gate_up_proj.shape[0]).tolist()
        offset = 0
        for expert, count in enumerate(counts):
            if count:
                rows = order[offset: offset + count]
                out[rows] = self.expert_forward(x[rows], expert)
                offset += count
        return out


# ---------------------------------------------------------------------------------------------
# The swap
# ---------------------------------------------------------------------------------------------

def fp8_targets(model: nn.Module) -> list[str]:
    """Every module path FP8 can replace: attention projections, dense MLPs, shared and routed
    experts. The router, embeddings and LM head stay in high precision."""
    paths = []
    for i, layer in enumerate(model.layers):
        paths += [f"layers.{i}.self_attn.qkv_proj", f"layers.{i}.self_attn.o_proj"]
        if layer.is_moe:
            paths += [f"layers.{i}.feed_forward.shared_expert", f"layers.{i}.feed_forward.experts"]
        else:
            paths.append(f"layers.{i}.feed_forward")
    return paths


def _fp8_module(old: nn.Module, path: str, scheme: Fp8Scheme, shard: ShardLayout, dtype: torch.dtype) -> nn.Module:
    if isinstance(old, nn.Linear):
        offset = shard.o_proj_in_start if path.endswith("o_proj") else 0
        return Fp8Linear(old.in_features, old.out_features, scheme, dtype, k_offset=offset)
    if isinstance(old, MLP):
        offset = shard.shared_in_start if path.endswith("shared_expert") else shard.mlp_in_start
        return Fp8MLP(old.gate_up_proj.in_features, old.intermediate_per_rank, scheme, dtype, offset)
    if isinstance(old, Experts):
        n_experts, hidden, two_i = old.gate_up_proj.shape
        return Fp8Experts(n_experts, hidden, two_i // 2, scheme, dtype, shard.expert_in_start)
    raise TypeError(f"{path}: no FP8 version of {type(old).__name__}")


def to_fp8(model: nn.Module, plan: dict[str, Fp8Scheme]) -> nn.Module:
    """Replaces each module the plan names (paths from `fp8_targets`) by its FP8 version, built
    empty at the same per-rank shapes and device. Returns the model (changed in place)."""
    targets = set(fp8_targets(model))
    unknown = sorted(set(plan) - targets)
    if unknown:
        raise ValueError(f"no FP8 version for module {unknown[0]!r}")
    dtype = model.embed_tokens.weight.dtype
    for path, scheme in plan.items():
        parent_path, name = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        old = getattr(parent, name)
        with torch.device(next(old.parameters()).device):
            setattr(parent, name, _fp8_module(old, path, scheme, model.shard, dtype))
    return model


def all_fp8(model: nn.Module, scheme: Fp8Scheme) -> dict[str, Fp8Scheme]:
    """The plan that quantizes every FP8 target with one scheme (quantize-at-load)."""
    return {path: scheme for path in fp8_targets(model)}


def checkpoint_plan(model: nn.Module, fp8_names: set[str], names: list[str], scheme: Fp8Scheme) -> dict[str, Fp8Scheme]:
    """The plan that makes FP8 exactly the modules whose checkpoint weights are FP8 (`fp8_names`
    among the checkpoint's weight `names`). A module with FP8 and high-precision weights mixed is
    an error naming it: a fused parameter has one dtype."""
    targets = fp8_targets(model)
    kinds: dict[str, set[bool]] = {}
    for name in names:
        dest = match(model.cfg, name)[0]
        owner = next((t for t in targets if dest.startswith(t + ".")), None)
        if owner is not None:  # FP8 tensors outside the targets (router, LM head) are dequantized at load
            kinds.setdefault(owner, set()).add(name in fp8_names)
    mixed = sorted(t for t, k in kinds.items() if len(k) == 2)
    if mixed:
        raise CheckpointError(f"module {mixed[0]} has FP8 and high-precision weights in the checkpoint")
    return {t: scheme for t, k in kinds.items() if k == {True}}
