"""One buffer in torch's symmetric memory, mapped into every rank of the host, and its peers' addresses.

The fused all-reduce and the MoE all-to-all each own one; both need the same three steps (allocate
and fill, rendezvous, learn where every peer's tensor starts inside its mapped allocation), so they
live here once. Rendezvous needs every process to see all GPUs of the host, each bound to its own
(torch.cuda.set_device); when it fails, the error says what this rank sees, which is almost always
the cause (a launcher that narrowed CUDA_VISIBLE_DEVICES to one GPU per process).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class SymmetricBuffer:
    tensor: torch.Tensor  # (nbytes,) uint8 on this rank's GPU, every byte `fill`
    handle: object  # torch's _SymmetricMemory: keeps the peer mappings alive
    bases: list[int]  # (world,) device address of every rank's tensor, as this process maps it


def map_symmetric(nbytes: int, group, fill: int = 0) -> SymmetricBuffer:
    """Collective over `group` (a TorchDistCommunicator on NCCL whose process group is WORLD); every
    byte of this rank's buffer is set to `fill` (the caller waits for every rank before using it)."""
    import torch.distributed._symmetric_memory as symm_mem
    tensor = symm_mem.empty(nbytes, dtype=torch.uint8, device=group.device)
    tensor.fill_(fill)
    try:
        handle = symm_mem.rendezvous(tensor, dist.group.WORLD)
    except RuntimeError as e:
        raise RuntimeError(
            f"rank {group.rank}: symmetric memory rendezvous failed on cuda:{torch.cuda.current_device()} with "
            f"{torch.cuda.device_count()} GPU(s) visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); every rank must see every GPU of the host and "
            f"bind its own: {e}") from None
    # the tensor may sit inside a larger (pooled) allocation: every rank says where its own starts
    offset = torch.tensor([tensor.data_ptr() - handle.buffer_ptrs[group.rank]], device=group.device)
    offsets = group.all_gather(offset).tolist()  # (world,)
    return SymmetricBuffer(tensor, handle, [base + off for base, off in zip(handle.buffer_ptrs, offsets)])
