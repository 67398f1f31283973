"""FP8 (e4m3) GEMMs: the recipe, the quantizers, and `Fp8Linear`.

Recipe
------
Format: `torch.float8_e4m3fn` for weights, activations and the KV cache: 1 sign, 4 exponent (bias 7),
3 mantissa bits, largest finite 448, smallest normal 2^-6, smallest subnormal 2^-9, no inf. e4m3
rather than e5m2 because inference needs precision more than range (e5m2 is for gradients).

Scales are float32 *dequantization* multipliers: `real ~= fp8_value * scale`. Quantizing divides by
the scale, saturates to [-448, 448] (never inf or NaN: an outlier beyond the calibrated range is
clipped, not blown up) and rounds to nearest-even (torch's cast). A scale is `amax / 448` of its
granule, so the granule's largest magnitude lands exactly on 448; an all-zero granule gets scale 1.

Three granularities, as the checkpoints of the record's ecosystem have them:
  * "per-tensor" (NVIDIA ModelOpt): one weight scale per checkpoint tensor and one STATIC input scale
    per GEMM, calibrated offline. Static input scales make a token's result independent of the
    batch and let the AllReduce+RMSNorm collective emit the next GEMM's FP8 input directly.
  * "channel" (compressed-tensors, Meta's FP8 Maverick): one weight scale per output row, and a
    DYNAMIC activation scale per token (row amax at run time): outliers in one token or one
    channel no longer cost the others their precision.
  * "block" (DeepSeek-V3 style, `weight_block_size` [128, 128]): one weight scale per 128x128 block
    and a dynamic activation scale per token per 128 input columns (1x128 groups).
Blocks and groups are cut on GLOBAL 128 boundaries of the unsharded tensor: a rank whose slice of
the input dimension starts at column c keeps `k_offset = c % 128`, so its groups line up with the
unsharded model's and its scales are the same ones.

In our modules a weight scale is stored per output row, `(N,)`, or per output row and 128-column
group, `(N, G)`: the per-tensor scales of fused parts (Q|K|V, gate|up) then sit side by side
without requantizing, and a block scale is found by row even when a rank's rows do not start on a
block boundary. It costs 4 bytes per row (per row and group for blocks: 1/32 of the FP8 bytes).

The GEMM multiplies FP8 values exactly (the product of two e4m3 numbers has at most 8 significant
bits, so it is exact in float32), accumulates in float32 and applies the scales in float32
afterwards: `out = (sum_k a_q b_q) * s_a * s_w`, per 128-column group for blocks (as DeepGEMM
promotes each group to float32). On CPU an emulation computes exactly that: it converts the e4m3
bytes to float32 exactly and multiplies in float32; benchmarks/fp8_cpu_gemm.py measured it
against CPU `torch._scaled_mm` (see `CPU_GEMM`). On CUDA the activation is quantized by one
Triton kernel (model/fp8_kernels.py, the same bytes as the torch code here) and one GEMM runs on
the FP8 tensor cores with the scales in its float32 epilogue: a Triton split-K kernel up to
SMALL_M_TRITON rows, else `torch._scaled_mm` (row-wise, or 1x128 x 1x128 groups); the hardware
keeps fewer bits than float32 while it accumulates (see `cuda_gemm`), so GPU results are native,
not bit-identical to the emulation.
A model computing in float64 accumulates in float64, where a sum of up to 2^17 e4m3 products is
EXACT (their bits span 2^-18 .. 2^17): the order of summation then cannot matter, which is how the
tests show sharded FP8 equal to unsharded FP8 beyond float32's summation-order noise.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from collectives.communicator import FP8_MAX, INV_FP8_MAX, MIN_AMAX, quantize_fp8, quantize_rows_fp8
from model import fp8_kernels

FP8 = torch.float8_e4m3fn
BLOCK = 128
GROUP_BATCH_BYTES = 64 << 20  # block emulation: per-group partial sums held at once
# Measured by benchmarks/fp8_cpu_gemm.py (results/fp8_cpu_gemm.json, one thread): the emulation
# (bit-moved e4m3 -> float32, float32 matmul) beat CPU torch._scaled_mm at all 20 shapes (M = 1..128),
# median 3.5x, within the same float32 accumulation bound. "scaled_mm" selects the alternative.
CPU_GEMM = "emulated"
FUSED_QUANT = True  # CUDA: activation quantization as one Triton kernel (False: torch ops, for comparison)
# CUDA, tensor/channel weight scales: up to this many rows (<= 16) use the Triton decode GEMM
# (model/fp8_kernels.gemm_small_m), chosen on the numbers (results/fp8_gpu_h200.json, decode_h200_*):
# replayed from a CUDA graph it takes 60-85% of cuBLAS's GPU time at M <= 16, and an eager decode
# step of the medium model took 13.1 ms with it vs 15.4 ms without (BF16: 11.5 ms, same run).
# DGX_EMU_FP8_SMALL_M=0 turns it off.
SMALL_M_TRITON = int(os.environ.get("DGX_EMU_FP8_SMALL_M", "16"))


@dataclass(frozen=True)
class Fp8Scheme:
    """How weights and activations are scaled. weight: tensor | channel | block;
    activation: static (per-tensor, calibrated) | token (dynamic per row) | group (dynamic 1x128)."""

    weight: str
    activation: str

    def __post_init__(self) -> None:
        if self.weight not in ("tensor", "channel", "block"):
            raise ValueError(f"FP8 weight granularity must be tensor, channel or block, got {self.weight!r}")
        if self.activation not in ("static", "token", "group"):
            raise ValueError(f"FP8 activation granularity must be static, token or group, got {self.activation!r}")
        if (self.weight == "block") != (self.activation == "group"):
            raise ValueError("128x128 block weights go with 1x128 group activations, and only with them "
                             f"(got weight {self.weight!r}, activation {self.activation!r})")

    @property
    def static_input(self) -> bool:
        return self.activation == "static"


PER_TENSOR = Fp8Scheme("tensor", "static")
PER_CHANNEL = Fp8Scheme("channel", "token")
BLOCK_128 = Fp8Scheme("block", "group")
SCHEMES = {"per-tensor": PER_TENSOR, "channel": PER_CHANNEL, "block": BLOCK_128}


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 in float32; an all-zero granule gets 1 (its values quantize to 0 either way)."""
    amax = amax.float()
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def n_groups(k_offset: int, k: int) -> int:
    """Global 128-column groups that a slice of k columns starting at `k_offset` (mod 128) touches."""
    return ceil_div(k_offset % BLOCK + k, BLOCK)


