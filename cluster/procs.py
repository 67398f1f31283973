"""Runs a function on N local processes joined by a Communicator, without Ray.

The Worker and model are Ray-agnostic, so sharded-equals-unsharded checks run here: faster to
start than a Ray cluster, and the same model/communicator code. Rank 0's return value (a dict
of tensors) comes back through a safetensors file, never a pickle.

On the CPU, one spawned process (it sees the caller's environment and sys.path, as spawned ranks
would) imports torch and the function's module once, then forks the ranks: a fork costs
milliseconds where each spawned rank re-imported torch and the model code (~4 s of CPU a rank;
a world of 8 on a 2-core machine spent ~20 s starting). CUDA ranks are spawned directly (a
process must not fork once CUDA may be initialized).
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


def _fork_ranks(_index: int, world: int, entry_args: tuple) -> None:
    """In the one spawned process: fn's module is imported (unpickling fn did it); fork the ranks.
    A rank's exception comes back to run_world with the rank's traceback in its message."""
    torch.set_num_threads(1)  # before the fork: each rank starts with one intra-op thread, no pool
    mp.start_processes(_entry, args=(world, *entry_args), nprocs=world, start_method="fork", join=True)


def run_world(world: int, fn, *args, timeout_s: float = 120.0, backend: str = "gloo",
              device: str = "cpu", hosts: list | None = None) -> dict[str, torch.Tensor]:
    """Calls fn(comm, *args) on `world` processes joined by `backend`; returns rank 0's dict of tensors
    (on the CPU). With device "cuda", process r uses GPU r. hosts: a host label per rank, to simulate
    ranks on several hosts (with "shm": the hierarchical backend)."""
    with tempfile.TemporaryDirectory() as out_dir:
        entry_args = (fn, args, out_dir, timeout_s, backend, uuid.uuid4().hex[:12], device, hosts)
        if device == "cuda":
            mp.start_processes(_entry, args=(world, *entry_args), nprocs=world, start_method="spawn", join=True)
        else:
            mp.start_processes(_fork_ranks, args=(world, entry_args), nprocs=1, start_method="spawn", join=True)
        path = Path(out_dir) / "result.safetensors"
        return load_file(str(path)) if path.exists() else {}
