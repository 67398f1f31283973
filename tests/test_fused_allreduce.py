"""The fused AllReduce (+ residual + RMSNorm [+ FP8]) kernel over peer memory (collectives/fused_allreduce.py)
and the communicator built on it (collectives/symm_mem.py).

On CPU (Triton's interpreter), W ranks live in one process: each rank's "symmetric buffer" is a CPU
byte tensor and every rank's kernel gets the data_ptr()s of all of them, which the interpreter
dereferences as the GPU dereferences peer addresses, so the real kernel code (pushes, flags, epochs,
parities, rank-order reduction, norm) runs. The interpreter runs programs one after another, so
the phases run one at a time over all ranks (PUSH everywhere, then SCATTER, then FINISH) instead
of one launch that pushes and then spins.

What is asserted:
  * the reduced values / new residual equal the rank-order fp32 sum (rounded to the dtype) and the
    residual add bit for bit; normed equals the one-GPU kernel (collectives.fused_norm, the code
    all_reduce + add_rmsnorm runs on CUDA) applied to that sum bit for bit, and the torch
    reference within its 2-ulp tolerance; every rank holds the same bits; one-shot == two-shot;
  * consecutive calls with fresh inputs and changing row counts reuse the buffers correctly, also
    when a rank runs a call ahead of a peer that is still reading the previous one (the parity);
  * a wait whose peer never pushes gives up after the timeout and names the missing rank;
  * on GPUs (>= 2): the symm backend equals NCCL + the reference norm, eagerly and inside a
    replayed CUDA graph, bitwise equal across ranks.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from collectives import fused_norm  # noqa: E402
from collectives.communicator import add_rmsnorm  # noqa: E402
from collectives.fused_allreduce import (AR_ROW, FINISH, PUSH, SCATTER, FusedAllReduce, Layout,  # noqa: E402
                                         TWO_SHOT_MIN_BYTES, algorithm_for)

MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}
CPU = not torch.cuda.is_available()
cpu_only = pytest.mark.skipif(not CPU, reason="the simulated world runs under Triton's interpreter (no GPU)")


class SimulatedWorld:
    """W ranks in this process, their symmetric buffers as CPU tensors."""

    def __init__(self, world: int, capacity: int = 16 * 80, programs: int = 4, timeout_s: float = 0.02):
        self.layout = Layout(world, capacity, programs)
        self.buffers = [torch.zeros(self.layout.nbytes, dtype=torch.uint8) for _ in range(world)]
        bases = [b.data_ptr() for b in self.buffers]
        self.ranks = [FusedAllReduce(r, self.layout, bases, "cpu", timeout_s) for r in range(world)]

    def phases(self, algorithm: str) -> tuple[int, ...]:
        return (PUSH, SCATTER, FINISH) if algorithm == "two-shot" else (PUSH, FINISH)

    def norm(self, parts, residual, weight, eps=1e-5, scale=None, algorithm="one-shot", order=None):
        """Every rank's (normed, new_residual); phases over all ranks, ranks in `order`."""
        dtype = torch.float8_e4m3fn if scale is not None else torch.promote_types(residual.dtype, weight.dtype)
        outs = [(torch.full(residual.shape, float("nan"), dtype=torch.float32).to(dtype),
                 torch.full_like(residual, float("nan"))) for _ in self.ranks]
        for phase in self.phases(algorithm):
            for r in order or range(len(self.ranks)):
                self.ranks[r].launch(parts[r], outs[r][0], residual, weight, eps, scale, outs[r][1], algorithm, phase)
        return outs

    def all_reduce(self, parts, algorithm="one-shot"):
        outs = [torch.full_like(p, float("nan")) for p in parts]
        for phase in self.phases(algorithm):
            for r, rank in enumerate(self.ranks):
                rank.launch(parts[r], outs[r], algorithm=algorithm, phases=phase)
        return outs


def rank_order_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """all_reduce's contract here: the fp32 sum p0 + p1 + ... in rank order, rounded to the dtype."""
    total = parts[0].float()
    for p in parts[1:]:
        total = total + p.float()
    return total.to(parts[0].dtype)


