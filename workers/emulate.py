"""Shape-only emulation: what one rank's decode step would take on a node, op by op, with no weights.

The model is built on the `meta` device at rank 0's shard shapes (the same ShardLayout, FP8 swap
and parameter dtypes as a GPU run, so no size is restated here) and the launch plans of its modules
(workers/launch_plan.py: the kernels the GPU path launches, in order, chosen by the code's own
predicates, and the collectives between them) are laid end to end: for a decode or verify step the
fused path (per attention sub-layer the QKV GEMV, ONE attention kernel, o_proj and the
AllReduce+RMSNorm; per MoE the router kernel and two shared + routed pair launches), for a prefill
the torch ops; the LM head, the greedy pick and the graph's copies. All ranks of a tensor-parallel
step do the same work, so rank 0's time is the step's.

The costs are the cost model's, the same that advance the per-rank virtual clock of a real run
(`generate --emulate-node`, workers/virtual_clock.py): the walk is that clock's prediction without
running anything. Expert parallelism (`moe="ep"`) is costed as the GPU path runs it over the symm
backend: whole experts, a dispatch and a combine kernel of this rank's share of the rows. A
speculative step (estimate_spec_step) adds a shape-only EAGLE-3 draft beside the target: its
growth, the verification and its catch-up, from workers/draft_plan.py's plans.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from collectives.communicator import Communicator
from model.config import ModelConfig
from model.fp8 import SCHEMES
from model.fp8_modules import all_fp8, fp8_targets, to_fp8
from model.llama4 import Llama4
from model.parallel import layout
from model.eagle3 import Eagle3Config, Eagle3Draft, SharedTargetParts, draft_layout
from workers.cost_model import CostModel, Op, module_bytes
from workers.draft_plan import catch_up_plan, draft_forward_plan, grow_plan
from workers.launch_plan import CURRENT_CODE, CodePaths, activation_bytes, embed_plan, flatten, head_plan, layer_plan
from workers.model_build import default_dtype
from workers.node_spec import NodeSpec

__all__ = ["Op", "StepEstimate", "module_bytes", "shape_only_model", "gpu_twin", "estimate_step", "estimate_draft_step",
           "estimate_spec_step", "shape_only_draft", "default_draft_config", "target_plan", "Projection", "project",
           "memory_per_rank", "ShapeOnlyCommunicator"]


class ShapeOnlyCommunicator(Communicator):
    """Stands for a rank of `world_size` while a model is only built, never run."""

    backend = "shape-only"

    def __init__(self, world_size: int) -> None:
        self.rank, self.world_size = 0, world_size

    def _refuse(self, *args, **kwargs):
        raise RuntimeError("a shape-only model is walked, not run: it cannot communicate")

    all_reduce = all_gather = all_to_all = broadcast = barrier = _refuse


@dataclass
class StepEstimate:
    ops: list[Op] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(op.seconds for op in self.ops)

    def by(self, key: str) -> dict[str, float]:
        totals: dict[str, float] = {}
        for op in self.ops:
            totals[getattr(op, key)] = totals.get(getattr(op, key), 0.0) + op.seconds
        return totals


def shape_only_model(cfg: ModelConfig, tp: int, moe: str, dtype: str, replicate_embedding: bool = False,
                     fp8_scheme: str = "channel") -> Llama4:
    """Rank 0 of a `tp`-way layout on the meta device: real shapes and dtypes (FP8 in `fp8_scheme`, a
    model.fp8.SCHEMES name), no storage."""
    with torch.device("meta"), default_dtype(torch.bfloat16 if dtype != "fp32" else torch.float32):
        model = Llama4(cfg, layout(cfg, tp, 0, moe, replicate_embedding), ShapeOnlyCommunicator(tp), kernels="triton")
    if dtype == "fp8":
        to_fp8(model, all_fp8(model, SCHEMES[fp8_scheme]))
    return model


def gpu_twin(model: Llama4) -> Llama4:
    """`model` as a GPU run would build it, on the meta device: the fused kernels' layouts (out-major
    experts), the same shard shapes, dtype and FP8 schemes, module by module. The virtual clock
    plans a real run (CPU actors: the torch build) from its twin's modules, so both walk one plan."""
    with torch.device("meta"), default_dtype(model.embed_tokens.weight.dtype):
        twin = Llama4(model.cfg, model.shard, ShapeOnlyCommunicator(model.shard.parallel.world_size), kernels="triton")
    schemes = {path: model.get_submodule(path).scheme for path in fp8_targets(model)
               if hasattr(model.get_submodule(path), "scheme")}
    return to_fp8(twin, schemes) if schemes else twin


