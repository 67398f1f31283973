"""The fused-kernel path of a decode-sized step: the same math as the modules' own forwards, in
fewer, bandwidth-bound launches (model/kernels/), chosen at construction (`Llama4(kernels="triton")`).

At batch 1 a decode step is a weight stream: every byte of every active weight is read once and
almost nothing is computed. The torch ops spend their time elsewhere: ~20 launches per attention
(RoPE in float32, masks over the cache, SDPA, casts), a cuBLAS GEMV that reaches a third to a half
of HBM bandwidth at M = 1, and an expert loop that reads the routing back to the host. Here a
sub-layer is a handful of kernels:

  attention   FC_QKV GEMV -> RoPE + QK-norm + temperature + KV-cache write and split-KV attention
              over the static cache (length / chunk / tree mask computed in the kernel, the splits
              merged by the last one) in one kernel at decode sizes -> o_proj GEMV
  dense MLP   FC13 GEMV with SwiGLU in its epilogue -> FC2 GEMV
  MoE         router GEMV + top-1 + sigmoid (one kernel) -> shared and routed FC13+SwiGLU (one
              launch) -> shared and routed FC2 + their sum (one launch); the routed GEMVs read ONLY
              the routed experts' weights (expert ids stay on the device)
  LM head     GEMV over this rank's vocabulary slice

FP8 modules (tensor and channel schemes) run the same GEMV on e4m3 weights, quantizing the
activation inside the kernel's prologue, so an FP8 layer reads half the bytes in the same number of
launches. The residual add + RMSNorm between sub-layers is the collective's (one kernel,
collectives/fused_norm.py). Anything the kernels do not cover (more than MAX_TOKENS rows, CPU
tensors without Triton's interpreter, block-scaled FP8, expert parallelism over a communicator
that counts on the host, static per-expert input scales) takes the module's own forward: the
reference ops. Expert parallelism over a device-dispatching communicator (the symm backend) runs
the gathered expert GEMVs on the received slots between its dispatch and combine kernels.

Nothing here reads a device value on the host, so a step of these kernels is capturable in a CUDA
graph (workers/cuda_graphs.py captures it). tests/test_fast_path.py holds every path equal to the
modules' own forwards.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from collectives.triton_support import INTERPRETED, triton
from model.fp8 import Fp8Linear

MAX_TOKENS = 16  # rows (batch x new tokens) the small-M kernels take
NORM_FP8_ROWS = os.environ.get("DGX_EMU_NORM_FP8_ROWS", "1") != "0"  # fp8_rows; 0: the GEMVs quantize (A/B runs)
# fp8_rows up to this hidden size. Measured on an H200 (session 13, rows on / off alternated): medium (2048) decode
# 299.2 / 299.1 vs 302.4 / 302.5 us, verify 462.2 / 462.4 vs 474.1 / 474.1; maverick-slice (5120) decode 997.5 /
# 997.5 vs 994.6 / 993.9, verify 1328.5 / 1325.7 vs 1320.1 / 1314.6 (h200-ab-decode-*-rows{0,1}-*.json): there the
# norm's one program a row pays more for the amax and 5120 divisions than the GEMVs save (16-row tiles at K = 5120
# share their quantization over more rows than medium's 8).
NORM_FP8_ROWS_MAX_K = 4096


def _kernels():
    from model.kernels import decode_attention, linear_small_m, qkv_rope
    return linear_small_m, decode_attention, qkv_rope


def _moe_kernels():
    from model.kernels import moe_decode
    return moe_decode


def applies(x: torch.Tensor) -> bool:
    """x: (B, T, ...) a step's activations. True when this step runs on the fused kernels: at most
    MAX_TOKENS rows, on CUDA (or on CPU tensors under Triton's interpreter, for tests)."""
    return fits(x.shape[0] * x.shape[1]) and triton is not None and (x.is_cuda or INTERPRETED)


def fits(rows: int) -> bool:
    """True when a step of `rows` rows (batch x new tokens) is small enough for the fused kernels:
    the size half of `applies`. The emulator's launch plans (workers/launch_plan.py) ask it, for the
    GPU they emulate, so plan and code cannot disagree on which path a step takes."""
    return rows <= MAX_TOKENS


def _linear_args(module: nn.Module) -> dict | None:
    """How linear_small_m computes `module` (None: it cannot; use the module's own forward)."""
    if isinstance(module, nn.Linear) and module.bias is None:
        return {"weight": module.weight}
    if isinstance(module, Fp8Linear) and module.scheme.weight in ("tensor", "channel"):
        act = module.input_scale if module.scheme.static_input else "token"
        return {"weight": module.weight, "weight_scale": module.weight_scale, "act_quant": act,
                "out_dtype": module.out_dtype}
    return None


def _quantized_input(args: dict | None) -> bool:
    """Are these linear_small_m arguments an FP8 linear that can read its input quantized by its producer:
    dynamic per-token activation scales, or one static scale (the per-tensor scheme)?"""
    if args is None or args["weight"].dtype != torch.float8_e4m3fn:
        return False
    act = args["act_quant"]
    return act == "token" if isinstance(act, str) else act.numel() == 1


def takes_fp8_rows(module: nn.Module) -> bool:
    """Does linear(module, x, x_fp8=...) read x quantized per row (an FP8 linear with per-token or static
    activation scales on the GEMV kernels)?"""
    return _quantized_input(_linear_args(module))


def _rows_pay(module: nn.Module, rows: int) -> bool:
    """Are the norm's FP8 rows worth making for `module` at `rows` rows: on, it takes them, its K within
    NORM_FP8_ROWS_MAX_K, and with a static scale only from 2 rows, where they save the tensor-core path's
    quantization pre-pass? At one row a GEMV quantizes with a static scale in its prologue at no cost (no amax),
    and the rows only lengthen the norm: medium per-tensor decode on an H200, 296.8 / 296.9 us with them vs
    292.6 / 292.8 without; verify (4 rows) 458.5 / 458.9 vs 468.1 / 468.3 (f5624b6,
    h200-ab-decode-medium-fp8-per-tensor-rows*-8dcd4c3-tp1.json)."""
    if not (NORM_FP8_ROWS and takes_fp8_rows(module) and module.weight.shape[-1] <= NORM_FP8_ROWS_MAX_K):
        return False
    return rows > 1 or module.input_scale is None  # an Fp8Linear: input_scale only with a static scheme


def plans_fp8_rows(module: nn.Module, world: int, rows: int) -> bool:
    """fp8_rows' answer for a linear the norm feeds at `rows` rows, as the emulator's launch plans ask it: a
    world of one (the single-rank communicator's norm kernel makes the rows), FP8 with per-token or static
    scales (static: from 2 rows)."""
    return world == 1 and _rows_pay(module, rows)


def fp8_rows(comm, consumer: nn.Module | None, partial: torch.Tensor) -> tuple | None:
    """Buffers (e4m3 like partial, float32 (rows,)) for allreduce_add_rmsnorm to fill with its output
    quantized per row, when what reads that output (`consumer`: a linear, an MLP, or a MoE block, whose
    shared expert reads it) is an FP8 linear with per-token or static activation scales (then a third item:
    its static scale, which the norm quantizes with; from 2 rows only, _rows_pay) and the communicator's norm
    kernel makes the rows at no extra launch, at hidden sizes up to NORM_FP8_ROWS_MAX_K; else None. The GEMVs
    then skip their own amax pass and IEEE divisions (one row) or their quantization pre-pass (2+ rows). Measured on an H200: the medium weight
    stream as GEMV launches 188.1 -> 157.1 us were every FP8 GEMV fed so; the medium step, where the norms feed
    QKV, FC13 and the shared expert, 302.5 -> 299.1 us (verify 474.1 -> 462.4)."""
    if consumer is not None and hasattr(consumer, "router"):
        path = moe_path(consumer, partial.numel() // partial.shape[-1])
        consumer = consumer.shared_expert.gate_up_proj if path in ("pair", "separate") else None
    elif consumer is not None and hasattr(consumer, "gate_up_proj"):  # a dense MLP: its FC13
        consumer = consumer.gate_up_proj
    rows = partial.numel() // partial.shape[-1]
    if consumer is None or not _rows_pay(consumer, rows) or not comm.norm_quantizes_rows(partial):
        return None
    buffers = (torch.empty(partial.shape, dtype=torch.float8_e4m3fn, device=partial.device),
               torch.empty(rows, dtype=torch.float32, device=partial.device))
    return buffers if consumer.input_scale is None else (*buffers, consumer.input_scale)


def _flat_rows(x_fp8: tuple | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fp8_rows' (values, scales[, static scale]) as linear_small_m's x_fp8: (M, K), (M,)."""
    return None if x_fp8 is None else (x_fp8[0].reshape(-1, x_fp8[0].shape[-1]), x_fp8[1])


def linear(module: nn.Module, x: torch.Tensor, swiglu: bool = False,
           x_fp8: tuple | None = None) -> torch.Tensor:
    """module(x) for x (..., K), with SwiGLU of the (gate | up) halves when asked. x_fp8: x quantized per
    row by its producer (fp8_rows), read instead of x where the module takes it (takes_fp8_rows)."""
    args = _linear_args(module)
    if args is None:
        y = module(x)
        if not swiglu:
            return y
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up
    linear_small_m, _, _ = _kernels()
    flat = x.reshape(-1, x.shape[-1])  # (M, K)
    rows = _flat_rows(x_fp8) if _quantized_input(args) else None
    y = linear_small_m.linear_small_m(flat, swiglu=swiglu, x_fp8=rows, **args)
    return y.view(*x.shape[:-1], y.shape[-1])


def attention(attn, x: torch.Tensor, ctx, cache, x_fp8: tuple | None = None
              ) -> torch.Tensor:
    """Attention.forward on the kernels. x: (B, T, H) normed (x_fp8: also quantized per row, fp8_rows).
    Returns the o_proj partial (B, T, H)."""
    _, decode_attention, _ = _kernels()
    batch, n_new, _ = x.shape
    layer = attn.layer
    k_scale, v_scale = cache.scales[layer]
    fp8_cache = cache.dtype == torch.float8_e4m3fn
    qkv = linear(attn.qkv_proj, x, x_fp8=x_fp8)  # (B, T, (Hq + 2 Hkv) D)
    scales = dict(k_scale=k_scale if fp8_cache else None, v_scale=v_scale if fp8_cache else None)
    out = decode_attention.rope_decode_attention(  # RoPE, QK-norm, temperature, KV write and attention
        qkv, ctx.positions, ctx.start, cache.k[layer], cache.v[layer], n_heads=attn.n_heads_per_rank,
        n_kv_heads=attn.n_kv_heads_per_rank, head_dim=attn.head_dim, inv_freq=ctx.inv_freq,
        use_rope=attn.use_rope, use_qk_norm=attn.use_qk_norm, eps=attn.eps, temperature=attn.temperature,
        scale=attn.head_dim ** -0.5, chunk_size=attn.chunk_size, step_mask=ctx.step_mask, **scales)  # (B, T, Hq, D)
    return linear(attn.o_proj, out.reshape(batch, n_new, attn.n_heads_per_rank * attn.head_dim))


def feed_forward(ffn: nn.Module, x: torch.Tensor, x_fp8: tuple | None = None
                 ) -> torch.Tensor:
    """The MLP's or MoE's forward on the kernels. x: (B, T, H) (x_fp8: also quantized per row, for FC13
    or the shared expert's). Returns the partial sum (B, T, H)."""
    if hasattr(ffn, "router"):
        return moe(ffn, x, x_fp8)
    return linear(ffn.down_proj, linear(ffn.gate_up_proj, x, swiglu=True, x_fp8=x_fp8))


def _expert_args(experts: nn.Module, which: str) -> dict | None:
    """linear_small_m arguments for the routed experts' `which` ("gate_up_proj" / "down_proj")."""
    weight = getattr(experts, which)  # logical (E, in, out)
    if weight.dtype != torch.float8_e4m3fn:
        return {"weight": weight.transpose(1, 2)}  # (E, out, in) view
    scheme = experts.scheme
    if scheme.weight not in ("tensor", "channel"):
        return None
    act = getattr(experts, which + "_input_scale") if scheme.static_input else "token"  # static: (E,) per expert
    return {"weight": weight.transpose(1, 2), "weight_scale": getattr(experts, which + "_scale"),
            "act_quant": act, "out_dtype": experts.out_dtype}


def route(block: nn.Module, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE.route on the device: (expert ids (N, k), scores (N, k)). Top-1 with a plain router is one
    kernel (router GEMV + top-1 + sigmoid); other routers take the torch ops, and so does a router
    with forward hooks (workers/step_bench.py counts routed experts through one), so they fire."""
    router = block.router
    hooked = bool(router._forward_hooks or router._forward_pre_hooks)
    if routes_in_one_kernel(block) and not hooked:
        ids, scores = _moe_kernels().route_top1(flat, router.weight)  # (N,) each
        return ids[:, None], scores[:, None]
    return block.route(flat)


def routes_in_one_kernel(block: nn.Module) -> bool:
    """Does `route` take the one router kernel for `block` (top-1, a plain bias-free router)?"""
    router = block.router
    return block.top_k == 1 and type(router) is nn.Linear and router.bias is None


SHARED_PASSES_BYTES = 64 << 20  # FP8 shared-expert bytes x extra rows from which "separate" beats "pair"


def moe_path(block: nn.Module, rows: int = 1) -> str:
    """Which launches `moe` makes for `block` at decode sizes: "module" (its own forward: FP8
    experts without a kernel), "expert_parallel" (moe_expert_parallel), "pair" (the router, then the
    shared and routed experts in two pair launches) or "separate" (shared and routed GEMVs apart;
    also a big FP8 shared expert at `rows` > 1, see shared_on_tensor_cores). The emulator's launch
    plans ask it too."""
    gate_up, down = _expert_args(block.experts, "gate_up_proj"), _expert_args(block.experts, "down_proj")
    if gate_up is None or down is None:
        return "module"
    if block.expert_parallel:
        return "expert_parallel"
    shared = block.shared_expert
    if (block.top_k == 1 and _moe_kernels().pair_applies(_linear_args(shared.gate_up_proj), gate_up)
            and _moe_kernels().pair_applies(_linear_args(shared.down_proj), down)
            and not shared_on_tensor_cores(shared, rows)):
        return "pair"
    return "separate"


def shared_on_tensor_cores(shared: nn.Module, rows: int) -> bool:
    """Does a big FP8 shared expert at `rows` > 1 rows go apart from the pair, onto the tensor cores?
    The pair runs it on the CUDA-core FP8 GEMV, bound by per-row work: M rows cost M one-row passes
    (traced on an H200: a maverick-slice MoE layer's pairs take 106 us at 1 token, 339 us at 4).
    Apart, its FC13 and FC2 take linear_small_m's tensor-core path (a pass for any M <= 16) at ~5 more
    launches (~12-15 us, ~50 MB at the GEMV's rate): worth it once the extra passes read 64 MB."""
    weights = (shared.gate_up_proj.weight, shared.down_proj.weight)
    if rows < 2 or any(w.dtype != torch.float8_e4m3fn for w in weights):
        return False
    return (rows - 1) * sum(w.numel() for w in weights) >= SHARED_PASSES_BYTES


def moe(block: nn.Module, x: torch.Tensor, x_fp8: tuple | None = None) -> torch.Tensor:
    """MoE.forward (tensor-parallel experts) with the routing kept on the device. Top-1 routing with
    shared and routed experts of one weight dtype is three launches: the router, the shared and
    routed FC13 + SwiGLU as one, the shared and routed FC2 and their sum as one. x_fp8: x quantized
    per row (fp8_rows), for the shared expert's FC13."""
    path = moe_path(block, x.numel() // x.shape[-1])
    if path == "module":
        return block(x)
    gate_up, down = _expert_args(block.experts, "gate_up_proj"), _expert_args(block.experts, "down_proj")
    linear_small_m, _, _ = _kernels()
    moe_decode = _moe_kernels()
    flat = x.reshape(-1, x.shape[-1])  # (N, H)
    if path == "expert_parallel":
        return moe_expert_parallel(block, flat, gate_up, down).view_as(x)
    expert_ids, scores = route(block, flat)  # (N, k) each, on the device
    top_k = expert_ids.shape[1]
    shared = block.shared_expert
    if path == "pair":  # top-1
        shared_gate_up, shared_down = _linear_args(shared.gate_up_proj), _linear_args(shared.down_proj)
        ids, row_scale = expert_ids[:, 0], scores[:, 0]  # (N,) unit-stride views
        shared_fp8 = _flat_rows(x_fp8) if _quantized_input(shared_gate_up) else None
        hidden_shared, hidden_routed = moe_decode.dual_gate_up(flat, shared_gate_up, gate_up, ids, row_scale,
                                                               shared_fp8=shared_fp8)
        return moe_decode.dual_down(hidden_shared, hidden_routed, shared_down, down, ids).view_as(x)
    partial = feed_forward(shared, flat, _flat_rows(x_fp8))
    rows = flat if top_k == 1 else flat.repeat_interleave(top_k, dim=0)  # (N*k, H)
    ids, row_scale = expert_ids.reshape(-1), scores.reshape(-1)
    hidden = linear_small_m.linear_small_m(rows, expert_ids=ids, row_scale=row_scale, swiglu=True, **gate_up)
    routed = linear_small_m.linear_small_m(hidden, expert_ids=ids, **down)  # (N*k, H)
    if top_k == 1:
        partial = partial + routed
    else:
        partial = partial + routed.view(flat.shape[0], top_k, -1).sum(1)
    return partial.view_as(x)


def moe_expert_parallel(block: nn.Module, flat: torch.Tensor, gate_up: dict, down: dict) -> torch.Tensor:
    """MoE.forward with the experts split over the ranks: flat (N, H) -> this rank's partial sum (N, H).
    On a communicator that dispatches on the device (`block.static_dispatch_applies`), the routed rows
    go through dispatch_static / combine_static and the received slots through the gathered expert
    GEMVs (their inputs arrive scaled by the router score), so nothing is read back to the host and
    the step is capturable; otherwise the module's own routed path (counts on the host)."""
    if not block.static_dispatch_applies(flat.shape[0]):
        return block(flat)
    linear_small_m, _, _ = _kernels()
    expert_ids, scores = route(block, flat)  # (N, k) each, on the device

    def run_experts(rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:  # (R, H), (R,) -> (R, H)
        hidden = linear_small_m.linear_small_m(rows, expert_ids=local_ids, swiglu=True, **gate_up)
        return linear_small_m.linear_small_m(hidden, expert_ids=local_ids, **down)

    return feed_forward(block.shared_expert, flat) + block.routed_static(flat, expert_ids, scores, run_experts)


def step_head(model: nn.Module, token_ids: torch.Tensor, cache, n_new: torch.Tensor | None,
              positions: torch.Tensor | None, step_mask: torch.Tensor | None, static: bool):
    """The start of Llama4.forward on the kernels: (normed, residual, step context), or None when the
    embedding kernel does not take this model (then the torch ops run). One launch at a world of one
    (model/kernels/embed_norm.py: embedding gather, the first RMSNorm, positions, the cache length
    snapshot the layers read as `start`, and cache.lengths advanced by n_new, all at once); at
    several ranks the embedding's partial sums go through the communicator's allreduce_add_rmsnorm
    with no residual (the sum is the residual). The context carries no slots, masks or RoPE tables:
    the attention kernels compute those from positions and start. Validates the step's size as
    build_step_context does, before anything runs (a dynamic step reads the longest length)."""
    from model.attention import StepContext
    from model.kernels import embed_norm
    embed, norm = model.embed_tokens, model.layers[0].input_layernorm
    if not embed_norm.available(token_ids, embed.weight) or norm.weight.dtype not in embed_norm.DTYPES:
        return None
    n_tokens = token_ids.shape[1]
    if static and n_tokens > cache.max_len:
        raise ValueError(f"step of {n_tokens} tokens for a cache of {cache.max_len} slots")
    n_keys = cache.max_len if static else int(cache.lengths.max()) + n_tokens  # dynamic: a host sync, as there
    if n_keys > cache.max_len:
        raise ValueError(f"step needs {n_keys} cache slots but the cache holds {cache.max_len}")
    whole = model.comm.world_size == 1 or embed.replicated
    head = embed_norm.embed_norm(token_ids, embed.weight, vocab_start=embed.vocab_start, vocab_valid=embed.vocab_valid,
                                 norm_weight=norm.weight if whole else None, eps=norm.eps, lengths=cache.lengths,
                                 n_new=n_new, positions=positions)
    if whole:  # a world of one, or a replicated table, owns every id: the rows are the residual
        normed, residual = head.normed, head.rows
    else:
        normed, residual = model.comm.allreduce_add_rmsnorm(head.rows, None, norm.weight, norm.eps)
    ctx = StepContext(slots=None, cos=None, sin=None, masks={}, temperature=None, n_keys=n_keys,
                      positions=head.positions, start=head.start, step_mask=step_mask, inv_freq=model.inv_freq)
    return normed, residual, ctx


def lm_head(weight: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
    """normed (B, R, H) @ weight (V_r, H).T on the GEMV kernel."""
    linear_small_m, _, _ = _kernels()
    flat = normed.reshape(-1, normed.shape[-1])
    return linear_small_m.linear_small_m(flat, weight).view(*normed.shape[:-1], weight.shape[0])


def graph_blocker(model: nn.Module) -> str | None:
    """Why a decode step of `model` cannot be captured in a CUDA graph, or None when it can: every
    module of the step must be on the kernels (the torch fallbacks read routing back to the host)."""
    if getattr(model, "kernels", "torch") != "triton":
        return "the model runs the torch ops (--kernels torch); graphs need the fused kernels"
    for name, module in model.named_modules():
        if hasattr(module, "router"):
            if module.expert_parallel and not getattr(module.comm, "device_dispatch", False):
                return f"{name}: expert-parallel MoE over {module.comm.backend} (its all-to-all counts go through the host)"
            if _expert_args(module.experts, "gate_up_proj") is None:
                return f"{name}: FP8 experts with {module.experts.scheme} scales have no graph kernel yet"
        elif isinstance(module, Fp8Linear) and _linear_args(module) is None:
            return f"{name}: {module.scheme.weight}-scaled FP8 has no graph kernel yet"
    return None
