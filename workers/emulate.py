"""Shape-only emulation: what one rank's decode step would take on a node, op by op, with no weights.

The model is built on the `meta` device at rank 0's shard shapes (the same ShardLayout, FP8 swap
and parameter dtypes as a real run, so no size is restated here) and its modules are walked in the
order the GPU decode path launches kernels (model/fast_path.py): per attention sub-layer the
FC_QKV GEMV, RoPE + KV write, split-KV attention and its merge, o_proj and the AllReduce+RMSNorm;
per dense MLP FC13+SwiGLU and FC2; per MoE the router, top-k, the shared expert and the routed
experts (only `distinct_experts` of them are read); the LM head and the argmax. Each op costs

    GEMV        fixed_s + weight bytes / (bandwidth_fraction x achievable copy bandwidth)
    attention   fixed_s + KV bytes / (attention fraction x copy bandwidth), plus the merge
    others      their measured per-launch time inside a CUDA graph
    all-reduce  latency + (tp - 1) x message bytes / one-way NVLink bandwidth (one-shot)

with the constants of the node file (cluster/nodes/*.json), each naming its source: fits of the
H200 micro-benchmarks, assumed equal on the B200 and H100 where nothing was measured there. All
ranks of a tensor-parallel step do the same work, so rank 0's time is the step's.

Expert parallelism (`moe="ep"`) is costed as the GPU path would run it with graph-ready
collectives (the runtime itself runs it eagerly today): whole experts, a dispatch and a combine
all-to-all. This is v1 of the emulator: a cost walk over the modules, not yet the per-rank virtual
clock that a dispatch mode and a clocked communicator would advance during real runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cluster.hardware import NodeSpec
from collectives.communicator import Communicator
from model.config import ModelConfig
from model.fp8 import SCHEMES
from model.fp8_modules import all_fp8, to_fp8
from model.llama4 import Llama4
from model.parallel import layout
from workers.model_build import default_dtype

FP8 = torch.float8_e4m3fn


class ShapeOnlyCommunicator(Communicator):
    """Stands for a rank of `world_size` while a model is only built, never run."""

    backend = "shape-only"

    def __init__(self, world_size: int) -> None:
        self.rank, self.world_size = 0, world_size

    def _refuse(self, *args, **kwargs):
        raise RuntimeError("a shape-only model is walked, not run: it cannot communicate")

    all_reduce = all_gather = all_to_all = broadcast = barrier = _refuse


@dataclass(frozen=True)
class Op:
    name: str
    kind: str  # gemv | attention | kernel | collective
    part: str  # embed | attention | dense | moe | head
    seconds: float
    bytes: int = 0


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


def shape_only_model(cfg: ModelConfig, tp: int, moe: str, dtype: str) -> Llama4:
    """Rank 0 of a `tp`-way layout on the meta device: real shapes and dtypes, no storage."""
    with torch.device("meta"), default_dtype(torch.bfloat16 if dtype != "fp32" else torch.float32):
        model = Llama4(cfg, layout(cfg, tp, 0, moe), ShapeOnlyCommunicator(tp), kernels="triton")
    if dtype == "fp8":
        to_fp8(model, all_fp8(model, SCHEMES["channel"]))
    return model


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters (real or meta): what reading all its weights moves."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


class _Walk:
    """Appends the ops of one step, costed on `node`."""

    def __init__(self, node: NodeSpec, tp: int, rows: int) -> None:
        self.node, self.tp, self.rows, self.est = node, tp, rows, StepEstimate()

    def gemv(self, name: str, part: str, nbytes: int, fp8: bool, gathered: bool = False) -> None:
        fit = self.node.gemv[("fp8" if fp8 else "bf16") + ("_m1" if self.rows == 1 or gathered else "_m16")]
        seconds = fit.fixed_s + nbytes / (fit.bandwidth_fraction * self.node.copy_bytes_per_s)
        self.est.ops.append(Op(name, "gemv", part, seconds, nbytes))

    def linear(self, name: str, part: str, module: torch.nn.Module) -> None:
        self.gemv(name, part, module_bytes(module), next(module.parameters()).dtype == FP8)

    def kernel(self, name: str, part: str, kind: str, count: int = 1, nbytes: int = 0) -> None:
        self.est.ops.append(Op(name, "kernel", part, count * self.node.kernel_s[kind], nbytes))

    def all_reduce(self, name: str, part: str, hidden: int, norm: bool = True) -> None:
        if self.tp > 1:
            message = self.rows * hidden * 2  # bf16 partial sums
            seconds = self.node.allreduce_latency_s + (self.tp - 1) * message / self.node.nvlink_bytes_per_s_one_way
            self.est.ops.append(Op(name, "collective", part, seconds, message * (self.tp - 1)))
        if norm:
            self.kernel(name + " add+rmsnorm", part, "add_rmsnorm")

    def all_to_all(self, name: str, part: str, nbytes: int) -> None:
        """Rows to (or from) the ranks owning their experts: a collective's latency plus this
        rank's share of the rows over one NVLink direction (the counts travel with the rows)."""
        if self.tp > 1:
            share = nbytes * (self.tp - 1) // self.tp
            seconds = self.node.allreduce_latency_s + share / self.node.nvlink_bytes_per_s_one_way
            self.est.ops.append(Op(name, "collective", part, seconds, share))


