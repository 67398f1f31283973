"""linear_small_m (model/kernels/linear_small_m.py) against its torch reference, which in turn is
held to the model's own FP8 layer: dense and gathered-expert rows, both weight layouts, router-score
row scales, SwiGLU, FP8 weights with static and per-token activation scales, and bad input.

Every output is poisoned with NaN before the kernel runs (an unwritten element shows as NaN).
Without CUDA the kernels run in Triton's interpreter (tests/conftest.py), whose float32 -> e4m3
cast truncates instead of rounding to nearest-even: there the FP8 cases feed activations whose
quantization is EXACT (x = e4m3 value * 2^j, each row holding +-448 * 2^j so that the per-token
scale amax * float32(1/448) is 2^j; static scales are powers of two), so any rounding gives the
same bytes. The random-activation FP8 case, which checks the in-kernel quantization against
torch's bytes, runs only on a GPU, as does the large realistic shape."""
from __future__ import annotations

import time

import pytest
import torch

from tests.numerics import poison_gemv_outputs, randn_on

pytest.importorskip("triton")

from collectives.communicator import quantize_fp8  # noqa: E402
from model.fp8 import PER_CHANNEL, PER_TENSOR, Fp8Linear  # noqa: E402
from model.kernels import linear_small_m as lsm  # noqa: E402
from model.kernels.linear_small_m import linear_small_m, reference_linear_small_m  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FP8 = torch.float8_e4m3fn
gpu_only = pytest.mark.skipif(not CUDA, reason="in-kernel float32 -> e4m3 rounding and large shapes need a GPU")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    poison_gemv_outputs(monkeypatch)


def _randn(gen, *shape, dtype=torch.float32):
    return randn_on(DEVICE, gen, *shape, dtype=dtype)


def _weight(gen, lead, n, k, dtype, layout):
    """A (*lead, N, K) weight: K-contiguous ("k", nn.Linear), or an N-contiguous view of HF's
    (*lead, K, N) storage ("n", as the BF16 experts are passed: w.transpose(-1, -2))."""
    if layout == "k":
        return _randn(gen, *lead, n, k, dtype=dtype)
    return _randn(gen, *lead, k, n, dtype=dtype).transpose(-1, -2)


def _scores(gen, m, x_dtype):
    """Router scores (M,). Triton's interpreter rounds float32 -> bf16/fp16 by truncation (a GPU
    rounds to nearest-even), so there 16-bit inputs get powers of two: x * score is then exact."""
    if CUDA or x_dtype == torch.float32:
        return torch.rand(m, generator=gen).to(DEVICE)
    return (-torch.randint(0, 4, (m,), generator=gen).float()).exp2().to(DEVICE)


