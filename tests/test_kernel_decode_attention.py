"""Split-KV decode attention (model/kernels/decode_attention.py) against the model's own math
(`reference_decode_attention`: build_step_context's mask + Attention.forward's SDPA call).

Cases sweep batch rows with different prefix lengths, GQA ratios, head dims, cache sizes, chunked
attention with chunk boundaries inside the prefix, causal and tree step masks (siblings at equal
positions), float32 / bfloat16 / float16 queries, FP8 caches, and forced split counts (1, 3, 8: some
splits empty); the merge of the splits both fused into the split kernel (the default at these
sizes) and as its own kernel. Every cache slot at or past start + T holds NaN, so one read of it would poison the
output; torch.empty is patched to hand out NaN, so every output element and every scratch partial
the merge reads must have been written. Without a GPU this runs in Triton's interpreter.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from model.kernels.decode_attention import FP8, decode_attention, reference_decode_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8_SCALE = 0.05


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like hand out NaN-filled float tensors for the duration of a test."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(x):
        return x.fill_(float("nan")) if x.is_floating_point() and x.dtype != FP8 else x

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def _tree(n_new: int, gen: torch.Generator, parents=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A tree over the new tokens (parent before child; random unless `parents` are given):
    (depth (T,), ancestor-or-self mask (T, T))."""
    depth = torch.zeros(n_new, dtype=torch.long)
    mask = torch.eye(n_new, dtype=torch.bool)
    for j in range(1, n_new):
        parent = parents[j] if parents else int(torch.randint(0, j, (1,), generator=gen))
        depth[j] = depth[parent] + 1
        mask[j] |= mask[parent]
    return depth, mask


def _case(batch, n_new, n_heads, n_kv, head_dim, s_max, dtype, cache_dtype, tree, seed, starts=None, parents=None):
    """Fresh inputs: (kwargs for the kernel with a NaN-poisoned cache, kwargs for the reference)."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, s_max - n_new + 1, (batch,), generator=gen)
    if batch > 1:
        start[-1] = s_max - n_new  # one row fills the cache: chunk boundaries fall inside its prefix
    if starts is not None:
        start = torch.tensor(starts)
    positions = start[:, None] + torch.arange(n_new)
    step_mask = None
    if tree:
        depths, masks = zip(*(_tree(n_new, gen, parents) for _ in range(batch)))
        positions = start[:, None] + torch.stack(depths)
        step_mask = torch.stack(masks)
    q = torch.randn(batch, n_new, n_heads, head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(batch, n_kv, s_max, head_dim, generator=gen) for _ in range(2))
    scales = {}
    if cache_dtype == FP8:
        k, v = ((x / FP8_SCALE).clamp(-448, 448).to(FP8) for x in (k, v))
        scales = dict(k_scale=torch.tensor(FP8_SCALE), v_scale=torch.tensor(FP8_SCALE))
    else:
        k, v = k.to(cache_dtype), v.to(cache_dtype)
    dead = torch.arange(s_max)[None, :] >= (start + n_new)[:, None]  # (B, S_max) slots never to be read
    k_bad, v_bad = k.clone(), v.clone()
    for x in (k_bad, v_bad):
        if cache_dtype == FP8:
            x.view(torch.uint8).transpose(1, 2)[dead] = 0x7F  # e4m3fn NaN
        else:
            x.transpose(1, 2)[dead] = float("nan")
    common = dict(start=start, positions=positions, step_mask=step_mask, scale=head_dim ** -0.5, **scales)
    to_dev = lambda kw: {n: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for n, x in kw.items()}  # noqa: E731
    return (to_dev(dict(q=q, k_cache=k_bad, v_cache=v_bad, **common)),
            to_dev(dict(q=q, k_cache=k, v_cache=v, **common)))


CASES = [  # (B, T, Hq, Hkv, D, S_max, chunk_size, n_splits, block_s, tree)
    (1, 1, 4, 2, 16, 40, None, 1, 16, False),
    (2, 3, 4, 2, 32, 96, 16, 3, 16, False),
    (2, 4, 8, 1, 16, 96, None, 8, 16, True),
    (2, 4, 2, 2, 32, 40, 16, 8, 16, True),
    (1, 4, 8, 1, 32, 96, 16, None, None, False),
    (2, 1, 2, 2, 16, 96, 16, 3, 32, False),
    (2, 3, 8, 1, 16, 40, 16, 1, 16, True),
]


@pytest.mark.parametrize("index", range(len(CASES)))
def test_float32_matches_reference(index, poisoned_empty):
    batch, n_new, n_heads, n_kv, head_dim, s_max, chunk, n_splits, block_s, tree = CASES[index]
    kernel_in, ref_in = _case(batch, n_new, n_heads, n_kv, head_dim, s_max, torch.float32, torch.float32,
                              tree, seed=100 + index)
    out = decode_attention(**kernel_in, chunk_size=chunk, n_splits=n_splits, block_s=block_s)
    ref = reference_decode_attention(**ref_in, chunk_size=chunk)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("index", [1, 2, 6])
def test_separate_and_fused_merge(index, poisoned_empty):
    """The merge as its own kernel and fused into the split kernel (the last split of each group
    merges): both the reference; the fused merge's arrival counters are back at zero after."""
    from model.kernels import decode_attention as da
    batch, n_new, n_heads, n_kv, head_dim, s_max, chunk, n_splits, block_s, tree = CASES[index]
    kernel_in, ref_in = _case(batch, n_new, n_heads, n_kv, head_dim, s_max, torch.float32, torch.float32,
                              tree, seed=200 + index)
    ref = reference_decode_attention(**ref_in, chunk_size=chunk)
    for fused in (False, True):
        out = decode_attention(**kernel_in, chunk_size=chunk, n_splits=n_splits, block_s=block_s, fused_merge=fused)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not da._COUNTERS[torch.device(DEVICE) if DEVICE == "cpu" else out.device].any()