def estimate_step(model: Llama4, node: NodeSpec, batch: int, tokens: int, context: int,
                  distinct_experts: int | None = None, kv_element_bytes: int = 2) -> StepEstimate:
    """One step of `tokens` new tokens for `batch` rows over `context` cached keys, on rank 0."""
    tp, rows = model.shard.parallel.world_size, batch * tokens
    walk = _Walk(node, tp, rows)
    cfg = model.cfg
    # launch counts below are the torch ops of llama4.py / attention.py / sampling.py on this path
    walk.kernel("positions + slots", "embed", "elementwise", 4)
    walk.kernel("embedding", "embed", "elementwise", 1 if tp == 1 else 8)  # a gather; sharded: masked
    walk.all_reduce("embedding all-reduce", "embed", cfg.hidden_size, norm=False)
    walk.kernel("first rmsnorm", "embed", "elementwise", 8)
    for layer in model.layers:
        attn = layer.self_attn
        walk.linear("qkv_proj", "attention", attn.qkv_proj)
        walk.kernel("rope + kv write", "attention", "qkv_rope")
        kv = 2 * batch * context * attn.n_kv_heads_per_rank * attn.head_dim * kv_element_bytes
        seconds = node.kernel_s["attention_split"] + kv / (node.attention_bandwidth_fraction * node.copy_bytes_per_s)
        walk.est.ops.append(Op("attention", "attention", "attention", seconds, kv))
        walk.kernel("attention merge", "attention", "attention_merge")
        walk.linear("o_proj", "attention", attn.o_proj)
        walk.all_reduce("attention all-reduce", "attention", cfg.hidden_size)
        ffn = layer.feed_forward
        if layer.is_moe:
            _moe(walk, ffn, rows if distinct_experts is None else distinct_experts, cfg.hidden_size)
            walk.all_reduce("moe all-reduce", "moe", cfg.hidden_size)
        else:
            walk.linear("fc13 + swiglu", "dense", ffn.gate_up_proj)
            walk.linear("fc2", "dense", ffn.down_proj)
            walk.all_reduce("mlp all-reduce", "dense", cfg.hidden_size)
    head = model.lm_head_weight()
    walk.gemv("lm head", "head", head.numel() * head.element_size(), head.dtype == FP8)
    # argmax (+ vocab offset), cache lengths, the graph's feedback copy; sharded: the pairwise argmax
    walk.kernel("argmax + cache lengths", "head", "elementwise", 4 if tp == 1 else 13)
    if tp > 1:
        walk.all_reduce("argmax all-gather", "head", 2 * tp, norm=False)
    return walk.est


