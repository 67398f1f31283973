"""The launch plan of a step: the kernels each module call launches on the emulated GPU, in order, and
the collectives between them, decided by the same predicates the code decides by.

Why: inside a CUDA graph a decode step of a small model is paid per launch as much as per byte (a
few microseconds each), so a plan that launches what the code no longer launches is off by tens of
percent (the plan of the older kernel set had 101 launches where the medium step makes 79). So which
path a call takes is ASKED of the code, never restated here: model/fast_path.py's fits(rows) (fused
kernels or the torch ops), moe_path(block) and routes_in_one_kernel(block), and decode_attention's
own split plan (whether the merge fuses into the attention launch). The emulated node is a GPU, so
the fused path's device condition holds there whatever this host runs; the modules asked are those
of a GPU build (workers/emulate.py: shape_only_model, gpu_twin). One exception: whether the
embedding and argmax kernels take a model is their dtype / width test, restated here, because their
`available` mixes it with the device test (a meta or CPU tensor fails that on this host).

  fused step (rows <= fast_path.MAX_TOKENS: decode, verify)
    prologue   ONE embedding kernel (gather, first RMSNorm, positions, cache lengths; at several
               ranks its rows then go through the fused all-reduce + RMSNorm), or before that kernel
               (CodePaths) the torch ops: positions and slots, the gather, the RMSNorm's seven ops
    attention  QKV GEMV -> ONE attention kernel (RoPE + KV write + split-KV + fused merge) -> o_proj
               GEMV -> AllReduce + add + RMSNorm (one kernel; at one rank the add + RMSNorm)
    dense      FC13 + SwiGLU GEMV -> FC2 GEMV -> the same collective
    MoE        router kernel (GEMV + top-1 + sigmoid) -> shared + routed FC13 pair -> shared + routed
               FC2 pair and their sum; expert-parallel (symm): router, shared FC13 and FC2, the
               routing glue, dispatch, the gathered routed GEMVs over every received slot, combine
    epilogue   LM head GEMV, the greedy pick (ONE argmax kernel; several ranks: its (max, id) pair,
               the all-gather and torch's choice of the winner), the graph's feedback copies
  torch step (prefill sizes): the module forwards, costed as before the fused path existed (qkv_rope,
    split + merge attention, cuBLAS router + top-k, separate shared and routed GEMVs and their sum)

The few torch-op counts below (prologue, pick, expert-parallel glue) are what those lines of model
code launch; tests/test_launch_plan.py holds each plan's launches equal to what the code launches,
counted under Triton's interpreter with benchmarks/launch_count.py's counter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from collectives.triton_support import triton
from model import fast_path
from model.ffn import EP_STATIC_MAX_ROWS
from workers.cost_model import FP8, Collective, CostModel, Op, PlanItem

EMBED_TORCH_OPS = 4  # positions = lengths + arange, slots = start + arange
SHARDED_EMBED_OPS = 7  # VocabEmbedding beside its gather: the id shift, ownership mask and zeroing
RMSNORM_TORCH_OPS = (2, 5)  # collectives.communicator.rms_norm around its mean: cast, square | eps, rsqrt, scale, cast, weight
EP_GLUE = (13, 7, 3)  # MoE.routed_static's torch ops: before dispatch, local expert ids, after combine (+ the sum)
GATHER_OPS_BEFORE, GATHER_OPS_AFTER = 4, 6  # sampling.distributed_argmax's torch ops around its all-gather
KV_DTYPES = {1: torch.float8_e4m3fn, 2: torch.bfloat16, 4: torch.float32}


@dataclass(frozen=True)
class CodePaths:
    """Which prologue and pick a step takes where the code has a choice the checkout's own history
    settles: None (the default) asks this checkout's code; True / False plans the step of a commit
    from before or after a kernel existed (benchmarks/emulator_validation.py plans each measured
    commit's step so: a measurement of older code is compared with the plan of that code)."""

    step_head: bool | None = None  # the embedding kernel (model/kernels/embed_norm.py) opens the fused step
    argmax: bool | None = None  # the greedy pick's argmax kernel (model/kernels/argmax.py)
    ids_in_place: bool | None = None  # a decode graph's pick writes its token buffer (no feedback copies)
    winner_kernel: bool | None = None  # several ranks: ONE kernel picks the winner of the gathered pairs
    gather_slots_kept: bool | None = None  # symm all_gather: kept zeroed slots, a view of the sum (2 launches)


CURRENT_CODE = CodePaths()


def fused(rows: int) -> bool:
    """Does a step of `rows` rows run on the fused kernels on the GPU? fast_path's own answer."""
    return fast_path.fits(rows)


def activation_bytes(model) -> int:
    """Bytes of one activation element: the embedding's dtype (bf16 for bf16 and fp8 models)."""
    return model.embed_tokens.weight.element_size()


def head_in_one_kernel(model, rows: int, paths: CodePaths = CURRENT_CODE) -> bool:
    """Does the step open with fast_path.step_head's ONE embedding kernel (gather, first RMSNorm,
    positions, cache lengths) on the GPU? On the fused path where model/kernels/embed_norm.py takes
    the embedding (its dtype and width) and the first norm's dtype, as embed_norm.available and
    step_head test them (their device test aside: the emulated node is a GPU)."""
    if not fused(rows) or paths.step_head is False:
        return False
    try:
        from model.kernels import embed_norm
    except ImportError:  # a checkout from before the kernel
        return False
    weight, norm = model.embed_tokens.weight, model.layers[0].input_layernorm.weight
    return (weight.dtype in embed_norm.DTYPES and 1 <= weight.shape[1] <= embed_norm.MAX_HIDDEN
            and norm.dtype in embed_norm.DTYPES)


def embed_plan(cost: CostModel, model, batch: int, tokens: int, paths: CodePaths = CURRENT_CODE) -> list[PlanItem]:
    """Positions and cache slots, the vocab-parallel embedding, its all-reduce, the first RMSNorm:
    the embedding kernel (at several ranks then the fused all-reduce + RMSNorm of its partial rows),
    else the torch ops of Llama4.forward. A replicated embedding needs no all-reduce."""
    rows, sharded = batch * tokens, not model.embed_tokens.owns_every_id
    message = rows * model.cfg.hidden_size * activation_bytes(model)
    if head_in_one_kernel(model, rows, paths):
        plan: list[PlanItem] = [cost.kernel("embedding + rmsnorm + positions", "embed", "gather")]
        if cost.world == 1 or model.embed_tokens.replicated:
            return plan
        # a CPU run (the torch prologue) all-reduces the same rows, then norms them on its own
        collective = Collective("allreduce_add_rmsnorm", "embedding all-reduce + rmsnorm", "embed", message,
                                accepts=("all_reduce",))
        return plan + [collective] + ([] if cost.fused_norm else [cost.kernel("first rmsnorm", "embed", "add_rmsnorm")])
    plan = [cost.kernel("positions + slots", "embed", "elementwise", EMBED_TORCH_OPS),
            cost.kernel("embedding", "embed", "gather")]
    if sharded:
        plan.append(cost.kernel("embedding mask", "embed", "elementwise", SHARDED_EMBED_OPS))
    before, after = RMSNORM_TORCH_OPS
    if not model.embed_tokens.replicated:
        plan.append(Collective("all_reduce", "embedding all-reduce", "embed", message))
    return plan + [cost.kernel("first rmsnorm", "embed", "elementwise", before),
                   cost.kernel("first rmsnorm mean", "embed", "row_reduce"),
                   cost.kernel("first rmsnorm scale", "embed", "elementwise", after)]


def norm_collective(cost: CostModel, name: str, part: str, message: int) -> list[PlanItem]:
    """The AllReduce + residual add + RMSNorm: one fused kernel (symm, several ranks), else the
    collective (none at one rank) and the add+RMSNorm launch."""
    plan: list[PlanItem] = [Collective("allreduce_add_rmsnorm", name, part, message)]
    return plan if cost.fused_norm else plan + [cost.kernel(name + " add+rmsnorm", part, "add_rmsnorm")]


def merge_fuses(cost: CostModel, attn, batch: int, tokens: int, keys: int, kv_element_bytes: int) -> bool:
    """Does rope_decode_attention take one launch (its merge fused) at this shape? Its own split
    plan decides, over a cache of the rows' mean key count (the split count follows the cache)."""
    slots = max(tokens, -(-keys // batch))
    key = ("merge", batch, tokens, attn.n_heads_per_rank, attn.n_kv_heads_per_rank, attn.head_dim, slots,
           kv_element_bytes)
    if key not in cost._memo:
        if triton is None:  # the GPU has Triton; this host cannot run the plan: a decode step's default
            cost._memo[key] = True
        else:
            from model.kernels import decode_attention
            q = torch.empty(batch, tokens, attn.n_heads_per_rank, attn.head_dim, device="meta")  # (B, T, Hq, D)
            k = torch.empty(batch, attn.n_kv_heads_per_rank, slots, attn.head_dim, device="meta",
                            dtype=KV_DTYPES[kv_element_bytes])  # (B, Hkv, S, D)
            cost._memo[key] = decode_attention.merge_fuses(q, k)
    return cost._memo[key]


def layer_plan(cost: CostModel, layer, act_bytes: int, batch: int, tokens: int, keys: int, kv_element_bytes: int,
               experts_read: int | Callable[[], int]) -> list[PlanItem]:
    """One decoder layer: attention, its AllReduce+RMSNorm, the MLP or MoE, another one.
    keys: keys read by attention, summed over the rows; experts_read: routed experts whose weights
    this rank reads (a callable when the real routing decides it)."""
    attn, ffn, rows = layer.self_attn, layer.feed_forward, batch * tokens
    message = rows * layer.input_layernorm.weight.shape[0] * act_bytes  # (rows, H) partial sums
    on_kernels = fused(rows)
    one_launch = on_kernels and merge_fuses(cost, attn, batch, tokens, keys, kv_element_bytes)
    # the single-rank norm kernel quantizes its output per row for an FP8 GEMV after it (fast_path.fp8_rows);
    # the first layer's input comes from the embedding kernel, which does not
    norm_rows = lambda module: on_kernels and fast_path.plans_fp8_rows(module, cost.world, rows)  # noqa: E731
    plan: list[PlanItem] = [
        cost.linear("qkv_proj", "attention", attn.qkv_proj, rows, norm_rows(attn.qkv_proj) and attn.layer > 0),
        *cost.attention("attention", "attention", tokens, keys, attn.n_heads_per_rank, attn.n_kv_heads_per_rank,
                        attn.head_dim, kv_element_bytes, fused=one_launch),
        cost.linear("o_proj", "attention", attn.o_proj, rows),
        *norm_collective(cost, "attention all-reduce", "attention", message)]
    if layer.is_moe:
        make = moe_plan if on_kernels else torch_moe_plan
        return plan + make(cost, ffn, rows, act_bytes, experts_read) + norm_collective(cost, "moe all-reduce", "moe",
                                                                                          message)
    plan += [cost.linear("fc13 + swiglu", "dense", ffn.gate_up_proj, rows, norm_rows(ffn.gate_up_proj)),
             cost.linear("fc2", "dense", ffn.down_proj, rows)]
    return plan + norm_collective(cost, "mlp all-reduce", "dense", message)


def _read(experts_read: int | Callable[[], int]) -> int:
    return experts_read() if callable(experts_read) else experts_read


def expert_parallel_static(cost: CostModel, block, rows: int) -> bool:
    """MoE.static_dispatch_applies on the emulated node: a device-dispatching communicator (symm)
    and at most EP_STATIC_MAX_ROWS routed rows a rank."""
    return cost.comm == "symm" and -(-rows // cost.world) * block.top_k <= EP_STATIC_MAX_ROWS


def route_plan(cost: CostModel, block, rows: int) -> list[Op]:
    """The router: one kernel (GEMV + top-1 + sigmoid), else MoE.route's torch ops."""
    if fast_path.routes_in_one_kernel(block):
        return [cost.router(cost.bytes_of(block.router))]
    return [cost.linear("router", "moe", block.router, rows), cost.kernel("top-k", "moe", "topk"),
            cost.kernel("scores", "moe", "elementwise", 3)]


def moe_plan(cost: CostModel, block, rows: int, act_bytes: int,
             experts_read: int | Callable[[], int]) -> list[PlanItem]:
    """The MoE of a fused step, as fast_path.moe runs `block` (fast_path.moe_path says how)."""
    path = fast_path.moe_path(block, rows)
    if path == "module" or (path == "expert_parallel" and not expert_parallel_static(cost, block, rows)):
        return torch_moe_plan(cost, block, rows, act_bytes, experts_read)
    experts, shared = block.experts, block.shared_expert
    plan: list[PlanItem] = route_plan(cost, block, rows)
    if path == "pair":
        plan.append(lambda: pair_ops(cost, block, rows, _read(experts_read)))
        return plan
    quantized = path == "separate" and fast_path.plans_fp8_rows(shared.gate_up_proj, cost.world, rows)  # fp8_rows
    plan += [cost.linear("shared fc13 + swiglu", "moe", shared.gate_up_proj, rows, quantized),
             cost.linear("shared fc2", "moe", shared.down_proj, rows)]
    if path == "separate":
        routed_rows = rows * block.top_k
        around = [cost.kernel("repeat rows", "moe", "elementwise")] if block.top_k > 1 else []
        sums = cost.kernel("shared + routed", "moe", "elementwise", 1 if block.top_k == 1 else 2)
        plan.append(lambda: around + cost.routed_experts(experts, _read(experts_read), routed_rows) + [sums])
        return plan
    routed_rows = -(-rows // cost.world) * block.top_k  # M: this rank's share of the routed rows
    hidden = block.router.weight.shape[1]
    before, local_ids, after = EP_GLUE
    return plan + [cost.kernel("routing glue", "moe", "elementwise", before),
                   Collective("dispatch", "dispatch", "moe", routed_rows * hidden * act_bytes),
                   cost.kernel("local expert ids", "moe", "elementwise", local_ids),
                   lambda: cost.routed_experts(experts, _read(experts_read), cost.world * routed_rows),
                   Collective("combine", "combine", "moe", routed_rows * hidden * act_bytes),
                   cost.kernel("combine glue + shared sum", "moe", "elementwise", after)]


def pair_ops(cost: CostModel, block, rows: int, read: int) -> list[Op]:
    """The two pair launches: shared and `read` routed experts' FC13 + SwiGLU, then FC2 + the sum."""
    memo, key = cost.memo_of(block), ("pair", rows, read)
    if key not in memo:
        experts, shared = block.experts, block.shared_expert
        fp8 = experts.gate_up_proj.dtype == FP8
        ops = []
        for which, linear in (("gate_up_proj", shared.gate_up_proj), ("down_proj", shared.down_proj)):
            flops = 2.0 * rows * (linear.weight.numel() + getattr(experts, which)[0].numel())
            ops.append(cost.pair(f"shared + routed {which} x{read}", cost.bytes_of(linear),
                                 read * cost.expert_bytes(experts, which), fp8, rows, flops))
        memo[key] = ops
    return memo[key]


def torch_moe_plan(cost: CostModel, block, rows: int, act_bytes: int,
                   experts_read: int | Callable[[], int]) -> list[PlanItem]:
    """MoE.forward's own ops (prefill sizes, or experts without a kernel): the cuBLAS router, top-k
    and scores, the shared expert, then the routed experts: tensor-parallel, a slice of every
    routed expert; expert-parallel, whole experts between a dispatch and a combine of this rank's
    share of the rows. Costed as the older kernel set was."""
    experts, hidden = block.experts, block.router.weight.shape[1]
    plan: list[PlanItem] = [
        cost.kernel("router", "moe", "router_gemv", nbytes=cost.bytes_of(block.router)),  # cuBLAS: its measured time
        cost.kernel("top-k", "moe", "topk"), cost.kernel("scores", "moe", "elementwise", 2),
        cost.linear("shared fc13 + swiglu", "moe", block.shared_expert.gate_up_proj, rows),
        cost.linear("shared fc2", "moe", block.shared_expert.down_proj, rows)]
    routed_rows = rows * block.top_k
    if block.expert_parallel:
        routed_rows = -(-rows // cost.world) * block.top_k
        plan.append(Collective("dispatch", "dispatch", "moe", routed_rows * hidden * act_bytes))

    def routed() -> list[Op]:
        read = _read(experts_read)
        return cost.routed_experts(experts, read, routed_rows) if read else []
    plan.append(routed)
    if block.expert_parallel:
        plan.append(Collective("combine", "combine", "moe", routed_rows * hidden * act_bytes))
    return plan + [cost.kernel("shared + routed", "moe", "elementwise")]


def head_plan(cost: CostModel, model, batch: int, tokens: int, last_only: bool = False,
              paths: CodePaths = CURRENT_CODE, verify: bool = False) -> list[PlanItem]:
    """After the layers: the cache lengths (unless the embedding kernel advanced them), the LM head
    over every row (or each row's last, a prefill), the vocabulary padding's mask, the greedy pick
    of each row's last logits and, in a graph's decode step, the copies of the choice into the
    graph's token buffer (workers/cuda_graphs.py: DecodeGraph; `feedback_copies`). verify: a
    speculative step's verification
    (workers/speculative.py SpecDecoder.verify): the pick is of EVERY row's logits (the target's
    choice at each node), and no decode graph's copies follow."""
    head, shard = model.lm_head_weight(), model.shard
    rows = batch * tokens
    head_rows = batch if last_only else rows
    plan: list[PlanItem] = ([] if head_in_one_kernel(model, rows, paths)
                            else [cost.kernel("cache lengths", "head", "elementwise")])
    if last_only:
        plan.append(cost.kernel("last rows", "head", "elementwise", 3))
    plan.append(cost.gemv("lm head", "head", head.numel() * head.element_size(), head.dtype == FP8, head_rows,
                          2.0 * head_rows * head.numel()))
    if shard.vocab_per_rank * shard.parallel.world_size > model.cfg.vocab_size:  # the last rank's padding:
        plan.append(cost.kernel("vocab padding", "head", "elementwise"))  # the step waits for that rank
    one_kernel = argmax_in_one_kernel(model, paths)
    plan += pick_plan(cost, shard.vocab_per_rank, rows if verify else batch, "head", activation_bytes(model), one_kernel,
                      paths.winner_kernel is not False, paths.gather_slots_kept is not False)
    copies = feedback_copies(cost.world, tokens, one_kernel, paths)
    if fused(rows) and not last_only and not verify and copies:
        plan.append(cost.kernel("feedback copies", "head", "copy", copies))
    return plan


def feedback_copies(world: int, tokens: int, argmax_kernel: bool, paths: CodePaths = CURRENT_CODE) -> int:
    """Device copies of a decode graph's choice after its pick. Now: none where one rank's argmax
    kernel writes the graph's token buffer itself (which is also the next step's input), else one.
    Before (paths.ids_in_place False): the choice was copied to the ids and, at one new token, to
    the next step's input as well; several ranks copied torch's winner until the winner kernel."""
    if paths.ids_in_place is False:
        return 2 if tokens == 1 else 1
    return 0 if argmax_kernel and (world == 1 or paths.winner_kernel is not False) else 1


def argmax_in_one_kernel(model, paths: CodePaths = CURRENT_CODE) -> bool:
    """Does sampling.distributed_argmax take model/kernels/argmax.py on the GPU? Its default where
    the kernel takes the logits (their dtype: the activations')."""
    if paths.argmax is False:
        return False
    try:
        from model.kernels import argmax
    except ImportError:  # a checkout from before the kernel
        return False
    return model.embed_tokens.weight.dtype in argmax.DTYPES


def pick_plan(cost: CostModel, vocab_per_rank: int, batch: int, part: str, logit_bytes: int = 2,
              kernel: bool = True, winner_kernel: bool = True, slots_kept: bool = True) -> list[PlanItem]:
    """sampling.distributed_argmax over `batch` rows: one rank, the argmax and the vocabulary
    offset (ONE launch of the argmax kernel); several, each rank's (max, id) pair, their
    all-gather of fp32, the winner (on the kernels ONE launch of argmax.pick_winner, unless
    winner_kernel is False: a commit before it, torch's ops). kernel False: torch's one-block
    argmax and its elementwise ops. slots_kept: the gather's launches (cost_model.Collective)."""
    logits = batch * vocab_per_rank * logit_bytes
    if kernel:
        local = [cost.argmax_kernel("argmax" if cost.world == 1 else "local max + id", part, logits)]
    elif cost.world == 1:
        local = [cost.argmax("argmax", part, vocab_per_rank), cost.kernel("vocab offset", part, "elementwise")]
    else:
        local = [cost.argmax("local max", part, vocab_per_rank),
                 cost.kernel("pair", part, "elementwise", GATHER_OPS_BEFORE)]
    if cost.world == 1:
        return local
    return local + [Collective("all_gather", "argmax all-gather", part, batch * 2 * 4, slots_kept=slots_kept),
                    cost.kernel("winner", part, "elementwise", 1 if kernel and winner_kernel else GATHER_OPS_AFTER)]


def flatten(cost: CostModel, plan: list[PlanItem]) -> list[Op]:
    """A plan's ops as the walk counts them: collectives costed from their planned bytes."""
    ops: list[Op] = []
    for item in plan:
        if isinstance(item, Op):
            ops.append(item)
        elif isinstance(item, Collective):
            ops += cost.collective(item)
        else:
            ops += item()
    return ops