def _check(got, want, rtol):
    """Every element written, and |got - want| <= rtol * max|want| (+ rtol * |want| elementwise)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    assert not torch.isnan(got).any(), "an output element was not written"
    got, want = got.float(), want.float()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


def _both(x, w, rtol, config=None, **kw):
    got = linear_small_m(x, w, config=config, **kw)
    _check(got, reference_linear_small_m(x, w, **kw), rtol)
    return got


SHAPES = [(1, 64, 96), (3, 24, 40), (16, 130, 256), (1, 130, 40), (3, 64, 256), (16, 24, 96)]


@pytest.mark.parametrize("layout", ["k", "n"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_dense_fp32(m, n, k, layout):
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x, w = _randn(gen, m, k), _weight(gen, (), n, k, torch.float32, layout)
    _both(x, w, 1e-5)


@pytest.mark.parametrize("layout", ["k", "n"])
@pytest.mark.parametrize("m,n,k", SHAPES[:3])
def test_dense_bf16(m, n, k, layout):
    gen = torch.Generator().manual_seed(m + n + k)
    x, w = _randn(gen, m, k, dtype=torch.bfloat16), _weight(gen, (), n, k, torch.bfloat16, layout)
    _both(x, w, 2 ** -7)  # bf16 output: a float32 sum in another order can round one ulp apart
    _both(x, w, 1e-5, out_dtype=torch.float32)  # exact bf16 products: only the summation order differs


@pytest.mark.parametrize("m", [1, 3, 16])
def test_row_scale_and_swiglu_dense(m):
    gen = torch.Generator().manual_seed(m)
    x, w = _randn(gen, m, 96, dtype=torch.bfloat16), _randn(gen, 128, 96, dtype=torch.bfloat16)
    score = _scores(gen, m, x.dtype)  # float32 router scores: rounded to bf16 first
    _both(x, w, 1e-5, row_scale=score, out_dtype=torch.float32)
    out = _both(x, w, 2 ** -7, row_scale=score, swiglu=True)
    assert out.shape == (m, 64)
    _both(x.float(), w.float(), 1e-5, swiglu=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["k", "n"])
def test_gathered_experts(layout, dtype):
    """Row m uses expert ids[m]: repeated ids, a single row, score scaling and SwiGLU."""
    gen = torch.Generator().manual_seed(7 if layout == "k" else 8)
    w = _weight(gen, (3,), 130, 96, dtype, layout)  # (E, N, K)
    for ids in ([2], [1, 1, 0], [0, 2, 2, 1, 0, 1, 2, 2]):
        m = len(ids)
        ids = torch.tensor(ids, device=DEVICE)
        x, score = _randn(gen, m, 96, dtype=dtype), _scores(gen, m, dtype)
        _both(x, w, 1e-5, expert_ids=ids, out_dtype=torch.float32)
        _both(x, w, 1e-5, expert_ids=ids.int(), row_scale=score, out_dtype=torch.float32)
    w = _weight(gen, (3,), 64, 40, dtype, layout)
    x = _randn(gen, 3, 40, dtype=dtype)
    _both(x, w, 1e-5 if dtype == torch.float32 else 2 ** -7, expert_ids=ids[:3], row_scale=score[:3], swiglu=True)


def _fp8_weight(gen, lead, n, k):
    w = _randn(gen, *lead, n, k)
    scale = w.abs().amax(-1) / 448  # (*lead, N) per output row, as checkpoints store it
    return (w / scale[..., None]).to(FP8), scale.float()


def _exact_fp8_rows(gen, m, k, dtype, row_exps):
    """x whose per-token quantization is exact: row i = e4m3 values * 2^row_exps[i], with one 448."""
    q = (torch.randn(m, k, generator=gen) * 100).clamp(-448, 448).to(FP8).float()
    q[:, 0] = 448.0
    return (q * torch.tensor(row_exps, dtype=torch.float32).exp2()[:, None]).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_fp8_exact_activations(m, dtype):
    """FP8 weights, dense: static and per-token scales, with score scaling (powers of two keep
    x * score exact in bf16) and SwiGLU."""
    gen = torch.Generator().manual_seed(m * 3)
    w_q, w_scale = _fp8_weight(gen, (), 130, 96)
    x = _exact_fp8_rows(gen, m, 96, dtype, [(i % 5) - 8 for i in range(m)])
    if m > 1:
        x[1] = 0.0  # a token of zeros: scale max(0, 1e-12) / 448, output zeros
    static = torch.tensor(2.0 ** -8, device=DEVICE)  # x / 2^-8 exact; values past 448 saturate
    # the default path from 2 rows is FP8 x FP8 on the tensor cores, whose sums keep ~14 bits inside an
    # instruction on a GPU (fp8_mma.py; the bound of its realistic-shapes test); the CUDA-core / 16-row dot
    # path (MMA off) stays exact to float32 rounding, and is checked so on every device
    tensor_cores = CUDA and lsm.mma_default(m, 130, 96)
    for act in ("token", static):
        _both(x, w_q, 1e-3 if tensor_cores else 1e-5, weight_scale=w_scale, act_quant=act, out_dtype=torch.float32)
        _both(x, w_q, 1e-5, weight_scale=w_scale, act_quant=act, out_dtype=torch.float32, config={"MMA": False})
        _both(x, w_q, 2 ** -7, weight_scale=w_scale, act_quant=act, swiglu=True)
    score = torch.tensor([2.0 ** -(i % 3) for i in range(m)], device=DEVICE)
    _both(x, w_q, 1e-3 if tensor_cores else 1e-5, weight_scale=w_scale, act_quant="token", row_scale=score,
          out_dtype=torch.float32)
    _both(x, w_q, 1e-5, weight_scale=w_scale, act_quant="token", row_scale=score, out_dtype=torch.float32,
          config={"MMA": False})


def test_fp8_gathered_experts_exact_activations():
    gen = torch.Generator().manual_seed(11)
    w_q, w_scale = _fp8_weight(gen, (3,), 64, 256)  # (E, N, K), (E, N)
    ids = torch.tensor([2, 0, 2, 1], device=DEVICE)
    x = _exact_fp8_rows(gen, 4, 256, torch.bfloat16, [-6, -9, -5, -7])
    per_expert = torch.tensor([2.0 ** -7, 2.0 ** -9, 2.0 ** -6], device=DEVICE)  # static input scales per expert
    for act in ("token", torch.tensor(2.0 ** -8, device=DEVICE), per_expert):
        _both(x, w_q, 1e-5, expert_ids=ids, weight_scale=w_scale, act_quant=act, out_dtype=torch.float32)
        _both(x, w_q, 1e-5, expert_ids=ids, weight_scale=w_scale, act_quant=act, swiglu=True,
              out_dtype=torch.float32)


@pytest.mark.parametrize("scheme", ["token", "static"])
def test_reference_is_the_model_fp8_linear(scheme):
    """The FP8 reference equals model/fp8.py's Fp8Linear (CPU: torch quantizer + emulated GEMM)."""
    gen = torch.Generator().manual_seed(5)
    layer = Fp8Linear(96, 40, PER_CHANNEL if scheme == "token" else PER_TENSOR, torch.float32)
    w_q, w_scale = _fp8_weight(gen, (), 40, 96)
    layer.weight.data.copy_(w_q.cpu())
    layer.weight_scale.data.copy_(w_scale.cpu())
    act = "token"
    if scheme == "static":
        layer.input_scale.data.fill_(0.013)
        act = layer.input_scale.data
    x = torch.randn(5, 96, generator=gen)
    ref = reference_linear_small_m(x, layer.weight, weight_scale=layer.weight_scale, act_quant=act,
                                   out_dtype=torch.float32)
    torch.testing.assert_close(ref, layer(x), rtol=1e-6, atol=1e-6 * float(ref.abs().max()))


