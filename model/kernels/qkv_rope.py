"""Everything attention does to the fused Q|K|V projection before SDPA, as ONE GPU kernel (Triton).

Why: between the qkv GEMM and attention, Attention.forward runs split, RoPE on q and on k (float
cast, four multiplies, an add, a subtract, stack, cast back: each a kernel), QK-norm on both (seven
more each), the NoPE temperature multiply and cast, and two cache writes (encode, then an indexed
scatter; FP8 quantization is three more). At decode token counts each is a launch of a few
kilobytes: some thirty launches per layer whose time is all overhead. Here it is one launch.

Design: one program per (token, block of up to 16 heads) over the row's q heads, then its k heads,
then its v heads (Maverick's per-rank 5 + 1 + 1 heads are one program per token); a head is
head_dim values, so a program holds a small (heads, head_dim / 2) tile. RoPE rotates interleaved
pairs (x[2i], x[2i+1]), so the kernel loads the even and the odd elements as two tiles and never
needs a shuffle; v heads skip the math through `tl.where` rather than a branch, as one program
mixes kinds. cos/sin and the temperature are recomputed per program from `positions` (a few
transcendental ops) instead of being read from a step-wide table: that costs nothing here and keeps
the argument list to what the layer already has.

Numerics match the torch code (`reference_qkv_rope_cache`, which mirrors Attention.forward):
  * every stage rounds to the input dtype where torch does (after RoPE, after QK-norm, after the
    temperature): the kernel casts to the io dtype and back to float32 at the same points;
  * the kernel is compiled with `enable_fp_fusion=False`, so `real * cos - imag * sin` rounds each
    product as torch's separate kernels do (no FMA), and divisions are IEEE (`div_rn`);
  * on a GPU cos, sin and log1p are libdevice's (what torch's CUDA kernels call); Triton's
    interpreter has no libdevice, so there they are numpy's and may differ from torch's CPU ones by
    an ulp (the test allows one bf16 ulp there);
  * the QK-norm mean of squares is a tree sum, not torch's order: a float32 ulp or so, which can
    move a bf16 result by one ulp;
  * `(pos + 1) / floor_scale` is a true division, as torch on the CPU; torch on CUDA multiplies by the
    reciprocal of a Python scalar, which is the same number when floor_scale is a power of two
    (Llama 4's 8192).
Cache slots past `S_max` are not written (the store is masked): build_step_context refuses such a
step before any layer runs, and a masked store cannot corrupt memory if it did not.
"""
from __future__ import annotations

import torch

from collectives.communicator import FP8_MAX, quantize_fp8, rms_norm
from collectives.triton_support import INTERPRETED, pdl_kwargs, tl, triton

FP8 = torch.float8_e4m3fn
IO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_PAIRS = 1024  # (head, pair) elements of one program: 16 heads of 128

if triton is not None:
    from triton.language.extra import libdevice

    from collectives.triton_support import pdl_launch_dependents, pdl_wait

    FP8_MAX_CONST = tl.constexpr(FP8_MAX)

    # The interpreter differs from a GPU in two ways that matter here: numpy has no libdevice (cos, sin
    # and log1p become numpy's), and its float32 -> bfloat16 cast truncates; `_round` rounds to
    # nearest-even by hand there, so a later store of the rounded value is exact.
    if INTERPRETED:
        @triton.jit
        def _mul(a, b):
            return a * b  # numpy rounds every product on its own

        @triton.jit
        def _cos_sin(x):
            return tl.cos(x), tl.sin(x)

        @triton.jit
        def _log1p(x):
            return tl.log(1.0 + x)  # x is a small integer here, so 1 + x is exact

        @triton.jit
        def _round(x, DTYPE: tl.constexpr):
            """x rounded to DTYPE and widened back: the value torch holds after an op that returns DTYPE."""
            if DTYPE == tl.bfloat16:
                bits = x.to(tl.uint32, bitcast=True)
                bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16  # round half to even at bit 16
                return bits.to(tl.float32, bitcast=True)
            else:
                return x.to(DTYPE).to(tl.float32)
    else:  # libdevice's cosf / sinf / log1pf: the functions torch's CUDA kernels call
        @triton.jit
        def _mul(a, b):
            """a * b rounded on its own (PTX mul.rn is never contracted into an FMA), so that the RoPE
            math keeps torch's roundings inside kernels compiled with FMA contraction on."""
            a, b = tl.broadcast(a, b)
            return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                             is_pure=True, pack=1)

        @triton.jit
        def _cos_sin(x):
            return libdevice.cos(x), libdevice.sin(x)

        @triton.jit
        def _log1p(x):
            return libdevice.log1p(x)

        @triton.jit
        def _round(x, DTYPE: tl.constexpr):
            """x rounded to DTYPE (round to nearest even) and widened back: what torch holds after an op
            that returns DTYPE."""
            return x.to(DTYPE).to(tl.float32)