@pytest.mark.parametrize("dtype,cache_dtype,chunk,tree,n_splits,atol", [
    (torch.bfloat16, torch.bfloat16, 16, True, 3, 2e-2),
    (torch.bfloat16, torch.bfloat16, None, False, 8, 2e-2),
    (torch.float16, torch.float16, 16, False, 3, 2e-3),
    (torch.float32, FP8, 16, True, 3, 1e-5),  # fp8 -> float32 dequantization is exact
    (torch.bfloat16, FP8, None, False, 8, 2e-2),
])
def test_low_precision_matches_reference(dtype, cache_dtype, chunk, tree, n_splits, atol, poisoned_empty):
    kernel_in, ref_in = _case(2, 4, 4, 2, 32, 96, dtype, cache_dtype, tree, seed=n_splits + (chunk or 0))
    out = decode_attention(**kernel_in, chunk_size=chunk, n_splits=n_splits, block_s=16)
    ref = reference_decode_attention(**ref_in, chunk_size=chunk)
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=atol)


def test_tree_across_chunk_boundary(poisoned_empty):
    """A new key's chunk follows its position, not its slot: siblings push slots past positions, and
    here slot 16 holds position 15 (row 0), slot 32 position 31 (row 1), across chunks of 16."""
    kernel_in, ref_in = _case(2, 4, 4, 2, 16, 40, torch.float32, torch.float32, True, seed=11,
                              starts=[14, 29], parents=[None, 0, 0, 1])  # depths 0, 1, 1, 2
    out = decode_attention(**kernel_in, chunk_size=16, n_splits=2, block_s=16)
    torch.testing.assert_close(out, reference_decode_attention(**ref_in, chunk_size=16), atol=1e-5, rtol=1e-5)


