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
from tests.numerics import assert_within_2_ulps, ulps  # noqa: E402
from collectives.communicator import add_rmsnorm  # noqa: E402
from collectives.fused_allreduce import AR_ROW, FINISH, PUSH, SCATTER, FusedAllReduce  # noqa: E402
from collectives.symm_layout import PROTOCOLS, TWO_SHOT_MIN_BYTES, Layout, algorithm_for  # noqa: E402

CPU = not torch.cuda.is_available()
cpu_only = pytest.mark.skipif(not CPU, reason="the simulated world runs under Triton's interpreter (no GPU)")


class SimulatedWorld:
    """W ranks in this process, their symmetric buffers as CPU tensors."""

    def __init__(self, world: int, capacity: int = 16 * 80, programs: int = 4, timeout_s: float = 0.02,
                 protocol: str = "lamport"):
        self.layout = Layout(world, capacity, programs, protocol)
        self.buffers = [torch.full((self.layout.nbytes,), self.layout.initial_byte, dtype=torch.uint8)
                        for _ in range(world)]
        bases = [b.data_ptr() for b in self.buffers]
        self.ranks = [FusedAllReduce(r, self.layout, bases, "cpu", timeout_s) for r in range(world)]

    def phases(self, algorithm: str) -> tuple[int, ...]:
        return (PUSH, SCATTER, FINISH) if algorithm == "two-shot" else (PUSH, FINISH)

    def norm(self, parts, residual, weight, eps=1e-5, scale=None, algorithm="one-shot", order=None):
        """Every rank's (normed, new_residual); phases over all ranks, ranks in `order`."""
        like = parts[0] if residual is None else residual  # residual None: the sum is the new residual
        dtype = torch.float8_e4m3fn if scale is not None else torch.promote_types(like.dtype, weight.dtype)
        outs = [(torch.full(like.shape, float("nan"), dtype=torch.float32).to(dtype),
                 torch.full_like(like, float("nan"))) for _ in self.ranks]
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


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def check_norm(outs, parts, residual, weight, eps=1e-5, scale=None):
    reduced = rank_order_sum(parts)
    want_normed, want_residual = fused_norm.add_rmsnorm(reduced, residual, weight, eps, scale)
    for normed, new_residual in outs:
        assert same_bits(new_residual, want_residual)
        assert same_bits(normed, want_normed)
    if scale is None:  # and the torch ops of Communicator.allreduce_add_rmsnorm, within their tolerance
        assert_within_2_ulps(outs[0][0], add_rmsnorm(reduced, residual, weight, eps)[0])


@cpu_only
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("algorithm", ["one-shot", "two-shot"])
@pytest.mark.parametrize("world,dtype", [(2, torch.float32), (3, torch.bfloat16), (4, torch.float32)])
def test_consecutive_calls_match_the_rank_order_reference(algorithm, world, dtype, protocol):
    """Rows 4, 1, 16, 4, 2 with fresh inputs on one set of buffers: 4 programs own every 4th row, the
    grid stays the same while the rows change, hidden 80 is no power of two; five calls use every
    Lamport buffer and clear each one at least once."""
    sim = SimulatedWorld(world, protocol=protocol)
    for call, rows in enumerate([4, 1, 16, 4, 2]):
        parts, residual, weight = inputs(world, rows, 80, dtype, seed=10 * world + call)
        check_norm(sim.norm(parts, residual, weight, algorithm=algorithm), parts, residual, weight)
    assert all(torch.equal(r.counters, torch.full_like(r.counters, 5)) for r in sim.ranks)  # one epoch per call
    assert all(r.missing_ranks() == [] for r in sim.ranks)


