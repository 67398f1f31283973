"""The fused QKV -> RoPE -> QK-norm -> temperature -> KV-cache-write kernel (model/kernels/qkv_rope.py)
against its torch reference, which mirrors Attention.forward and KVCache.write.

What is asserted, and why:
  * float32: q and the written cache slots agree to 1e-5 relative (cos / sin / log1p come from
    numpy under the interpreter and libdevice on a GPU, the QK-norm sum is a tree sum);
  * bfloat16: every element is within one bf16 ulp of the reference; on a GPU without QK-norm the
    result is bit-identical (the same libdevice functions as torch, no FMA contraction, IEEE division);
  * every cache slot the step does not write keeps its bytes (the caches start as random values
    and NaNs), and every element of q is written (torch.empty returns NaN here: see conftest's `poison_empty`);
  * FP8 cache: exact bytes on a GPU. Under the interpreter Triton's own float32 -> e4m3 cast is wrong
    (it truncates subnormals and drops the carry of a rounding, up to a factor of 2), so there the
    expected bytes are the reference's float32 values put through that same cast: everything but
    the cast itself (scale, clamp, slot indexing) is checked exactly, the cast only on a GPU.
"""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from collectives.communicator import quantize_fp8  # noqa: E402
from model.kernels import qkv_rope  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
FLAGS = list(itertools.product([False, True], repeat=3))  # (use_rope, use_qk_norm, use_temperature)
SHAPES = list(itertools.product([1, 2], [1, 4], [16, 32], [(4, 2), (2, 2)]))  # B, T, head_dim, (Hq, Hkv)


pytestmark = pytest.mark.usefixtures("poison_empty")  # tests/conftest.py


def _inv_freq(head_dim: int) -> torch.Tensor:
    return (1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))).to(DEVICE)


def _case(gen, batch, n_new, head_dim, heads, dtype, cache_dtype, max_len=12):
    n_heads, n_kv = heads
    qkv = (torch.randn(batch, n_new, (n_heads + 2 * n_kv) * head_dim, generator=gen) * 3).to(dtype)
    positions = torch.randint(0, 40, (batch, n_new), generator=gen)  # crosses several floor_scale steps
    start = torch.randint(0, max_len - n_new + 1, (batch,), generator=gen)
    cache = torch.randn(2, batch, n_kv, max_len, head_dim, generator=gen)
    cache[torch.rand(cache.shape, generator=gen) < 0.3] = float("nan")
    cache = cache.to(cache_dtype)
    return [t.to(DEVICE) for t in (qkv, positions, start, cache[0].clone(), cache[1].clone())]


def _written(start, n_new, shape) -> torch.Tensor:
    """(B, Hkv, S, D) bool: the slots start[b] .. start[b] + T - 1 of every row."""
    slot = torch.arange(shape[2], device=start.device)
    rows = (slot >= start[:, None]) & (slot < start[:, None] + n_new)  # (B, S)
    return rows[:, None, :, None].expand(shape)


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    _, exponent = torch.frexp(x.float())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 8).clamp_min(2.0 ** -133)


def _assert_close(actual, expected, dtype, exact=False):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not actual.isnan().any(), "an element was not written"
    if exact:
        assert torch.equal(actual, expected)
    elif dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        # one bf16 ulp of the element, or float32 rounding at the tensor's scale: an element that RoPE's
        # x cos - y sin cancels to ~0 carries the fp32 rounding of its O(1) operands (seen: 9e-8 at 1e-6)
        err = (actual.float() - expected.float()).abs()
        fp32_floor = torch.finfo(torch.float32).eps * expected.float().abs().max()
        assert bool((err <= torch.maximum(_bf16_ulp(expected), fp32_floor)).all()), \
            f"more than one bf16 ulp off: {err.max().item()}"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes as integers of the same width, so that NaNs compare equal to themselves."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_cache(cache, ref_cache, before, start, n_new, dtype, exact):
    written = _written(start, n_new, cache.shape)
    assert torch.equal(_bits(cache)[~written], _bits(before)[~written]), "a slot outside the step changed"
    _assert_close(cache[written], ref_cache[written], dtype, exact)


def _run_both(qkv, positions, start, k_cache, v_cache, **kw):
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q = qkv_rope.qkv_rope_cache(qkv, positions, start, k_cache, v_cache, **kw)
    q_ref = qkv_rope.reference_qkv_rope_cache(qkv, positions, start, k_ref, v_ref, **kw)
    return q, q_ref, k_ref, v_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_rope,use_qk_norm,use_temperature", FLAGS)
