"""Runs a function on N local processes joined by a Communicator, without Ray.

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

import uuid

from collectives.factory import make_communicator
from collectives.torch_dist import file_store


def _entry(rank: int, world: int, fn, args, out_dir: str, timeout_s: float, backend: str, node_id: str,
           device: str, hosts: list | None = None) -> None:
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
    store = file_store(os.path.join(out_dir, "store"), world)
    comm = make_communicator(backend, rank, world, store, node_id, timeout_s, device, hosts=hosts)
    try:
        result = fn(comm, *args)
        if rank == 0 and result is not None:
            save_file({k: v.contiguous().cpu() for k, v in result.items()}, os.path.join(out_dir, "result.safetensors"))
    finally:
        comm.close()


def run_world(world: int, fn, *args, timeout_s: float = 120.0, backend: str = "gloo",
              device: str = "cpu", hosts: list | None = None) -> dict[str, torch.Tensor]:
    """Calls fn(comm, *args) on `world` processes joined by `backend`; returns rank 0's dict of tensors
    (on the CPU). With device "cuda", process r uses GPU r. hosts: a host label per rank, to simulate
    ranks on several hosts (with "shm": the hierarchical backend)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world, fn, args, out_dir, timeout_s, backend, uuid.uuid4().hex[:12], device, hosts),
                           nprocs=world,
                           start_method="spawn", join=True)
        path = Path(out_dir) / "result.safetensors"
        return load_file(str(path)) if path.exists() else {}