@cpu_only
@pytest.mark.parametrize("algorithm", ["one-shot", "two-shot"])
def test_no_residual(algorithm):
    """residual None (a step's first norm, of the embedding's partial rows): the rank-order sum is
    the new residual and normed is the one-GPU kernel's norm of it, on every rank."""
    sim = SimulatedWorld(3)
    for call, rows in enumerate([2, 5]):
        parts, _, weight = inputs(3, rows, 80, torch.bfloat16, seed=70 + call)
        outs = sim.norm(parts, None, weight, algorithm=algorithm)
        check_norm(outs, parts, None, weight)
        assert same_bits(outs[0][1], rank_order_sum(parts))


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
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_rank_one_call_ahead_does_not_disturb_a_peer_still_reading(protocol):
    """Rank 0 finishes call 1 and pushes call 2 into rank 1's buffer before rank 1 has reduced call 1:
    call 2 writes the other parity (Lamport: the next of three buffers, and rank 0 clears only its
    own copy of call 0's), so rank 1 still reads call 1's data."""
    sim = SimulatedWorld(2, protocol=protocol)
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
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_missing_peer_times_out_and_is_named(protocol):
    """Rank 1 never pushes: rank 0's wait gives up after its timeout and reports rank 1 (no hang)."""
    sim = SimulatedWorld(2, timeout_s=0.005, protocol=protocol)
    parts, residual, weight = inputs(2, 2, 80, torch.float32, seed=4)
    normed, new_residual = torch.empty(2, 80), torch.empty(2, 80)
    sim.ranks[0].launch(parts[0], normed, residual, weight, 1e-5, None, new_residual, "one-shot", PUSH)
    sim.ranks[0].launch(parts[0], normed, residual, weight, 1e-5, None, new_residual, "one-shot", FINISH)
    assert sim.ranks[0].missing_ranks() == [1]


@cpu_only
@pytest.mark.parametrize("algorithm", ["one-shot", "two-shot"])
def test_lamport_buffers_are_cleared_so_a_later_call_never_reads_stale_data(algorithm):
    """Three calls of changing dtypes and sizes (one input holding the sentinel's bits, all ones:
    it is summed as the NaN it is, with no hang), then a fourth, in the first call's buffer, that
    rank 1 never joins: rank 0 must time out on rank 1 instead of reading call 1's values, which
    the second call's PUSH set back to the sentinel."""
    sim = SimulatedWorld(2, timeout_s=0.005)
    for call, (rows, dtype) in enumerate([(16, torch.float32), (4, torch.bfloat16), (2, torch.float32)]):
        parts, residual, weight = inputs(2, rows, 80, dtype, seed=90 + call)
        if call == 1:
            parts[1].view(torch.int16)[0, 3] = -1  # all ones: a NaN with the sentinel's bits
            outs, want = sim.all_reduce(parts, algorithm), rank_order_sum(parts)
            assert same_bits(outs[0], outs[1]) and bool(outs[0][0, 3].isnan())  # a NaN, the same on both ranks
            outs[0][0, 3] = want[0, 3]  # its payload is the kernel's own
            assert same_bits(outs[0], want)
        else:
            check_norm(sim.norm(parts, residual, weight, algorithm=algorithm), parts, residual, weight)
    assert all(r.missing_ranks() == [] for r in sim.ranks)
    parts, residual, weight = inputs(2, 16, 80, torch.float32, seed=99)
    out = (torch.empty(16, 80), torch.empty(16, 80))
    for phase in sim.phases(algorithm):  # rank 0 alone
        sim.ranks[0].launch(parts[0], out[0], residual, weight, 1e-5, None, out[1], algorithm, phase)
    assert sim.ranks[0].missing_ranks() == [1]