def test_matches_reference(dtype, use_rope, use_qk_norm, use_temperature):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, use_rope, use_qk_norm, use_temperature)).encode()))
    exact = dtype == torch.bfloat16 and DEVICE == "cuda" and not use_qk_norm
    shapes = SHAPES[FLAGS.index((use_rope, use_qk_norm, use_temperature)) % 4::4]  # all 16 over the flag sets
    for batch, n_new, head_dim, heads in shapes:  # fresh inputs for every shape
        qkv, positions, start, k_cache, v_cache = _case(gen, batch, n_new, head_dim, heads, dtype, dtype)
        k_before, v_before = k_cache.clone(), v_cache.clone()
        q, q_ref, k_ref, v_ref = _run_both(
            qkv, positions, start, k_cache, v_cache, n_heads=heads[0], n_kv_heads=heads[1], head_dim=head_dim,
            inv_freq=_inv_freq(head_dim), use_rope=use_rope, use_qk_norm=use_qk_norm, eps=1e-5,
            temperature=(4.0, 0.1) if use_temperature else None)
        assert q.shape == (batch, n_new, heads[0], head_dim)
        _assert_close(q, q_ref, dtype, exact)
        _assert_cache(k_cache, k_ref, k_before, start, n_new, dtype, exact)
        _assert_cache(v_cache, v_ref, v_before, start, n_new, dtype, exact=True)  # v is copied as is



