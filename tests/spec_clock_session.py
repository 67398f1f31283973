"""What each rank of the speculative virtual-clock sessions runs (tests/test_virtual_clock_spec.py):
an EAGLE-3 generate of the embedded model and its shipped draft with --emulate-node, its clock held
op by op to the shape-only walk of the same steps (the accepted lengths and routed experts the run
reported being the walk's inputs), and the same generate without the clock. Spawned processes
import this module, which keeps their imports to the worker, the walk and the node files' reader."""
from __future__ import annotations

import dataclasses

import torch

from cluster.hardware import node_spec
from model.config import load_model_config
from model.eagle3_checkpoint import read_draft_config
from model.embedded import default_draft_dir, default_model_dir
from model.sampling import SamplingParams
from model.spec import SpecConfig
from workers.cost_model import CostModel
from workers.draft_plan import catch_up_plan
from workers.emulate import estimate_spec_step, shape_only_draft, shape_only_model, target_plan
from workers.engine import Request
from workers.launch_plan import flatten
from workers.run_config import RunConfig
from workers.worker import Worker

from tests.virtual_clock_session import ops_equal_the_walk

NODE = "dgx-b200"
PROMPT = (0, 340, 360, 357, 288, 290, 353, 371, 371, 357, 370, 372)  # the held-out text's first tokens
NEW_TOKENS = 10
SHAPES = {"chain": SpecConfig(draft_len=3), "tree": SpecConfig(tree=True, top_k=2, depth=3, tree_tokens=4)}


def _walk(clock, spec: SpecConfig, accepted: list[int], dtype: str) -> list[list]:
    """The walk's ops of each step: the prefill and the draft's catch-up on the prompt, then each
    speculative step at its context, catch-up width (accepted + 1) and the experts the run routed to."""
    cfg = load_model_config(default_model_dir())
    meta, kv = shape_only_model(cfg, clock.world, "tp", dtype), 4 if dtype == "fp32" else 2
    draft = shape_only_draft(read_draft_config(default_draft_dir(), cfg), meta)
    cost, prompt = CostModel(clock.node, clock.world, clock.cost.comm), len(PROMPT)
    experts = lambda step: [read for s, _, read in sorted(clock.routing) if s == step]  # noqa: E731
    steps = [flatten(cost, target_plan(cost, meta, 1, prompt, prompt, experts(0), kv)
                     + catch_up_plan(cost, draft, 1, prompt, prompt))]
    context = prompt
    for step, kept in enumerate(accepted, start=1):
        steps.append(estimate_spec_step(meta, draft, clock.node, 1, spec.shape, context, catch_up=kept + 1,
                                        distinct_experts=experts(step), kv_element_bytes=kv, comm=clock.cost.comm).ops)
        context += kept + 1
    return steps


def spec_rank(comm, which: str, device: str = "cpu", dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """The same EAGLE-3 generate unclocked, then clocked (world = the communicator's), the clock
    checked against the walk step by step and op by op. Returns both token lists and the step times."""
    spec = SHAPES[which]
    backend = "gloo" if device == "cpu" else "nccl"
    run = RunConfig(str(default_model_dir()), world_size=comm.world_size, comm=backend, device=device, dtype=dtype,
                    draft_path=str(default_draft_dir()), emulate_node=NODE)
    request = [Request(PROMPT, SamplingParams(max_new_tokens=NEW_TOKENS, stop_on_eos=False), "0")]
    plain = Worker(comm.rank, dataclasses.replace(run, emulate_node=None), comm)  # on a GPU: its graphs
    plain.load()
    unclocked, _ = plain.generate(request, spec=spec)
    worker = Worker(comm.rank, run, comm, node=node_spec(NODE))
    worker.load()
    worker.clock.ops = []  # keep every op charged from here on
    completions, stats = worker.generate(request, spec=spec)
    clock = worker.clock
    accepted = [fields["accepted"][0] for _, fields in clock.step_fields[1:]]
    walked = _walk(clock, spec, accepted, dtype)
    assert len(walked) == 1 + len(stats.modeled["step_s"]), (len(walked), stats.modeled)
    walk_steps = [ops_equal_the_walk(clock, step, walk, comm.rank) for step, walk in enumerate(walked)]
    draft_ops = sum(op.part == "draft" for _, _, op in clock.ops)
    worker.close()  # closes the communicator too: last
    return {"tokens": torch.tensor(completions[0].token_ids), "unclocked_tokens": torch.tensor(unclocked[0].token_ids),
            "real_steps": torch.tensor([stats.modeled["ttft_s"], *stats.modeled["step_s"]], dtype=torch.float64),
            "walk_steps": torch.tensor(walk_steps, dtype=torch.float64), "accepted": torch.tensor(accepted),
            "draft_ops": torch.tensor(draft_ops)}
