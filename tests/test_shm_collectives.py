"""The shared-memory backend against reference math, over random shapes, dtypes and group sizes.

One world of 8 processes runs many seeded random cases (every rank draws the same cases from the
same seed) in subgroups of every size 1..8, so the property test costs one process start-up.
Each case checks on every rank: all_reduce == the fp32 sum of all inputs (cast once), the fused
allreduce_add_rmsnorm == the reference composition bit for bit, every rank got identical bits,
and the one-shot / reduce-once / two-shot / chunked paths all appear (each case runs on a
one-shot group and on a reduce-once group of its size). The large-message world (two-shot and
chunked paths) also serves the check that no segment outlives its world.
"""
from __future__ import annotations

import os

import pytest
import torch

from collectives.communicator import quantize_fp8, rms_norm
from cluster.procs import run_world

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _input(rank: int, shape, dtype, case: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * case + rank)).to(dtype)


def _cases(n: int):
    rng = torch.Generator().manual_seed(42)
    for case in range(n):
        size = int(torch.randint(1, 9, (1,), generator=rng))
        rows = int(torch.randint(1, 200, (1,), generator=rng))
        hidden = int(torch.randint(1, 700, (1,), generator=rng))
        dtype = DTYPES[int(torch.randint(0, 3, (1,), generator=rng))]
        yield case, size, (rows, hidden), dtype


def _property_cases(comm) -> dict[str, torch.Tensor]:
    algorithms = ("one-shot", "reduce-once")
    groups = {(size, algo): comm.new_group(list(range(size)), algo) for size in range(1, 9) for algo in algorithms}
    checked = torch.zeros(4, dtype=torch.long)  # one-shot, reduce-once, two-shot, chunked
    for (case, size, shape, dtype), algo in ((c, a) for c in _cases(60) for a in algorithms):
        group = groups[size, algo]
        if group is None:
            continue
        x = _input(comm.rank, shape, dtype, case)
        everyone = [_input(r, shape, dtype, case) for r in range(size)]
        expected = sum(t.float() for t in everyone).to(dtype)
        total = group.all_reduce(x)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert torch.allclose(total.float(), expected.float(), atol=tol * size, rtol=tol), (case, size, shape, dtype)
        residual = _input(99, shape, dtype, case)
        weight = _input(98, shape[-1:], dtype, case)
        normed, new_residual = group.allreduce_add_rmsnorm(x, residual, weight, 1e-5)
        assert torch.equal(new_residual, residual + total)
        assert torch.equal(normed, rms_norm(residual + total, weight, 1e-5))
        scale = torch.tensor(0.05)
        q, _ = group.allreduce_add_rmsnorm(x, residual, weight, 1e-5, quant_scale=scale)
        assert q.dtype == torch.float8_e4m3fn and torch.equal(q.view(torch.uint8),
                                                              quantize_fp8(normed, scale).view(torch.uint8))
        same = group.all_gather(normed.float().sum().reshape(1))  # every rank must hold the same bits
        assert torch.all(same == same[0]), (case, "ranks diverged")
        nbytes = x.numel() * x.element_size()
        small = algorithms.index(algo) if size > 1 else 0
        checked[small if nbytes <= group.small_limit else (2 if nbytes <= group.capacity else 3)] += 1
    return {"checked": checked}


def test_random_shapes_dtypes_and_group_sizes():
    got = run_world(8, _property_cases, backend="shm")
    assert got["checked"][0] > 0 and got["checked"][1] > 0 and got["checked"][2] > 0, got["checked"]


def _large(comm) -> dict[str, torch.Tensor]:
    """Messages past the two-shot threshold and past the buffer capacity (chunked)."""
    out = {}
    for rows in (64, 600):  # 64 x 5120 fp32 = 1.3 MB (two-shot); 600 x 5120 = 12 MB (> 8 MB: chunked)
        x = _input(comm.rank, (rows, 5120), torch.float32, rows)
        expected = sum(_input(r, (rows, 5120), torch.float32, rows) for r in range(comm.world_size))
        residual = _input(77, (rows, 5120), torch.float32, rows)
        normed, new_residual = comm.allreduce_add_rmsnorm(x, residual, torch.ones(5120), 1e-5)
        assert torch.allclose(new_residual, residual + expected, atol=1e-4)
        assert torch.equal(normed, rms_norm(new_residual, torch.ones(5120), 1e-5))
        out[f"sum{rows}"] = comm.all_reduce(x)
    return out


@pytest.fixture(scope="module")
def large_world():
    """One 4-rank world of large messages; the shared-memory names before and after it ran."""
    before = set(os.listdir("/dev/shm"))
    got = run_world(4, _large, backend="shm")
    return got, before, set(os.listdir("/dev/shm"))


def test_two_shot_and_chunked_messages(large_world):
    got, _, _ = large_world
    for rows in (64, 600):
        expected = sum(_input(r, (rows, 5120), torch.float32, rows) for r in range(4))
        assert torch.allclose(got[f"sum{rows}"], expected, atol=1e-4)


def test_no_segments_left_behind(large_world):
    _, before, after = large_world
    assert {n for n in after if n.startswith("dgxemu-")} - before == set()