@triton.jit
def _interpreter_fp8_cast(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """The interpreter's own float32 -> e4m3 cast, to say what its kernels store."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n).to(tl.float8e4nv), mask=offs < n)


def _expected_fp8(encoded_ref, values, scale):
    """Torch's bytes on a GPU; under the interpreter the same float32 values through its own cast."""
    if DEVICE == "cuda":
        return encoded_ref
    pre = (values.float() / scale).clamp(-448.0, 448.0).contiguous()
    out = torch.empty(pre.shape, dtype=FP8)
    _interpreter_fp8_cast[(triton.cdiv(pre.numel(), 1024),)](pre, out, pre.numel(), BLOCK=1024)
    return out


@pytest.mark.parametrize("use_rope", [False, pytest.param(True, marks=pytest.mark.skipif(
    DEVICE != "cuda", reason="numpy's cos can move a bf16 value by an ulp, which the interpreter's cast can double"))])
def test_fp8_cache(use_rope):
    gen = torch.Generator().manual_seed(7 + use_rope)
    batch, n_new, head_dim, heads = 2, 4, 32, (4, 2)
    qkv, positions, start, k_cache, v_cache = _case(gen, batch, n_new, head_dim, heads, torch.bfloat16, FP8)
    k_scale, v_scale = torch.tensor(0.02, device=DEVICE), torch.tensor(0.01, device=DEVICE)  # |x| > 4.5 saturates
    kw = dict(n_heads=heads[0], n_kv_heads=heads[1], head_dim=head_dim, inv_freq=_inv_freq(head_dim),
              use_rope=use_rope, use_qk_norm=False, eps=1e-5, temperature=None)
    before = {"k": k_cache.clone(), "v": v_cache.clone()}
    q, q_ref, k_ref, v_ref = _run_both(qkv, positions, start, k_cache, v_cache, k_scale=k_scale, v_scale=v_scale,
                                       **kw)
    _assert_close(q, q_ref, torch.bfloat16, exact=DEVICE == "cuda")
    # the values the reference quantized: the same step into a bf16 cache
    plain = [torch.zeros(k_cache.shape, dtype=torch.bfloat16, device=DEVICE) for _ in range(2)]
    qkv_rope.reference_qkv_rope_cache(qkv, positions, start, *plain, **kw)
    written = _written(start, n_new, k_cache.shape)
    for name, cache, ref, values, scale in (("k", k_cache, k_ref, plain[0], k_scale), ("v", v_cache, v_ref, plain[1],
                                                                                       v_scale)):
        assert torch.equal(_bits(cache)[~written], _bits(before[name])[~written]), f"{name}: an unwritten slot changed"
        expected = _expected_fp8(ref[written], values[written], scale)
        assert torch.equal(_bits(cache[written]), _bits(expected)), f"{name}: FP8 bytes differ"
    assert bool((k_ref[written].float().abs() == 448).any()), "the case should saturate"


@pytest.mark.skipif(DEVICE != "cuda", reason="realistic shape: GPU only")
@pytest.mark.parametrize("fp8", [False, True])
def test_large_gpu(fp8):
    """Maverick's unsharded heads (40 q, 8 kv, head_dim 128), a verify step of 16 tokens, 8192 slots."""
    gen = torch.Generator().manual_seed(11)
    batch, n_new, head_dim, heads = 8, 16, 128, (40, 8)
    cache_dtype = FP8 if fp8 else torch.bfloat16
    qkv, positions, start, k_cache, v_cache = _case(gen, batch, n_new, head_dim, heads, torch.bfloat16,
                                                    cache_dtype, max_len=8192)
    positions = positions + 9000  # past floor_scale: the temperature is not 1
    scales = dict(k_scale=torch.tensor(0.03, device=DEVICE), v_scale=torch.tensor(0.02, device=DEVICE)) if fp8 else {}
    kw = dict(n_heads=heads[0], n_kv_heads=heads[1], head_dim=head_dim, inv_freq=_inv_freq(head_dim),
              use_rope=not fp8, use_qk_norm=not fp8, eps=1e-5, temperature=(8192.0, 0.1) if fp8 else None)
    k_before = k_cache.clone()
    q, q_ref, k_ref, v_ref = _run_both(qkv, positions, start, k_cache, v_cache, **scales, **kw)
    exact = fp8  # no QK-norm: bit-identical
    _assert_close(q, q_ref, torch.bfloat16, exact)
    written = _written(start, n_new, k_cache.shape)
    assert torch.equal(_bits(k_cache)[~written], _bits(k_before)[~written])
    if fp8:
        assert torch.equal(_bits(k_cache), _bits(k_ref)) and torch.equal(_bits(v_cache), _bits(v_ref))
    else:
        _assert_close(k_cache[written], k_ref[written], torch.bfloat16)
        assert torch.equal(_bits(v_cache), _bits(v_ref))


def _error_case(**change):
    gen = torch.Generator().manual_seed(3)
    qkv, positions, start, k_cache, v_cache = _case(gen, 2, 4, 16, (4, 2), torch.float32, torch.float32)
    args = dict(qkv=qkv, positions=positions, start=start, k_cache=k_cache, v_cache=v_cache, n_heads=4,
                n_kv_heads=2, head_dim=16, inv_freq=_inv_freq(16), use_rope=True, use_qk_norm=True, eps=1e-5,
                temperature=None)
    args.update(change)
    return args


@pytest.mark.parametrize("change,message", [
    (dict(n_heads=3), r"qkv must be \(B, T, \(n_heads \+ 2 \* n_kv_heads\) \* head_dim = 112\)"),
    (dict(head_dim=15), "even head_dim"),
    (dict(qkv=torch.zeros(2, 4, 128, dtype=torch.float64)), "float32/bfloat16/float16"),
    (dict(qkv=torch.zeros(2, 128, 4).transpose(1, 2)), "contiguous"),
    (dict(positions=torch.zeros(2, 4, dtype=torch.int32)), "positions must be int64"),
    (dict(start=torch.zeros(3, dtype=torch.int64)), r"start must be int64 \(B,\)"),
    (dict(k_cache=torch.zeros(2, 4, 12, 16)), r"k_cache must be contiguous \(B, n_kv_heads"),
    (dict(v_cache=torch.zeros(2, 2, 12, 16, dtype=torch.bfloat16)), "v_cache must be .* like k_cache"),
    (dict(k_cache=torch.zeros(2, 2, 12, 16, dtype=FP8), v_cache=torch.zeros(2, 2, 12, 16, dtype=FP8)),
     "an FP8 cache needs k_scale"),
    (dict(inv_freq=torch.zeros(16)), r"inv_freq must be float32 \(head_dim / 2,\)"),
])
def test_bad_input_is_refused(change, message):
    args = _error_case(**{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    for op in (qkv_rope.qkv_rope_cache, qkv_rope.reference_qkv_rope_cache):
        with pytest.raises(ValueError, match=message):
            op(**args)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs: GPU only")
def test_cuda_graph_capture():
    """No host sync inside: the kernel captures into a CUDA graph, and a replay on new inputs (new
    positions and start slots included) gives what an eager call gives."""
    gen = torch.Generator().manual_seed(5)
    batch, n_new, head_dim, heads = 2, 4, 128, (5, 1)
    kw = dict(n_heads=heads[0], n_kv_heads=heads[1], head_dim=head_dim, inv_freq=_inv_freq(head_dim),
              use_rope=True, use_qk_norm=True, eps=1e-5, temperature=None)
    static = _case(gen, batch, n_new, head_dim, heads, torch.bfloat16, torch.bfloat16, max_len=64)
    qkv_rope.qkv_rope_cache(*static, **kw)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_static = qkv_rope.qkv_rope_cache(*static, **kw)
    fresh = _case(gen, batch, n_new, head_dim, heads, torch.bfloat16, torch.bfloat16, max_len=64)
    eager_k, eager_v = fresh[3].clone(), fresh[4].clone()
    q_eager = qkv_rope.qkv_rope_cache(*fresh[:3], eager_k, eager_v, **kw)
    for buf, new in zip(static, fresh):
        buf.copy_(new)
    graph.replay()
    assert torch.equal(q_static, q_eager)
    assert torch.equal(_bits(static[3]), _bits(eager_k)) and torch.equal(_bits(static[4]), _bits(eager_v))
