"""Choosing and building the node for a RunConfig, and the errors a user can cause.

Every check that can fail on user input runs here, before any actor starts: the checkpoint's
config is read, the shard layout is validated for the world size, and requests are checked
against the vocabulary and context limits.
"""
from __future__ import annotations

import sys
from pathlib import Path

from cluster.hardware import emulated_node, gpu_spec
from cluster.timeline import TraceError
from model.checkpoint import CheckpointError
from model.config import ConfigError, load_model_config
from model.eagle3 import draft_layout
from model.eagle3_checkpoint import read_draft_config
from model.parallel import layout
from model.sampling import SamplingError
from workers.engine import Request, RequestError, validate_requests
from workers.run_config import RunConfig


class UserError(ValueError):
    """Something the user asked for that cannot be done (bad flag, path, layout...)."""


USER_ERRORS = (UserError, ConfigError, CheckpointError, RequestError, SamplingError, TraceError)


def check_layout(run: RunConfig):
    """Reads the model config and validates the layout for every rank; returns the ModelConfig."""
    path = Path(run.model_path)
    if not path.exists():
        raise UserError(f"model path {path} does not exist")
    cfg = load_model_config(path)
    for rank in range(run.world_size):
        layout(cfg, run.world_size, rank, run.moe_mode, run.replicate_embedding)
    if run.draft_path:  # the draft must fit the target and split over the same ranks
        draft = read_draft_config(run.draft_path, cfg)
        for rank in range(run.world_size):
            draft_layout(draft, run.world_size, rank)
    if run.device == "cuda":
        import torch
        available = torch.cuda.device_count()
        if run.world_size > available:
            raise UserError(f"--device cuda with world size {run.world_size} needs {run.world_size} GPUs, "
                            f"{available} visible")
    return cfg


def _attach_validate(node):
    cfg, run = node.model_cfg, node.run
    node.validate = lambda requests: validate_requests(requests, cfg.vocab_size,
                                                       run.max_context or cfg.max_position_embeddings)
    return node


def build_node(run: RunConfig, address: str | None = None, placement: str = "STRICT_PACK",
               dashboard: bool = False, max_restarts: int = 0, comm_auto: bool = False,
               target_node: str | None = None):
    """World size 1 runs in-process (no Ray); larger worlds start one Ray actor per rank, under a
    Supervisor that restarts the node after a rank failure when max_restarts > 0.
    comm_auto: run.comm is the default, so it may follow where Ray places the ranks (cluster/placement.py).
    target_node: the Ray node id the ranks should go to where it has room (replicas: cluster/replicas.py)."""
    check_layout(run)
    gpu_spec(run.hardware)
    emulated_node(run.emulate_node)  # an unknown name or a bad node file is refused here, before any actor
    if max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {max_restarts}")
    if run.world_size == 1 and address is None:
        from cluster.inprocess import InProcessNode
        return _attach_validate(InProcessNode(run))
    from cluster.ray_node import RayNode

    def make():
        return _attach_validate(RayNode(run, address=address, placement=placement, dashboard=dashboard,
                                        comm_auto=comm_auto, target_node=target_node))

    if max_restarts == 0:
        return make()
    from cluster.faults import Supervisor
    supervisor = Supervisor(make, max_restarts, log=lambda msg: print(msg, file=sys.stderr))
    supervisor.validate = supervisor.node.validate
    return supervisor