def _moe(walk: _Walk, block, distinct: int, hidden: int) -> None:
    """Tensor-parallel experts: every rank reads its slice of each of the `distinct` routed experts.
    Expert-parallel: whole experts, the slowest rank reading ceil(distinct / tp) of them (routing
    spread evenly at best), between a dispatch and a combine all-to-all of the routed rows."""
    experts = block.experts
    n_experts = experts.gate_up_proj.shape[0] * (walk.tp if block.expert_parallel else 1)
    distinct = max(1, min(distinct, n_experts))
    walk.kernel("router", "moe", "router_gemv", nbytes=module_bytes(block.router))  # cuBLAS: its measured time
    walk.kernel("top-k", "moe", "topk")
    walk.kernel("scores", "moe", "elementwise", 2)
    walk.linear("shared fc13 + swiglu", "moe", block.shared_expert.gate_up_proj)
    walk.linear("shared fc2", "moe", block.shared_expert.down_proj)
    read = distinct
    if block.expert_parallel:
        read = -(-distinct // walk.tp)
        walk.all_to_all("dispatch", "moe", walk.rows * block.top_k * hidden * 2)
    fp8 = experts.gate_up_proj.dtype == FP8
    for which in ("gate_up_proj", "down_proj"):
        per_expert = sum(p[0].numel() * p.element_size() for n, p in experts.named_parameters() if n.startswith(which))
        walk.gemv(f"routed {which} x{read}", "moe", read * per_expert, fp8, gathered=True)
    if block.expert_parallel:
        walk.all_to_all("combine", "moe", walk.rows * block.top_k * hidden * 2)
    walk.kernel("shared + routed", "moe", "elementwise")


def estimate_draft_step(cfg: ModelConfig, node: NodeSpec, tp: int, batch: int, context: int,
                        draft_vocab: int | None = None) -> StepEstimate:
    """One EAGLE-3 draft step of one token per row, bf16, tensor-parallel like the target: fc
    (3H -> H), one decoder layer whose Q/K/V read [embedding | feature] (2H), its MLP (the target's
    dense width), the LM head over the draft vocabulary (default: the full one, as the record's
    Maverick draft), with the target's head shapes. Costed as the target's ops are."""
    walk = _Walk(node, tp, batch)
    h, d = cfg.hidden_size, cfg.head_dim
    heads, kv_heads = cfg.n_heads // tp, max(1, cfg.n_kv_heads // tp)
    vocab = (draft_vocab or cfg.vocab_size) // tp
    walk.gemv("draft fc", "draft", 3 * h * h * 2, False)
    walk.kernel("draft norms + concat", "draft", "elementwise", 4)
    walk.gemv("draft qkv_proj", "draft", 2 * h * (heads + 2 * kv_heads) * d * 2 // tp * tp, False)
    walk.kernel("draft rope + kv write", "draft", "qkv_rope")
    kv = 2 * batch * context * kv_heads * d * 2
    seconds = node.kernel_s["attention_split"] + kv / (node.attention_bandwidth_fraction * node.copy_bytes_per_s)
    walk.est.ops.append(Op("draft attention", "attention", "draft", seconds, kv))
    walk.kernel("draft attention merge", "draft", "attention_merge")
    walk.gemv("draft o_proj", "draft", heads * d * h * 2, False)
    walk.all_reduce("draft attention all-reduce", "draft", h)
    walk.gemv("draft fc13 + swiglu", "draft", 2 * h * (cfg.intermediate_size_mlp // tp) * 2, False)
    walk.gemv("draft fc2", "draft", h * (cfg.intermediate_size_mlp // tp) * 2, False)
    walk.all_reduce("draft mlp all-reduce", "draft", h)
    walk.gemv("draft lm head", "draft", vocab * h * 2, False)
    walk.kernel("draft argmax", "draft", "elementwise", 12)
    if tp > 1:
        walk.all_reduce("draft argmax all-gather", "draft", 2 * tp, norm=False)
    return walk.est


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
            model: Llama4 | None = None) -> Projection:
    """Plain decoding (draft_len 0) or EAGLE-3 chain decoding: per step one verification of
    draft_len + 1 tokens per row and draft_len draft steps, yielding acceptance_length tokens.
    model: the shape-only model of (cfg, tp, moe, dtype) when the caller already built it."""
    model = model or shape_only_model(cfg, tp, moe, dtype)
    tokens = draft_len + 1
    est = estimate_step(model, node, batch, tokens, context, kv_element_bytes=kv_element_bytes)
    ops = list(est.ops)
    if draft_len:
        draft = estimate_draft_step(cfg, node, tp, batch, context)
        ops += draft.ops * draft_len
    total = StepEstimate(ops)
    breakdown = {"by_part": total.by("part"), "by_kind": total.by("kind"), "ops": len(ops),
                 "memory_per_rank_bytes": memory_per_rank(model, batch, context, kv_element_bytes)}
    return Projection(total.seconds, acceptance_length if draft_len else 1.0, max(1, node.gpus_per_node // tp),
                      batch, breakdown)
