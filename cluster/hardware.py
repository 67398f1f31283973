"""What each virtual GPU stands for: the hardware numbers of the nodes we emulate.

Sources: NVIDIA's DGX B200 / HGX and H200 / H100 SXM datasheets (see shared anchors §3). Rates
are dense (no sparsity). NVLink is quoted bidirectional per GPU, as NVIDIA quotes it; one
direction is half. The emulator's cost model reads these; the runtime reports them with each
rank so a user sees whether a shard would fit the HBM of the GPU it stands for.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from model.config import ConfigError

GB = 1e9
TB = 1e12


@dataclass(frozen=True)
class GpuSpec:
    name: str
    hbm_bytes: float
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # bidirectional, per GPU
    bf16_flops: float
    fp8_flops: float
    fp4_flops: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


GPUS = {
    "b200": GpuSpec("B200", 180 * GB, 8.0 * TB, 1.8 * TB, 2.25e15, 4.5e15, 9.0e15),
    "h200": GpuSpec("H200", 141 * GB, 4.8 * TB, 0.9 * TB, 0.989e15, 1.979e15),
    "h100": GpuSpec("H100", 80 * GB, 3.35 * TB, 0.9 * TB, 0.989e15, 1.979e15),
}
GPUS_PER_NODE = 8


def gpu_spec(name: str) -> GpuSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown hardware {name!r}; choose one of {sorted(GPUS)}") from None


# ---------------------------------------------------------------------------------------------
# Node specs for the emulator: data files in cluster/nodes/, each number with its source
# ---------------------------------------------------------------------------------------------
NODES_DIR = Path(__file__).resolve().parent / "nodes"
NODE_ALIASES = {"b200": "dgx-b200", "h200": "hgx-h200", "h100": "hgx-h100"}


@dataclass(frozen=True)
class GemvFit:
    """A decode GEMV's time: fixed_s + bytes / (bandwidth_fraction * achievable copy bandwidth)."""

    fixed_s: float
    bandwidth_fraction: float


@dataclass(frozen=True)
class NodeSpec:
    name: str
    gpus_per_node: int
    gpu: GpuSpec
    copy_bytes_per_s: float  # what a device-to-device copy achieves: datasheet HBM x copy_fraction
    gemv: dict  # "bf16_m1" / "bf16_m16" / "fp8_m1" / "fp8_m16" -> GemvFit
    kernel_s: dict  # kernel kind -> seconds per launch inside a CUDA graph
    attention_bandwidth_fraction: float
    eager_launch_s: float
    allreduce_latency_s: float
    sources: dict

    @property
    def nvlink_bytes_per_s_one_way(self) -> float:
        return self.gpu.nvlink_bytes_per_s / 2


def node_spec(name_or_path: str) -> NodeSpec:
    """A node by name (dgx-b200, hgx-h200, hgx-h100, or b200 / h200 / h100) or a JSON file of the
    same form (a user's own node). Refuses a file that lacks a number, naming it."""
    key = NODE_ALIASES.get(name_or_path.lower(), name_or_path.lower())
    path = NODES_DIR / f"{key}.json"
    if not path.is_file():
        path = Path(name_or_path)
        if not path.is_file():
            known = sorted(p.stem for p in NODES_DIR.glob("*.json"))
            raise ConfigError(f"unknown node {name_or_path!r}: choose one of {known} or give a node JSON file")
    try:
        raw = json.loads(path.read_text())
        gpu, cal = raw["gpu"], raw["calibration"]
        spec = GpuSpec(gpu["name"], float(gpu["hbm_bytes"]), float(gpu["hbm_bytes_per_s"]),
                       float(raw["nvlink_bytes_per_s"]), float(gpu["bf16_flops"]), float(gpu["fp8_flops"]),
                       None if gpu.get("fp4_flops") is None else float(gpu["fp4_flops"]))
        return NodeSpec(raw["name"], int(raw["gpus_per_node"]), spec, spec.hbm_bytes_per_s * float(cal["copy_fraction"]),
                        {k: GemvFit(float(v["fixed_s"]), float(v["bandwidth_fraction"])) for k, v in cal["gemv"].items()},
                        {k: float(v) for k, v in cal["kernel_s"].items()}, float(cal["attention_bandwidth_fraction"]),
                        float(cal["eager_launch_s"]), float(cal["allreduce_latency_s"]), dict(raw.get("sources", {})))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"node file {path}: missing or malformed {e}") from None
