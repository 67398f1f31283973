"""What each virtual GPU stands for: the hardware numbers of the nodes we emulate.

Sources: NVIDIA's DGX B200 / HGX and H200 / H100 SXM datasheets (see shared anchors §3). Rates
are dense (no sparsity). NVLink is quoted bidirectional per GPU, as NVIDIA quotes it; one
direction is half. The emulator's cost model reads these; the runtime reports them with each
rank so a user sees whether a shard would fit the HBM of the GPU it stands for.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

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