def available(x: torch.Tensor) -> bool:
    """True when these kernels can run on `x`: a CUDA tensor (or a CPU one under Triton's interpreter)."""
    return triton is not None and (x.is_cuda or (INTERPRETED and x.device.type == "cpu"))


if triton is not None:
    @triton.jit
    def _store_kv(dst, scale_ptr, re, im, mask, FP8_CACHE: tl.constexpr):
        """Writes pairs to cache slots as KVCache._encode does: in the cache dtype, or for an FP8 cache
        clamp(x / scale, +-448) rounded to e4m3. dst points at the real parts."""
        if FP8_CACHE:
            scale = tl.load(scale_ptr)
            re = tl.minimum(tl.maximum(tl.math.div_rn(re, scale), -FP8_MAX_CONST), FP8_MAX_CONST)
            im = tl.minimum(tl.maximum(tl.math.div_rn(im, scale), -FP8_MAX_CONST), FP8_MAX_CONST)
        else:
            re, im = _round(re, dst.dtype.element_ty), _round(im, dst.dtype.element_ty)
        tl.store(dst, re.to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + 1, im.to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def rope_qk_norm_temperature(re, im, pos, inv_freq_ptr, pair, is_q, is_v, eps, floor_scale, attn_scale,
                                 IO: tl.constexpr, HEAD_DIM: tl.constexpr, USE_ROPE: tl.constexpr,
                                 USE_QK_NORM: tl.constexpr, USE_TEMPERATURE: tl.constexpr):
        """Heads as (rows, pairs) tiles of real / imaginary parts (float32), pos (float32) per row or
        one for all: RoPE and QK-norm on q and k heads (not v: is_v), the temperature on q heads
        (is_q), each stage rounded to IO where torch rounds (every product on its own: `_mul`)."""
        if USE_ROPE:  # q and k: (re + i im) * (cos + i sin)
            inv_freq = tl.load(inv_freq_ptr + pair, mask=pair < HEAD_DIM // 2, other=0.0)  # (1, HALF)
            cos, sin = _cos_sin(pos * inv_freq)
            re, im = (tl.where(is_v, re, _round(_mul(re, cos) - _mul(im, sin), IO)),
                      tl.where(is_v, im, _round(_mul(re, sin) + _mul(im, cos), IO)))
        if USE_QK_NORM:  # q and k: rms_norm(x, None, eps), float32 statistics, rounded to IO
            sq = _mul(re, re) + _mul(im, im)
            # summed in float64: the float32 result then does not depend on the order the tile's layout
            # gives the sum, so the split kernel's keys (write_new_kv) round as this kernel's do
            sum_sq = tl.sum(sq.to(tl.float64), axis=1).to(tl.float32)
            mean_sq = tl.math.div_rn(sum_sq, HEAD_DIM * 1.0)  # (rows,); masked lanes are 0
            inv_rms = tl.math.rsqrt(mean_sq + eps)[:, None]
            re, im = tl.where(is_v, re, _round(re * inv_rms, IO)), tl.where(is_v, im, _round(im * inv_rms, IO))
        if USE_TEMPERATURE:  # q only: q *= log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1
            t = _mul(_log1p(tl.math.floor(tl.math.div_rn(pos + 1.0, floor_scale))), attn_scale) + 1.0
            re, im = tl.where(is_q, _round(re * t, IO), re), tl.where(is_q, _round(im * t, IO), im)
        return re, im

    @triton.jit
    def rope_q_rows(qkv_ptr, pos_ptr, inv_freq_ptr, b, h, rows, row_ok, t, sp_b, sp_t, eps, floor_scale, attn_scale,
                    T: tl.constexpr, GROUP: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, Q_DT: tl.constexpr,
                    USE_ROPE: tl.constexpr, USE_QK_NORM: tl.constexpr, USE_TEMPERATURE: tl.constexpr):
        """For decode_attention's split kernel: its q rows (row = t * GROUP + g: head h * GROUP + g of
        token t) made from the fused QKV projection as this kernel makes them: (rows, D) in Q_DT."""
        n_all: tl.constexpr = HKV * GROUP + 2 * HKV
        half = tl.arange(0, D // 2)
        src = qkv_ptr + ((b * T + t) * n_all + h * GROUP + rows % GROUP)[:, None] * D + 2 * half[None, :]
        re = tl.load(src, mask=row_ok[:, None], other=0.0).to(tl.float32)  # (BLOCK_R, D / 2)
        im = tl.load(src + 1, mask=row_ok[:, None], other=0.0).to(tl.float32)
        pos = tl.load(pos_ptr + b * sp_b + t * sp_t, mask=row_ok, other=0).to(tl.float32)[:, None]
        every = rows[:, None] >= 0
        re, im = rope_qk_norm_temperature(re, im, pos, inv_freq_ptr, half[None, :], every, ~every, eps, floor_scale,
                                          attn_scale, Q_DT, D, USE_ROPE, USE_QK_NORM, USE_TEMPERATURE)
        return tl.reshape(tl.join(re, im), (re.shape[0], D)).to(Q_DT)  # (re, im) pairs back in place

    @triton.jit
    def write_new_kv(qkv_ptr, pos_ptr, inv_freq_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, b, h, start, lo, hi, kv_base,
                     sp_b, sp_t, eps, T: tl.constexpr, T_P2: tl.constexpr, GROUP: tl.constexpr, HKV: tl.constexpr,
                     D: tl.constexpr, Q_DT: tl.constexpr, FP8_CACHE: tl.constexpr, USE_ROPE: tl.constexpr,
                     USE_QK_NORM: tl.constexpr):
        """For decode_attention's split kernel: keys (RoPE, QK-norm) and values of the new tokens whose
        cache slots [lo, hi) its split reads, written there as this kernel writes them (the split's
        programs of other row blocks write the same bytes)."""
        n_q: tl.constexpr = HKV * GROUP
        tok = tl.arange(0, T_P2)[:, None]  # (T_P2, 1)
        half = tl.arange(0, D // 2)[None, :]  # (1, D / 2)
        slot = start + tok
        mask = (tok < T) & (slot >= lo) & (slot < hi) & (half >= 0)  # (T_P2, D / 2), tensors only
        row = (b * T + tok) * (n_q + 2 * HKV)
        src = qkv_ptr + (row + n_q + h) * D + 2 * half
        re = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        im = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
        pos = tl.load(pos_ptr + b * sp_b + tok * sp_t, mask=tok < T, other=0).to(tl.float32)
        none = tok < 0
        re, im = rope_qk_norm_temperature(re, im, pos, inv_freq_ptr, half, none, none, eps, 1.0, 0.0, Q_DT, D,
                                          USE_ROPE, USE_QK_NORM, False)
        dst = kv_base + slot * D + 2 * half
        _store_kv(k_ptr + dst, ks_ptr, re, im, mask, FP8_CACHE)
        src = qkv_ptr + (row + n_q + HKV + h) * D + 2 * half
        re = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        im = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
        _store_kv(v_ptr + dst, vs_ptr, re, im, mask, FP8_CACHE)

    @triton.jit
    def _qkv_rope_cache_kernel(
            qkv_ptr, pos_ptr, start_ptr, inv_freq_ptr, q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
            n_new, max_len, eps, floor_scale, attn_scale,
            N_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
            HEADS_BLOCK: tl.constexpr, USE_ROPE: tl.constexpr, USE_QK_NORM: tl.constexpr,
            USE_TEMPERATURE: tl.constexpr, FP8_CACHE: tl.constexpr, PDL: tl.constexpr):
        """Program (token, block of heads), token = b * T + t. Of the row's heads, [0, N_HEADS) are q heads
        (written to q), the next N_KV_HEADS k heads, the last N_KV_HEADS v heads (both written to cache
        slot start[b] + t). With PDL: waits for the QKV GEMV before anything else."""
        pdl_wait(PDL)
        pdl_launch_dependents(PDL)
        token = tl.program_id(0)
        io = qkv_ptr.dtype.element_ty
        n_all: tl.constexpr = N_HEADS + 2 * N_KV_HEADS
        head = tl.program_id(1) * HEADS_BLOCK + tl.arange(0, HEADS_BLOCK)[:, None]  # (HB, 1)
        pair = tl.arange(0, HALF)[None, :]  # (1, HALF)
        mask = (head < n_all) & (pair < HEAD_DIM // 2)  # (HB, HALF)
        is_q = head < N_HEADS
        is_v = head >= N_HEADS + N_KV_HEADS
        # Each head's interleaved pairs as two tiles: x[2i] (real parts) and x[2i+1] (imaginary parts)
        src = qkv_ptr + token * n_all * HEAD_DIM + head * HEAD_DIM + 2 * pair
        re = tl.load(src, mask=mask, other=0.0).to(tl.float32)  # (HB, HALF)
        im = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
        pos = tl.load(pos_ptr + token).to(tl.float32)
        re, im = rope_qk_norm_temperature(re, im, pos, inv_freq_ptr, pair, is_q, is_v, eps, floor_scale, attn_scale,
                                          io, HEAD_DIM, USE_ROPE, USE_QK_NORM, USE_TEMPERATURE)
        q_dst = q_ptr + (token * N_HEADS + head) * HEAD_DIM + 2 * pair  # (B, T, Hq, D)
        tl.store(q_dst, re.to(io), mask=mask & is_q)
        tl.store(q_dst + 1, im.to(io), mask=mask & is_q)
        # k and v heads go to slot start[b] + t of (B, Hkv, S_max, D); int64 offsets, the cache is large
        b = (token // n_new).to(tl.int64)
        slot = tl.load(start_ptr + b) + token % n_new
        kv_head = (head - N_HEADS) % N_KV_HEADS  # (HB, 1); meaningless (and masked off) for q heads
        offset = ((b * N_KV_HEADS + kv_head) * max_len + slot) * HEAD_DIM + 2 * pair
        # masks only of tensors: Triton 3.9's interpreter refuses a mask combined with a scalar
        in_cache = mask & (head >= N_HEADS) & (slot + 0 * head < max_len)  # (HB, HALF)
        is_k = head < N_HEADS + N_KV_HEADS
        _store_kv(k_cache_ptr + offset, k_scale_ptr, re, im, in_cache & is_k, FP8_CACHE)
        _store_kv(v_cache_ptr + offset, v_scale_ptr, re, im, in_cache & is_v, FP8_CACHE)


def _check(qkv, positions, start, k_cache, v_cache, n_heads, n_kv_heads, head_dim, inv_freq, k_scale, v_scale):
    """Raises ValueError naming the argument at fault, before anything runs."""
    width = (n_heads + 2 * n_kv_heads) * head_dim
    if n_heads < 1 or n_kv_heads < 1 or head_dim < 2 or head_dim % 2:
        raise ValueError(f"need n_heads, n_kv_heads >= 1 and an even head_dim, got {n_heads}, {n_kv_heads}, {head_dim}")
    if qkv.dim() != 3 or qkv.shape[-1] != width:
        raise ValueError(f"qkv must be (B, T, (n_heads + 2 * n_kv_heads) * head_dim = {width}), got {tuple(qkv.shape)}")
    if qkv.dtype not in IO_DTYPES or not qkv.is_contiguous():
        raise ValueError(f"qkv must be a contiguous float32/bfloat16/float16 tensor, got {qkv.dtype}")
    batch, n_new = qkv.shape[:2]
    if positions.shape != (batch, n_new) or positions.dtype != torch.int64:
        raise ValueError(f"positions must be int64 (B, T) = {(batch, n_new)}, got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if start.shape != (batch,) or start.dtype != torch.int64:
        raise ValueError(f"start must be int64 (B,) = ({batch},), got {start.dtype} {tuple(start.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if (cache.dim() != 4 or (cache.shape[0], cache.shape[1], cache.shape[3]) != (batch, n_kv_heads, head_dim)
                or cache.shape != k_cache.shape or not cache.is_contiguous()):
            raise ValueError(f"{name} must be contiguous (B, n_kv_heads, S_max, head_dim) = ({batch}, {n_kv_heads}, "
                             f"S_max, {head_dim}) like k_cache, got {tuple(cache.shape)}")
        if cache.dtype not in IO_DTYPES + (FP8,) or cache.dtype != k_cache.dtype:
            raise ValueError(f"{name} must be float32/bfloat16/float16/float8_e4m3fn like k_cache, got {cache.dtype}")
    if k_cache.dtype == FP8:
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if scale is None or scale.numel() != 1 or scale.dtype != torch.float32:
                raise ValueError(f"an FP8 cache needs {name} as a float32 scalar tensor, got {scale!r}")
    if inv_freq.shape != (head_dim // 2,) or inv_freq.dtype != torch.float32:
        raise ValueError(f"inv_freq must be float32 (head_dim / 2,) = ({head_dim // 2},), got {inv_freq.dtype} "
                         f"{tuple(inv_freq.shape)}")
    tensors = [positions, start, k_cache, v_cache, inv_freq] + ([k_scale, v_scale] if k_cache.dtype == FP8 else [])
    if any(t.device != qkv.device for t in tensors):
        raise ValueError(f"every tensor must be on qkv's device {qkv.device}")


def qkv_rope_cache(qkv: torch.Tensor, positions: torch.Tensor, start: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, *, n_heads: int, n_kv_heads: int, head_dim: int, inv_freq: torch.Tensor,
                   use_rope: bool, use_qk_norm: bool, eps: float, temperature: tuple[float, float] | None,
                   k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """qkv: (B, T, (n_heads + 2 * n_kv_heads) * head_dim) contiguous float32/bf16/fp16; positions (B, T)
    and start (B,) int64; k_cache / v_cache (B, n_kv_heads, S_max, head_dim) contiguous, in a float dtype
    or float8_e4m3fn (then k_scale / v_scale: float32 scalar tensors); inv_freq (head_dim / 2,) float32;
    temperature: (floor_scale, attn_scale) or None. Writes k and v of token t of row b to cache slot
    start[b] + t, in place. Returns q (B, T, n_heads, head_dim) in qkv's dtype."""
    _check(qkv, positions, start, k_cache, v_cache, n_heads, n_kv_heads, head_dim, inv_freq, k_scale, v_scale)
    if not available(qkv):
        raise ValueError(f"qkv_rope_cache needs Triton and a CUDA tensor (or Triton's interpreter), got {qkv.device}")
    batch, n_new = qkv.shape[:2]
    q = torch.empty((batch, n_new, n_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    fp8 = k_cache.dtype == FP8
    floor_scale, attn_scale = temperature if temperature is not None else (1.0, 0.0)
    half = triton.next_power_of_2(head_dim // 2)
    heads_block = min(triton.next_power_of_2(n_heads + 2 * n_kv_heads), max(1, MAX_PAIRS // half))
    grid = (batch * n_new, triton.cdiv(n_heads + 2 * n_kv_heads, heads_block))
    _qkv_rope_cache_kernel[grid](
        qkv, positions, start, inv_freq, q, k_cache, v_cache, k_scale if fp8 else k_cache,
        v_scale if fp8 else v_cache, n_new, k_cache.shape[2], float(eps), float(floor_scale), float(attn_scale),
        N_HEADS=n_heads, N_KV_HEADS=n_kv_heads, HEAD_DIM=head_dim, HALF=half, HEADS_BLOCK=heads_block,
        USE_ROPE=bool(use_rope), USE_QK_NORM=bool(use_qk_norm), USE_TEMPERATURE=temperature is not None,
        FP8_CACHE=fp8, num_warps=min(4, max(1, heads_block * half // 256)), enable_fp_fusion=False, **pdl_kwargs(qkv))
    return q


def reference_qkv_rope_cache(qkv: torch.Tensor, positions: torch.Tensor, start: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, *, n_heads: int, n_kv_heads: int, head_dim: int,
                             inv_freq: torch.Tensor, use_rope: bool, use_qk_norm: bool, eps: float,
                             temperature: tuple[float, float] | None, k_scale: torch.Tensor | None = None,
                             v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The same op in plain torch, step for step as Attention.forward, build_step_context and
    KVCache.write do it (the test oracle)."""
    from model.attention import apply_rope  # here, not at the top: attention.py may import this module

    _check(qkv, positions, start, k_cache, v_cache, n_heads, n_kv_heads, head_dim, inv_freq, k_scale, v_scale)
    batch, n_new = qkv.shape[:2]
    kv_width = n_kv_heads * head_dim
    q, k, v = qkv.split([n_heads * head_dim, kv_width, kv_width], dim=-1)
    q = q.view(batch, n_new, n_heads, head_dim)  # (B, T, Hq, D)
    k = k.view(batch, n_new, n_kv_heads, head_dim)  # (B, T, Hkv, D)
    v = v.view(batch, n_new, n_kv_heads, head_dim)
    if use_rope:
        freqs = positions[..., None].float() * inv_freq.to(qkv.device)  # (B, T, D/2)
        q, k = apply_rope(q, freqs.cos(), freqs.sin()), apply_rope(k, freqs.cos(), freqs.sin())
    if use_qk_norm:
        q, k = rms_norm(q, None, eps), rms_norm(k, None, eps)
    if temperature is not None:
        floor_scale, attn_scale = temperature
        t = torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0  # (B, T)
        q = (q * t[:, :, None, None]).to(q.dtype)
    rows = torch.arange(batch, device=qkv.device)[:, None]  # (B, 1)
    slots = start[:, None] + torch.arange(n_new, device=qkv.device)  # (B, T)
    fp8 = k_cache.dtype == FP8
    k_cache[rows, :, slots] = quantize_fp8(k, k_scale) if fp8 else k.to(k_cache.dtype)  # (B, T, Hkv, D) view
    v_cache[rows, :, slots] = quantize_fp8(v, v_scale) if fp8 else v.to(v_cache.dtype)
    return q