def test_strided_inputs_and_expanded_causal_mask(poisoned_empty):
    """q from a (B, Hq, T, D) buffer, positions a column slice, the causal mask as the model builds it
    (expanded over the batch: stride 0): the same as contiguous inputs and step_mask=None."""
    kernel_in, ref_in = _case(2, 3, 4, 2, 16, 40, torch.float32, torch.float32, False, seed=5)
    strided = dict(kernel_in, q=kernel_in["q"].transpose(1, 2).contiguous().transpose(1, 2),
                   positions=torch.stack([kernel_in["positions"]] * 2, dim=2)[:, :, 1],
                   step_mask=torch.ones(3, 3, dtype=torch.bool, device=DEVICE).tril().expand(2, 3, 3))
    assert not strided["q"].is_contiguous() and not strided["positions"].is_contiguous()
    out = decode_attention(**strided, chunk_size=16, n_splits=2, block_s=16)
    torch.testing.assert_close(out, reference_decode_attention(**ref_in, chunk_size=16), atol=1e-5, rtol=1e-5)
    contiguous = decode_attention(**kernel_in, chunk_size=16, n_splits=2, block_s=16)  # compiled apart on a GPU
    torch.testing.assert_close(out, contiguous, atol=1e-6, rtol=1e-6)


def test_deterministic_and_independent_of_garbage():
    """Same inputs, same bits; and the dead slots' contents do not matter (NaN or finite)."""
    kernel_in, ref_in = _case(2, 4, 4, 2, 16, 40, torch.float32, torch.float32, True, seed=7)
    first = decode_attention(**kernel_in, chunk_size=16, n_splits=3, block_s=16)
    assert torch.equal(first, decode_attention(**kernel_in, chunk_size=16, n_splits=3, block_s=16))
    assert torch.equal(first, decode_attention(**ref_in, chunk_size=16, n_splits=3, block_s=16))


def _bad(**changes):
    kernel_in, _ = _case(1, 2, 4, 2, 16, 40, torch.float32, torch.float32, False, seed=1)
    kernel_in.update(changes)
    return kernel_in


