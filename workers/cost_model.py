"""What one rank's work costs on a node: ONE cost model for the shape-only walk and for the
virtual clock of real runs.

A module call becomes a *plan* (workers/launch_plan.py: the kernels the GPU decode path launches,
in order, decided by the code's own predicates): each kernel an `Op` with its modeled seconds and
its launch count, and the communicator calls between them, each a `Collective` (which call, and the
bytes its cost depends on). The shape-only walk (workers/emulate.py) lays the plans of a step end to
end; a real run (workers/virtual_clock.py) builds the same plans from the same modules as they
execute and advances a per-rank clock through them, each `Collective` met by the real communicator
call it stands for. Both read every number from here, so they can only disagree if they see
different ops, which tests/test_virtual_clock.py checks.

An op's seconds are its COST TO THE STEP inside a graph replay, not its own duration: decode
kernels launch with programmatic dependent launch (PDL), so a GEMV starts while the kernel before
it finishes and streams its weights meanwhile. The per-kind constants are therefore fitted to the
time from a kernel's start to the next kernel's start in a trace of graph-replayed steps
(benchmarks/kernel_fit.py; the node file names the trace), and they sum to the step:

    GEMV        max(fixed_s + weight bytes / (bandwidth_fraction x achievable copy bandwidth),
                    2 x rows x weights / datasheet peak)            (the peak only binds for prefill)
    MoE pair    the shared and routed experts in one launch: the GEMV's fixed cost once, the shared
                bytes at the rows' bandwidth, the routed bytes at one row per expert's
    attention   max(attention_s + KV bytes / (attention fraction x copy bandwidth), QK and PV flops
                / peak): ONE kernel (RoPE + KV write + split-KV + fused merge) where the merge
                fuses, else qkv_rope, the splits and the merge
    argmax      torch's: a one-block reduction, a launch + its vocabulary slice x a per-element time;
                model/kernels/argmax.py's (not traced yet): a small Triton launch + the logits' bytes
    others      their per-launch constant (kernel_s)
    all-reduce  comm "symm" (GPU ranks on one host, the default): the fused one-shot kernel of
                collectives/symm_mem.py, latency + (n - 1) x message / its fitted bandwidth, and
                allreduce_add_rmsnorm is that ONE kernel (no separate norm launch); both fitted
                at TP2 (node file symm_*), TP4 / TP8 EXTRAPOLATED by the (n - 1) term, not measured;
                comm "nccl": min(one-shot: latency + (n - 1) x message / one-way NVLink bandwidth,
                    two-shot: 2 x latency + 2 (n - 1) / n x message / bandwidth), plus the
                add+RMSNorm kernel after it
    all-gather  latency + (n - 1) x one rank's message / bandwidth (symm: the fused all-reduce of
                n zero-padded slots, as collectives/symm_mem.py gathers the LM head's pairs)
    all-to-all  MoE dispatch / combine: symm, the device kernels' TP2 fit (latency + rows / bandwidth);
                else latency + (n - 1) / n x this rank's rows / bandwidth

with the constants of the node file (cluster/nodes/*.json), each naming its source. The compute
bound uses the datasheet's dense peak with no efficiency factor, so a prefill-sized step is a lower
bound; the two-shot all-reduce assumes the measured one-shot latency per phase. A world of one has
no collective cost, but its plans keep the calls (the model still makes them).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Union

import torch

from model.kernels import linear_small_m as small_m

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
    launches: int = 1  # kernel launches the op stands for (a collective: its one kernel)


@dataclass(frozen=True)
class Collective:
    """A communicator call inside a plan. `call` is the Communicator method; `message_bytes` what
    the call's cost is computed from (CostModel.message_bytes says how a real call gives it)."""

    call: str  # all_reduce | allreduce_add_rmsnorm | all_gather | dispatch | combine | ...
    name: str
    part: str
    message_bytes: int
    accepts: tuple = ()  # other calls a real run may make for it (a CPU run's torch path), costed as `call`
    optional: bool = False  # a call only some runs make (a CPU run's torch path at one rank, where it costs
    # nothing): the virtual clock lets a run pass it by
    slots_kept: bool = True  # symm all_gather along dim 0: kept zeroed slots and a view of the sum (two
    # launches); False: a commit before that (zeroed slots, own slot, sum, concatenation)


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