def experts_read(block, distinct: int, world: int) -> int:
    """Routed experts whose weights a rank reads when a step's tokens route to `distinct` experts:
    a slice of each (tensor-parallel), or whole experts, the slowest rank ceil(distinct / world)
    of them (expert-parallel, routing spread evenly at best)."""
    distinct = max(1, min(distinct, block.n_experts))
    return -(-distinct // world) if block.expert_parallel else distinct


def estimate_step(model: Llama4, node: NodeSpec, batch: int, tokens: int, context: int,
                  distinct_experts: int | Sequence[int] | None = None, kv_element_bytes: int = 2,
                  last_only: bool = False, comm: str = "symm", paths: CodePaths = CURRENT_CODE) -> StepEstimate:
    """One step of `tokens` new tokens for `batch` rows, each attending to `context` keys (its
    cache and its new tokens), on rank 0. distinct_experts: experts the step's tokens route to, one
    number for every MoE layer or one per MoE layer (default: every routed token its own expert).
    last_only: the LM head reads only each row's last token (a prefill). comm: the node's
    collectives, "symm" (fused one-shot, one host) or "nccl" (workers/cost_model.py). paths: the
    prologue and pick of an older commit's step (launch_plan.CodePaths; default: this checkout's)."""
    cost = CostModel(node, model.shard.parallel.world_size, comm)
    plan = target_plan(cost, model, batch, tokens, context, distinct_experts, kv_element_bytes, last_only, paths)
    return StepEstimate(flatten(cost, plan))


def target_plan(cost: CostModel, model: Llama4, batch: int, tokens: int, context: int,
                distinct_experts: int | Sequence[int] | None = None, kv_element_bytes: int = 2,
                last_only: bool = False, paths: CodePaths = CURRENT_CODE, verify: bool = False) -> list:
    """The plan of estimate_step's target forward (verify: a speculative verification, whose pick
    is of every row: launch_plan.head_plan)."""
    rows, act = batch * tokens, activation_bytes(model)
    moe_layers = [layer for layer in model.layers if layer.is_moe]
    if distinct_experts is None or isinstance(distinct_experts, int):
        counts = [distinct_experts] * len(moe_layers)
    elif len(distinct_experts) == len(moe_layers):
        counts = list(distinct_experts)
    else:
        raise ValueError(f"{len(distinct_experts)} expert counts for {len(moe_layers)} MoE layers")
    counts_of = {id(layer): count for layer, count in zip(moe_layers, counts)}
    plan = embed_plan(cost, model, batch, tokens, paths)
    for layer in model.layers:
        read = 0
        if layer.is_moe:
            block, count = layer.feed_forward, counts_of[id(layer)]
            read = experts_read(block, rows * block.top_k if count is None else count, cost.world)
        plan += layer_plan(cost, layer, act, batch, tokens, batch * context, kv_element_bytes, read)
    return plan + head_plan(cost, model, batch, tokens, last_only, paths, verify=verify)


def default_draft_config(cfg: ModelConfig, draft_vocab: int | None = None) -> Eagle3Config:
    """The EAGLE-3 draft a target gets when none is named: one Llama layer of the target's width,
    heads and dense MLP width, drafting over `draft_vocab` tokens (default: the full vocabulary, as
    the record's Maverick draft)."""
    return Eagle3Config(hidden_size=cfg.hidden_size, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                        head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size_mlp, vocab_size=cfg.vocab_size,
                        draft_vocab_size=draft_vocab or cfg.vocab_size, target_hidden_size=cfg.hidden_size)


def shape_only_draft(draft_cfg: Eagle3Config, model: Llama4) -> Eagle3Draft:
    """The draft beside shape-only target `model` (rank 0 of its layout): meta, the target's
    activation dtype (a bf16 draft beside an FP8 target), the target's embedding borrowed."""
    tp = model.shard.parallel.world_size
    with torch.device("meta"), default_dtype(model.embed_tokens.weight.dtype):
        head = None if draft_cfg.has_lm_head else model.lm_head_weight()
        return Eagle3Draft(draft_cfg, draft_layout(draft_cfg, tp, 0), ShapeOnlyCommunicator(tp),
                           SharedTargetParts(model.embed_tokens, head), kernels="triton")


def estimate_draft_step(cfg: ModelConfig, node: NodeSpec, tp: int, batch: int, context: int,
                        draft_vocab: int | None = None, comm: str = "symm", tokens: int = 1,
                        features: bool = True, draft_cfg: Eagle3Config | None = None) -> StepEstimate:
    """One EAGLE-3 draft forward of `tokens` new tokens per row over `context` cached keys, one
    row's logits, rank 0 of a `tp`-way bf16 layout (workers/draft_plan.py says which launches):
    features, a catch-up (fed the target's features) or else a depth (its own hidden states).
    draft_cfg: the draft's architecture (default: default_draft_config(cfg, draft_vocab))."""
    model = shape_only_model(cfg, tp, "tp", "bf16")
    draft = shape_only_draft(draft_cfg or default_draft_config(cfg, draft_vocab), model)
    cost = CostModel(node, tp, comm)
    plan = draft_forward_plan(cost, draft, batch, tokens, batch * (context + tokens), features, logit_rows=1)
    return StepEstimate(flatten(cost, plan))


def estimate_spec_step(model: Llama4, draft: Eagle3Draft, node: NodeSpec, batch: int, shape: tuple[int, int, int],
                       context: int, catch_up: int | None = None, distinct_experts: int | Sequence[int] | None = None,
                       kv_element_bytes: int = 2, comm: str = "symm") -> StepEstimate:
    """One speculative step of tree shape (top_k, depth, tokens) (a chain: (1, n, n)) for `batch`
    rows, each with `context` committed tokens (in the target's and the draft's cache) when it
    begins: the draft's growth (workers/draft_plan.py grow_plan), the target's verification of root
    + tokens (distinct_experts as in estimate_step), the draft's catch-up on `catch_up` rows a batch
    row (default depth + 1: the GPU's one-graph step pads it to that width; an eager step reads the
    longest accepted path + 1). The order is a real step's, which the virtual clock follows."""
    cost = CostModel(node, model.shard.parallel.world_size, comm)
    k, depth, n = shape
    width = depth + 1 if catch_up is None else catch_up
    plan = grow_plan(cost, draft, batch, shape, context)
    plan += target_plan(cost, model, batch, n + 1, context + n + 1, distinct_experts, kv_element_bytes, verify=True)
    plan += catch_up_plan(cost, draft, batch, width, batch * (context + width))
    return StepEstimate(flatten(cost, plan))


@dataclass(frozen=True)
class Projection:
    """Decode speed of one configuration: per user (one sequence) and per node."""

    step_s: float  # seconds per verification (spec) or decode step
    tokens_per_step: float  # 1, or the acceptance length
    replicas: int  # model copies on the node (gpus per node / tp)
    batch: int
    breakdown: dict  # part -> seconds, kind -> seconds, per step

    @property
    def tokens_per_s_per_user(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def tokens_per_s_per_node(self) -> float:
        return self.tokens_per_s_per_user * self.batch * self.replicas


def memory_per_rank(model: Llama4, batch: int, context: int, kv_element_bytes: int = 2) -> int:
    """Bytes a rank holds: its weights and the KV cache of `batch` rows of `context` tokens."""
    kv = sum(2 * batch * context * layer.self_attn.n_kv_heads_per_rank * layer.self_attn.head_dim
             for layer in model.layers) * kv_element_bytes
    return module_bytes(model) + kv


def project(cfg: ModelConfig, node: NodeSpec, tp: int, moe: str, dtype: str, batch: int, context: int,
            draft_len: int = 0, acceptance_length: float = 1.0, kv_element_bytes: int = 2,
            model: Llama4 | None = None, comm: str = "symm") -> Projection:
    """Plain decoding (draft_len 0) or EAGLE-3 chain decoding: per step the draft's root pick and
    draft_len - 1 depth forwards, one verification of draft_len + 1 tokens per row and the draft's
    catch-up (estimate_spec_step, the draft default_draft_config's), yielding acceptance_length tokens.
    model: the shape-only model of (cfg, tp, moe, dtype) when the caller already built it.
    comm: "symm" (the fused one-shot collectives of GPUs on one host, the default) or "nccl"."""
    model = model or shape_only_model(cfg, tp, moe, dtype)
    if draft_len:
        draft = shape_only_draft(default_draft_config(cfg), model)
        total = estimate_spec_step(model, draft, node, batch, (1, draft_len, draft_len), context,
                                   kv_element_bytes=kv_element_bytes, comm=comm)
    else:
        total = estimate_step(model, node, batch, 1, context, kv_element_bytes=kv_element_bytes, comm=comm)
    ops = total.ops
    breakdown = {"by_part": total.by("part"), "by_kind": total.by("kind"), "ops": len(ops),
                 "memory_per_rank_bytes": memory_per_rank(model, batch, context, kv_element_bytes)}
    return Projection(total.seconds, acceptance_length if draft_len else 1.0, max(1, node.gpus_per_node // tp),
                      batch, breakdown)
