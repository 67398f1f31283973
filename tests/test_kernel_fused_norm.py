"""The fused residual-add + RMSNorm (+ FP8) kernel (collectives/fused_norm.py) against its torch
reference, Communicator.allreduce_add_rmsnorm for a world of one.

What is asserted, and why:
  * the new residual is bit-identical (one add, rounded once, in both);
  * normed is within 1e-6 relative for float32 and within 2 ulps for bf16/fp16: the mean of squares
    is summed in a tree, not in torch's order (an ulp of the normalized value, then one more through
    the weight multiply);
  * FP8: the bytes equal quantize_fp8 of the kernel's own unquantized output, exactly. On a GPU that
    is torch's cast; under the interpreter, whose float32 -> e4m3 cast is wrong (subnormals and
    rounding carries), it is the interpreter's cast of the same float32 values, so scale and clamp
    are checked exactly everywhere and the cast itself on a GPU only;
  * every output element is written (torch.empty returns NaN here: see conftest's `poison_empty`), bad input is
    refused with a message naming it.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from collectives import fused_norm  # noqa: E402
from tests.numerics import assert_within_2_ulps  # noqa: E402
from collectives.communicator import Communicator, SingleRankCommunicator, quantize_fp8  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
SHAPES = [(1, 256), (3, 5, 96), (16, 2048), (2, 1000), (4, 1)]


pytestmark = pytest.mark.usefixtures("poison_empty")  # tests/conftest.py


def _inputs(shape, dtype, weight_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    partial = torch.randn(shape, generator=gen) * 2
    residual = torch.randn(shape, generator=gen) * torch.logspace(-2, 2, shape[-1])  # rows of uneven scale
    weight = 1 + torch.randn(shape[-1], generator=gen) * 0.2
    return partial.to(dtype).to(DEVICE), residual.to(dtype).to(DEVICE), weight.to(weight_dtype).to(DEVICE)


def _assert_normed(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not actual.isnan().any(), "an element was not written"
    assert_within_2_ulps(actual, expected)


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_matches_reference(dtype, weight_dtype):
    for seed, shape in enumerate(SHAPES):  # fresh inputs for every shape
        partial, residual, weight = _inputs(shape, dtype, weight_dtype, seed)
        normed, new_residual = fused_norm.add_rmsnorm(partial, residual, weight, 1e-5)
        ref_normed, ref_residual = fused_norm.reference_add_rmsnorm(partial, residual, weight, 1e-5)
        assert torch.equal(new_residual, ref_residual)
        _assert_normed(normed, ref_normed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_residual(dtype):
    """residual None (a step's first norm): the partial itself is the new residual, and normed is
    what the kernel makes of the partial added onto zeros, bit for bit (randn has no -0.0)."""
    for seed, shape in enumerate(SHAPES):
        partial, _, weight = _inputs(shape, dtype, dtype, 20 + seed)
        normed, new_residual = fused_norm.add_rmsnorm(partial, None, weight, 1e-5)
        assert new_residual is partial
        assert torch.equal(normed, fused_norm.add_rmsnorm(partial, torch.zeros_like(partial), weight, 1e-5)[0])
        ref_normed, ref_residual = fused_norm.reference_add_rmsnorm(partial, None, weight, 1e-5)
        assert ref_residual is partial
        _assert_normed(normed, ref_normed)
    composed = SingleRankCommunicator().allreduce_add_rmsnorm(partial, None, weight, 1e-5)
    assert composed[1] is partial
    _assert_normed(composed[0], ref_normed)


def test_the_communicator_routes_here():
    """allreduce_add_rmsnorm of a world of one: this kernel's bytes on CUDA tensors, the reference's
    (its torch ops) elsewhere."""
    partial, residual, weight = _inputs((3, 64), torch.bfloat16, torch.bfloat16, 9)
    scale = torch.tensor(0.01, device=DEVICE)
    op = fused_norm.add_rmsnorm if DEVICE == "cuda" else fused_norm.reference_add_rmsnorm
    expected = op(partial, residual, weight, 1e-5, scale)
    comm: Communicator = SingleRankCommunicator()
    got = comm.allreduce_add_rmsnorm(partial, residual, weight, 1e-5, scale)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(expected, got))


def test_the_communicator_takes_strided_residuals():
    """A residual that is a strided view (speculative decoding hands such slices over) goes through
    the torch ops instead of being refused (seen on an H200: EAGLE-3 generate failed with it)."""
    partial, residual, weight = _inputs((2, 7, 64), torch.bfloat16, torch.bfloat16, 10)
    strided = torch.cat([residual, residual], dim=-1)[..., :64]  # (2, 7, 64), row stride 128
    got = SingleRankCommunicator().allreduce_add_rmsnorm(partial, strided, weight, 1e-5)
    want = fused_norm.reference_add_rmsnorm(partial, strided.contiguous(), weight, 1e-5)
    assert torch.equal(got[1], want[1])
    _assert_normed(got[0], want[0])


def test_available_only_for_what_the_kernel_takes():
    assert fused_norm.available(torch.zeros(2, 5120, device=DEVICE, dtype=torch.bfloat16))
    assert not fused_norm.available(torch.zeros(2, 8193, device=DEVICE))
    assert not fused_norm.available(torch.zeros(2, 64, device=DEVICE, dtype=torch.float64))
    assert not fused_norm.available(torch.zeros(64, 2, device=DEVICE).t())


@triton.jit
def _interpreter_fp8_cast(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """The interpreter's own float32 -> e4m3 cast, to say what its kernels store."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n).to(tl.float8e4nv), mask=offs < n)


def _quantized(normed, scale):
    """quantize_fp8(normed, scale): torch's bytes on a GPU, the interpreter's cast of the same values on a CPU."""
    if DEVICE == "cuda":
        return quantize_fp8(normed, scale)
    pre = (normed.float() / scale).clamp(-448.0, 448.0).contiguous()
    out = torch.empty(pre.shape, dtype=FP8)
    _interpreter_fp8_cast[(triton.cdiv(pre.numel(), 1024),)](pre, out, pre.numel(), BLOCK=1024)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_output(dtype):
    for seed, shape in enumerate(SHAPES[:4]):
        partial, residual, weight = _inputs(shape, dtype, dtype, 100 + seed)
        scale = torch.tensor(0.004, device=DEVICE)  # |normed| > 1.8 saturates
        q, new_residual = fused_norm.add_rmsnorm(partial, residual, weight, 1e-5, scale)
        normed, _ = fused_norm.add_rmsnorm(partial, residual, weight, 1e-5)
        assert q.dtype == FP8 and q.shape == residual.shape
        assert torch.equal(q.view(torch.uint8), _quantized(normed, scale).view(torch.uint8))
        assert bool((q.float().abs() == 448).any()), "the case should saturate"
        _, ref_residual = fused_norm.reference_add_rmsnorm(partial, residual, weight, 1e-5, scale)
        assert torch.equal(new_residual, ref_residual)


def _fp8_buffers(shape):
    rows = 1
    for size in shape[:-1]:
        rows *= size
    return torch.empty(shape, dtype=FP8, device=DEVICE), torch.empty(rows, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_rows(dtype):
    """fp8_rows: normed (still returned in full precision) also quantized per row, as quantize_rows_fp8 does:
    the scales exactly, the bytes as the cast of the kernel's own normed / scale (torch's on a GPU); a row of
    zeros gets the smallest scale and zero bytes."""
    for seed, shape in enumerate(SHAPES[:4]):
        partial, residual, weight = _inputs(shape, dtype, dtype, 200 + seed)
        if shape[0] > 2:
            partial[1], residual[1] = 0.0, 0.0
        rows = _fp8_buffers(shape)
        normed, new_residual = fused_norm.add_rmsnorm(partial, residual, weight, 1e-5, fp8_rows=rows)
        plain, _ = fused_norm.add_rmsnorm(partial, residual, weight, 1e-5)
        _assert_normed(normed, plain)  # another compile of the kernel: its tree sum may round apart (an H200: fp32)
        scale = normed.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) * (1.0 / 448.0)
        assert torch.equal(rows[1], scale.view(-1))
        divisor = torch.where(scale > 1e-12 / 448.0, scale, torch.ones_like(scale))
        assert torch.equal(rows[0].view(torch.uint8), _quantized(normed, divisor).view(torch.uint8))
        assert bool((rows[0].float().abs() == 448).any()), "each row's largest value maps to 448"
        ref_rows = _fp8_buffers(shape)  # the reference quantizes its own normed (within 2 ulps of the kernel's)
        ref_normed, ref_residual = fused_norm.reference_add_rmsnorm(partial, residual, weight, 1e-5,
                                                                    fp8_rows=ref_rows)
        assert torch.equal(new_residual, ref_residual)
        ref_scale = ref_normed.float().abs().amax(-1).clamp(min=1e-12) * (1.0 / 448.0)
        assert torch.equal(ref_rows[1], ref_scale.view(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_rows_with_a_static_scale(dtype):
    """fp8_rows with a third item, a static scale s (the per-tensor scheme): the bytes are the cast of the kernel's
    own normed / s (values past 448 saturate), every row's scale is s, and the reference fills the same."""
    for seed, shape in enumerate(SHAPES[:4]):
        partial, residual, weight = _inputs(shape, dtype, dtype, 300 + seed)
        static = torch.rand((), generator=torch.Generator().manual_seed(seed)).to(DEVICE) * 0.01 + 1e-3
        rows = (*_fp8_buffers(shape), static)
        normed, _ = fused_norm.add_rmsnorm(partial, residual, weight, 1e-5, fp8_rows=rows)
        assert torch.equal(rows[1], static.expand(rows[1].shape))
        assert torch.equal(rows[0].view(torch.uint8), _quantized(normed, static).view(torch.uint8))
        assert bool((rows[0].float().abs() == 448).any()), "the scale is small enough for some values to saturate"
        ref_rows = (*_fp8_buffers(shape), static)
        ref_normed, _ = fused_norm.reference_add_rmsnorm(partial, residual, weight, 1e-5, fp8_rows=ref_rows)
        assert torch.equal(ref_rows[1], rows[1])
        assert torch.equal(ref_rows[0].view(torch.uint8), quantize_fp8(ref_normed, static).view(torch.uint8))


def test_fp8_rows_through_the_single_rank_communicator():
    """Communicator: the single-rank one takes fp8_rows (its norm kernel makes them, torch ops on a CPU)."""
    partial, residual, weight = _inputs((2, 64), torch.bfloat16, torch.bfloat16, 7)
    comm = SingleRankCommunicator()
    assert comm.norm_quantizes_rows(partial)
    rows = _fp8_buffers((2, 64))
    normed, _ = comm.allreduce_add_rmsnorm(partial, residual, weight, 1e-5, fp8_rows=rows)
    scale = normed.float().abs().amax(-1) * (1.0 / 448.0)
    assert torch.equal(rows[1], scale)
    # torch's cast: the communicator runs the kernel on a GPU, the torch ops on a CPU
    assert torch.equal(rows[0].view(torch.uint8), quantize_fp8(normed, scale[:, None]).view(torch.uint8))


@pytest.mark.skipif(DEVICE != "cuda", reason="realistic shape and exact FP8 bytes: GPU only")
@pytest.mark.parametrize("hidden", [5120, 8192])
def test_large_gpu(hidden):
    """Llama 4's hidden size over a verify step of 8 rows x 16 tokens, bf16, plain and FP8."""
    partial, residual, weight = _inputs((8, 16, hidden), torch.bfloat16, torch.bfloat16, hidden)
    normed, new_residual = fused_norm.add_rmsnorm(partial, residual, weight, 1e-5)
    ref_normed, ref_residual = fused_norm.reference_add_rmsnorm(partial, residual, weight, 1e-5)
    assert torch.equal(new_residual, ref_residual)
    _assert_normed(normed, ref_normed)
    scale = torch.tensor(0.01, device=DEVICE)
    q, _ = fused_norm.add_rmsnorm(partial, residual, weight, 1e-5, scale)
    assert torch.equal(q.view(torch.uint8), quantize_fp8(normed, scale).view(torch.uint8))


@pytest.mark.parametrize("change,message", [
    (dict(partial=torch.zeros(4, 32)), "partial and residual must match"),
    (dict(partial=torch.zeros(3, 32, dtype=torch.bfloat16)), "partial and residual must match"),
    (dict(partial=torch.zeros(3, 32, dtype=torch.float64), residual=torch.zeros(3, 32, dtype=torch.float64)),
     "float32/bfloat16/float16"),
    (dict(residual=torch.zeros(32, 3).t()), "contiguous"),
    (dict(partial=torch.zeros(2, 8193), residual=torch.zeros(2, 8193), weight=torch.ones(8193)),
     r"H = 8193 is outside 1..8192"),
    (dict(weight=torch.ones(31)), r"weight must be a contiguous float \(H,\) = \(32,\)"),
    (dict(quant_scale=torch.ones(2)), "quant_scale must be a float32 scalar"),
    (dict(quant_scale=torch.ones((), dtype=torch.float16)), "quant_scale must be a float32 scalar"),
    (dict(fp8_rows=(torch.zeros(3, 32).to(FP8), torch.zeros(2))), r"fp8_rows must be .* float32 \(3,\)"),
    (dict(fp8_rows=(torch.zeros(3, 32), torch.zeros(3))), "fp8_rows must be"),
    (dict(fp8_rows=(torch.zeros(3, 32).to(FP8), torch.zeros(3)), quant_scale=torch.ones(())), "exclude each other"),
    (dict(fp8_rows=(torch.zeros(3, 32).to(FP8), torch.zeros(3), torch.ones(2))), "static scale must be a one-element"),
    (dict(fp8_rows=(torch.zeros(3, 32).to(FP8), torch.zeros(3), torch.ones((), dtype=torch.float64))),
     "static scale must be a one-element float32"),
    (dict(fp8_rows=(torch.zeros(3, 32).to(FP8),)), "fp8_rows must be \\(values, scales\\)"),
])
def test_bad_input_is_refused(change, message):
    args = dict(partial=torch.zeros(3, 32), residual=torch.zeros(3, 32), weight=torch.ones(32), eps=1e-5)
    args.update(change)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else tuple(t.to(DEVICE) for t in v)
            if isinstance(v, tuple) else v for k, v in args.items()}
    for op in (fused_norm.add_rmsnorm, fused_norm.reference_add_rmsnorm):
        with pytest.raises(ValueError, match=message):
            op(**args)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs: GPU only")
def test_cuda_graph_capture():
    """No host sync inside: the kernel captures into a CUDA graph and a replay on new inputs gives
    what an eager call gives."""
    partial, residual, weight = _inputs((4, 5120), torch.bfloat16, torch.bfloat16, 1)
    scale = torch.tensor(0.01, device=DEVICE)
    fused_norm.add_rmsnorm(partial, residual, weight, 1e-5, scale)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_static, residual_static = fused_norm.add_rmsnorm(partial, residual, weight, 1e-5, scale)
    new_partial, new_residual, _ = _inputs((4, 5120), torch.bfloat16, torch.bfloat16, 2)
    q_eager, residual_eager = fused_norm.add_rmsnorm(new_partial, new_residual, weight, 1e-5, scale)
    partial.copy_(new_partial)
    residual.copy_(new_residual)
    graph.replay()
    assert torch.equal(q_static.view(torch.uint8), q_eager.view(torch.uint8))
    assert torch.equal(residual_static, residual_eager)
