"""RunConfig: how a node is launched (model, dtype, device, layout, backend). Frozen and checked
when made, so a bad combination is refused before any actor starts."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import ConfigError

# name -> compute dtype. "fp8": FP8 (e4m3) GEMMs with BF16 activations, norms and residuals.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
FP8_SCHEMES = ("auto", "per-tensor", "channel", "block")  # auto: the checkpoint's, else channel
KV_DTYPES = ("auto", "fp8")  # auto: the compute dtype
COMM_BACKENDS = ("shm", "gloo", "nccl", "symm")  # symm: fused collectives over GPU peer memory, one host
DEVICES = ("cpu", "cuda")
KERNEL_CHOICES = ("auto", "torch", "triton")


@dataclass(frozen=True)
class RunConfig:
    model_path: str
    dtype: str = "fp32"
    device: str = "cpu"
    world_size: int = 8
    moe_mode: str = "tp"
    replicate_embedding: bool = False  # every rank holds the whole embedding: no all-reduce to embed (ParallelConfig)
    comm: str = "shm"  # shared memory among CPU actors on one host; gloo/nccl through torch.distributed
    hardware: str = "b200"
    threads_per_rank: int = 1
    collective_timeout_s: float = 120.0
    max_context: int | None = None
    draft_path: str | None = None  # an EAGLE-3 draft checkpoint, loaded on every rank beside the target
    trace_dir: str | None = None  # per-rank communication timelines go here when set
    fp8_scheme: str = "auto"
    kv_dtype: str = "auto"
    delay_rank: int | None = None  # fault injection: this rank arrives late at every collective...
    delay_s: float = 0.0  # ...by this many seconds
    kernels: str = "auto"  # torch | triton | auto (triton on one GPU, else torch): model/fast_path.py
    cuda_graphs: str = "auto"  # on | off | auto (decode steps replay CUDA graphs where they can)
    emulate_node: str | None = None  # a node name or JSON file (cluster/hardware.py resolves it): each rank
    # keeps its virtual clock on that node

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.fp8_scheme not in FP8_SCHEMES:
            raise ConfigError(f"fp8 scheme must be one of {FP8_SCHEMES}, got {self.fp8_scheme!r}")
        if self.fp8_scheme != "auto" and self.dtype != "fp8":
            raise ConfigError(f"--fp8-scheme {self.fp8_scheme} needs --dtype fp8 (got --dtype {self.dtype})")
        if self.kv_dtype not in KV_DTYPES:
            raise ConfigError(f"kv dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.comm not in COMM_BACKENDS:
            raise ConfigError(f"comm backend must be one of {COMM_BACKENDS}, got {self.comm!r}")
        if self.comm in ("nccl", "symm") and self.device != "cuda":
            raise ConfigError(f"--comm {self.comm} needs --device cuda")
        if self.comm == "shm" and self.device != "cpu":
            raise ConfigError("--comm shm is for CPU actors (use nccl with --device cuda)")
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ConfigError(f"world size must be an integer >= 1, got {self.world_size!r}")
        if self.moe_mode not in ("tp", "ep"):
            raise ConfigError(f"moe mode must be 'tp' or 'ep', got {self.moe_mode!r}")
        if self.threads_per_rank < 1:
            raise ConfigError(f"threads per rank must be >= 1, got {self.threads_per_rank}")
        if self.delay_rank is not None and not (0 <= self.delay_rank < self.world_size and self.delay_s >= 0):
            raise ConfigError(f"delay injection needs a rank in 0..{self.world_size - 1} and seconds >= 0, "
                              f"got rank {self.delay_rank}, {self.delay_s} s")
        if self.kernels not in KERNEL_CHOICES:
            raise ConfigError(f"kernels must be one of {KERNEL_CHOICES}, got {self.kernels!r}")
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise ConfigError(f"cuda graphs must be auto, on or off, got {self.cuda_graphs!r}")
        if self.device != "cuda" and (self.cuda_graphs == "on" or self.kernels == "triton"):
            flag = "--cuda-graphs on" if self.cuda_graphs == "on" else "--kernels triton"
            raise ConfigError(f"{flag} needs --device cuda")
        if self.cuda_graphs == "on" and self.kernels == "torch":
            raise ConfigError("--cuda-graphs on needs the fused kernels (--kernels auto or triton), not --kernels torch")
        if self.emulate_node is not None:
            self._check_emulation()
        if not self.collective_timeout_s > 0:
            raise ConfigError(f"collective timeout must be > 0 s, got {self.collective_timeout_s}")

    def _check_emulation(self) -> None:
        """What emulation cannot be combined with. Whether the name or file is a node is checked where
        the config is built and the node resolved (cluster/node.py build_node), before any actor starts."""
        if self.cuda_graphs == "on":
            raise ConfigError("--emulate-node runs steps eagerly (a replayed CUDA graph passes by the virtual clock); "
                              "drop --cuda-graphs on")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The compute dtype (for fp8: BF16 activations around the FP8 GEMMs)."""
        return DTYPES[self.dtype]

    @property
    def model_kernels(self) -> str:
        """What the model is built with. auto: the fused kernels on GPUs (any world size: each rank
        runs them at its shard's shapes, and CUDA graphs need them), the torch ops on CPU actors."""
        if self.kernels == "auto":
            return "triton" if self.device == "cuda" else "torch"
        return self.kernels

    @property
    def engine_graphs(self) -> str:
        """The engine's CUDA-graph setting: off on CPU."""
        return "off" if self.device != "cuda" else self.cuda_graphs

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.kv_dtype == "fp8" else self.torch_dtype
