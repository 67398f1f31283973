"""Choosing and building the node for a RunConfig, and the errors a user can cause.

Every check that can fail on user input runs here, before any actor starts: the checkpoint's
config is read, the shard layout is validated for the world size, and requests are checked
against the vocabulary and context limits.
"""
from __future__ import annotations

from pathlib import Path

from cluster.hardware import gpu_spec
from cluster.timeline import TraceError
from model.checkpoint import CheckpointError
from model.config import ConfigError, load_model_config
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
        layout(cfg, run.world_size, rank, run.moe_mode)
    if run.device == "cuda":
        import torch
        available = torch.cuda.device_count()
        if run.world_size > available:
            raise UserError(f"--device cuda with world size {run.world_size} needs {run.world_size} GPUs, "
                            f"{available} visible")
    return cfg


class _Validating:
    def validate(self, requests: list[Request]) -> None:
        validate_requests(requests, self.model_cfg.vocab_size, self.run.max_context or self.model_cfg.max_position_embeddings)


def build_node(run: RunConfig, address: str | None = None, placement: str = "STRICT_PACK",
               dashboard: bool = False):
    """World size 1 runs in-process (no Ray); larger worlds start one Ray actor per rank."""
    check_layout(run)
    gpu_spec(run.hardware)
    if run.world_size == 1 and address is None:
        from cluster.inprocess import InProcessNode
        node = InProcessNode(run)
    else:
        from cluster.ray_node import RayNode
        node = RayNode(run, address=address, placement=placement, dashboard=dashboard)
    node.validate = _Validating.validate.__get__(node)
    return node