def test_layout_is_aligned_and_the_threshold_picks_two_shot():
    for protocol, buffers in (("lamport", 3), ("flags", 2)):
        layout = Layout(8, 16 * 5120, protocol=protocol)
        assert layout.data_offset % 256 == 0 and layout.gather_offset % 256 == 0 and layout.buffers == buffers
        assert layout.nbytes == layout.gather_offset + buffers * layout.slot_bytes >= (buffers * 8 + buffers) * 4 * 16 * 5120
    assert Layout(8, 16).data_offset == 0 and Layout(8, 16).initial_byte == 0xFF  # lamport: no flags, all ones
    assert (Layout(8, 16).programs, Layout(8, 16, protocol="flags").programs, Layout(8, 16, 7).programs) == (128, 32, 7)
    with pytest.raises(ValueError, match="protocol must be one of"):
        Layout(2, 16, protocol="semaphores")
    assert algorithm_for(TWO_SHOT_MIN_BYTES - 1, 4) == "one-shot" and algorithm_for(TWO_SHOT_MIN_BYTES, 4) == "two-shot"
    assert algorithm_for(64 * TWO_SHOT_MIN_BYTES, 2) == "one-shot"  # two ranks: two-shot never won


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


def test_the_symm_backend_refuses_cpu_ranks():
    from collectives.factory import BACKENDS, make_communicator
    assert "symm" in BACKENDS
    with pytest.raises(ValueError, match="the symm backend needs CUDA devices, got cpu; on CPU use shm or gloo"):
        make_communicator("symm", 0, 1, None, "node", 10.0, device="cpu")


# ---------------------------------------------------------------- GPUs: the symm backend, 2+ processes
gpu_world = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                               reason="needs 2 CUDA GPUs that reach each other")
HIDDEN = 5120


