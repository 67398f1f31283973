"""What one rank's work costs on a node: ONE cost model for the shape-only walk and for the
virtual clock of real runs.

A module call becomes a *plan*: the kernels it launches in the GPU decode path's order
(model/fast_path.py), each an `Op` with its modeled seconds, and the communicator calls between
them, each a `Collective` (which call, and the bytes its cost depends on). The shape-only walk
(workers/emulate.py) lays the plans of a step end to end; a real run (workers/virtual_clock.py)
builds the same plans from the same modules as they execute and advances a per-rank clock through
them, each `Collective` met by the real communicator call it stands for. Both read every number
from here, so they can only disagree if they see different ops, which tests/test_virtual_clock.py
checks.

    GEMV        max(fixed_s + weight bytes / (bandwidth_fraction x achievable copy bandwidth),
                    2 x rows x weights / datasheet peak)            (the peak only binds for prefill)
    attention   max(fixed_s + KV bytes / (attention fraction x copy bandwidth), QK and PV flops / peak),
                then the split-KV merge
    others      their measured per-launch time inside a CUDA graph
    all-reduce  comm "symm" (GPU ranks on one host, the default): the fused one-shot kernel of
                collectives/symm_mem.py, latency + (n - 1) x message / its fitted bandwidth, and
                allreduce_add_rmsnorm is that ONE kernel (no separate norm launch); both fitted
                at TP2 (node file symm_*), TP4 / TP8 EXTRAPOLATED by the (n - 1) term, not measured;
                comm "nccl": min(one-shot: latency + (n - 1) x message / one-way NVLink bandwidth,
                    two-shot: 2 x latency + 2 (n - 1) / n x message / bandwidth), plus the
                add+RMSNorm kernel after it
    all-gather  latency + (n - 1) x one rank's message / bandwidth (symm: the fused all-reduce of
                n zero-padded slots, as collectives/symm_mem.py gathers the LM head's pairs)
    all-to-all  latency + (n - 1) / n x this rank's rows / bandwidth (MoE dispatch and combine)

with the constants of the node file (cluster/nodes/*.json), each naming its source. The compute
bound uses the datasheet's dense peak with no efficiency factor, so a prefill-sized step is a lower
bound; the two-shot all-reduce assumes the measured one-shot latency per phase. A world of one has
no collective cost, but its plans keep the calls (the model still makes them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch

FP8 = torch.float8_e4m3fn
STAGES = {"embed": "embed", "attention": "attention", "dense": "mlp", "moe": "moe", "head": "lm_head",
          "draft": "draft"}  # an op's part -> the stage name the measured trace uses


@dataclass(frozen=True)
class Op:
    name: str
    kind: str  # gemv | attention | kernel | collective
    part: str  # embed | attention | dense | moe | head | draft
    seconds: float
    bytes: int = 0


@dataclass(frozen=True)
class Collective:
    """A communicator call inside a plan. `call` is the Communicator method; `message_bytes` what
    the call's cost is computed from (CostModel.message_bytes says how a real call gives it)."""

    call: str  # all_reduce | allreduce_add_rmsnorm | all_gather | dispatch | combine | ...
    name: str
    part: str
    message_bytes: int


PlanItem = Union[Op, Collective, Callable[[], list]]
COMMS = ("symm", "nccl")  # how the emulated node all-reduces: the fused one-shot kernel, or NCCL + a norm launch


def emulated_comm(run_comm: str) -> str:
    """The emulated node's collectives for a real run's backend: NCCL when the run chose a
    torch.distributed library (nccl, gloo), else the fused one-host kernel (symm, and shm: CPU
    actors on one host stand for GPUs on one host, whose default is symm, launch/cli.py)."""
    return "nccl" if run_comm in ("nccl", "gloo") else "symm"  # a callable: ops known only once the call has run


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters (real or meta): what reading all its weights moves."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