def inputs(world, rows, hidden, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    parts = [(torch.randn(rows, hidden, generator=gen) * 2).to(dtype) for _ in range(world)]
    residual = (torch.randn(rows, hidden, generator=gen) * torch.logspace(-2, 1, hidden)).to(dtype)
    weight = (1 + torch.randn(hidden, generator=gen) * 0.2).to(dtype)
    return parts, residual, weight


def assert_close_ulps(actual, expected):
    if expected.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
        return
    _, exponent = torch.frexp(expected.float())
    ulp = torch.ldexp(torch.ones_like(expected, dtype=torch.float32), exponent - 1 - MANTISSA_BITS[expected.dtype])
    err = (actual.float() - expected.float()).abs()
    assert bool((err <= 2 * ulp).all()), f"more than 2 ulps off: {err.max().item()}"


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def check_norm(outs, parts, residual, weight, eps=1e-5, scale=None):
    reduced = rank_order_sum(parts)
    want_normed, want_residual = fused_norm.add_rmsnorm(reduced, residual, weight, eps, scale)
    for normed, new_residual in outs:
        assert same_bits(new_residual, want_residual)
        assert same_bits(normed, want_normed)
    if scale is None:  # and the torch ops of Communicator.allreduce_add_rmsnorm, within their tolerance
        assert_close_ulps(outs[0][0], add_rmsnorm(reduced, residual, weight, eps)[0])


@cpu_only
@pytest.mark.parametrize("algorithm", ["one-shot", "two-shot"])
@pytest.mark.parametrize("world,dtype", [(2, torch.float32), (3, torch.bfloat16), (4, torch.float32)])
def test_consecutive_calls_match_the_rank_order_reference(algorithm, world, dtype):
    """Rows 4, 1, 16, 4 with fresh inputs on one set of buffers: 4 programs own every 4th row, the
    grid stays the same while the rows change, hidden 80 is no power of two."""
    sim = SimulatedWorld(world)
    for call, rows in enumerate([4, 1, 16, 4]):
        parts, residual, weight = inputs(world, rows, 80, dtype, seed=10 * world + call)
        check_norm(sim.norm(parts, residual, weight, algorithm=algorithm), parts, residual, weight)
    assert all(torch.equal(r.counters, torch.full_like(r.counters, 4)) for r in sim.ranks)  # one epoch per call
    assert all(r.missing_ranks() == [] for r in sim.ranks)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_output(dtype):
    sim = SimulatedWorld(2)
    scale = torch.tensor(0.004)  # |normed| > 1.8 saturates
    for call, rows in enumerate([3, 16]):
        parts, residual, weight = inputs(2, rows, 80, dtype, seed=50 + call)
        outs = sim.norm(parts, residual, weight, scale=scale)
        check_norm(outs, parts, residual, weight, scale=scale)
        assert outs[0][0].dtype == torch.float8_e4m3fn and bool((outs[0][0].float().abs() == 448).any())


@cpu_only
@pytest.mark.parametrize("algorithm", ["one-shot", "two-shot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_all_reduce(algorithm, dtype):
    """A message that is not a whole number of AR_ROW rows (the tail row is masked)."""
    sim = SimulatedWorld(3, capacity=3 * AR_ROW)
    for call, shape in enumerate([(3, 1000), (7,), (2, 2 * AR_ROW // 2 + 5)]):
        gen = torch.Generator().manual_seed(call)
        parts = [torch.randn(shape, generator=gen).to(dtype) for _ in range(3)]
        want = rank_order_sum(parts)
        assert all(same_bits(out, want) for out in sim.all_reduce(parts, algorithm))


@cpu_only
def test_one_and_two_shot_give_the_same_bits():
    sim = SimulatedWorld(4)
    parts, residual, weight = inputs(4, 16, 80, torch.bfloat16, seed=7)
    one = sim.norm(parts, residual, weight, algorithm="one-shot")
    two = sim.norm(parts, residual, weight, algorithm="two-shot")
    assert all(same_bits(a, b) for pair_a, pair_b in zip(one, two) for a, b in zip(pair_a, pair_b))


@cpu_only
def test_a_rank_one_call_ahead_does_not_disturb_a_peer_still_reading():
    """Rank 0 finishes call 1 and pushes call 2 into rank 1's buffer before rank 1 has reduced call 1:
    call 2 writes the other parity, so rank 1 still reads call 1's data."""
    sim = SimulatedWorld(2)
    first = inputs(2, 4, 80, torch.float32, seed=1)
    second = inputs(2, 4, 80, torch.float32, seed=2)
    outs1 = [(torch.empty(4, 80), torch.empty(4, 80)) for _ in range(2)]
    outs2 = [(torch.empty(4, 80), torch.empty(4, 80)) for _ in range(2)]

    def step(rank, call, phase):
        (parts, residual, weight), outs = (first, outs1) if call == 1 else (second, outs2)
        sim.ranks[rank].launch(parts[rank], outs[rank][0], residual, weight, 1e-5, None, outs[rank][1],
                               "one-shot", phase)
    for rank, call, phase in [(0, 1, PUSH), (1, 1, PUSH), (0, 1, FINISH), (0, 2, PUSH),
                              (1, 1, FINISH), (1, 2, PUSH), (1, 2, FINISH), (0, 2, FINISH)]:
        step(rank, call, phase)
    check_norm(outs1, *first)
    check_norm(outs2, *second)


@cpu_only
def test_ranks_in_any_order():
    sim = SimulatedWorld(4)
    parts, residual, weight = inputs(4, 5, 80, torch.bfloat16, seed=3)
    check_norm(sim.norm(parts, residual, weight, order=[2, 0, 3, 1]), parts, residual, weight)


@cpu_only
def test_a_missing_peer_times_out_and_is_named():
    """Rank 1 never pushes: rank 0's wait gives up after its timeout and reports rank 1 (no hang)."""
    sim = SimulatedWorld(2, timeout_s=0.005)
    parts, residual, weight = inputs(2, 2, 80, torch.float32, seed=4)
    normed, new_residual = torch.empty(2, 80), torch.empty(2, 80)
    sim.ranks[0].launch(parts[0], normed, residual, weight, 1e-5, None, new_residual, "one-shot", PUSH)
    sim.ranks[0].launch(parts[0], normed, residual, weight, 1e-5, None, new_residual, "one-shot", FINISH)
    assert sim.ranks[0].missing_ranks() == [1]


def test_layout_is_aligned_and_the_threshold_picks_two_shot():
    layout = Layout(8, 16 * 5120)
    assert layout.data_offset % 256 == 0 and layout.gather_offset % 256 == 0
    assert layout.nbytes == layout.gather_offset + 2 * layout.slot_bytes >= (2 * 8 + 2) * 4 * 16 * 5120
    assert algorithm_for(TWO_SHOT_MIN_BYTES - 1) == "one-shot" and algorithm_for(TWO_SHOT_MIN_BYTES) == "two-shot"


@cpu_only
@pytest.mark.parametrize("x,kwargs,message", [
    (torch.zeros(4, 80, dtype=torch.float64), {}, "contiguous float32/bf16/fp16"),
    (torch.zeros(80, 4).t(), {}, "contiguous float32/bf16/fp16"),
    (torch.zeros(17, 80), {}, "at most 1280 values"),
    (torch.zeros(4, 80), {"algorithm": "three-shot"}, "algorithm must be one of"),
    (torch.zeros(4, 80), {"phases": SCATTER}, "not a subset of one-shot"),
])
def test_bad_input_is_refused(x, kwargs, message):
    sim = SimulatedWorld(2)
    with pytest.raises(ValueError, match=message):
        sim.ranks[0].launch(x, torch.empty_like(x), **kwargs)
    with pytest.raises(ValueError, match="world size must be 1..30"):
        Layout(0, 16)