def gather_kept_bytes() -> int:
    """The largest zero-padded slots the symm all_gather keeps between calls (collectives/symm_mem.py)."""
    from collectives.symm_mem import GatherBySum
    return GatherBySum.KEPT_BYTES


def gather_capacity_bytes() -> int:
    """The largest slots the symm all_gather sums in its fused kernel, taking them as BF16 (the GPU
    runs' activations; the kernel's capacity counts values): above it the backend gathers over NCCL."""
    from collectives.symm_mem import DEFAULT_CAPACITY
    return 2 * DEFAULT_CAPACITY


class CostModel:
    """The seconds of each op on `node` for one rank of a `world`-rank tensor-parallel group."""

    def __init__(self, node, world: int, comm: str = "symm") -> None:
        if comm not in COMMS:
            raise ValueError(f"comm must be one of {COMMS}, got {comm!r}")
        self.node, self.world, self.comm = node, world, comm
        self._memo: dict = {}  # (op name, shape...) -> Op: a real run builds the same plans every step
        self._module_memos: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def memo_of(self, module: torch.nn.Module) -> dict:
        """The memo of one module's ops, dropped with the module. Not keyed by id(module): a module
        made after another one died can get its id (the clock makes a new GPU twin each time tracing
        is switched), and would be charged the dead one's bytes."""
        return self._module_memos.setdefault(module, {})

    def bytes_of(self, module: torch.nn.Module) -> int:
        memo = self.memo_of(module)
        if "bytes" not in memo:
            memo["bytes"] = module_bytes(module)
        return memo["bytes"]

    # --- local ops -------------------------------------------------------------------------
    def gemv_fit(self, fp8: bool, rows: int, tensor_cores: bool = False):
        """The node's GEMV fit of a call: BF16 by rows (one, or 2-16); FP8 by kernel: "fp8_m16" the
        tensor cores (linear_small_m.mma_default), "fp8_m1" the CUDA-core GEMV kernels (one row,
        the gathered experts, the MoE pair), as benchmarks/gemv_fit.py classes the measured calls."""
        if fp8:
            return self.node.gemv["fp8_m16" if tensor_cores else "fp8_m1"]
        return self.node.gemv["bf16_m1" if rows == 1 else "bf16_m16"]

    def gemv(self, name: str, part: str, nbytes: int, fp8: bool, rows: int, flops: float = 0.0,
             gathered: bool = False, launches: int = 1, tensor_cores: bool = False) -> Op:
        node = self.node
        fit = self.gemv_fit(fp8, 1 if gathered else rows, tensor_cores)
        streamed = fit.fixed_s + nbytes / (fit.bandwidth_fraction * node.copy_bytes_per_s)
        small = None if fp8 or gathered else node.gemv.get("bf16_small_m1" if rows == 1 else "bf16_small_m16")
        if small is not None:  # small weights: latency-bound, below the big-weight line's intercept
            streamed = min(streamed, small.fixed_s + nbytes / (small.bandwidth_fraction * node.copy_bytes_per_s))
        computed = flops / (node.gpu.fp8_flops if fp8 else node.gpu.bf16_flops)
        return Op(name, "gemv", part, max(streamed, computed), nbytes, launches)

    def linear(self, name: str, part: str, module: torch.nn.Module, rows: int, quantized_input: bool = False) -> Op:
        """A dense linear. An FP8 one that linear_small_m runs on the 16-row dot or the tensor cores
        launches its activation's quantization pre-pass first: two launches, timed together by the
        GEMV fit (benchmarks/gemv_fit.py fits the calls as they ship); one where the norm before it
        already quantized its input (quantized_input: fast_path.fp8_rows), timed by the same fit
        (no fit without the pre-pass yet: pessimistic by about a small launch)."""
        memo, key = self.memo_of(module), (name, rows, quantized_input)
        op = memo.get(key)
        if op is None:
            weight = module.weight
            fp8 = weight.dtype == FP8
            tensor_cores = fp8 and (rows > 1 or small_m.mma_default(rows, *weight.shape))  # or the 16-row dot
            prepass = tensor_cores and rows <= small_m.MAX_M and not quantized_input
            op = memo[key] = self.gemv(name, part, self.bytes_of(module), fp8, rows, 2.0 * rows * weight.numel(),
                                              launches=2 if prepass else 1, tensor_cores=tensor_cores)
        return op

    def expert_bytes(self, experts: torch.nn.Module, which: str) -> int:
        """Bytes of ONE routed expert's `which` ("gate_up_proj" / "down_proj"), its scales included."""
        memo, key = self.memo_of(experts), ("expert bytes", which)
        if key not in memo:
            per_expert = [p[0] for n, p in experts.named_parameters() if n.startswith(which)]
            memo[key] = sum(p.numel() * p.element_size() for p in per_expert)
        return memo[key]

    def routed_experts(self, experts: torch.nn.Module, read: int, rows: int) -> list[Op]:
        """The gathered FC13+SwiGLU and FC2 GEMVs over `read` routed experts' weights (and scales)."""
        memo, key = self.memo_of(experts), ("routed", read, rows)
        if key not in memo:
            ops, fp8 = [], experts.gate_up_proj.dtype == FP8
            for which in ("gate_up_proj", "down_proj"):
                flops = 2.0 * rows * getattr(experts, which)[0].numel()
                ops.append(self.gemv(f"routed {which} x{read}", "moe", read * self.expert_bytes(experts, which), fp8,
                                     rows, flops, gathered=True))
            memo[key] = ops
        return memo[key]

    def kernel(self, name: str, part: str, kind: str, count: int = 1, nbytes: int = 0) -> Op:
        key = (name, part, kind, count, nbytes)
        op = self._memo.get(key)
        if op is None:
            op = self._memo[key] = Op(name, "kernel", part, count * self.node.kernel_s[kind], nbytes, count)
        return op

    def pair(self, name: str, shared_bytes: int, routed_bytes: int, fp8: bool, rows: int, flops: float) -> Op:
        """A MoE pair launch (model/kernels/moe_decode.py): the shared expert over `rows` rows and
        the routed experts (one row each) in one kernel, its fixed cost paid once."""
        node = self.node
        fit, routed_fit = self.gemv_fit(fp8, rows), self.gemv_fit(fp8, 1)
        # the CUDA-core FP8 GEMV (the pair's shared expert) is bound by its per-row work, not its reads:
        # M rows cost M one-row passes (H200, gemv_bench --variants: 4.0x at M = 4, 3.7x at M = 16 the
        # one-row time at 8192x2048; the maverick-slice step traces: benchmarks/kernel_fit.py pair_layers)
        passes = rows if fp8 else 1
        shared_fraction, routed_fraction = fit.bandwidth_fraction, routed_fit.bandwidth_fraction
        if fp8 and rows == 1 and node.pair_fp8_m1_bandwidth_fraction is not None:  # fitted on the pair's own traces
            shared_fraction = routed_fraction = node.pair_fp8_m1_bandwidth_fraction
        streamed = (fit.fixed_s + passes * shared_bytes / (shared_fraction * node.copy_bytes_per_s)
                    + routed_bytes / (routed_fraction * node.copy_bytes_per_s))
        computed = flops / (node.gpu.fp8_flops if fp8 else node.gpu.bf16_flops)
        return Op(name, "gemv", "moe", max(streamed, computed), shared_bytes + routed_bytes)

    def router(self, nbytes: int) -> Op:
        """The fused router launch (GEMV + top-1 + sigmoid): its constant + its weight bytes."""
        return Op("router", "kernel", "moe", self.node.kernel_s["router"] + nbytes / self.node.copy_bytes_per_s, nbytes)

    def argmax(self, name: str, part: str, elements: int) -> Op:
        """torch's argmax / max over one row of `elements`: one block, linear in the row."""
        ks = self.node.kernel_s
        return Op(name, "kernel", part, ks["elementwise"] + elements * ks["argmax_per_element"], 0)

    def argmax_kernel(self, name: str, part: str, logit_bytes: int) -> Op:
        """model/kernels/argmax.py: one wide launch over the logits. Not traced yet: costed as a small
        Triton kernel (the add+RMSNorm's per-launch cost) + the logits at copy bandwidth."""
        ks = self.node.kernel_s
        return Op(name, "kernel", part, ks["add_rmsnorm"] + logit_bytes / self.node.copy_bytes_per_s, 0)

    def attention(self, name: str, part: str, queries: int, keys: int, heads: int, kv_heads: int,
                  head_dim: int, kv_element_bytes: int, fused: bool = True) -> list[Op]:
        """queries: new tokens per row; keys: keys read, summed over the rows. fused: RoPE, the KV
        write, the splits and their merge in one launch (else qkv_rope, the splits, the merge)."""
        node = self.node
        kv = 2 * keys * kv_heads * head_dim * kv_element_bytes
        fixed = node.kernel_s["attention" if fused else "attention_split"]
        streamed = fixed + kv / (node.attention_bandwidth_fraction * node.copy_bytes_per_s)
        computed = 4.0 * queries * keys * heads * head_dim / node.gpu.bf16_flops
        split = Op(name, "attention", part, max(streamed, computed), kv)
        if fused:
            return [split]
        return [self.kernel(name + " rope + kv write", part, "qkv_rope"), split,
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
            summed = Op(c.name, "collective", c.part, fit.latency_s + (n - 1) * m / fit.bytes_per_s, (n - 1) * m)
            if c.call != "all_gather":
                return [summed]
            # collectives/symm_mem.py all_gather: this rank's slot written, the sum (a view of it is the
            # gather); before (not slots_kept) the slots were zeroed every call and the sum concatenated
            if c.call == "all_gather" and m > gather_capacity_bytes():  # the slots outgrow the kernel: NCCL gathers
                return [self._nccl_gather(c)]
            own = [self.kernel(f"{c.name} own slot", c.part, "copy"), summed]
            if c.slots_kept:  # slots above GatherBySum.KEPT_BYTES are zeroed anew each call
                return own if m <= gather_kept_bytes() else [self.kernel(f"{c.name} slots", c.part, "elementwise"), *own]
            return [self.kernel(f"{c.name} slots", c.part, "elementwise"), *own,
                    self.kernel(f"{c.name} cat", c.part, "elementwise")]
        if self.comm == "symm" and c.call in ("dispatch", "combine") and c.call in self.node.symm:
            fit, moved = self.node.symm[c.call], c.message_bytes * (n - 1) // n  # fitted at TP2: its rows / bandwidth
            return [Op(c.name, "collective", c.part, fit.latency_s + c.message_bytes / fit.bytes_per_s, moved)]
        m, latency, bw = c.message_bytes, self.node.allreduce_latency(n), self.node.allreduce_bytes_per_s(n)
        if c.call in ("all_reduce", "allreduce_add_rmsnorm"):
            one_shot = latency + (n - 1) * m / bw
            two_shot = 2 * latency + 2 * (n - 1) / n * m / bw
            seconds, moved = (one_shot, (n - 1) * m) if one_shot <= two_shot else (two_shot, 2 * (n - 1) * m // n)
        elif c.call == "all_gather":
            return [self._nccl_gather(c)]
        elif c.call in ("dispatch", "combine", "all_to_all"):
            moved = m * (n - 1) // n
            seconds = latency + moved / bw
        elif c.call == "broadcast":
            seconds, moved = latency + m / bw, m
        else:  # barrier
            seconds, moved = latency, 0
        return [Op(c.name, "collective", c.part, seconds, moved)]

    def _nccl_gather(self, c: Collective) -> Op:
        """NCCL's all_gather of one rank's c.message_bytes: its line (node.allgather_line) at this world."""
        n, m = self.world, c.message_bytes
        line = self.node.allgather_line(n)
        return Op(c.name, "collective", c.part, line.latency_s + (n - 1) * m / line.bytes_per_s, (n - 1) * m)

    def algorithm(self, call: str, message_bytes: int) -> str:
        """The all-reduce algorithm the model picks for a message (what modeled traces record)."""
        if call not in ("all_reduce", "allreduce_add_rmsnorm") or self.world == 1:
            return "modeled"
        if self.comm == "symm":
            return "modeled fused one-shot"
        n, latency, bw = self.world, self.node.allreduce_latency(self.world), self.node.allreduce_bytes_per_s(self.world)
        one_shot = latency + (n - 1) * message_bytes / bw
        return "modeled one-shot" if one_shot <= 2 * latency + 2 * (n - 1) / n * message_bytes / bw \
            else "modeled two-shot"