@pytest.mark.parametrize("make,message", [
    (lambda: _bad(q=torch.randn(1, 17, 4, 16), positions=torch.zeros(1, 17, dtype=torch.long)),
     "T=17 new tokens"),
    (lambda: _bad(q=torch.randn(1, 2, 3, 16)), "Hq=3 query heads is not a multiple of Hkv=2"),
    (lambda: _bad(q=torch.randn(1, 2, 4, 24)), "head_dim must be a power of two"),
    (lambda: _bad(q=torch.randn(1, 2, 4, 32)), r"k_cache must be \(B=1, Hkv, S_max, D=32\)"),
    (lambda: _bad(q=torch.randn(2, 2, 4, 16)), r"k_cache must be \(B=2"),
    (lambda: _bad(v_cache=torch.randn(1, 2, 41, 16)), "v_cache .* must match k_cache"),
    (lambda: _bad(start=torch.zeros(2, dtype=torch.long)), r"start must be int64 \(B=1,\)"),
    (lambda: _bad(start=torch.zeros(1, dtype=torch.int32)), "start must be int64"),
    (lambda: _bad(positions=torch.zeros(1, 3, dtype=torch.long)), r"positions must be int64 \(B, T\)"),
    (lambda: _bad(step_mask=torch.ones(1, 2, 3, dtype=torch.bool)), r"step_mask must be bool \(B, T, T\)"),
    (lambda: _bad(k_cache=torch.zeros(1, 2, 40, 16, dtype=FP8), v_cache=torch.zeros(1, 2, 40, 16, dtype=FP8)),
     "an FP8 cache needs k_scale"),
    (lambda: _bad(chunk_size=0), "chunk_size must be a positive int"),
    (lambda: _bad(n_splits=0), "n_splits must be an int"),
    (lambda: _bad(q=torch.randn(1, 2, 4, 16, dtype=torch.float64)), "q must be float32, bfloat16 or float16"),
])
def test_bad_input_raises(make, message):
    kwargs = {n: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for n, x in make().items()}
    with pytest.raises(ValueError, match=message):
        decode_attention(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("s_max,chunk", [(512, None), (8192, 1024)])
@pytest.mark.parametrize("n_new", [1, 4])
def test_gpu_realistic_shape(n_new, s_max, chunk, cache_dtype):
    """One rank of a Llama-4-like layer: Hq=16, Hkv=8, D=128, bf16, compiled; auto split count."""
    kernel_in, ref_in = _case(1, n_new, 16, 8, 128, s_max, torch.bfloat16, cache_dtype, n_new > 1, seed=s_max)
    out = decode_attention(**kernel_in, chunk_size=chunk)
    ref = reference_decode_attention(**ref_in, chunk_size=chunk)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(out, decode_attention(**kernel_in, chunk_size=chunk))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda_graph_replay_follows_start():
    """Captured once, replayed after the prefix lengths change on the device: no host sync inside."""
    _, kernel_in = _case(2, 4, 16, 8, 128, 2048, torch.bfloat16, torch.bfloat16, False, seed=3)  # no NaN slots
    kernel_in["start"].copy_(torch.tensor([100, 1500]))
    kernel_in["positions"].copy_(kernel_in["start"][:, None] + torch.arange(4, device="cuda"))
    decode_attention(**kernel_in)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(**kernel_in)
    for new_start in ([7, 2000], [1000, 0]):
        kernel_in["start"].copy_(torch.tensor(new_start))
        kernel_in["positions"].copy_(kernel_in["start"][:, None] + torch.arange(4, device="cuda"))
        graph.replay()
        torch.testing.assert_close(out, decode_attention(**kernel_in), atol=0, rtol=0)


ROPE_CASES = [  # (B, T, Hq, Hkv, D, starts, S_max, chunk, n_splits, block_s, tree, rope, qk_norm, temperature, dtype, cache)
    (1, 1, 4, 2, 16, [20], 40, None, None, None, False, True, False, None, torch.float32, torch.float32),
    (2, 4, 8, 2, 32, [14, 29], 96, 16, 8, 16, True, True, True, None, torch.float32, torch.float32),  # crossing splits
    (2, 3, 4, 1, 16, [5, 40], 64, None, 3, 16, False, False, False, (8.0, 0.1), torch.float32, torch.float32),  # NoPE
    (1, 4, 4, 2, 16, [30], 64, 16, 4, 16, False, True, True, None, torch.float32, FP8),
    (2, 2, 4, 2, 16, [9, 31], 48, None, 2, 16, True, True, False, (4.0, 0.2), torch.bfloat16, torch.bfloat16),
]


@pytest.mark.parametrize("index", range(len(ROPE_CASES)))
def test_rope_fused_into_attention(index, poisoned_empty, monkeypatch):
    """rope_decode_attention (one launch: each split program makes its q rows and writes the new keys
    and values of its own slots) equals qkv_rope_cache + decode_attention: every cache byte, and the
    output (bit for bit in the interpreter; compiled, to the float32 rounding of the softmax steps),
    new tokens crossing split boundaries included."""
    from model.kernels import qkv_rope
    from model.kernels.decode_attention import rope_decode_attention
    qkv_rope_cache = qkv_rope.qkv_rope_cache
    (batch, n_new, n_heads, n_kv, head_dim, starts, s_max, chunk, n_splits, block_s, tree, use_rope, qk_norm,
     temperature, dtype, cache_dtype) = ROPE_CASES[index]
    gen = torch.Generator().manual_seed(300 + index)
    start = torch.tensor(starts)
    positions = start[:, None] + torch.arange(n_new)
    step_mask = None
    if tree:
        depths, masks = zip(*(_tree(n_new, gen) for _ in range(batch)))
        positions, step_mask = start[:, None] + torch.stack(depths), torch.stack(masks)
    qkv = torch.randn(batch, n_new, (n_heads + 2 * n_kv) * head_dim, generator=gen).to(dtype)
    cache = torch.randn(2, batch, n_kv, s_max, head_dim, generator=gen)
    scales = {}
    if cache_dtype == FP8:
        cache = (cache / FP8_SCALE).clamp(-448, 448)
        scales = dict(k_scale=torch.tensor(FP8_SCALE).to(DEVICE), v_scale=torch.tensor(FP8_SCALE).to(DEVICE))
    cache = cache.to(cache_dtype).to(DEVICE)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    rope = dict(n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, inv_freq=inv_freq.to(DEVICE), use_rope=use_rope,
                use_qk_norm=qk_norm, eps=1e-5, temperature=temperature)
    args = [t.to(DEVICE) for t in (qkv, positions, start)]
    mask = None if step_mask is None else step_mask.to(DEVICE)
    attn = dict(scale=head_dim ** -0.5, chunk_size=chunk, step_mask=mask, n_splits=n_splits, block_s=block_s)
    k_two, v_two = cache[0].clone(), cache[1].clone()
    q = qkv_rope_cache(*args, k_two, v_two, **rope, **scales)
    want = decode_attention(q, k_two, v_two, args[2], args[1], fused_merge=True, **attn, **scales)
    k_one, v_one = cache[0].clone(), cache[1].clone()
    monkeypatch.setattr(qkv_rope, "qkv_rope_cache", None)  # one launch: qkv_rope's kernel must not run
    got = rope_decode_attention(*args, k_one, v_one, **rope, **attn, **scales)
    assert got.dtype == dtype and not got.isnan().any()
    if DEVICE == "cpu":  # the interpreter rounds every step alike
        assert torch.equal(got, want)
    else:  # compiled without FMA contraction (as qkv_rope): the softmax's float32 steps may round apart
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-6 if dtype == torch.float32 else 2 ** -7,
                                   atol=1e-6)
    for one, two in ((k_one, k_two), (v_one, v_two)):
        assert torch.equal(one.view(torch.uint8) if one.dtype == FP8 else one,
                           two.view(torch.uint8) if two.dtype == FP8 else two)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("n_new", [1, 4])
