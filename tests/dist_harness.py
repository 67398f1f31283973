"""Runs a function on N local processes joined by a torch.distributed group, without Ray.

The Worker and model are Ray-agnostic, so sharded-equals-unsharded checks run here: faster to
start than a Ray cluster, and the same model/communicator code. Rank 0's return value (a dict
of tensors) comes back through a safetensors file, never a pickle.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from collectives.torch_dist import TorchDistCommunicator, file_store


def _entry(rank: int, world: int, fn, args, out_dir: str, timeout_s: float) -> None:
    torch.set_num_threads(1)
    store = file_store(os.path.join(out_dir, "store"), world)
    comm = TorchDistCommunicator(rank, world, store, "gloo", timeout_s)
    try:
        result = fn(comm, *args)
        if rank == 0 and result is not None:
            save_file({k: v.contiguous() for k, v in result.items()}, os.path.join(out_dir, "result.safetensors"))
    finally:
        comm.close()


def run_world(world: int, fn, *args, timeout_s: float = 120.0) -> dict[str, torch.Tensor]:
    """Calls fn(comm, *args) on `world` processes; returns rank 0's dict of tensors."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world, fn, args, out_dir, timeout_s), nprocs=world,
                           start_method="spawn", join=True)
        path = Path(out_dir) / "result.safetensors"
        return load_file(str(path)) if path.exists() else {}
