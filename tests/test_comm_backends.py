"""Every Communicator backend against what each collective means, on 3 ranks (odd, so
nothing divides evenly by accident), in fp32, bf16 and fp16, with uneven all-to-all splits.
One world per backend runs every dtype in turn: a world's start-up (3 processes importing
torch) costs far more than its collectives."""
from __future__ import annotations

import pytest
import torch

from collectives.communicator import rms_norm
from cluster.procs import run_world

WORLD = 3


def _rank_input(rank: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(100 + rank)).to(dtype)


def _send_counts(rank: int) -> list[int]:
    return [(rank + dest) % 3 for dest in range(WORLD)]  # includes zero-row sends


DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _every_dtype(comm) -> dict[str, torch.Tensor]:
    """_collectives for each dtype in turn on one world; keys 'dtype_name/result'."""
    return {f"{name}/{key}": value for name in DTYPE_NAMES for key, value in _collectives(comm, name).items()}


def _collectives(comm, dtype_name: str) -> dict[str, torch.Tensor]:
    dtype = getattr(torch, dtype_name)
    x = _rank_input(comm.rank, dtype)
    counts = _send_counts(comm.rank)
    rows = torch.arange(sum(counts) * 2, dtype=torch.float32).view(-1, 2) + 100 * comm.rank
    received, recv_counts = comm.all_to_all(rows, counts)
    residual = torch.randn(4, 6, generator=torch.Generator().manual_seed(7)).to(dtype)
    weight = torch.linspace(0.5, 1.5, 6).to(dtype)
    normed, new_residual = comm.allreduce_add_rmsnorm(x, residual, weight, 1e-5)
    first_normed, first_residual = comm.allreduce_add_rmsnorm(x, None, weight, 1e-5)  # no residual: a step's first norm
    comm.barrier()
    out = {"sum": comm.all_reduce(x), "gather0": comm.all_gather(x, dim=0), "gather1": comm.all_gather(x, dim=1),
           "bcast": comm.broadcast(x, src=2), "normed": normed, "residual": new_residual,
           "first_normed": first_normed, "first_residual": first_residual}
    # Each rank checks what it received itself; rank 0's results come back to the test.
    expected_rows = [torch.arange(_send_counts(src)[comm.rank] * 2, dtype=torch.float32).view(-1, 2)
                     + 100 * src + 2 * sum(_send_counts(src)[: comm.rank]) for src in range(WORLD)]
    assert recv_counts == [_send_counts(src)[comm.rank] for src in range(WORLD)]
    assert torch.equal(received, torch.cat(expected_rows))
    return out


@pytest.mark.parametrize("backend", ["gloo", "shm"])
def test_collectives_match_their_definitions(backend):
    every = run_world(WORLD, _every_dtype, backend=backend)
    for dtype_name in DTYPE_NAMES:
        dtype = getattr(torch, dtype_name)
        got = {key.split("/", 1)[1]: value for key, value in every.items() if key.startswith(f"{dtype_name}/")}
        inputs = [_rank_input(r, dtype) for r in range(WORLD)]
        total = (inputs[0].float() + inputs[1].float() + inputs[2].float())
        tol = 1e-6 if dtype == torch.float32 else 2e-2
        assert torch.allclose(got["sum"].float(), total, atol=tol, rtol=tol)
        assert torch.equal(got["gather0"], torch.cat(inputs, 0))
        assert torch.equal(got["gather1"], torch.cat(inputs, 1))
        assert torch.equal(got["bcast"], inputs[2])
        residual = torch.randn(4, 6, generator=torch.Generator().manual_seed(7)).to(dtype)
        ref_residual = residual + got["sum"]
        assert torch.equal(got["residual"], ref_residual)
        assert torch.equal(got["normed"], rms_norm(ref_residual, torch.linspace(0.5, 1.5, 6).to(dtype), 1e-5))
        assert torch.equal(got["first_residual"], got["sum"])  # residual None: the sum is the new residual
        assert torch.equal(got["first_normed"], rms_norm(got["sum"], torch.linspace(0.5, 1.5, 6).to(dtype), 1e-5))
