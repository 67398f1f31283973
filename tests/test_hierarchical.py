"""The hierarchical backend (shared memory within a host, gloo among host leaders) against the flat
reference, on simulated hosts: processes of this machine given host labels, so no Ray is needed.

Each world runs every collective once with fresh seeded inputs that every rank can recompute, and
checks on every rank: integer-valued fp32 sums equal the flat sum exactly (any order gives the
same bits), random fp32 / bf16 sums are close to the flat fp32 sum and identical on every rank,
the fused call equals add + RMSNorm (+ FP8) of that sum bit for bit, and gather, broadcast,
all-to-all and the MoE dispatch / combine return exactly the flat reference's rows.
"""
from __future__ import annotations

import pytest
import torch

from cluster.procs import run_world
from collectives.communicator import add_rmsnorm
from collectives.hierarchical import HierarchicalCommunicator, host_groups


def _x(seed: int, shape, dtype=torch.float32, integers: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if integers:
        return torch.randint(-64, 64, shape, generator=gen).to(dtype)
    return torch.randn(shape, generator=gen).to(dtype)


def _same_on_every_rank(comm, t: torch.Tensor) -> bool:
    everyone = comm.all_gather(t.float().reshape(1, -1), dim=0)  # (world, numel)
    return bool((everyone == everyone[0]).all())


def _reductions(comm, world: int) -> None:
    rank = comm.rank
    exact = comm.all_reduce(_x(rank, (5, 96), integers=True))
    assert torch.equal(exact, sum(_x(r, (5, 96), integers=True) for r in range(world)))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x = _x(100 + rank, (3, 200), dtype)
        total = comm.all_reduce(x)
        flat = sum(_x(100 + r, (3, 200), dtype).float() for r in range(world))
        assert total.dtype == dtype and torch.allclose(total.float(), flat, atol=tol * world, rtol=tol)
        assert _same_on_every_rank(comm, total), f"{dtype}: ranks hold different sums"
    # the fused call: the flat reference's bits where the sum is exact, the same bits everywhere otherwise
    residual, weight = _x(7, (4, 64)), _x(8, (64,))
    normed, new_residual = comm.allreduce_add_rmsnorm(_x(rank, (4, 64), integers=True), residual, weight, 1e-5)
    ref_normed, ref_residual = add_rmsnorm(sum(_x(r, (4, 64), integers=True) for r in range(world)),
                                           residual, weight, 1e-5)
    assert torch.equal(normed, ref_normed) and torch.equal(new_residual, ref_residual)
    scale = torch.tensor(0.05)
    partial = _x(200 + rank, (2, 64))
    q, res = comm.allreduce_add_rmsnorm(partial, residual[:2], weight, 1e-5, quant_scale=scale)
    reduced = res - residual[:2]  # what the call summed
    assert q.dtype == torch.float8_e4m3fn and _same_on_every_rank(comm, q.float())
    assert torch.equal(q.view(torch.uint8), add_rmsnorm(reduced, residual[:2], weight, 1e-5, scale)[0].view(torch.uint8))
    big = comm.all_reduce(_x(300 + rank, (520, 4096), integers=True))  # 8.5 MB: past the shm buffer
    assert torch.equal(big, sum(_x(300 + r, (520, 4096), integers=True) for r in range(world)))


def _data_movement(comm, world: int) -> None:
    rank = comm.rank
    for dim in (0, 1):
        got = comm.all_gather(_x(rank, (2, 3)), dim=dim)
        assert torch.equal(got, torch.cat([_x(r, (2, 3)) for r in range(world)], dim=dim))
    for src in range(world):
        assert torch.equal(comm.broadcast(_x(src if rank == src else 999, (3, 5)), src), _x(src, (3, 5)))
    counts_of = [[int(c) for c in torch.randint(0, 4, (world,), generator=torch.Generator().manual_seed(50 + s))]
                 for s in range(world)]  # counts_of[s][d]: rows rank s sends rank d
    rows_of = [_x(60 + s, (sum(counts_of[s]), 6)) for s in range(world)]
    got, recv_counts = comm.all_to_all(rows_of[rank], counts_of[rank])
    expected = [rows_of[s][sum(counts_of[s][:rank]): sum(counts_of[s][: rank + 1])] for s in range(world)]
    assert recv_counts == [counts_of[s][rank] for s in range(world)] and torch.equal(got, torch.cat(expected))
    # MoE at static shapes: every row goes to a random rank (or nowhere) and comes back where it left
    m = 5
    dest = torch.randint(-1, world, (m,), generator=torch.Generator().manual_seed(70 + rank))
    x, ids = _x(80 + rank, (m, 8)), torch.arange(m) + 10 * rank
    recv_x, recv_ids = comm.dispatch_static(x, dest, ids)
    for s in range(world):
        dest_s, x_s = torch.randint(-1, world, (m,), generator=torch.Generator().manual_seed(70 + s)), _x(80 + s, (m, 8))
        for i in range(m):
            mine = int(dest_s[i]) == rank
            assert int(recv_ids[s * m + i]) == (10 * s + i if mine else -1)
            assert torch.equal(recv_x[s * m + i], x_s[i] if mine else torch.zeros(8))
    back = comm.combine_static(recv_x * 2, recv_ids, dest)
    assert torch.equal(back, torch.where((dest >= 0)[:, None], x * 2, torch.zeros_like(x)))
    comm.barrier()


def _both_modes(comm, world: int) -> None:
    """The model reduces inside inference mode and gathers for sampling outside it: the same
    shared-memory buffers serve both (a rank once failed on writing a view made in the other mode)."""
    for inference in (True, False, True, False):
        with torch.inference_mode(inference):
            x = _x(comm.rank, (2, 4), integers=True)
            assert torch.equal(comm.all_reduce(x), sum(_x(r, (2, 4), integers=True) for r in range(world)))
            assert torch.equal(comm.all_gather(x), torch.cat([_x(r, (2, 4), integers=True) for r in range(world)]))
            assert torch.equal(comm.broadcast(x, world - 1), _x(world - 1, (2, 4), integers=True))


def _check_world(comm) -> dict[str, torch.Tensor]:
    assert isinstance(comm, HierarchicalCommunicator), type(comm)
    world = comm.world_size
    _both_modes(comm, world)
    _reductions(comm, world)
    _data_movement(comm, world)
    calls = comm.hierarchical_calls
    counted = torch.tensor([calls["all_reduce"], calls["allreduce_add_rmsnorm"], calls["all_gather"],
                            calls["broadcast"], calls["all_to_all"], calls["barrier"]])
    return {"calls": comm.all_gather(counted[None], dim=0), "groups": torch.tensor(len(comm.groups))}


@pytest.mark.parametrize("hosts", [["a", "b"] * 4, ["x", "y", "x"]], ids=["2hosts-x-4ranks-interleaved", "uneven-2+1"])
def test_hierarchical_collectives_equal_the_flat_reference(hosts):
    got = run_world(len(hosts), _check_world, backend="shm", hosts=hosts, timeout_s=60.0)
    assert int(got["groups"]) == 2
    calls = got["calls"]  # (world, 6): every rank counted every call as hierarchical
    assert (calls == calls[0]).all() and (calls[0] > 0).all(), calls


def test_host_groups_keep_rank_order_within_and_first_seen_order_across():
    assert host_groups(["b", "a", "b", "c", "a"]) == [[0, 2], [1, 4], [3]]
    assert host_groups(["n"] * 3) == [[0, 1, 2]]