def to_groups(x: torch.Tensor, k_offset: int) -> torch.Tensor:
    """(..., K) -> (..., G, 128): zero-padded so that group boundaries are global multiples of 128."""
    lead = k_offset % BLOCK
    groups = n_groups(k_offset, x.shape[-1])
    padded = F.pad(x, (lead, groups * BLOCK - lead - x.shape[-1]))
    return padded.unflatten(-1, (groups, BLOCK))


def from_groups(x: torch.Tensor, k_offset: int, k: int) -> torch.Tensor:
    """Inverse of `to_groups`: (..., G, 128) -> (..., K)."""
    lead = k_offset % BLOCK
    return x.flatten(-2)[..., lead: lead + k]


# ---------------------------------------------------------------------------------------------
# Weights, in checkpoint layout: (out, in) with the scale shapes the checkpoints store
# ---------------------------------------------------------------------------------------------

def quantize_weight(w: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (out, in). Returns (fp8 weight, scale): scale () per tensor, (out, 1) per channel,
    (ceil(out/128), ceil(in/128)) per block (DeepSeek's `weight_scale_inv`)."""
    w = w.float()
    if granularity == "tensor":
        scale = scale_from_amax(w.abs().amax())
        return quantize_fp8(w, scale), scale
    if granularity == "channel":
        scale = scale_from_amax(w.abs().amax(dim=1, keepdim=True))  # (out, 1)
        return quantize_fp8(w, scale), scale
    if granularity == "block":
        rows, cols = w.shape
        padded = F.pad(w, (0, (-cols) % BLOCK, 0, (-rows) % BLOCK))
        blocks = padded.unflatten(1, (-1, BLOCK)).unflatten(0, (-1, BLOCK))  # (out_blocks, 128, in_blocks, 128)
        scale = scale_from_amax(blocks.abs().amax(dim=(1, 3)))  # (out_blocks, in_blocks)
        return quantize_fp8(w, expand_block_scale(scale, rows, cols)), scale
    raise ValueError(f"unknown weight granularity {granularity!r}")


def expand_block_scale(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(out_blocks, in_blocks) block scales -> one scale per element of a (rows, cols) weight."""
    return scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]


def dequantize_weight(w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_weight (float32), for any of its scale shapes."""
    if scale.dim() == 2 and scale.shape[1] != 1:
        scale = expand_block_scale(scale, *w_q.shape)
    return fp8_values(w_q) * scale.float()


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------

def quantize_activation(x: torch.Tensor, scheme: Fp8Scheme, input_scale: torch.Tensor | None = None,
                        k_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (M, K) high precision. Returns (fp8 x, scale): () static, (M, 1) per token, (M, G) per group.
    On a GPU with Triton each granularity is one kernel with the same bits (model/fp8_kernels.py)."""
    if FUSED_QUANT and fp8_kernels.available(x):
        if scheme.activation == "static":
            return fp8_kernels.quantize_static(x, input_scale), input_scale
        if scheme.activation == "token":
            return fp8_kernels.quantize_per_token(x, MIN_AMAX)
        return fp8_kernels.quantize_per_group(x, k_offset, n_groups(k_offset, x.shape[-1]), MIN_AMAX)
    if scheme.activation == "static":
        return quantize_fp8(x, input_scale), input_scale
    if scheme.activation == "token":
        return quantize_rows_fp8(x)  # scales (M, 1)
    groups = to_groups(x.float(), k_offset)  # (M, G, 128)
    scale = groups.abs().amax(dim=-1).clamp(min=MIN_AMAX) * INV_FP8_MAX  # (M, G)
    return from_groups(quantize_fp8(groups, scale[..., None]), k_offset, x.shape[-1]), scale


# ---------------------------------------------------------------------------------------------
# The GEMM
# ---------------------------------------------------------------------------------------------

def fp8_values(t: torch.Tensor) -> torch.Tensor:
    """The exact float32 values of a float8_e4m3fn tensor (any strides).

    On CPU torch's own cast costs ~8 ns per element; moving the bits instead is ~2.5x faster: an
    e4m3 byte shifted left by 7 is the float16 with the same sign, exponent and mantissa, its
    exponent bias 15 instead of 7, so it reads as value * 2^-8 (subnormals included, exactly).
    Sign-extending the byte to 16 bits puts the sign in bit 15; bit 14 is then cleared. (The two
    NaN bytes are not mapped to NaN; loading rejects them, and quantizing never makes them.)"""
    if t.device.type != "cpu":
        return t.float()
    bits = t.view(torch.int8).to(torch.int16).bitwise_left_shift_(7).bitwise_and_(-16385)
    return bits.view(torch.float16).float().mul_(256.0)


def emulated_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                  k_offset: int = 0, acc_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(M, N) = sum_k x_q[m, k] w_q[n, k], scaled, in acc_dtype. x_q: (M, K), w_q: (N, K) fp8;
    w_scale: (N,) with x_scale () or (M, 1); or (N, G) with x_scale (M, G) for 1x128 / 128x128."""
    a, b = fp8_values(x_q).to(acc_dtype), fp8_values(w_q).to(acc_dtype)
    x_scale, w_scale = x_scale.to(acc_dtype), w_scale.to(acc_dtype)
    if w_scale.dim() == 1:
        return (a @ b.t()) * x_scale * w_scale
    a = to_groups(a, k_offset).transpose(0, 1)  # (G, M, 128)
    b = to_groups(b, k_offset).permute(1, 2, 0)  # (G, 128, N)
    groups, m, n = a.shape[0], a.shape[1], b.shape[2]
    out = torch.zeros(m, n, dtype=acc_dtype, device=a.device)
    step = max(1, GROUP_BATCH_BYTES // (m * n * a.element_size()))  # groups per batched matmul
    for g in range(0, groups, step):
        partial = torch.bmm(a[g: g + step], b[g: g + step])  # (g, M, N): one float32 sum per group
        partial *= x_scale.t()[g: g + step, :, None]
        partial *= w_scale.t()[g: g + step, None, :]
        out += partial.sum(0)
    return out


def _pad(t: torch.Tensor, cols: tuple[int, int] = (0, 0), rows: int = 0) -> torch.Tensor:
    """Zero-pads an FP8 matrix (exact: zeros add nothing to the sums)."""
    if not (cols[0] or cols[1] or rows):
        return t
    return F.pad(t.view(torch.int8), (*cols, 0, rows)).view(t.dtype)


def cuda_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
              k_offset: int = 0, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Same contract as `emulated_gemm`, as ONE torch._scaled_mm on the FP8 tensor cores with the
    scales fused into cuBLAS's float32 epilogue: row-wise scales (per token x per output channel;
    a per-tensor scale is a constant row) or, for blocks, 1x128 x 1x128 group scales. The tensor
    cores keep ~14 significant bits while accumulating (DeepSeek-V3 report, 3.3.2), not float32's
    24: measured on an H200, ~1e-4 relative to the exact sums (benchmarks/fp8_gpu_check.py).
    cuBLAS wants K and N multiples of 16, B column-major (w_q (N, K) row-major is), and for blocks
    M a multiple of 16 and groups starting at column 0; zero padding provides all of them.
    Up to SMALL_M_TRITON rows with per-row weight scales go to model/fp8_kernels.gemm_small_m
    instead, which streams the weight faster than cuBLAS at decode token counts."""
    m, k = x_q.shape
    out_mm = out_dtype if out_dtype in (torch.bfloat16, torch.float32) else torch.float32
    if w_scale.dim() == 1 and m <= SMALL_M_TRITON and fp8_kernels.available(x_q) and w_q.stride(1) == 1:
        return fp8_kernels.gemm_small_m(x_q, x_scale.float().contiguous(), w_q, w_scale.float().contiguous(),
                                        out_mm).to(out_dtype)
    if w_scale.dim() == 1:
        pad_k, pad_n = (-k) % 16, (-w_q.shape[0]) % 16
        scale_a = x_scale.reshape(1, 1).repeat(m, 1) if x_scale.dim() == 0 else x_scale  # (M, 1)
        scale_a = scale_a.float().contiguous()
        scale_b = (F.pad(w_scale.float(), (0, pad_n), value=1.0) if pad_n else w_scale.float())[None]  # (1, N)
        out = torch._scaled_mm(_pad(x_q.contiguous(), (0, pad_k)), _pad(w_q, (0, pad_k), pad_n).t(),
                               scale_a=scale_a, scale_b=scale_b, out_dtype=out_mm)
        return out[:, : w_q.shape[0]].to(out_dtype)
    lead, groups = k_offset % BLOCK, w_scale.shape[1]
    cols, pad_m = (lead, groups * BLOCK - lead - k), (-m) % 16
    scale_a = F.pad(x_scale.float(), (0, 0, 0, pad_m), value=1.0)  # (M', G)
    out = torch._scaled_mm(_pad(x_q.contiguous(), cols, pad_m), _pad(w_q, cols).t(),
                           scale_a=scale_a.t().contiguous().t(),  # M-major, as cuBLAS reads 1x128 scales
                           scale_b=w_scale.float().t().contiguous(), out_dtype=out_mm)  # (G, N)
    return out[:m].to(out_dtype)


def scaled_mm_sums_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                        k_offset: int = 0) -> torch.Tensor:
    """`emulated_gemm`'s contract with the sums from torch._scaled_mm at unit per-tensor scales (the
    only scaling every CPU build has) and the same float32 epilogue: the CPU alternative that
    benchmarks/fp8_cpu_gemm.py measured against the emulation (see CPU_GEMM)."""
    one = torch.ones((), dtype=torch.float32, device=x_q.device)

    def sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (M, K) @ (N, K).T, float32
        pad_k, pad_n = (-a.shape[1]) % 16, (-b.shape[0]) % 16
        out = torch._scaled_mm(_pad(a.contiguous(), (0, pad_k)), _pad(b.contiguous(), (0, pad_k), pad_n).t(),
                               scale_a=one, scale_b=one, out_dtype=torch.float32)
        return out[:, : b.shape[0]]
    if w_scale.dim() == 1:
        return sums(x_q, w_q) * x_scale * w_scale
    lead, groups = k_offset % BLOCK, w_scale.shape[1]
    cols = (lead, groups * BLOCK - lead - x_q.shape[1])
    a, b = _pad(x_q.contiguous(), cols), _pad(w_q.contiguous(), cols)
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    for g in range(groups):
        group = slice(g * BLOCK, (g + 1) * BLOCK)
        out += sums(a[:, group], b[:, group]) * x_scale[:, g: g + 1] * w_scale[:, g]
    return out


def fp8_gemm(x_q, x_scale, w_q, w_scale, k_offset: int = 0, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The FP8 GEMM on the tensor cores (CUDA) or on CPU (CPU_GEMM); float32 sums (float64 for a
    float64 model, emulated), returned in out_dtype."""
    if x_q.is_cuda:
        return cuda_gemm(x_q, x_scale, w_q, w_scale, k_offset, out_dtype)
    if CPU_GEMM == "scaled_mm":
        return scaled_mm_sums_gemm(x_q, x_scale, w_q, w_scale, k_offset).to(out_dtype)
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    return emulated_gemm(x_q, x_scale, w_q, w_scale, k_offset, acc).to(out_dtype)


class Fp8Linear(nn.Module):
    """y = x W^T with W in FP8 (out_features, in_features) and float32 scales; y in `out_dtype`.

    `weight_scale` is (out,) for tensor/channel schemes, (out, G) for block; `input_scale` exists
    only for the static scheme. Scales start at zero: the loader must fill every one of them.
    `k_offset` is where this rank's input columns start in the unsharded layer (mod 128)."""

    def __init__(self, in_features: int, out_features: int, scheme: Fp8Scheme, out_dtype: torch.dtype,
                 k_offset: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.out_dtype, self.k_offset = scheme, out_dtype, k_offset % BLOCK
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        scale_shape = (out_features, n_groups(k_offset, in_features)) if scheme.weight == "block" else (out_features,)
        self.weight_scale = nn.Parameter(torch.zeros(scale_shape, dtype=torch.float32), requires_grad=False)
        self.input_scale = (nn.Parameter(torch.zeros((), dtype=torch.float32), requires_grad=False)
                            if scheme.static_input else None)

    @property
    def static_input_scale(self) -> torch.Tensor | None:
        return self.input_scale

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_activation(x, self.scheme, self.input_scale, self.k_offset)

    def matmul(self, x_q: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """x_q: (..., in) fp8 with its scale. Returns (..., out) in out_dtype."""
        flat = x_q.reshape(-1, self.in_features)  # (M, K)
        scale = x_scale.reshape(-1, x_scale.shape[-1]) if x_scale.dim() else x_scale
        out = fp8_gemm(flat, scale, self.weight, self.weight_scale, self.k_offset, self.out_dtype)
        return out.view(*x_q.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == FP8:  # already quantized upstream (the fused AllReduce+RMSNorm) with our scale
            if self.input_scale is None:
                raise ValueError("an FP8 input needs a static input scale; this layer quantizes dynamically")
            return self.matmul(x, self.input_scale)
        flat = x.reshape(-1, self.in_features)
        x_q, x_scale = self.quantize_input(flat)
        return self.matmul(x_q, x_scale).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, weight={self.scheme.weight}, "
                f"activation={self.scheme.activation}, k_offset={self.k_offset}")


def static_input_scale(module: nn.Module) -> torch.Tensor | None:
    """The static FP8 input scale a module wants its input quantized with, or None (high precision
    or dynamic scales): what the decoder hands to allreduce_add_rmsnorm as `quant_scale`."""
    return module.static_input_scale if isinstance(module, Fp8Linear) else None
