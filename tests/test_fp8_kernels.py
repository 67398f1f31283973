"""The one-kernel FP8 activation quantizers (model/fp8_kernels.py, Triton, GPU only) give the same
bytes and scales as model/fp8.py's torch code, for every granularity, dtype and k_offset, with
zero rows, saturating values and subnormal results among the inputs."""
from __future__ import annotations

import pytest
import torch

from model import fp8, fp8_kernels
from model.fp8 import BLOCK_128, PER_CHANNEL, PER_TENSOR, quantize_activation

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and fp8_kernels.triton is not None),
                                reason="needs a CUDA GPU with Triton")


def _torch_path(x, scheme, input_scale=None, k_offset=0):
    fp8.FUSED_QUANT = False
    try:
        return quantize_activation(x, scheme, input_scale, k_offset)
    finally:
        fp8.FUSED_QUANT = True


def _inputs(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-4, 3, m)[:, None]  # rows over 7 decades
    x[0] = 0.0  # an all-zero token
    x[-1, : k // 3] *= 1e-6  # values that land on e4m3 subnormals next to the row's amax
    return x.to(dtype).cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 5120), (7, 640), (33, 1000), (128, 96)])
def test_per_token_equals_torch(m, k, dtype):
    x = _inputs(m, k, dtype, seed=m + k)
    assert fp8_kernels.available(x)
    q, scale = quantize_activation(x, PER_CHANNEL)
    q_ref, scale_ref = _torch_path(x, PER_CHANNEL)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,k_offset", [(1, 5120, 0), (5, 640, 640), (9, 1000, 64), (3, 100, 37)])
def test_per_group_equals_torch(m, k, k_offset, dtype):
    x = _inputs(m, k, dtype, seed=m * k)
    q, scale = quantize_activation(x, BLOCK_128, k_offset=k_offset)
    q_ref, scale_ref = _torch_path(x, BLOCK_128, k_offset=k_offset)
    assert scale.shape == scale_ref.shape == (m, fp8.n_groups(k_offset, k))
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_equals_torch_and_saturates(dtype):
    x = _inputs(17, 777, dtype, seed=3)
    scale = torch.tensor(0.05, device="cuda")  # the large rows exceed 448 * 0.05: saturation
    q, _ = quantize_activation(x, PER_TENSOR, scale)
    q_ref, _ = _torch_path(x, PER_TENSOR, scale)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert q.float().abs().max() == 448.0 and not torch.isnan(q.float()).any()


def test_strided_rows():
    x = _inputs(6, 512, torch.bfloat16, seed=9)[:, :300]  # rows 512 apart, 300 columns used
    q, scale = quantize_activation(x, PER_CHANNEL)
    q_ref, scale_ref = _torch_path(x.contiguous(), PER_CHANNEL)
    assert torch.equal(scale, scale_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("scale_kind", ["token", "tensor"])
@pytest.mark.parametrize("m,k,n", [(1, 5120, 896), (5, 640, 5120), (16, 1000, 200), (3, 96, 40)])
def test_small_m_gemm_matches_float64(m, k, n, scale_kind):
    """The Triton decode GEMM against a float64 sum of the same FP8 operands: within the float32
    accumulation bound times 2^10 (FP8 tensor cores keep ~14 bits while accumulating, as the
    cuBLAS path's check allows), and equal on a second run (fixed split-K order, no atomics)."""
    gen = torch.Generator().manual_seed(m * 7 + k)
    x, w = torch.randn(m, k, generator=gen).cuda(), torch.randn(n, k, generator=gen).cuda()
    x_q, x_scale = quantize_activation(x, PER_CHANNEL)
    if scale_kind == "tensor":
        x_scale = x_scale.max()
        x_q = (x / x_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    w_scale = (w.abs().amax(1) / 448).float()
    w_q = (w / w_scale[:, None]).to(torch.float8_e4m3fn)
    got = fp8_kernels.gemm_small_m(x_q, x_scale, w_q, w_scale, torch.float32)
    a, b = x_q.double(), w_q.double()
    sx, sw = x_scale.double(), w_scale.double()
    ref = (a @ b.t()) * sx * sw
    bound = (k + 3) * 2.0 ** -24 * ((a.abs() @ b.abs().t()) * sx.abs() * sw) + 1e-30
    assert float(((got.double() - ref).abs() / bound).max()) <= 2 ** 10
    assert torch.equal(got, fp8_kernels.gemm_small_m(x_q, x_scale, w_q, w_scale, torch.float32))


def test_fp8_linear_takes_the_small_m_kernel(monkeypatch):
    """With SMALL_M_TRITON = 16, Fp8Linear routes up to 16 rows (channel scales) to gemm_small_m
    and more rows to cuBLAS; with 0 everything goes to cuBLAS."""
    monkeypatch.setattr(fp8, "SMALL_M_TRITON", 16)
    calls = []
    real = fp8_kernels.gemm_small_m
    monkeypatch.setattr(fp8_kernels, "gemm_small_m", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    layer = fp8.Fp8Linear(256, 64, PER_CHANNEL, torch.bfloat16).cuda()
    layer.weight.data.copy_(torch.randn(64, 256, device="cuda").to(torch.float8_e4m3fn))
    layer.weight_scale.data.fill_(0.01)
    for m in (1, 16, 17, 64):
        layer(torch.randn(m, 256, device="cuda", dtype=torch.bfloat16))
    assert calls == [1, 16]
    monkeypatch.setattr(fp8, "SMALL_M_TRITON", 0)
    layer(torch.randn(1, 256, device="cuda", dtype=torch.bfloat16))
    assert calls == [1, 16]
