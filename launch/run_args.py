"""The node options `dgx-emu generate` and `dgx-emu serve` share, and the RunConfig they build.

Both commands start the same node (model, dtype, layout, devices, collectives, draft, tracing,
fault handling); they differ only in where requests come from (flags vs HTTP). Keeping the flags
and their translation here means a new runtime option reaches both commands at once.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cluster.node import UserError
from launch.spec_cli import add_spec_args, spec_settings
from launch.trace_cli import prepare_trace_dir
from model.embedded import ensure_default_model
from model.spec import SpecConfig
from workers.run_config import RunConfig


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (HF Llama 4); default: the embedded model")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp8"],
                   help="fp8: FP8 (e4m3) GEMMs, BF16 around them; an FP8 checkpoint loads as is, "
                        "a BF16/FP32 one is quantized at load")
    p.add_argument("--fp8-scheme", default="auto", choices=["auto", "per-tensor", "channel", "block"],
                   help="FP8 scales: per-tensor (static), channel (per-token activations) or block (128x128); "
                        "auto: the checkpoint's, else channel")
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "fp8"],
                   help="KV cache: the compute dtype (auto) or FP8 with per-tensor scales")
    p.add_argument("--world-size", type=int, default=8, help="virtual GPUs, one Ray actor each (1: in-process)")
    p.add_argument("--moe", default="tp", choices=["tp", "ep"], help="MoE layout: tensor or expert parallel")
    p.add_argument("--replicate-embedding", action="store_true",
                   help="every rank holds the whole embedding table: a step embeds without an all-reduce "
                        "(costs the table's memory on every rank; the LM head stays split)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"],
                   help="decode-step kernels: fused Triton kernels or the torch reference ops (auto: triton on cuda)")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                   help="replay decode steps from CUDA graphs (auto: where possible on cuda; on: error if not)")
    p.add_argument("--comm", default=None, choices=["shm", "gloo", "nccl", "symm"],
                   help="data-plane backend (default: shm on cpu; on cuda symm for ranks on one host, nccl across hosts)")
    p.add_argument("--hardware", default="b200", choices=["b200", "h200", "h100"],
                   help="the GPU each rank stands for")
    p.add_argument("--threads-per-rank", type=int, default=1, help="torch threads in each rank")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    p.add_argument("--placement", default="STRICT_PACK", choices=["STRICT_PACK", "PACK", "SPREAD"],
                   help="placement-group strategy for the ranks")
    p.add_argument("--replicas", type=int, default=1,
                   help="copies of the node, each placed by Ray (one per host where the cluster has several): "
                        "serve spreads requests over them (least loaded first), generate splits its prompts")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard (local Ray only)")
    p.add_argument("--trace", metavar="DIR", default=None,
                   help="record per-rank communication timelines into DIR (see `dgx-emu trace`)")
    p.add_argument("--emulate-node", metavar="NODE", default=None,
                   help="give each rank a virtual clock of NODE (dgx-b200, hgx-h200, hgx-h100 or a node JSON file): "
                        "--json reports the modeled step time and tokens/s beside the measured ones, --trace "
                        "writes the modeled timeline beside the measured one (steps run eagerly)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="after a rank failure, restart the node and rerun the batch up to N times")
    p.add_argument("--collective-timeout", type=float, default=120.0,
                   help="seconds a rank waits in a collective before naming the ranks that never came")
    p.add_argument("--inject-delay", metavar="RANK:SECONDS", default=None,
                   help="fault injection: RANK arrives SECONDS late at every collective")
    add_spec_args(p)


def default_comm(device: str, world_size: int, ray_address: str | None) -> str:
    """shm for CPU actors; on GPUs the fused peer-memory collectives (symm). Where a joined cluster
    places the ranks on several hosts, the node makes shm hierarchical and turns this default symm
    into NCCL (cluster/placement.py); ray_address is kept for callers that pass it."""
    if device != "cuda":
        return "shm"
    return "symm" if world_size > 1 else "nccl"


def _delay(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        rank, seconds = text.split(":")
        return {"delay_rank": int(rank), "delay_s": float(seconds)}
    except ValueError:
        raise UserError(f"--inject-delay must look like RANK:SECONDS, got {text!r}") from None


@dataclass(frozen=True)
class NodeSettings:
    """What the runtime flags ask for: the RunConfig, where the model is, the draft and its spec
    settings, and the keyword arguments of cluster.node.build_node beside the RunConfig."""
    run: RunConfig
    model_dir: Path
    draft_path: str | None
    spec: SpecConfig | None
    build_kwargs: dict


def node_settings(args) -> NodeSettings:
    """Translates the runtime flags (and prepares --trace DIR); the RunConfig checks its own fields."""
    model_dir = Path(args.model) if args.model else ensure_default_model()
    comm = args.comm or default_comm(args.device, args.world_size, args.ray_address)
    draft_path, spec = spec_settings(args, model_given=args.model is not None)
    if args.trace:
        prepare_trace_dir(args.trace)
    run = RunConfig(model_path=str(model_dir), dtype=args.dtype, device=args.device, world_size=args.world_size,
                    moe_mode=args.moe, replicate_embedding=args.replicate_embedding, comm=comm,
                    threads_per_rank=args.threads_per_rank,
                    hardware=args.hardware, trace_dir=args.trace, fp8_scheme=args.fp8_scheme,
                    kv_dtype=args.kv_dtype, draft_path=draft_path, kernels=args.kernels,
                    cuda_graphs=args.cuda_graphs, emulate_node=args.emulate_node,
                    collective_timeout_s=args.collective_timeout, **_delay(args.inject_delay))
    build = {"address": args.ray_address, "placement": args.placement, "dashboard": args.dashboard,
             "max_restarts": args.max_restarts, "comm_auto": args.comm is None}
    return NodeSettings(run, model_dir, draft_path, spec, build)
