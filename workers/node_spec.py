"""What a node is, as the cost model and the virtual clock read it: a GPU's datasheet numbers and
the calibration that turns bytes and launches into seconds.

The classes live here, below cluster/, because the workers that cost their work need the type and
workers/ must not import cluster/ (DESIGN.md: launch -> cluster -> workers -> model). Where the
numbers come from (the data files in cluster/nodes/, a user's own file, names and aliases, the
errors a user sees) stays in cluster/hardware.py, which hands the parsed NodeSpec down.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


SYMM_FITS = (("all_reduce", "allreduce"), ("allreduce_add_rmsnorm", "ar_rmsnorm"), ("dispatch", "dispatch"),
             ("combine", "combine"))  # communicator call -> the node file's symm_<key>_latency_s / _bytes_per_s
REQUIRED_SYMM = ("allreduce", "ar_rmsnorm")


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


@dataclass(frozen=True)
class GemvFit:
    """A decode GEMV's time: fixed_s + bytes / (bandwidth_fraction * achievable copy bandwidth)."""

    fixed_s: float
    bandwidth_fraction: float


@dataclass(frozen=True)
class LinkFit:
    """A collective kernel's time at two ranks: latency_s + message bytes / bytes_per_s."""

    latency_s: float
    bytes_per_s: float


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
    allreduce_latency_s: float  # NCCL's, inside a CUDA graph
    sources: dict
    symm: dict  # call -> LinkFit: the fused one-shot all-reduce(s) (collectives/symm_mem.py), the MoE
    # dispatch / combine kernels (collectives/moe_all_to_all.py) where the file has them
    pair_fp8_m1_bandwidth_fraction: float | None = None  # the one-row FP8 MoE pair's (else the fp8_m1 GEMV's)
    allreduce_latency_s_by_ranks: dict = field(default_factory=dict)  # ranks -> NCCL latency measured there
    allreduce_bytes_per_s_by_ranks: dict = field(default_factory=dict)  # ranks -> NCCL bytes/s measured there
    allgather_by_ranks: dict = field(default_factory=dict)  # ranks -> LinkFit: NCCL's all_gather measured there

    def allreduce_latency(self, ranks: int) -> float:
        """NCCL's latency inside a CUDA graph at `ranks` ranks: measured there, else allreduce_latency_s."""
        return self.allreduce_latency_s_by_ranks.get(ranks, self.allreduce_latency_s)

    def allreduce_bytes_per_s(self, ranks: int) -> float:
        """The rate NCCL's bytes term moves at `ranks` ranks: measured there, else NVLink's one-way rate."""
        return self.allreduce_bytes_per_s_by_ranks.get(ranks, self.nvlink_bytes_per_s_one_way)

    def allgather_line(self, ranks: int) -> LinkFit:
        """NCCL's all_gather inside a CUDA graph at `ranks` ranks, time = latency + (ranks - 1) x one
        rank's message / bytes_per_s: its own line where measured, else the all-reduce's."""
        return self.allgather_by_ranks.get(ranks) or LinkFit(self.allreduce_latency(ranks),
                                                              self.allreduce_bytes_per_s(ranks))

    @property
    def nvlink_bytes_per_s_one_way(self) -> float:
        return self.gpu.nvlink_bytes_per_s / 2

    @classmethod
    def from_dict(cls, raw: dict) -> NodeSpec:
        """A node from the parsed form of a node file (cluster/nodes/*.json). A missing or
        malformed number raises KeyError, TypeError or ValueError naming it; the reader of the
        file turns that into the user's error."""
        gpu, cal = raw["gpu"], raw["calibration"]
        spec = GpuSpec(gpu["name"], float(gpu["hbm_bytes"]), float(gpu["hbm_bytes_per_s"]),
                       float(raw["nvlink_bytes_per_s"]), float(gpu["bf16_flops"]), float(gpu["fp8_flops"]),
                       None if gpu.get("fp4_flops") is None else float(gpu["fp4_flops"]))
        gemv = {kind: GemvFit(float(fit["fixed_s"]), float(fit["bandwidth_fraction"]))
                for kind, fit in cal["gemv"].items()}
        return cls(raw["name"], int(raw["gpus_per_node"]), spec, spec.hbm_bytes_per_s * float(cal["copy_fraction"]),
                   gemv, {kind: float(s) for kind, s in cal["kernel_s"].items()},
                   float(cal["attention_bandwidth_fraction"]), float(cal["eager_launch_s"]),
                   float(cal["allreduce_latency_s"]), dict(raw.get("sources", {})),
                   {call: LinkFit(float(cal[f"symm_{key}_latency_s"]), float(cal[f"symm_{key}_bytes_per_s"]))
                    for call, key in SYMM_FITS if key in REQUIRED_SYMM or f"symm_{key}_latency_s" in cal},
                   float(cal["pair_fp8_m1_bandwidth_fraction"]) if "pair_fp8_m1_bandwidth_fraction" in cal else None,
                   {int(n): float(s) for n, s in cal.get("allreduce_latency_s_by_ranks", {}).items()},
                   {int(n): float(b) for n, b in cal.get("allreduce_bytes_per_s_by_ranks", {}).items()},
                   {int(n): LinkFit(float(line["latency_s"]), float(line["bytes_per_s"]))
                    for n, line in cal.get("allgather_by_ranks", {}).items()})