class CostModel:
    """The seconds of each op on `node` for one rank of a `world`-rank tensor-parallel group."""

    def __init__(self, node, world: int, comm: str = "symm") -> None:
        if comm not in COMMS:
            raise ValueError(f"comm must be one of {COMMS}, got {comm!r}")
        self.node, self.world, self.comm = node, world, comm
        self._memo: dict = {}  # (op name, module, rows) -> Op: a real run builds the same plans every step

    def bytes_of(self, module: torch.nn.Module) -> int:
        key = ("bytes", id(module))
        if key not in self._memo:
            self._memo[key] = module_bytes(module)
        return self._memo[key]

    # --- local ops -------------------------------------------------------------------------
    def gemv(self, name: str, part: str, nbytes: int, fp8: bool, rows: int, flops: float = 0.0,
             gathered: bool = False) -> Op:
        node = self.node
        fit = node.gemv[("fp8" if fp8 else "bf16") + ("_m1" if rows == 1 or gathered else "_m16")]
        streamed = fit.fixed_s + nbytes / (fit.bandwidth_fraction * node.copy_bytes_per_s)
        computed = flops / (node.gpu.fp8_flops if fp8 else node.gpu.bf16_flops)
        return Op(name, "gemv", part, max(streamed, computed), nbytes)

    def linear(self, name: str, part: str, module: torch.nn.Module, rows: int) -> Op:
        key = (name, id(module), rows)
        op = self._memo.get(key)
        if op is None:
            weight = module.weight
            op = self._memo[key] = self.gemv(name, part, module_bytes(module), weight.dtype == FP8, rows,
                                              2.0 * rows * weight.numel())
        return op

    def routed_experts(self, experts: torch.nn.Module, read: int, rows: int) -> list[Op]:
        """The gathered FC13+SwiGLU and FC2 GEMVs over `read` routed experts' weights (and scales)."""
        key = ("routed", id(experts), read, rows)
        if key not in self._memo:
            ops, fp8 = [], experts.gate_up_proj.dtype == FP8
            for which in ("gate_up_proj", "down_proj"):
                per_expert = [p[0] for n, p in experts.named_parameters() if n.startswith(which)]
                nbytes = read * sum(p.numel() * p.element_size() for p in per_expert)
                flops = 2.0 * rows * getattr(experts, which)[0].numel()
                ops.append(self.gemv(f"routed {which} x{read}", "moe", nbytes, fp8, rows, flops, gathered=True))
            self._memo[key] = ops
        return self._memo[key]

    def kernel(self, name: str, part: str, kind: str, count: int = 1, nbytes: int = 0) -> Op:
        key = (name, part, kind, count, nbytes)
        op = self._memo.get(key)
        if op is None:
            op = self._memo[key] = Op(name, "kernel", part, count * self.node.kernel_s[kind], nbytes)
        return op

    def attention(self, name: str, part: str, queries: int, keys: int, heads: int, kv_heads: int,
                  head_dim: int, kv_element_bytes: int) -> list[Op]:
        """queries: new tokens per row; keys: keys read, summed over the rows."""
        node = self.node
        kv = 2 * keys * kv_heads * head_dim * kv_element_bytes
        streamed = node.kernel_s["attention_split"] + kv / (node.attention_bandwidth_fraction * node.copy_bytes_per_s)
        computed = 4.0 * queries * keys * heads * head_dim / node.gpu.bf16_flops
        return [Op(name, "attention", part, max(streamed, computed), kv),
                self.kernel(name + " merge", part, "attention_merge")]

    # --- collectives ------------------------------------------------------------------------
    @staticmethod
    def message_bytes(call: str, args: tuple) -> int:
        """What a real communicator call's cost is computed from: the first tensor's bytes (for an
        all-gather one rank's part, for dispatch / combine this rank's rows; a barrier none)."""
        return args[0].nbytes if args and isinstance(args[0], torch.Tensor) else 0

    def collective(self, c: Collective) -> list[Op]:
        n = self.world
        if n == 1:
            return []
        ops = self._memo.get(c)
        if ops is None:
            ops = self._memo[c] = self._collective(c)
        return ops

    @property
    def fused_norm(self) -> bool:
        """Whether allreduce_add_rmsnorm is one kernel (symm at several ranks) or a collective and a norm."""
        return self.comm == "symm" and self.world > 1

    def _collective(self, c: Collective) -> list[Op]:
        n = self.world
        if self.comm == "symm" and c.call in ("all_reduce", "allreduce_add_rmsnorm", "all_gather"):
            fit = self.node.symm["allreduce_add_rmsnorm" if c.call == "allreduce_add_rmsnorm" else "all_reduce"]
            m = c.message_bytes * (n if c.call == "all_gather" else 1)  # a gather: n slots, summed
            return [Op(c.name, "collective", c.part, fit.latency_s + (n - 1) * m / fit.bytes_per_s, (n - 1) * m)]
        m, latency, bw = c.message_bytes, self.node.allreduce_latency_s, self.node.nvlink_bytes_per_s_one_way
        if c.call in ("all_reduce", "allreduce_add_rmsnorm"):
            one_shot = latency + (n - 1) * m / bw
            two_shot = 2 * latency + 2 * (n - 1) / n * m / bw
            seconds, moved = (one_shot, (n - 1) * m) if one_shot <= two_shot else (two_shot, 2 * (n - 1) * m // n)
        elif c.call == "all_gather":
            seconds, moved = latency + (n - 1) * m / bw, (n - 1) * m
        elif c.call in ("dispatch", "combine", "all_to_all"):
            moved = m * (n - 1) // n
            seconds = latency + moved / bw
        elif c.call == "broadcast":
            seconds, moved = latency + m / bw, m
        else:  # barrier
            seconds, moved = latency, 0
        return [Op(c.name, "collective", c.part, seconds, moved)]

    def algorithm(self, call: str, message_bytes: int) -> str:
        """The all-reduce algorithm the model picks for a message (what modeled traces record)."""
        if call not in ("all_reduce", "allreduce_add_rmsnorm") or self.world == 1:
            return "modeled"
        if self.comm == "symm":
            return "modeled fused one-shot"
        n, latency, bw = self.world, self.node.allreduce_latency_s, self.node.nvlink_bytes_per_s_one_way
        one_shot = latency + (n - 1) * message_bytes / bw
        return "modeled one-shot" if one_shot <= 2 * latency + 2 * (n - 1) / n * message_bytes / bw \
            else "modeled two-shot"


# ---------------------------------------------------------------------------------------------
# Plans: one per module call, built from the module's own shapes
# ---------------------------------------------------------------------------------------------
def activation_bytes(model) -> int:
    """Bytes of one activation element: the embedding's dtype (bf16 for bf16 and fp8 models)."""
    return model.embed_tokens.weight.element_size()


def embed_plan(cost: CostModel, model, batch: int, tokens: int) -> list[PlanItem]:
    """Positions and cache slots, the vocab-parallel embedding, its all-reduce, the first RMSNorm
    (launch counts: the torch ops of llama4.py on this path)."""
    rows, sharded = batch * tokens, not model.embed_tokens.owns_every_id
    return [cost.kernel("positions + slots", "embed", "elementwise", 4),
            cost.kernel("embedding", "embed", "elementwise", 8 if sharded else 1),  # a gather; sharded: masked
            Collective("all_reduce", "embedding all-reduce", "embed",
                       rows * model.cfg.hidden_size * activation_bytes(model)),
            cost.kernel("first rmsnorm", "embed", "elementwise", 8)]


def norm_collective(cost: CostModel, name: str, part: str, message: int) -> list[PlanItem]:
    """The AllReduce + residual add + RMSNorm: one fused kernel (symm, several ranks), else the
    collective (none at one rank) and the add+RMSNorm launch."""
    plan: list[PlanItem] = [Collective("allreduce_add_rmsnorm", name, part, message)]
    return plan if cost.fused_norm else plan + [cost.kernel(name + " add+rmsnorm", part, "add_rmsnorm")]


def layer_plan(cost: CostModel, layer, act_bytes: int, batch: int, tokens: int, keys: int, kv_element_bytes: int,
               experts_read: int | Callable[[], int]) -> list[PlanItem]:
    """One decoder layer: attention, its fused AllReduce+RMSNorm, the MLP or MoE, another one.
    keys: keys read by attention, summed over the rows; experts_read: routed experts whose weights
    this rank reads (a callable when the real routing decides it)."""
    attn, ffn, rows = layer.self_attn, layer.feed_forward, batch * tokens
    message = rows * layer.input_layernorm.weight.shape[0] * act_bytes  # (rows, H) partial sums
    plan: list[PlanItem] = [
        cost.linear("qkv_proj", "attention", attn.qkv_proj, rows),
        cost.kernel("rope + kv write", "attention", "qkv_rope"),
        *cost.attention("attention", "attention", tokens, keys, attn.n_heads_per_rank, attn.n_kv_heads_per_rank,
                        attn.head_dim, kv_element_bytes),
        cost.linear("o_proj", "attention", attn.o_proj, rows),
        *norm_collective(cost, "attention all-reduce", "attention", message)]
    if layer.is_moe:
        plan += moe_plan(cost, ffn, rows, act_bytes, experts_read)
        return plan + norm_collective(cost, "moe all-reduce", "moe", message)
    plan += [cost.linear("fc13 + swiglu", "dense", ffn.gate_up_proj, rows),
             cost.linear("fc2", "dense", ffn.down_proj, rows)]
    return plan + norm_collective(cost, "mlp all-reduce", "dense", message)


def moe_plan(cost: CostModel, block, rows: int, act_bytes: int,
             experts_read: int | Callable[[], int]) -> list[PlanItem]:
    """Router, top-k and scores, the shared expert, then the routed experts: tensor-parallel, a
    slice of every routed expert; expert-parallel, whole experts between a dispatch and a combine
    all-to-all of this rank's share of the rows (model/ffn.py: each rank dispatches its own)."""
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
        read = experts_read() if callable(experts_read) else experts_read
        return cost.routed_experts(experts, read, routed_rows) if read else []
    plan.append(routed)
    if block.expert_parallel:
        plan.append(Collective("combine", "combine", "moe", routed_rows * hidden * act_bytes))
    return plan + [cost.kernel("shared + routed", "moe", "elementwise")]


def head_plan(cost: CostModel, model, head_rows: int, picked_rows: int) -> list[PlanItem]:
    """The LM head over `head_rows` rows, the argmax of `picked_rows` (+ vocab offset, cache
    lengths, the graph's feedback copy); sharded, the pairwise argmax's all-gather of fp32 (max, id)."""
    head = model.lm_head_weight()
    sharded = cost.world > 1
    plan: list[PlanItem] = [
        cost.gemv("lm head", "head", head.numel() * head.element_size(), head.dtype == FP8, head_rows,
                  2.0 * head_rows * head.numel()),
        cost.kernel("argmax + cache lengths", "head", "elementwise", 13 if sharded else 4)]
    if sharded:
        plan.append(Collective("all_gather", "argmax all-gather", "head", picked_rows * 2 * 4))
    return plan


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