def max_ulps(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| in ulps of expected (bf16)."""
    return float(ulps(actual, expected).max())


def _check_call(comm, partial, residual, weight, normed, new_residual, scale, tally):
    """Tallies what one fused call got wrong against (a) the rank-order sum + the one-GPU norm
    kernel, bit for bit, (b) NCCL all_reduce + the torch reference norm, within 2 ulps, and (c)
    the other ranks' bytes."""
    reduced = rank_order_sum(list(comm.nccl.all_gather(partial[None], dim=0)))
    want_normed, want_residual = fused_norm.add_rmsnorm(reduced, residual, weight, 1e-5, scale)
    tally["residual_not_exact"] += int(not same_bits(new_residual, want_residual))
    tally["normed_not_one_gpu_kernel_bits"] += int(not same_bits(normed, want_normed))
    if scale is None:
        ref_normed, ref_residual = fused_norm.reference_add_rmsnorm(comm.nccl.all_reduce(partial), residual, weight, 1e-5)
        tally["max_ulps_vs_nccl_reference"] = max(tally["max_ulps_vs_nccl_reference"], max_ulps(normed, ref_normed))
        tally["max_ulps_residual_vs_nccl"] = max(tally["max_ulps_residual_vs_nccl"], max_ulps(new_residual, ref_residual))
    for mine in (normed, new_residual):
        everyone = comm.nccl.all_gather(mine.contiguous().view(torch.uint8)[None], dim=0)
        tally["ranks_disagree"] += int(not all(torch.equal(everyone[0], other) for other in everyone[1:]))


def _new_tally() -> dict:
    return dict.fromkeys(["timed_out", "residual_not_exact", "normed_not_one_gpu_kernel_bits", "ranks_disagree",
                          "all_reduce_not_exact", "max_ulps_vs_nccl_reference", "max_ulps_residual_vs_nccl"], 0)


def _step_inputs(comm, call, rows, dtype=torch.bfloat16):
    """Fresh inputs: partials differ per rank; residual and weight are the same everywhere (as in TP)."""
    shared = torch.Generator(comm.device).manual_seed(call)
    mine = torch.Generator(comm.device).manual_seed(10_000 * (comm.rank + 1) + call)
    partial = torch.randn(rows, HIDDEN, generator=mine, device=comm.device).to(dtype)
    residual = (torch.randn(rows, HIDDEN, generator=shared, device=comm.device) * 4).to(dtype)
    weight = (1 + 0.2 * torch.randn(HIDDEN, generator=shared, device=comm.device)).to(dtype)
    return partial, residual, weight


def _eager_calls(comm, n_calls: int) -> dict[str, torch.Tensor]:
    """n_calls consecutive fused calls, rows cycling 1, 4, 16, 128 (128 rows: two-shot), every 3rd FP8,
    every 5th a plain all_reduce too, every 7th forced two-shot."""
    tally = _new_tally()
    comm.fused.timeout_ns = int(20e9)  # a broken handshake fails the test in seconds, not minutes
    scale = torch.tensor(0.02, device=comm.device)
    for call in range(n_calls):
        if call in (1, 50) and _a_rank_timed_out(comm):
            tally["timed_out"] = 1
            break
        rows = (1, 4, 16, 128)[call % 4]
        partial, residual, weight = _step_inputs(comm, call, rows)
        q = scale if call % 3 == 2 else None
        if call % 7 == 6:
            normed, new_residual = comm.fused.allreduce_add_rmsnorm(partial, residual, weight, 1e-5, q, "two-shot")
        else:
            normed, new_residual = comm.allreduce_add_rmsnorm(partial, residual, weight, 1e-5, q)
        _check_call(comm, partial, residual, weight, normed, new_residual, q, tally)
        if call % 5 == 0:
            reduced = comm.all_reduce(partial)
            tally["all_reduce_not_exact"] += int(not same_bits(reduced, rank_order_sum(
                list(comm.nccl.all_gather(partial[None], dim=0)))))
        if call == 0:  # a strided residual is not the kernel's: NCCL + add_rmsnorm
            strided = torch.cat([residual, residual], dim=-1)[:, :HIDDEN]
            got = comm.allreduce_add_rmsnorm(partial, strided, weight, 1e-5)
            want = fused_norm.reference_add_rmsnorm(comm.nccl.all_reduce(partial), residual, weight, 1e-5)
            tally["fallback_residual_not_exact"] = int(not same_bits(got[1], want[1]))
    comm.barrier()  # raises if a fused wait timed out
    return _over_ranks(comm, tally)


def _graph_replays(comm, replays: int) -> dict[str, torch.Tensor]:
    """One graph holding a fused allreduce_add_rmsnorm and a plain all_reduce, replayed with new
    inputs copied into its static inputs; every 10th replay an eager fused call in between."""
    tally = _new_tally()
    comm.fused.timeout_ns = int(20e9)
    partial, residual, weight = _step_inputs(comm, 0, 4)
    side = torch.cuda.Stream(comm.device)
    side.wait_stream(torch.cuda.current_stream(comm.device))
    with torch.cuda.stream(side):  # compile outside the capture
        for _ in range(3):
            comm.allreduce_add_rmsnorm(partial, residual, weight, 1e-5)
            comm.all_reduce(partial)
    torch.cuda.current_stream(comm.device).wait_stream(side)
    if _a_rank_timed_out(comm):
        tally["timed_out"] = 1
        return _over_ranks(comm, tally)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        normed, new_residual = comm.allreduce_add_rmsnorm(partial, residual, weight, 1e-5)
        reduced = comm.all_reduce(partial)
    launches = 6
    for replay in range(replays):
        fresh_partial, fresh_residual, _ = _step_inputs(comm, 1000 + replay, 4)
        partial.copy_(fresh_partial)
        residual.copy_(fresh_residual)
        graph.replay()
        launches += 2
        _check_call(comm, partial, residual, weight, normed, new_residual, None, tally)
        tally["all_reduce_not_exact"] += int(not same_bits(reduced, rank_order_sum(
            list(comm.nccl.all_gather(partial[None], dim=0)))))
        if replay % 10 == 9:
            eager = comm.allreduce_add_rmsnorm(partial, residual, weight, 1e-5)
            launches += 1
            _check_call(comm, partial, residual, weight, *eager, None, tally)
    comm.barrier()
    tally["counters_off"] = int((comm.fused.counters != launches).sum())
    return _over_ranks(comm, tally)


def _a_rank_timed_out(comm) -> bool:
    """Whether any rank's fused wait gave up so far (every rank gets the same answer)."""
    mine = comm.fused.status.clone()
    return bool(comm.nccl.all_gather(mine, dim=0).any())


def _over_ranks(comm, tally: dict) -> dict[str, torch.Tensor]:
    """The worst value of every tally over all ranks (run_world returns rank 0's dict only)."""
    mine = torch.tensor([float(v) for v in tally.values()], device=comm.device)
    worst = comm.nccl.all_gather(mine[None], dim=0).max(dim=0).values.cpu()  # (n_tallies,)
    return dict(zip(tally, worst))


def _assert_tally(got: dict[str, torch.Tensor]) -> None:
    counts = {k: int(v) for k, v in got.items() if not k.startswith("max_ulps")}
    assert counts == dict.fromkeys(counts, 0), counts
    assert float(got["max_ulps_vs_nccl_reference"]) <= 2, got  # 2 ranks: NCCL's sum is the rank-order sum
    assert float(got["max_ulps_residual_vs_nccl"]) == 0, got


@gpu_world
def test_gpu_fused_equals_nccl_and_the_reference_over_200_calls():
    from cluster.procs import run_world
    _assert_tally(run_world(2, _eager_calls, 200, backend="symm", device="cuda", timeout_s=300))


@gpu_world
def test_gpu_fused_inside_a_replayed_cuda_graph():
    from cluster.procs import run_world
    _assert_tally(run_world(2, _graph_replays, 100, backend="symm", device="cuda", timeout_s=300))


def test_bench_table_and_the_two_shot_crossover():
    """workers/collectives_bench.py's summary of its rows (the GPU timing itself runs on GPUs only)."""
    from workers.collectives_bench import table, two_shot_from
    rows = [{"op": "ar_rmsnorm", "mode": "graph", "impl": impl, "tokens": t, "median_us": us, "p90_us": us + 1}
            for impl, t, us in [("symm-one-shot", 16, 6.0), ("symm-two-shot", 16, 7.0), ("symm-one-shot", 128, 20.0),
                                ("symm-two-shot", 128, 15.0), ("nccl", 16, 25.0)]]
    assert two_shot_from(rows) == 128
    assert two_shot_from(rows[:2]) is None
    lines = table(rows).splitlines()
    assert len(lines) == 3 and lines[1].split()[:3] == ["ar_rmsnorm", "graph", "16"] and "25.0" in lines[1]
    # a second variant's run: its fused rows are named flags@64-*, its NCCL rows dropped (the first run has them)
    from workers.collectives_bench import protocol_rows
    flags = protocol_rows([dict(r, name="x") for r in rows + [dict(rows[0], impl="symm")]], "flags@64", first=False)
    assert [r["impl"] for r in flags] == ["flags@64-one-shot", "flags@64-two-shot"] * 2 + ["flags@64"]
    flags = flags[:4]
    assert all(r["variant"] == "flags@64" and r["name"] == f"ar_rmsnorm {r['impl']} graph" for r in flags)
    from types import SimpleNamespace

    from workers.collectives_bench import Case, cases
    assert cases(SimpleNamespace(fused=None), (1, 4), ("all_gather",)) == [
        Case("all_gather", impl, t) for t in (1, 4) for impl in ("symm", "nccl")]  # --collectives all_gather
    header = table(rows + flags).splitlines()[0].split()
    assert header[3:8] == ["symm-one-shot", "symm-two-shot", "flags@64-one-shot", "flags@64-two-shot", "nccl"]


def test_bench_collectives_refuses_unknown_protocols(capsys):
    from launch.cli import main
    for value in ("semaphores", "lamport,lamport", "", "flags@0", "lamport@x", "lamport@2@3"):
        assert main(["bench", "collectives", "--protocols", value]) == 2
        err = capsys.readouterr().err.strip()
        assert "--protocols must name variants of lamport, flags" in err and len(err.splitlines()) == 1
    assert main(["bench", "collectives", "--collectives", "all_gather,broadcast"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--collectives must name some of ar_rmsnorm, all_reduce, all_gather" in err and len(err.splitlines()) == 1


def _gathers(comm, calls: int) -> dict[str, torch.Tensor]:
    """all_gather of small float tensors (the fused sum of zero-padded slots) vs NCCL's, bitwise."""
    wrong = torch.zeros((), dtype=torch.long, device=comm.device)
    for call in range(calls):
        for dtype, shape, dim in ((torch.float32, (1, 3, 2), 0), (torch.bfloat16, (4, 7), 1)):
            x = torch.randn(shape, device=comm.device).to(dtype) * (comm.rank + 1 + call)
            wrong += int(not torch.equal(comm.all_gather(x, dim), comm.nccl.all_gather(x, dim)))
    return {"wrong": comm.nccl.all_reduce(wrong).cpu()}


@gpu_world
def test_gpu_small_all_gather_by_fused_sum_equals_nccl():
    from cluster.procs import run_world
    assert int(run_world(2, _gathers, 20, backend="symm", device="cuda", timeout_s=300)["wrong"]) == 0


@cpu_only
def test_the_fused_kernel_stamps_begin_arrival_and_end_while_a_ledger_is_active():
    """Same bits with stamps; each launch of the FINISH phase writes its three slots (interpreter
    stand-in time: slot x 1000), and nothing is taken with no ledger active."""
    from collectives import gpu_stamps
    sim = SimulatedWorld(2)
    parts, residual, weight = inputs(2, 3, 80, torch.float32, seed=5)
    plain = sim.norm(parts, residual, weight)
    ledger = gpu_stamps.StampLedger("cpu", capacity=16)
    outs = [(torch.empty_like(residual), torch.empty_like(residual)) for _ in sim.ranks]
    for r, rank in enumerate(sim.ranks):
        rank.launch(parts[r], outs[r][0], residual, weight, 1e-5, None, outs[r][1], "one-shot", PUSH)
    for r, rank in enumerate(sim.ranks):
        with gpu_stamps.stamping(ledger):
            rank.launch(parts[r], outs[r][0], residual, weight, 1e-5, None, outs[r][1], "one-shot", FINISH)
    assert all(torch.equal(a, b) for out, ref in zip(outs, plain) for a, b in zip(out, ref))
    kinds = [label[0] for label, _ in ledger.read()]
    assert kinds == ["begin", "arrived", "end"] * 2
    assert [t for _, t in ledger.read()] == [slot * 1000 for slot in range(6)]


def test_gather_by_sum_equals_the_concatenation_and_keeps_its_zeroed_slots():
    """symm_mem.GatherBySum on CPU stand-ins for two ranks (the all-reduce: the rank-order sum of both
    ranks' slots): every call equals torch.cat of the ranks' tensors, along dim 0 as a view of the sum
    and along dim 1 concatenated, and the kept slots stay zero outside each rank's own."""
    from collectives.symm_mem import GatherBySum
    gathers = [GatherBySum(rank, 2) for rank in range(2)]
    gen = torch.Generator().manual_seed(11)
    for call in range(3):
        for shape, dim in (((1, 3, 2), 0), ((4, 7), 1), ((4, 7), -1)):
            xs = [torch.randn(shape, generator=gen) for _ in range(2)]
            slots = [g.slots(x) for g, x in zip(gathers, xs)]
            for rank, s in enumerate(slots):  # kept from the first call on: zero but for nothing yet written
                assert s.shape == (2, *shape) and not s[1 - rank].any()
            slots[1][1].copy_(xs[1])  # rank 1 "ran ahead": its slot is written when rank 0 sums
            total = lambda _: slots[0] + slots[1]  # noqa: E731 (the all-reduce of both ranks' slots)
            outs = [g(x, dim, total) for g, x in zip(gathers, xs)]
            want = torch.cat(xs, dim=dim)
            assert all(torch.equal(out, want) for out in outs)
    assert all(len(g.kept) == 2 for g in gathers)  # one (shape, dtype) each: (1, 3, 2) and (4, 7)