def test_config_override_and_determinism():
    """Tiles that do not divide N or K give the same result; two runs give the same bits."""
    gen = torch.Generator().manual_seed(3)
    x, w = _randn(gen, 3, 100), _randn(gen, 50, 100)
    want = reference_linear_small_m(x, w)
    for cfg in ({"BLOCK_N": 16, "BLOCK_K": 32}, {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 2}):
        _check(linear_small_m(x, w, config=cfg), want, 1e-5)
    for block_n in (1, 2, 4):  # the GEMV's narrowest tiles, as the heuristic picks them on a GPU
        _check(linear_small_m(x[1:2], w, config={"BLOCK_N": block_n, "BLOCK_K": 64}), want[1:2], 1e-5)
        _check(linear_small_m(x, w.T.contiguous().T, config={"BLOCK_N": 16, "BLOCK_K": 16}), want, 1e-5)
    _check(linear_small_m(x, w, config={"gemv": True}), want, 1e-5)  # dense rows as per-row GEMV programs
    assert torch.equal(linear_small_m(x, w), linear_small_m(x, w))
    with pytest.raises(ValueError, match="unknown config keys"):
        linear_small_m(x, w, config={"BLOCK_M": 16})


def test_config_heuristic(monkeypatch):
    """Powers of two, and a few programs per SM at M = 1 for the Llama 4 shard shapes (as on a GPU)."""
    from model.kernels import gemv_tiles
    monkeypatch.setattr(gemv_tiles, "INTERPRETED", False)
    tiles = gemv_tiles.tiles.__wrapped__  # uncached: the interpreter's tiles must not be reused either way
    for layout in ("k", "n"):
        for dtype in (torch.bfloat16, FP8, torch.float32):
            for m, n, k in [(1, 4096, 5120), (1, 2048, 2048), (4, 1792, 5120), (16, 50512, 5120), (16, 24, 40)]:
                cfg = tiles(m, n, k, layout, dtype, gemv=m == 1)
                assert all(cfg[b] & (cfg[b] - 1) == 0 for b in ("BLOCK_N", "BLOCK_K")), cfg
                if m == 1 and n >= 2048 and not (layout == "n" and dtype == FP8):  # (FP8 is never N-major)
                    # N-contiguous tiles stay >= 32 bytes wide: half as many programs
                    assert -(-n // cfg["BLOCK_N"]) >= gemv_tiles.SMS // (1 if layout == "k" else 2), (layout, dtype, n, cfg)


def _bad_inputs():
    x, w = torch.randn(2, 8, device=DEVICE), torch.randn(6, 8, device=DEVICE)
    w3, ids = torch.randn(3, 6, 8, device=DEVICE), torch.tensor([0, 2], device=DEVICE)
    wq, ws = w.to(FP8), torch.ones(6, device=DEVICE)
    return [
        ((torch.randn(17, 8, device=DEVICE), w), {}, "1 <= M <= 16"),
        ((torch.randn(2, 16, device=DEVICE)[:, ::2], w), {}, "unit stride along K"),
        ((x.double(), w), {}, "float32/bfloat16/float16"),
        ((x, torch.randn(6, 9, device=DEVICE)), {}, "K = 8"),
        ((x, w3), {}, "needs expert_ids"),
        ((x, w), {"expert_ids": ids}, "needs expert_ids"),
        ((x, w3), {"expert_ids": ids.float()}, "expert_ids must be"),
        ((x, w3), {"expert_ids": ids[:1]}, "expert_ids must be"),
        ((x, w), {"row_scale": torch.ones(3, device=DEVICE)}, "row_scale must be"),
        ((x, torch.randn(5, 8, device=DEVICE)), {"swiglu": True}, "even N"),
        ((x, wq), {"act_quant": "token"}, "weight_scale"),
        ((x, wq), {"weight_scale": ws.half(), "act_quant": "token"}, "weight_scale"),
        ((x, wq), {"weight_scale": ws}, "act_quant"),
        ((x, wq), {"weight_scale": ws, "act_quant": "tensor"}, "act_quant"),
        ((x, wq), {"weight_scale": ws, "act_quant": torch.ones(2, device=DEVICE)}, "act_quant"),
        ((x, w), {"act_quant": "token"}, "FP8 weights only"),
        ((x, w), {"weight_scale": ws}, "FP8 weights only"),
        ((x, w), {"out_dtype": torch.int32}, "out_dtype"),
        ((x, w.to(torch.int8)), {}, "weight dtype"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_input_is_refused(case):
    args, kw, message = _bad_inputs()[case]
    for fn in (linear_small_m, reference_linear_small_m):
        with pytest.raises(ValueError, match=message):
            fn(*args, **kw)


@gpu_only
@pytest.mark.parametrize("m", [1, 5, 16])
def test_gpu_fp8_random_activations_quantize_like_torch(m):
    """Random bf16 activations: the CUDA-core kernels' quantization (in the GEMV, or the pre-pass of
    the 16-row dot) gives torch's e4m3 bytes. A single byte off moves a sum by ~1e-3 of its scale;
    float32 summation order moves it ~1e-6. From 2 rows the default is the tensor cores
    (mma_default), whose accumulation between float32 promotions moves sums by ~1e-4 of the
    largest (measured on an H200 at f92792a: 31 of 3e5): checked at that path's 1e-3."""
    gen = torch.Generator().manual_seed(m)
    w_q, w_scale = _fp8_weight(gen, (), 1000, 5120)
    x = _randn(gen, m, 5120, dtype=torch.bfloat16) * torch.logspace(-3, 3, m, device=DEVICE)[:, None]
    for act in ("token", torch.tensor(0.02, device=DEVICE)):
        kw = dict(weight_scale=w_scale, act_quant=act, out_dtype=torch.float32)
        want = reference_linear_small_m(x, w_q, **kw)
        _check(linear_small_m(x, w_q, config={"MMA": False}, **kw), want, 2e-5)
        _check(linear_small_m(x, w_q, **kw), want, 2e-5 if m == 1 else 1e-3)


@gpu_only
@pytest.mark.parametrize("m", [1, 4, 16])
def test_gpu_realistic_shapes(m):
    """Llama 4 TP8 shard shapes: bf16 dense, HF-layout experts with SwiGLU, FP8 experts."""
    gen = torch.Generator().manual_seed(m)
    x = _randn(gen, m, 5120, dtype=torch.bfloat16)
    _both(x, _randn(gen, 4096, 5120, dtype=torch.bfloat16), 2e-5, out_dtype=torch.float32)
    w_hf = _randn(gen, 16, 5120, 2048, dtype=torch.bfloat16)  # (E, K, N) as HF stores experts
    ids = torch.randint(0, 16, (m,), generator=gen).to(DEVICE)
    _both(x, w_hf.transpose(1, 2), 2 ** -7, expert_ids=ids, row_scale=torch.rand(m, device=DEVICE), swiglu=True)
    w_q, w_scale = _fp8_weight(gen, (16,), 2048, 5120)
    _both(x, w_q, 2e-5, expert_ids=ids, weight_scale=w_scale, act_quant="token", swiglu=True,
          out_dtype=torch.float32)


def _every_e4m3_weight(gen, n, k):
    """(N, K) e4m3 weights holding every finite byte (subnormals, +-0, +-448) in random places."""
    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)  # 254 values
    picks = finite[torch.randint(0, finite.numel(), (n, k), generator=gen)]
    picks[0, :finite.numel()] = finite[: min(k, finite.numel())]
    w_q = picks.view(FP8)
    return w_q.to(DEVICE), (torch.rand(n, generator=gen) + 0.5).to(DEVICE)


@pytest.mark.parametrize("m,swiglu", [(1, False), (3, True)])
def test_fp8_cvt_variants(m, swiglu):
    """CVT 'bits' (integer e4m3 -> float32 bits, x scaled by 2^119) gives CVT 'cvt''s bits exactly;
    CVT 'words' (four bytes per int32) equals the reference to float32 summation order; every
    finite e4m3 byte, subnormals included, is in the weights."""
    gen = torch.Generator().manual_seed(m)
    w_q, w_scale = _every_e4m3_weight(gen, 48, 256)
    x = _exact_fp8_rows(gen, m, 256, torch.bfloat16, [(i % 4) - 7 for i in range(m)])
    for act in ("token", torch.tensor(2.0 ** -8, device=DEVICE)):
        kw = dict(weight_scale=w_scale, act_quant=act, swiglu=swiglu, out_dtype=torch.float32)
        base = linear_small_m(x, w_q, config={"gemv": True, "BLOCK_N": 16, "BLOCK_K": 64}, **kw)
        _check(base, reference_linear_small_m(x, w_q, **kw), 1e-5)
        bits = linear_small_m(x, w_q, config={"gemv": True, "BLOCK_N": 16, "BLOCK_K": 64, "CVT": "bits"}, **kw)
        assert torch.equal(bits, base)
        words = linear_small_m(x, w_q, config={"gemv": True, "BLOCK_N": 16, "BLOCK_K": 64, "CVT": "words"}, **kw)
        _check(words, reference_linear_small_m(x, w_q, **kw), 1e-5)
        for cvt in ("cvt", "bits"):  # x quantized by the pre-pass kernel: the same bytes, the same sums
            pre = linear_small_m(x, w_q, config={"gemv": True, "BLOCK_N": 16, "BLOCK_K": 64, "CVT": cvt,
                                                 "PREQUANT": True}, **kw)
            assert torch.equal(pre, base)


def test_fp8_cvt_variants_gathered():
    gen = torch.Generator().manual_seed(21)
    w_q, w_scale = _fp8_weight(gen, (3,), 40, 128)  # (E, N, K)
    ids = torch.tensor([2, 0, 2], device=DEVICE)
    x = _exact_fp8_rows(gen, 3, 128, torch.bfloat16, [-6, -9, -5])
    kw = dict(expert_ids=ids, weight_scale=w_scale, act_quant="token", swiglu=True, out_dtype=torch.float32)
    want = reference_linear_small_m(x, w_q, **kw)
    for cfg in ({"CVT": "bits"}, {"CVT": "words"}, {"PREQUANT": True}, {"CVT": "words", "PREQUANT": True}):
        _check(linear_small_m(x, w_q, config={**cfg, "BLOCK_N": 8, "BLOCK_K": 32}, **kw), want, 1e-5)


@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k(split_k):
    """K cut among programs, the last one per tile reducing in split order: dense / gathered /
    SwiGLU / FP8; deterministic; its arrival counters end at zero."""
    gen = torch.Generator().manual_seed(split_k)
    x, w = _randn(gen, 3, 200), _randn(gen, 40, 200)
    cfg = {"gemv": True, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": split_k}
    got = linear_small_m(x, w, config=cfg)
    _check(got, reference_linear_small_m(x, w), 1e-5)
    assert torch.equal(got, linear_small_m(x, w, config=cfg))
    _check(linear_small_m(x, w, swiglu=True, config=cfg), reference_linear_small_m(x, w, swiglu=True), 1e-5)
    w3, ids = _randn(gen, 3, 40, 200), torch.tensor([1, 1, 0], device=DEVICE)
    score = _scores(gen, 3, torch.float32)
    kw = dict(expert_ids=ids, row_scale=score, swiglu=True)
    _check(linear_small_m(x, w3, config=cfg, **kw), reference_linear_small_m(x, w3, **kw), 1e-5)
    w_q, w_scale = _fp8_weight(gen, (), 40, 256)
    xq = _exact_fp8_rows(gen, 3, 256, torch.float32, [-4, -6, -2])
    kw = dict(weight_scale=w_scale, act_quant="token", out_dtype=torch.float32)
    for cvt in ("cvt", "words"):
        _check(linear_small_m(xq, w_q, config={**cfg, "CVT": cvt}, **kw), reference_linear_small_m(xq, w_q, **kw),
               1e-5)
    assert not lsm._COUNTERS[torch.device(DEVICE) if DEVICE == "cpu" else x.device].any()


def test_variant_configs_are_checked():
    x, w = torch.randn(2, 8, device=DEVICE), torch.randn(6, 8, device=DEVICE)
    w_q, w_scale = w.to(FP8), torch.ones(6, device=DEVICE)
    with pytest.raises(ValueError, match="CVT must be one of"):
        linear_small_m(x, w_q, weight_scale=w_scale, act_quant="token", config={"gemv": True, "CVT": "fast"})
    with pytest.raises(ValueError, match="FP8 weights in the GEMV path only"):
        linear_small_m(x, w, config={"gemv": True, "CVT": "bits"})
    with pytest.raises(ValueError, match="K % 4 == 0"):
        linear_small_m(x[:, :6], w_q[:, :6], weight_scale=w_scale, act_quant="token",
                       config={"gemv": True, "CVT": "words"})
    with pytest.raises(ValueError, match="SPLIT_K"):
        linear_small_m(x, w, config={"gemv": False, "SPLIT_K": 2})
    w3, ids = torch.randn(3, 6, 8, device=DEVICE).to(FP8), torch.tensor([0, 2], device=DEVICE)
    with pytest.raises(ValueError, match="PREQUANT"):
        linear_small_m(x, w3, expert_ids=ids, weight_scale=torch.ones(3, 6, device=DEVICE),
                       act_quant=torch.ones(3, device=DEVICE), config={"PREQUANT": True})


@gpu_only
@pytest.mark.parametrize("m", [1, 4, 16])
def test_gpu_variants_random_activations(m):
    """Every GEMV variant of the benchmark sweep on random bf16 activations at a Llama 4 shard shape:
    the reference's bytes (in-kernel quantization rounds as torch does) to float32 summation order."""
    gen = torch.Generator().manual_seed(m)
    w_q, w_scale = _fp8_weight(gen, (), 2048, 5120)
    x = _randn(gen, m, 5120, dtype=torch.bfloat16)
    kw = dict(weight_scale=w_scale, act_quant="token", out_dtype=torch.float32)
    want = reference_linear_small_m(x, w_q, **kw)
    for cfg in ({"CVT": "bits"}, {"CVT": "words"}, {"SPLIT_K": 4}, {"PREQUANT": True},
                {"CVT": "words", "PREQUANT": True, "SPLIT_K": 2}, {"gemv": False, "DOT_F16": True}):
        _check(linear_small_m(x, w_q, config={"gemv": True, **cfg}, **kw), want, 2e-5)


def test_benchmark_variants_compute_the_reference():
    """Every variant benchmarks/gemv_variants.py times on a GPU, on a small shape of each of its
    cases: accepted by linear_small_m and equal to the reference (so a GPU sweep measures only
    variants that are right, and none fails on a config error)."""
    from benchmarks import gemv_variants
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for case_set, kind, dtype, m in [(name, *case[:3]) for name, cases in gemv_variants.CASE_SETS.items()
                                     for case in cases]:
        if (case_set, kind, dtype, m) in seen:
            continue
        seen.add((case_set, kind, dtype, m))
        swiglu = kind == "dense swiglu"
        if dtype == "bf16":
            x, w, kw = _randn(gen, m, 64), _randn(gen, 48 if swiglu else 24, 64), {"swiglu": swiglu}
        elif kind == "experts":
            w, scale = _fp8_weight(gen, (3,), 32, 64)
            x = _exact_fp8_rows(gen, m, 64, torch.bfloat16, [-6] * m)
            kw = dict(expert_ids=torch.arange(m, device=DEVICE) % 3, weight_scale=scale, act_quant="token",
                      swiglu=True, out_dtype=torch.float32)
        else:
            w, scale = _fp8_weight(gen, (), 48 if swiglu else 24, 64)
            x = _exact_fp8_rows(gen, m, 64, torch.bfloat16, [-6] * m)
            kw = dict(weight_scale=scale, act_quant="token", swiglu=swiglu, out_dtype=torch.float32)
        want = reference_linear_small_m(x, w, **kw)
        for name, cfg in gemv_variants.variants(kind, dtype, m, case_set):
            cfg = {k: (min(v, 32) if k == "BLOCK_K" else v) for k, v in cfg.items()}  # the interpreter's pace
            # a GPU's FP8 tensor cores keep ~14 bits inside an instruction (measured on an H200: 1.6e-4
            # of the largest output here), which the interpreter does not model: the bound of the MMA test below
            rtol = 1e-3 if CUDA and cfg.get("MMA") else 1e-5
            _check(linear_small_m(x, w, config=cfg, **kw), want, rtol)


def test_environment_overrides(monkeypatch):
    """DGX_EMU_GEMV_FP8 / _BF16 ("KEY=VALUE,..."): parsed and checked, applied to calls without a
    config (GEMV-path keys to the GEMV only), never to calls with one."""
    monkeypatch.setenv("DGX_EMU_GEMV_FP8", "CVT=words, BLOCK_N=8,PREQUANT=1,DOT_F16=1")
    assert lsm.env_overrides("DGX_EMU_GEMV_FP8") == {"CVT": "words", "BLOCK_N": 8, "PREQUANT": True, "DOT_F16": True}
    for bad, message in (("BLOCK_M=4", "KEY=VALUE"), ("CVT", "KEY=VALUE"), ("BLOCK_N=wide", "takes an integer")):
        monkeypatch.setenv("DGX_EMU_GEMV_FP8", bad)
        with pytest.raises(ValueError, match=message):
            lsm.env_overrides("DGX_EMU_GEMV_FP8")
    gen = torch.Generator().manual_seed(2)
    w_q, w_scale = _fp8_weight(gen, (), 24, 62)  # K = 62: CVT 'words' refuses it
    x = _exact_fp8_rows(gen, 1, 62, torch.bfloat16, [-5])
    kw = dict(weight_scale=w_scale, act_quant="token", out_dtype=torch.float32)
    monkeypatch.setitem(lsm.ENV_OVERRIDES, FP8, {"CVT": "words", "DOT_F16": True})
    assert lsm.defaults(FP8, True) == {"CVT": "words"} and lsm.defaults(FP8, False) == {"DOT_F16": True}
    with pytest.raises(ValueError, match="K % 4 == 0"):  # the override reached the call
        linear_small_m(x, w_q, **kw)
    _check(linear_small_m(x, w_q, config={}, **kw), reference_linear_small_m(x, w_q, **kw), 1e-5)  # explicit: none
    monkeypatch.setitem(lsm.ENV_OVERRIDES, FP8, {"CVT": "bits", "BLOCK_N": 4})
    _check(linear_small_m(x, w_q, **kw), reference_linear_small_m(x, w_q, **kw), 1e-5)


@pytest.mark.parametrize("m,swiglu,split_k", [(1, False, 1), (3, True, 2), (16, False, 3), (5, True, 1)])
def test_fp8_tensor_core_path(m, swiglu, split_k):
    """FP8 weights x FP8 activations on the tensor cores (fp8_mma.py, swap AB): every finite e4m3
    weight byte, static and per-token scales, a zero row, score scaling, N not a multiple of the
    tile, K cut into splits reduced in a fixed order (deterministic, counters back at zero)."""
    gen = torch.Generator().manual_seed(m * 7 + split_k)
    w_q, w_scale = _every_e4m3_weight(gen, 2 * 72 if swiglu else 72, 256)
    x = _exact_fp8_rows(gen, m, 256, torch.bfloat16, [(i % 4) - 7 for i in range(m)])
    if m > 2:
        x[2] = 0.0
    cfg = {"MMA": True, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": split_k}
    for act in ("token", torch.tensor(2.0 ** -8, device=DEVICE)):
        kw = dict(weight_scale=w_scale, act_quant=act, swiglu=swiglu, out_dtype=torch.float32)
        got = linear_small_m(x, w_q, config=cfg, **kw)
        _check(got, reference_linear_small_m(x, w_q, **kw), 1e-5)
        assert torch.equal(got, linear_small_m(x, w_q, config=cfg, **kw))
    score = torch.tensor([2.0 ** -(i % 3) for i in range(m)], device=DEVICE)
    kw = dict(weight_scale=w_scale, act_quant="token", row_scale=score, swiglu=swiglu)
    _check(linear_small_m(x, w_q, config=cfg, **kw), reference_linear_small_m(x, w_q, **kw), 2 ** -7)
    assert not any(c.any() for c in lsm._COUNTERS.values())


def test_fp8_tensor_core_path_refuses_what_it_does_not_take():
    gen = torch.Generator().manual_seed(5)
    w_q, w_scale = _fp8_weight(gen, (2,), 32, 64)
    x = _exact_fp8_rows(gen, 2, 64, torch.bfloat16, [-6, -7])
    with pytest.raises(ValueError, match="not experts"):
        linear_small_m(x, w_q, expert_ids=torch.tensor([0, 1], device=DEVICE), weight_scale=w_scale,
                       act_quant="token", config={"MMA": True})
    w_n = _fp8_weight(gen, (), 64, 64)[0].T  # (N, K) view, N-contiguous
    with pytest.raises(ValueError, match="K-contiguous"):
        linear_small_m(x, w_n, weight_scale=torch.ones(64, device=DEVICE), act_quant="token", config={"MMA": True})


@gpu_only
@pytest.mark.parametrize("m", [1, 4, 16])
def test_gpu_fp8_tensor_core_path_realistic_shapes(m):
    """Random bf16 activations at Llama 4 shard shapes on the tensor cores: the same quantized bytes as
    torch (the pre-pass), sums within the FP8 tensor cores' accumulation error of the float32 reference."""
    gen = torch.Generator().manual_seed(m + 40)
    x = _randn(gen, m, 5120, dtype=torch.bfloat16)
    for n, swiglu in ((4096, False), (2 * 2048, True), (1000, False)):
        w_q, w_scale = _fp8_weight(gen, (), n, 5120)
        kw = dict(weight_scale=w_scale, act_quant="token", swiglu=swiglu, out_dtype=torch.float32)
        _check(linear_small_m(x, w_q, config={"MMA": True}, **kw), reference_linear_small_m(x, w_q, **kw), 1e-3)


def test_one_row_bf16_gemv_takes_rows_that_fill_a_program():
    """The K-contiguous high-precision GEMV's BLOCK_N: ~16 KB of weight a program at one row (medium's K = 2048
    rows of 4 KB: 4; SwiGLU's gate + up: 2; K = 4096: 2; Maverick's K = 5120: 1), one row for several rows."""
    from model.kernels.gemv_tiles import rows_per_program as rows
    assert [rows(1, 2048, 2, False), rows(1, 2048, 2, True), rows(1, 4096, 2, False), rows(1, 5120, 2, False)] == \
        [4, 2, 2, 1]
    assert rows(1, 1024, 2, False) == 4 and rows(1, 2048, 4, False) == 2 and rows(4, 2048, 2, False) == 1
    assert set(lsm.TUNED_BF16_GEMV) == {(32768, 2048), (2048, 4096)}  # the launcher's table


@gpu_only
def test_gpu_tuned_bf16_gemv_shapes():
    """One-row BF16 GEMVs at the tuned shapes and at the rule's 2- and 4-row tiles, against the reference."""
    gen = torch.Generator().manual_seed(8)
    for (n, k), swiglu in [((32768, 2048), False), ((2048, 4096), False), ((4096, 2048), False), ((8192, 2048), True),
                           ((1000, 2048), False)]:
        x, w = _randn(gen, 1, k, dtype=torch.bfloat16), _randn(gen, n, k, dtype=torch.bfloat16)
        kw = dict(swiglu=swiglu, out_dtype=torch.float32)
        _check(linear_small_m(x, w, **kw), reference_linear_small_m(x, w, **kw), 2e-5)


@gpu_only
def test_gpu_tuned_fp8_gemv_shapes():
    """The one-row FP8 GEMV at every shape of TUNED_FP8_GEMV (its measured tiles) against the reference."""
    from model.kernels.linear_small_m import TUNED_FP8_GEMV
    gen = torch.Generator().manual_seed(int(time.time_ns() % 2**31))
    for n, k in TUNED_FP8_GEMV:
        w_q, w_scale = _fp8_weight(gen, (), n, k)
        _both(_randn(gen, 1, k, dtype=torch.bfloat16), w_q, 2e-5, weight_scale=w_scale, act_quant="token",
              out_dtype=torch.float32)


def test_tuned_fp8_gemv_tiles_are_the_measured_best():
    """linear_small_m.TUNED_FP8_GEMV holds, per shape, the CUDA-core GEMV variant that ran fastest in
    the committed H200 sweep (gemv_bench.py --variants --cases deep-k), at least 10% ahead of the
    heuristic's tiles: a table that cannot drift from its measurement."""
    import json
    from pathlib import Path
    from model.kernels.linear_small_m import TUNED_FP8_GEMV
    sweep = json.loads((Path(__file__).resolve().parent.parent / "benchmarks/results/h200-gemv-variants-deep-k.json")
                       .read_text())["variants"]
    for (n, k), tuned in TUNED_FP8_GEMV.items():
        rows = [r for r in sweep if (r["M"], r["N"], r["K"]) == (1, n, k) and "us" in r and not r["config"].get("MMA")]
        best = min(rows, key=lambda r: r["us"])
        heuristic = next(r for r in rows if r["variant"] == "heuristic")
        assert best["config"] == tuned, (n, k, best)
        assert best["us"] <= 0.9 * heuristic["us"], (n, k, best["us"], heuristic["us"])


@pytest.mark.parametrize("static", [False, True])
def test_quantization_pre_pass_one_load_equals_the_two_passes(monkeypatch, static):
    """fp8_mma.prequantize loads a row of up to ONE_PASS_MAX_K values once; longer rows take the amax
    pass and the quantization pass in 2048-wide steps. Both give the same e4m3 bytes and scales, the
    module reference's (rows whose quantization is exact; with row scores, powers of two)."""
    from model.kernels import fp8_mma
    gen = torch.Generator().manual_seed(int(time.time_ns() % 2**31))
    x = _exact_fp8_rows(gen, 3, 4100, torch.bfloat16, [-8, -3, 2])  # K not a power of two: masked lanes
    scores = (-torch.randint(0, 3, (3,), generator=gen).float()).exp2().to(DEVICE)
    act = torch.tensor(2.0 ** -10, device=DEVICE) if static else "token"  # x / 2^-10: e4m3 values or saturated
    one_pass = fp8_mma.prequantize(x, scores, act)
    monkeypatch.setattr(fp8_mma, "ONE_PASS_MAX_K", 2048)
    two_passes = fp8_mma.prequantize(x, scores, act)
    assert torch.equal(one_pass[0].view(torch.uint8), two_passes[0].view(torch.uint8))
    assert torch.equal(one_pass[1], two_passes[1])
    scored = (x.float() * scores[:, None]).to(x.dtype)  # the kernels' row scaling: one rounding to x's dtype
    scale = act.expand(3) if static else scored.float().abs().amax(-1).clamp(min=1e-12) * (1.0 / 448)  # (M,)
    assert torch.equal(one_pass[0].float(), quantize_fp8(scored, scale[:, None]).float())
    assert torch.equal(one_pass[1], scale.float())


@pytest.mark.parametrize("m,swiglu,gather", [(1, False, False), (1, True, False), (3, True, True), (4, False, False)])
def test_fp8_x_quantized_by_its_producer(m, swiglu, gather):
    """x_fp8 (x as its producer quantized it, e.g. the fused add + RMSNorm) gives the bits of x
    quantized in the kernel: the one-row GEMV, gathered experts, and the tensor-core path from 2 rows."""
    from model.kernels.fp8_mma import prequantize
    gen = torch.Generator().manual_seed(m * 5 + swiglu + 2 * gather)
    w_q, w_scale = _fp8_weight(gen, (3,) if gather else (), 2 * 40 if swiglu else 40, 128)
    x = _exact_fp8_rows(gen, m, 128, torch.bfloat16, [(i % 4) - 7 for i in range(m)])
    kw = dict(weight_scale=w_scale, act_quant="token", swiglu=swiglu, out_dtype=torch.float32)
    if gather:
        kw["expert_ids"] = torch.tensor([2, 0, 2][:m], device=DEVICE)
    x_fp8 = prequantize(x, None, "token")
    want = linear_small_m(x, w_q, **kw)
    _check(want, reference_linear_small_m(x, w_q, **kw), 1e-3 if CUDA and m > 1 else 1e-5)
    assert torch.equal(linear_small_m(x, w_q, x_fp8=x_fp8, **kw), want)


def test_fp8_x_quantized_by_its_producer_is_checked():
    from model.kernels.fp8_mma import prequantize
    gen = torch.Generator().manual_seed(9)
    w_q, w_scale = _fp8_weight(gen, (), 32, 64)
    x = _exact_fp8_rows(gen, 2, 64, torch.bfloat16, [-6, -7])
    x_q, scales = prequantize(x, None, "token")
    kw = dict(weight_scale=w_scale, act_quant="token")
    for bad, match in [((x_q[:1], scales[:1]), "x_fp8 must be"), ((x_q, scales.double()), "x_fp8 must be"),
                       ((x_q.float(), scales), "x_fp8 must be")]:
        with pytest.raises(ValueError, match=match):
            linear_small_m(x, w_q, x_fp8=bad, **kw)
    with pytest.raises(ValueError, match="goes with FP8 weights"):
        linear_small_m(x, w_q.to(torch.bfloat16), x_fp8=(x_q, scales))
    # one static scale s (the per-tensor scheme): x_fp8 = (quantize_fp8(x, s), s in every row) gives the bits of the
    # kernel quantizing x with s itself (x exact in e4m3 after the division; row 0's largest values saturate)
    static = torch.tensor(2.0 ** -7, device=DEVICE)
    given = (quantize_fp8(x, static), static.expand(2).contiguous())
    for m in (1, 2):
        want = linear_small_m(x[:m], w_q, weight_scale=w_scale, act_quant=static, out_dtype=torch.float32,
                              config={"MMA": False})
        got = linear_small_m(x[:m], w_q, weight_scale=w_scale, act_quant=static, out_dtype=torch.float32,
                             config={"MMA": False}, x_fp8=(given[0][:m], given[1][:m]))
        assert torch.equal(got, want), m
    with pytest.raises(ValueError, match="no row_scale"):
        linear_small_m(x, w_q, row_scale=torch.ones(2, device=DEVICE), x_fp8=(x_q, scales), **kw)
