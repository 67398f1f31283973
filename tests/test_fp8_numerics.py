"""FP8 numerics: e4m3 rounding and saturation, weight/activation quantizers, and the FP8 GEMM of
Fp8Linear / Fp8MLP / Fp8Experts against a float64 reference of the same quantized values.

The GEMM multiplies e4m3 values exactly and sums in float32, so its only error against float64 is
float32 accumulation: |fp32 - f64| <= (K + 2) * 2^-24 * sum_k |a_k b_k| * scales (K additions and
two scale multiplications, each within 2^-24 relative; products are exact). Tests use that bound.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectives.communicator import SingleRankCommunicator, quantize_fp8
from model.attention import KVCache
from model.fp8 import (BLOCK_128, FP8, PER_CHANNEL, PER_TENSOR, Fp8Linear, fp8_values, quantize_activation,
                       quantize_weight, scaled_mm_sums_gemm, to_groups)
from model.fp8_modules import Fp8Experts, Fp8MLP

ALL_BYTES = torch.arange(256, dtype=torch.uint8).view(FP8)
FINITE = ALL_BYTES[~torch.isnan(ALL_BYTES.float())]  # 254 values: every finite e4m3 number
SCHEMES = {"per-tensor": PER_TENSOR, "channel": PER_CHANNEL, "block": BLOCK_128}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# e4m3 values, rounding, saturation
# ---------------------------------------------------------------------------------------------

def test_fp8_values_is_exact_for_every_byte():
    assert torch.equal(fp8_values(FINITE), FINITE.float())
    assert torch.equal(fp8_values(FINITE.view(2, 127).t()), FINITE.view(2, 127).t().float())  # strided too


def test_representable_values_round_trip_exactly():
    values = FINITE.float()
    for scale in (1.0, 2.0 ** -7, 2.0 ** 5):  # power-of-two scales keep values representable
        q = quantize_fp8(values * scale, torch.tensor(scale))
        assert torch.equal(q.view(torch.uint8), FINITE.view(torch.uint8))


def test_saturation_and_round_to_nearest_even():
    x = torch.tensor([448.0, 464.0, 1e9, -1e9, float("inf"), 1.0625, 1.1875, 2.0 ** -10, 3 * 2.0 ** -11])
    q = quantize_fp8(x, torch.tensor(1.0)).float()
    #                  max    max-tie  sat     sat    inf->max  ->even 1.0, ->even 1.25, tie->0, ->2^-9
    want = torch.tensor([448.0, 448.0, 448.0, -448.0, 448.0, 1.0, 1.25, 0.0, 2.0 ** -9])
    assert torch.equal(q, want)
    assert bool(torch.isfinite(q).all())


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 300), log_std=st.floats(-6, 6),
       granularity=st.sampled_from(["tensor", "channel", "block"]), seed=st.integers(0, 2 ** 16))
def test_weight_quantization_error_is_within_half_an_e4m3_step(rows, cols, log_std, granularity, seed):
    w = torch.randn(rows, cols, generator=_gen(seed)) * 2.0 ** log_std
    w_q, scale = quantize_weight(w, granularity)
    expected_scale_shape = {"tensor": (), "channel": (rows, 1), "block": (-(-rows // 128), -(-cols // 128))}
    assert tuple(scale.shape) == expected_scale_shape[granularity]
    full = scale
    if granularity == "block":
        full = scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    back = fp8_values(w_q) * full
    # normal range: 3 mantissa bits -> relative error <= 2^-4; subnormals: absolute <= 2^-10 * scale
    bound = torch.maximum(w.abs() * 2.0 ** -4, full * 2.0 ** -10) * (1 + 1e-6)
    assert bool(((back - w).abs() <= bound).all())
    assert float(fp8_values(w_q).abs().max()) == 448.0  # the amax of (some) granule lands on 448


def test_block_activation_groups_follow_global_boundaries():
    x = torch.randn(5, 384, generator=_gen(1))
    full_q, full_scale = quantize_activation(x, BLOCK_128)
    part_q, part_scale = quantize_activation(x[:, 128:384], BLOCK_128, k_offset=128)  # aligned slice: same
    assert torch.equal(part_q.view(torch.uint8), full_q[:, 128:].view(torch.uint8))
    assert torch.equal(part_scale, full_scale[:, 1:])
    _, unaligned = quantize_activation(x[:, 64:320], BLOCK_128, k_offset=64)  # groups [64,128) [128,256) [256,320)
    assert unaligned.shape == (5, 3)
    assert torch.equal(unaligned[:, 1], full_scale[:, 1])


# ---------------------------------------------------------------------------------------------
# The GEMM against float64
# ---------------------------------------------------------------------------------------------

def _reference(x_q, x_scale, w_q, w_scale, k_offset):
    """float64 result and the float32-accumulation error bound for the same quantized operands."""
    a, b = x_q.double(), w_q.double()
    if w_scale.dim() == 1:
        ref = (a @ b.t()) * x_scale.double() * w_scale.double()
        mag = (a.abs() @ b.abs().t()) * x_scale.double() * w_scale.double()
    else:
        ga, gb = to_groups(a, k_offset), to_groups(b, k_offset)  # (M, G, 128), (N, G, 128)
        scales = x_scale.double().t()[:, :, None] * w_scale.double().t()[:, None]  # (G, M, N)
        per_group = torch.einsum("mgk,ngk->gmn", ga, gb) * scales
        mags = torch.einsum("mgk,ngk->gmn", ga.abs(), gb.abs()) * scales
        ref, mag = per_group.sum(0), mags.sum(0)
    return ref, (a.shape[1] + 2 + (w_scale.dim() - 1) * w_scale.shape[-1]) * 2.0 ** -24 * mag


def _linear(scheme, k, n, k_offset, seed):
    """An Fp8Linear holding a quantized random (n, k) weight whose columns start at global column
    k_offset (block scales: one per row and global 128-column group, as the loader stores them)."""
    layer = Fp8Linear(k, n, scheme, torch.float32, k_offset=k_offset)
    lead = k_offset % 128 if scheme.weight == "block" else 0
    w = torch.nn.functional.pad(torch.randn(n, k, generator=_gen(seed)), (lead, 0))
    w_q, scale = quantize_weight(w, scheme.weight)
    layer.weight.data.copy_(w_q[:, lead:])
    if scheme.weight == "block":
        layer.weight_scale.data.copy_(scale.repeat_interleave(128, 0)[:n])
    else:
        layer.weight_scale.data.copy_(scale.reshape(-1).expand(n))
    if layer.input_scale is not None:
        layer.input_scale.data.fill_(0.02)
    return layer


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("m,k,n,k_offset", [(1, 256, 96, 0), (7, 200, 130, 0), (33, 320, 64, 64)])
def test_fp8_linear_matches_float64_reference(name, m, k, n, k_offset):
    scheme = SCHEMES[name]
    layer = _linear(scheme, k, n, k_offset, seed=m + k)
    x = torch.randn(m, k, generator=_gen(m)) * 3
    got = layer(x)
    x_q, x_scale = quantize_activation(x, scheme, layer.input_scale, k_offset)
    ref, bound = _reference(x_q.float(), x_scale, layer.weight.float(), layer.weight_scale, k_offset)
    assert bool(((got.double() - ref).abs() <= bound + 1e-30).all())
    # the CPU torch._scaled_mm alternative (benchmarks/fp8_cpu_gemm.py) sums the same: same bound
    via_scaled_mm = scaled_mm_sums_gemm(x_q, x_scale, layer.weight, layer.weight_scale, k_offset)
    assert bool(((via_scaled_mm.double() - ref).abs() <= bound + 1e-30).all())


def test_static_fp8_input_equals_quantizing_inside():
    """The fused AllReduce+RMSNorm hands Fp8Linear an already-quantized input: same numbers."""
    layer = _linear(PER_TENSOR, 64, 48, 0, seed=3)
    x = torch.randn(2, 5, 64, generator=_gen(4))
    assert torch.equal(layer(x), layer(quantize_fp8(x, layer.input_scale)))
    with pytest.raises(ValueError, match="static input scale"):
        _linear(PER_CHANNEL, 64, 48, 0, seed=3)(quantize_fp8(x, torch.tensor(0.02)))


@pytest.mark.parametrize("name", SCHEMES)
def test_fp8_mlp_is_fc13_swiglu_quantized_fc2(name):
    scheme = SCHEMES[name]
    mlp = Fp8MLP(256, 192, scheme, torch.float32, down_k_offset=64)
    mlp.gate_up_proj = _linear(scheme, 256, 384, 0, seed=5)
    mlp.down_proj = _linear(scheme, 192, 256, 64, seed=6)
    x = torch.randn(9, 256, generator=_gen(7))
    gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    h = torch.nn.functional.silu(gate) * up
    assert torch.equal(mlp(x), mlp.down_proj(h))


@pytest.mark.parametrize("name", SCHEMES)
def test_fp8_experts_route_each_row_to_its_expert(name):
    scheme = SCHEMES[name]
    experts = Fp8Experts(3, 256, 96, scheme, torch.float32, down_k_offset=32)
    linears = []
    for e in range(3):
        gate_up, down = _linear(scheme, 256, 192, 0, seed=10 + e), _linear(scheme, 96, 256, 32, seed=20 + e)
        experts.gate_up_proj.data[e] = gate_up.weight.data.t()
        experts.down_proj.data[e] = down.weight.data.t()
        experts.gate_up_proj_scale.data[e] = gate_up.weight_scale
        experts.down_proj_scale.data[e] = down.weight_scale
        if scheme.static_input:
            experts.gate_up_proj_input_scale.data[e] = gate_up.input_scale
            experts.down_proj_input_scale.data[e] = down.input_scale
        linears.append((gate_up, down))
    assert experts.gate_up_proj[0].mT.is_contiguous()  # column-major B for _scaled_mm, no copy
    x = torch.randn(11, 256, generator=_gen(8))
    which = torch.tensor([2, 0, 0, 1, 2, 2, 0, 1, 1, 0, 2])
    got = experts(x, which)
    for e, (gate_up, down) in enumerate(linears):
        rows = (which == e).nonzero().flatten()
        gate, up = gate_up(x[rows]).chunk(2, dim=-1)
        assert torch.equal(got[rows], down(torch.nn.functional.silu(gate) * up))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("name", SCHEMES)
def test_cuda_tensor_cores_match_float64(name, m):
    """Hopper's FP8 tensor cores keep about 14 significant bits while accumulating (DeepSeek-V3
    report, section 3.3.2), so the accumulation bound is taken with unit roundoff 2^-14, not 2^-24."""
    scheme = SCHEMES[name]
    layer = _linear(scheme, 512, 256, 64 if name == "block" else 0, seed=9)
    x = torch.randn(m, 512, generator=_gen(9))
    x_q, x_scale = quantize_activation(x, scheme, layer.input_scale, layer.k_offset)
    ref, bound = _reference(x_q.float(), x_scale, layer.weight.float(), layer.weight_scale, layer.k_offset)
    got = layer.to("cuda")(x.cuda()).double().cpu()
    assert bool(((got - ref).abs() <= 2.0 ** 10 * bound + 1e-30).all())


# ---------------------------------------------------------------------------------------------
# FP8 KV cache
# ---------------------------------------------------------------------------------------------

def test_fp8_kv_cache_stores_scaled_e4m3_and_reads_it_back():
    k_scale, v_scale = torch.tensor(0.05), torch.tensor(0.002)
    cache = KVCache(1, 2, 8, 2, 16, FP8, scales=[(k_scale, v_scale)])
    k, v = torch.randn(2, 3, 2, 16, generator=_gen(11)), torch.randn(2, 3, 2, 16, generator=_gen(12)) * 0.01
    rows, slots = torch.arange(2)[:, None], torch.tensor([[0, 1, 2], [4, 5, 6]])
    cache.write(0, rows, slots, k, v)
    assert cache.k[0].dtype == FP8 and cache.nbytes() == 2 * 2 * 2 * 8 * 16
    assert torch.equal(cache.k[0][1, :, 5].view(torch.uint8), quantize_fp8(k[1, 1], k_scale).view(torch.uint8))
    keys, values = cache.read(0, 7, torch.float32)
    assert torch.equal(keys[1, :, 5], quantize_fp8(k[1, 1], k_scale).float() * k_scale)
    assert torch.equal(values[0, :, 2], quantize_fp8(v[0, 2], v_scale).float() * v_scale)
    assert bool((keys[0, :, 3:] == 0).all())  # untouched slots stay zero


def test_high_precision_cache_is_unchanged():
    cache = KVCache(1, 1, 4, 1, 8, torch.float32)
    k = torch.randn(1, 2, 1, 8, generator=_gen(13))
    cache.write(0, torch.zeros(1, 1, dtype=torch.long), torch.tensor([[0, 1]]), k, k)
    assert torch.equal(cache.read(0, 2, torch.float32)[0], k.transpose(1, 2))


def test_single_rank_comm_quantizes_the_normed_output():
    comm = SingleRankCommunicator()
    x, res, w = torch.randn(3, 16, generator=_gen(14)), torch.randn(3, 16, generator=_gen(15)), torch.ones(16)
    normed, _ = comm.allreduce_add_rmsnorm(x, res, w, 1e-5)
    q, _ = comm.allreduce_add_rmsnorm(x, res, w, 1e-5, quant_scale=torch.tensor(0.01))
    assert q.dtype == FP8
    assert torch.equal(q.view(torch.uint8), quantize_fp8(normed, torch.tensor(0.01)).view(torch.uint8))
