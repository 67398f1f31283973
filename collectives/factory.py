"""Builds the Communicator a run asks for. The only place that maps a backend name to a class.

`hosts` (the host of every rank, as cluster/ found it after placement) decides the shape of the
data plane: "shm" over ranks of one host is the flat shared-memory backend; over several hosts it
becomes hierarchical (collectives/hierarchical.py: shared memory within each host, gloo between
one leader per host). gloo and NCCL are flat whatever the layout (NCCL itself keeps the traffic
within a host on NVLink / peer memory); symm needs one host, which cluster/ checks before any
rank starts."""
from __future__ import annotations

import os

from collectives.communicator import Communicator
from collectives.shm_sync import WAIT_STRATEGIES

BACKENDS = ("shm", "gloo", "nccl", "symm")  # symm: CUDA ranks of one host (collectives/symm_mem.py)
SHM_PREFIX = "dgxemu-"


def symm_protocol() -> str:
    """The symm backend's fused-kernel protocol: $DGX_EMU_SYMM_PROTOCOL, else lamport."""
    return os.environ.get("DGX_EMU_SYMM_PROTOCOL", "lamport")


def symm_programs() -> int | None:
    """The symm fused kernel's programs per launch: $DGX_EMU_SYMM_PROGRAMS, else None (the default)."""
    value = os.environ.get("DGX_EMU_SYMM_PROGRAMS")
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"DGX_EMU_SYMM_PROGRAMS must be a positive integer, got {value!r}")
    return int(value)


def shm_name(node_id: str, group: str = "world") -> str:
    """Segment-name prefix for one group of one node: unique per node, so nodes never collide."""
    return f"{SHM_PREFIX}{node_id}-{group}"


def make_communicator(backend: str, rank: int, world_size: int, store, node_id: str, timeout_s: float,
                      device: str = "cpu", wait: str | None = None, hosts: list | None = None) -> Communicator:
    """wait: the shm wait strategy (default: $DGX_EMU_SHM_WAIT, else hybrid). The shm small-message
    algorithm comes from $DGX_EMU_SHM_ALGO (auto, one-shot or reduce-once; default auto); the symm
    fused kernel's arrival protocol from $DGX_EMU_SYMM_PROTOCOL (lamport or flags; default lamport)
    and its programs per launch from $DGX_EMU_SYMM_PROGRAMS (default: the protocol's, symm_layout.Layout).
    hosts: the host label of every rank (None: all on one host)."""
    wait = wait or os.environ.get("DGX_EMU_SHM_WAIT", "hybrid")
    if hosts is not None and len(hosts) != world_size:
        raise ValueError(f"hosts names {len(hosts)} ranks, the world has {world_size}")
    spans_hosts = hosts is not None and len(set(hosts)) > 1
    if backend == "symm" and spans_hosts:
        raise ValueError(f"the symm backend needs every rank on one host; the ranks are on {len(set(hosts))} hosts "
                         "(use nccl)")
    if backend == "shm":
        if wait not in WAIT_STRATEGIES:
            raise ValueError(f"wait strategy must be one of {WAIT_STRATEGIES}, got {wait!r}")
        small_algorithm = os.environ.get("DGX_EMU_SHM_ALGO", "auto")
        if spans_hosts:
            from collectives.hierarchical import HierarchicalCommunicator
            return HierarchicalCommunicator(rank, world_size, store, shm_name(node_id, "hier"), hosts, timeout_s,
                                            wait=wait, small_algorithm=small_algorithm)
        from collectives.shm import ShmCommunicator
        return ShmCommunicator(rank, world_size, store, shm_name(node_id), timeout_s, wait=wait,
                               small_algorithm=small_algorithm)
    if backend in ("gloo", "nccl"):
        from collectives.torch_dist import TorchDistCommunicator
        return TorchDistCommunicator(rank, world_size, store, backend, timeout_s, device)
    if backend == "symm":
        from collectives.symm_mem import SymmMemCommunicator
        return SymmMemCommunicator(rank, world_size, store, timeout_s, device,
                                   protocol=symm_protocol(), programs=symm_programs())
    raise ValueError(f"unknown communication backend {backend!r}; choose one of {BACKENDS}")