def test_gpu_rope_fused_realistic(n_new, cache_dtype):
    """medium's attention at context 512 (Hq 16, Hkv 8, D 128, bf16): the fused launch writes the
    cache bytes qkv_rope writes and attends as decode_attention does."""
    from model.kernels import qkv_rope
    from model.kernels.decode_attention import rope_decode_attention
    gen = torch.Generator().manual_seed(n_new)
    start = torch.tensor([512], device="cuda")
    positions = start[:, None] + torch.arange(n_new, device="cuda")
    qkv = torch.randn(1, n_new, 32 * 128, generator=gen).to(torch.bfloat16).cuda()
    cache = (torch.randn(2, 1, 8, 1024, 128, generator=gen) * (1 / FP8_SCALE if cache_dtype == FP8 else 1))
    cache = cache.clamp(-448, 448).to(cache_dtype).cuda()
    scales = dict(k_scale=torch.tensor(FP8_SCALE, device="cuda"), v_scale=torch.tensor(FP8_SCALE, device="cuda")) \
        if cache_dtype == FP8 else {}
    rope = dict(n_heads=16, n_kv_heads=8, head_dim=128, inv_freq=1.0 / (500000.0 ** (torch.arange(0, 128, 2).cuda()
                / 128)), use_rope=True, use_qk_norm=False, eps=1e-5, temperature=None)
    k_two, v_two = cache[0].clone(), cache[1].clone()
    q = qkv_rope.qkv_rope_cache(qkv, positions, start, k_two, v_two, **rope, **scales)
    want = decode_attention(q, k_two, v_two, start, positions, scale=128 ** -0.5, chunk_size=8192, **scales)
    k_one, v_one = cache[0].clone(), cache[1].clone()
    got = rope_decode_attention(qkv, positions, start, k_one, v_one, **rope, scale=128 ** -0.5, chunk_size=8192,
                                **scales)
    for one, two in ((k_one, k_two), (v_one, v_two)):
        assert torch.equal(one.view(torch.uint8), two.view(torch.uint8))
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-3)
