"""What each rank of the virtual-clock sessions runs (tests/test_virtual_clock.py on CPU ranks,
tests/test_virtual_clock_gpu.py on GPUs; spawned processes import this module, which keeps their
imports to the worker, the walk and the node files' reader)."""
from __future__ import annotations

import dataclasses
import math

import torch

from cluster.hardware import node_spec
from model.config import load_model_config
from model.sampling import SamplingParams
from collectives.clocked import ClockedCommunicator
from workers.cost_model import Collective, Op
from workers.emulate import estimate_step, shape_only_model
from workers.engine import Request
from workers.run_config import RunConfig
from workers.virtual_clock import VirtualClock
from workers.worker import Worker

NODE = "dgx-b200"
PROMPTS = ((0, 5, 9, 300, 17), (0, 7, 44, 2, 101))  # equal lengths: every row reads the same keys
NEW_TOKENS = 4
LATE_S = 1e-3  # how much later rank 1 reaches the exercise's collectives, in virtual time


def ops_equal_the_walk(clock: VirtualClock, step: int, walk: list[Op], rank: int) -> float:
    """Asserts the ops the run's clock charged in `step` are the walk's, op by op (names, kinds,
    parts, bytes, seconds to 1e-12); returns the walk's seconds for that step."""
    real = [op for s, _, op in clock.ops if s == step]
    assert [(o.name, o.kind, o.part, o.bytes) for o in real] == [(o.name, o.kind, o.part, o.bytes) for o in walk], \
        f"rank {rank} step {step}: the run's ops differ from the walk's"
    for r, w in zip(real, walk):
        assert math.isclose(r.seconds, w.seconds, rel_tol=1e-12), (step, r, w)
    return sum(op.seconds for op in walk)


def _walk_ops(ckpt: str, clock: VirtualClock, steps: int, dtype: str) -> dict[int, list[Op]]:
    """The shape-only walk of each step of the run: rank 0's meta model, the same batch, new tokens,
    keys and, per MoE layer, the number of experts the run's router chose (what the walk takes as input)."""
    meta = shape_only_model(load_model_config(ckpt), clock.world, "tp", dtype)
    kv_bytes = 4 if dtype == "fp32" else 2
    batch, prompt = len(PROMPTS), len(PROMPTS[0])
    walked = {}
    for step in range(steps):
        experts = [read for s, _, read in sorted(clock.routing) if s == step]
        tokens = prompt if step == 0 else 1
        walked[step] = estimate_step(meta, clock.node, batch, tokens, prompt + step, experts, kv_element_bytes=kv_bytes,
                                     last_only=step == 0, comm=clock.cost.comm).ops
    return walked


def _late_rank_exercise(comm, device: str) -> torch.Tensor:
    """Rank 1 charges LATE_S of extra work, then both ranks all-reduce and all-to-all uneven rows
    through a ClockedCommunicator: once outside a step (each call settled at once), once inside a
    step (settled at its end). Returns (arrival, transfer, end, result ok) of the four calls."""
    clock = VirtualClock(node_spec(NODE), comm.rank, comm.world_size, keep_ops=True)
    clocked = ClockedCommunicator(comm, comm, clock, device)
    transfers, results = [], []
    for in_step in (False, True):
        if in_step:
            clock.step_begin(0, [])
        if comm.rank == 1:
            clock.charge(Op("made late", "kernel", "attention", LATE_S), -1)
        x = torch.full((4, 64), float(comm.rank + 1), device=device)
        results.append(float(torch.equal(clocked.all_reduce(x), torch.full_like(x, 3.0))))
        transfers.append(clock.cost.collective(Collective("all_reduce", "", "", x.nbytes))[0].seconds)
        send = torch.ones(2 + 6 * comm.rank, 64, device=device)  # rank 0 sends 2 rows, rank 1 sends 8: uneven transfers
        received, _ = clocked.all_to_all(send, [send.shape[0] // 2, send.shape[0] - send.shape[0] // 2])
        results.append(float(received.shape[0] == 1 + 4))
        transfers.append(clock.cost.collective(Collective("all_to_all", "", "", send.nbytes))[0].seconds)
        if in_step:
            clock.step_end(0)
    return torch.tensor([[arrival, transfer, end, ok] for (_, _, arrival, end), transfer, ok
                         in zip(clock.settled, transfers, results)], dtype=torch.float64)


def _expert_parallel(comm, run: RunConfig, params: SamplingParams) -> dict[str, torch.Tensor]:
    """The same generate with expert-parallel MoE: per step, each MoE layer's dispatch and combine
    all-to-alls in the clock, and the experts this rank computed (whole experts: at most its own)."""
    worker = Worker(comm.rank, dataclasses.replace(run, moe_mode="ep", trace_dir=None), comm, node=node_spec(NODE))
    worker.load()
    worker.clock.ops = []
    _, stats = worker.generate([Request(p, params, str(i)) for i, p in enumerate(PROMPTS)])
    moe_layers = sum(layer.is_moe for layer in worker.model.layers)
    per_step = [[op.name for s, _, op in worker.clock.ops if s == step and op.kind == "collective"]
                for step in range(1 + len(stats.modeled["step_s"]))]
    return {"ep_all_to_alls": torch.tensor([[names.count("dispatch"), names.count("combine")] for names in per_step]),
            "ep_moe_layers": torch.tensor(moe_layers),
            "ep_experts_read": torch.tensor([read for _, _, read in worker.clock.routing]),
            "ep_experts_per_rank": torch.tensor(worker.shard.experts_per_rank),
            "ep_steps": torch.tensor([stats.modeled["ttft_s"], *stats.modeled["step_s"]], dtype=torch.float64)}


def session_rank(comm, ckpt: str, trace_dir: str, device: str = "cpu", dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """A traced, emulated generate of PROMPTS; every rank checks its clock against the walk op by
    op; then (two ranks) the late-rank exercise. Returns step times, the op count and the exercise."""
    backend = "gloo" if device == "cpu" else "nccl"
    run = RunConfig(ckpt, world_size=comm.world_size, comm=backend, device=device, dtype=dtype, emulate_node=NODE,
                    trace_dir=trace_dir)
    worker = Worker(comm.rank, run, comm, node=node_spec(NODE))
    worker.load()
    worker.clock.ops = []  # keep every op charged from here on
    params = SamplingParams(max_new_tokens=NEW_TOKENS, stop_on_eos=False)
    _, stats = worker.generate([Request(p, params, str(i)) for i, p in enumerate(PROMPTS)])
    clock = worker.clock
    walked = _walk_ops(ckpt, clock, 1 + len(stats.modeled["step_s"]), dtype)
    real_steps = [stats.modeled["ttft_s"], *stats.modeled["step_s"]]
    walk_steps = [ops_equal_the_walk(clock, step, walk, comm.rank) for step, walk in walked.items()]
    out = {"real_steps": torch.tensor(real_steps, dtype=torch.float64),
           "walk_steps": torch.tensor(walk_steps, dtype=torch.float64), "ops": torch.tensor(len(clock.ops))}
    if comm.world_size > 1:
        out.update(_expert_parallel(comm, run, params))
        exercise = _late_rank_exercise(comm, device)  # on the raw communicator the worker wraps
        out["exercise"] = comm.all_gather(exercise.to(device)[None], dim=0).cpu()  # (world, 4 calls, 4)
    worker.close()  # flushes both traces
    return out
