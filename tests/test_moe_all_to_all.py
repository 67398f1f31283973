"""MoE dispatch / combine at static shapes: the kernels over peer memory (collectives/moe_all_to_all.py)
and the reference every backend inherits (Communicator.dispatch_static / combine_static).

On CPU (Triton's interpreter), W ranks live in one process: each rank's MoE buffer is a CPU byte
tensor and every rank's kernels get the data_ptr()s of all of them, as in tests/test_fused_allreduce.py;
the interpreter runs programs one after another, so PUSH runs on every rank, then FINISH.

What is asserted:
  * dispatch and combine equal the contract written out in `expected_dispatch` / `expected_combine`
    bit for bit, on consecutive calls with fresh routings, changing row counts, padding rows (-1),
    ranks that receive nothing, NaN in the combine's padding slots (ignored), float32 and bf16,
    int32 and int64 ids, also when a rank runs a call ahead of a peer still reading (the parity);
  * the all_to_all reference (3 gloo processes) returns the kernels' bits on the same inputs;
  * a wait whose peer never pushes gives up and names the missing rank; bad input is refused;
  * on GPUs (>= 2): the kernels over torch symmetric memory equal the NCCL reference bit for bit,
    eagerly on many fresh routings and replayed from a CUDA graph.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from cluster.procs import run_world  # noqa: E402
from collectives.communicator import SingleRankCommunicator  # noqa: E402
from collectives.fused_allreduce import FINISH, PUSH  # noqa: E402
from collectives.moe_all_to_all import MoeAllToAll, MoeLayout  # noqa: E402
from workers.cuda_graphs import capture  # noqa: E402

CPU = not torch.cuda.is_available()
cpu_only = pytest.mark.skipif(not CPU, reason="the simulated world runs under Triton's interpreter (no GPU)")
HIDDEN = 80  # no power of two: the row's tail is masked


class SimulatedWorld:
    """W ranks in this process, their MoE buffers as CPU tensors."""

    def __init__(self, world: int, max_rows: int = 8, timeout_s: float = 0.02):
        self.world = world
        self.layout = MoeLayout(world, max_rows, max_hidden=96, programs=4)
        self.buffers = [torch.zeros(self.layout.nbytes, dtype=torch.uint8) for _ in range(world)]
        bases = [b.data_ptr() for b in self.buffers]
        self.ranks = [MoeAllToAll(r, self.layout, bases, "cpu", timeout_s) for r in range(world)]

    def dispatch(self, xs, dests, ids, order=None):
        m, h = xs[0].shape
        outs = [(torch.full((self.world * m, h), float("nan"), dtype=xs[0].dtype),
                 torch.full((self.world * m,), 99, dtype=ids[0].dtype)) for _ in self.ranks]
        for phase in (PUSH, FINISH):
            for r in order or range(self.world):
                self.ranks[r].launch_dispatch(xs[r], dests[r], ids[r], *outs[r], phases=phase)
        return outs

    def combine(self, ys, recv_ids, dests, order=None):
        outs = [torch.full((d.shape[0], ys[0].shape[1]), float("nan"), dtype=ys[0].dtype) for d in dests]
        for phase in (PUSH, FINISH):
            for r in order or range(self.world):
                self.ranks[r].launch_combine(ys[r], recv_ids[r], dests[r], outs[r], phases=phase)
        return outs


def routing(world, m, dtype, seed, id_dtype=torch.int64, n_experts=16):
    """Every rank's rows, destinations (-1: padding, about one in five) and expert ids."""
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(m, HIDDEN, generator=gen).to(dtype) for _ in range(world)]
    dests = [torch.randint(0, world, (m,), generator=gen) for _ in range(world)]
    dests = [torch.where(torch.rand(m, generator=gen) < 0.2, -1, d).to(id_dtype) for d in dests]
    ids = [torch.randint(0, n_experts, (m,), generator=gen).to(id_dtype) for _ in range(world)]
    return xs, dests, ids


def expected_dispatch(xs, dests, ids):
    """The contract: on rank d, slot s*M + i holds rank s's row i and its id where dests[s][i] == d,
    zeros and -1 elsewhere."""
    world, (m, h) = len(xs), xs[0].shape
    x, dest, expert = torch.stack(xs), torch.stack(dests), torch.stack(ids)  # (W, M, H), (W, M), (W, M)
    return [(torch.where((dest == d)[..., None], x, torch.zeros((), dtype=x.dtype)).reshape(world * m, h),
             torch.where(dest == d, expert, -1).reshape(world * m)) for d in range(world)]


def expected_combine(ys, dests):
    """Row i of rank s: slot s*M + i of ys[dests[s][i]], zeros where dests[s][i] is -1."""
    m = dests[0].shape[0]
    zero = torch.zeros(ys[0].shape[1], dtype=ys[0].dtype)
    return [torch.stack([ys[int(d)][s * m + i] if d >= 0 else zero for i, d in enumerate(dest.tolist())])
            for s, dest in enumerate(dests)]


def expert_outputs(received, rank):
    """A stand-in for the experts: a function of each received row, NaN in the padding slots (the
    combine must not read them)."""
    ys = []
    for r, (recv_x, recv_ids) in enumerate(received):
        y = recv_x * 3 + (rank if rank is not None else r)
        y[recv_ids < 0] = float("nan")
        ys.append(y)
    return ys


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def check_round(sim, xs, dests, ids, order=None):
    received = sim.dispatch(xs, dests, ids, order)
    for (rx, rid), (ex, eid) in zip(received, expected_dispatch(xs, dests, ids)):
        assert same_bits(rx, ex) and torch.equal(rid, eid)
    ys = expert_outputs(received, None)
    backs = sim.combine(ys, [rid for _, rid in received], dests, order)
    for back, want in zip(backs, expected_combine(ys, dests)):
        assert same_bits(back, want)
    return received, backs


@cpu_only
@pytest.mark.parametrize("world,dtype,id_dtype", [(2, torch.float32, torch.int64), (3, torch.bfloat16, torch.int32),
                                                  (4, torch.float32, torch.int32)])
def test_consecutive_calls_match_the_contract(world, dtype, id_dtype):
    """Rows 5, 1, 8, 3 with fresh routings on one set of buffers: 4 programs own every 4th row."""
    sim = SimulatedWorld(world)
    for call, m in enumerate([5, 1, 8, 3]):
        check_round(sim, *routing(world, m, dtype, seed=10 * world + call, id_dtype=id_dtype))
    for r in sim.ranks:  # one epoch per call and kernel
        assert torch.equal(r.dispatch_epochs, torch.full_like(r.dispatch_epochs, 4))
        assert torch.equal(r.combine_epochs, r.dispatch_epochs) and r.missing_ranks() == []


@cpu_only
def test_round_trip_returns_each_row_to_its_source_row():
    """Experts as the identity: combine(dispatch(x)) is x where the row was sent, zeros where not."""
    sim = SimulatedWorld(3)
    xs, dests, ids = routing(3, 7, torch.float32, seed=1)
    dests[1] = torch.full_like(dests[1], -1)  # a rank that sends nothing
    dests[0][:] = 2  # and one that sends everything to one peer
    received = sim.dispatch(xs, dests, ids)
    assert torch.equal(received[0][1][:14], torch.full((14,), -1))  # rank 0: nothing from ranks 0 and 1
    assert torch.equal(received[2][1][:7], ids[0])
    backs = sim.combine([rx for rx, _ in received], [rid for _, rid in received], dests)
    for x, dest, back in zip(xs, dests, backs):
        assert torch.equal(back, torch.where((dest >= 0)[:, None], x, 0.0))


@cpu_only
def test_a_rank_one_call_ahead_does_not_disturb_a_peer_still_reading():
    """Rank 0 finishes dispatch 1 and pushes dispatch 2 into rank 1's buffer before rank 1 has read
    dispatch 1: call 2 writes the other parity, so rank 1 still reads call 1's rows."""
    sim = SimulatedWorld(2)
    calls = [routing(2, 6, torch.float32, seed=s) for s in (3, 4)]
    outs = [[(torch.empty(12, HIDDEN), torch.empty(12, dtype=torch.int64)) for _ in range(2)] for _ in calls]
    for rank, call, phase in [(0, 0, PUSH), (1, 0, PUSH), (0, 0, FINISH), (0, 1, PUSH),
                              (1, 0, FINISH), (1, 1, PUSH), (1, 1, FINISH), (0, 1, FINISH)]:
        xs, dests, ids = calls[call]
        sim.ranks[rank].launch_dispatch(xs[rank], dests[rank], ids[rank], *outs[call][rank], phases=phase)
    for (xs, dests, ids), got in zip(calls, outs):
        for (rx, rid), (ex, eid) in zip(got, expected_dispatch(xs, dests, ids)):
            assert same_bits(rx, ex) and torch.equal(rid, eid)


@cpu_only
def test_ranks_in_any_order():
    sim = SimulatedWorld(4)
    check_round(sim, *routing(4, 6, torch.bfloat16, seed=5), order=[2, 0, 3, 1])


@cpu_only
def test_a_missing_peer_times_out_and_is_named():
    """Rank 1 never dispatches: rank 0's wait gives up after its timeout and reports rank 1 (no hang)."""
    sim = SimulatedWorld(2, timeout_s=0.005)
    xs, dests, ids = routing(2, 3, torch.float32, seed=6)
    recv_x, recv_ids = torch.empty(6, HIDDEN), torch.empty(6, dtype=torch.int64)
    for phase in (PUSH, FINISH):
        sim.ranks[0].launch_dispatch(xs[0], dests[0], ids[0], recv_x, recv_ids, phases=phase)
    assert sim.ranks[0].missing_ranks() == [1]


def _reference_calls(comm, calls):
    """Every call's dispatch_static / combine_static on this backend, all ranks' results gathered."""
    out = {}
    for c, (m, dtype, seed) in enumerate(calls):
        xs, dests, ids = routing(comm.world_size, m, getattr(torch, dtype), seed)
        r = comm.rank
        recv_x, recv_ids = comm.dispatch_static(xs[r], dests[r], ids[r])
        y = expert_outputs([(recv_x, recv_ids)], r)[0]
        back = comm.combine_static(y, recv_ids, dests[r])
        for name, t in (("recv_x", recv_x), ("recv_ids", recv_ids), ("back", back)):
            out[f"{name}{c}"] = comm.all_gather(t[None], dim=0)  # (W, ...)
    return out


@cpu_only
def test_the_all_to_all_reference_gives_the_kernels_bits():
    """The reference (3 gloo processes, all_to_all with host counts) and the kernels, same inputs."""
    calls = [(5, "float32", 21), (1, "bfloat16", 22), (8, "float32", 23)]
    got = run_world(3, _reference_calls, calls)
    sim = SimulatedWorld(3)
    for c, (m, dtype, seed) in enumerate(calls):
        xs, dests, ids = routing(3, m, getattr(torch, dtype), seed)
        received = sim.dispatch(xs, dests, ids)
        backs = sim.combine([expert_outputs([rx], r)[0] for r, rx in enumerate(received)],
                            [rid for _, rid in received], dests)
        for r in range(3):
            assert same_bits(got[f"recv_x{c}"][r], received[r][0]) and torch.equal(got[f"recv_ids{c}"][r], received[r][1])
            assert same_bits(got[f"back{c}"][r], backs[r])


@pytest.mark.parametrize("args,message", [
    ((torch.zeros(4), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)), "must be \\(M, H\\)"),
    ((torch.zeros(4, 8), torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long)), "dest_rank must be"),
    ((torch.zeros(4, 8), torch.zeros(4, dtype=torch.long), torch.zeros(4)), "expert_ids must be"),
    ((torch.zeros(4, 8), torch.tensor([0, 1, 0, -1]), torch.zeros(4, dtype=torch.long)), "outside -1..0: \\[1\\]"),
])
def test_reference_refuses_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        SingleRankCommunicator().dispatch_static(*args)


def test_world_of_one_reference_keeps_sent_rows():
    x = torch.randn(5, 8)
    dest, ids = torch.tensor([0, -1, 0, 0, -1]), torch.arange(5)
    comm = SingleRankCommunicator()
    recv_x, recv_ids = comm.dispatch_static(x, dest, ids)
    assert torch.equal(recv_ids, torch.tensor([0, -1, 2, 3, -1]))
    assert torch.equal(comm.combine_static(recv_x * 2, recv_ids, dest), torch.where((dest >= 0)[:, None], 2 * x, 0.0))


@cpu_only
@pytest.mark.parametrize("x,message", [
    (torch.zeros(4, 80, dtype=torch.float64), "contiguous float32/bf16/fp16"),
    (torch.zeros(80, 4).t(), "contiguous float32/bf16/fp16"),
    (torch.zeros(9, 80), "M <= 8"),
    (torch.zeros(4, 97), "H <= 96"),
])
def test_kernels_refuse_bad_input(x, message):
    sim = SimulatedWorld(2)
    dest, ids = torch.zeros(x.shape[0], dtype=torch.long), torch.zeros(x.shape[0], dtype=torch.long)
    with pytest.raises(ValueError, match=message):
        sim.ranks[0].dispatch(x, dest, ids)
    with pytest.raises(ValueError, match="expert_ids must be a contiguous int32/int64 \\(4,\\)"):
        sim.ranks[0].dispatch(torch.zeros(4, 80), torch.zeros(4, dtype=torch.long), torch.zeros(4))
    with pytest.raises(ValueError, match="phases 2 are not a subset"):
        sim.ranks[0].launch_dispatch(torch.zeros(4, 80), dest[:4], ids[:4], torch.empty(8, 80),
                                     torch.empty(8, dtype=torch.long), phases=2)
    with pytest.raises(ValueError, match="world size must be 1..30"):
        MoeLayout(31)


def test_layout_is_aligned():
    layout = MoeLayout(8, 16, 5120)
    assert all(off % 256 == 0 for off in (layout.ids_offset, layout.data_offset, layout.combine_offset))
    assert layout.nbytes == layout.combine_offset + 2 * layout.slot_bytes >= (2 * 8 + 2) * 4 * 16 * 5120


# --- GPUs ---------------------------------------------------------------------------------------
gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def _gpu_kernels_equal_nccl(comm, calls: int, graph_replays: int):
    """On every rank: the kernels (own symmetric buffer) against comm.nccl's all_to_all reference."""
    from collectives.moe_all_to_all import SymmetricMoeAllToAll
    world, rank, dev = comm.world_size, comm.rank, comm.device
    moe = SymmetricMoeAllToAll(comm.nccl, MoeLayout(world, max_rows=16, max_hidden=5120))

    def inputs(seed, m, hidden, dtype):
        gen = torch.Generator(device=dev).manual_seed(1000 * seed + rank)
        x = torch.randn(m, hidden, generator=gen, device=dev).to(dtype)
        dest = torch.randint(-1, world, (m,), generator=gen, device=dev)
        return x, dest, torch.randint(0, 64, (m,), generator=gen, device=dev)

    def check(x, dest, ids, recv_x, recv_ids, back):
        want_x, want_ids = comm.nccl.dispatch_static(x, dest, ids)
        assert same_bits(recv_x, want_x) and torch.equal(recv_ids, want_ids), f"rank {rank}: dispatch differs"
        want_back = comm.nccl.combine_static(want_x * 3 + rank, want_ids, dest)
        assert same_bits(back, want_back), f"rank {rank}: combine differs"

    for call in range(calls):  # eager, fresh routings, rows and hidden sizes change between calls
        m, hidden = [(1, 5120), (16, 5120), (7, 80), (3, 2048)][call % 4]
        x, dest, ids = inputs(call, m, hidden, (torch.bfloat16, torch.float32)[call % 2])
        recv_x, recv_ids = moe.dispatch(x, dest, ids)
        check(x, dest, ids, recv_x, recv_ids, moe.combine(recv_x * 3 + rank, recv_ids, dest))
    x, dest, ids = inputs(0, 16, 5120, torch.bfloat16)  # static inputs of the graph

    def step():
        recv_x, recv_ids = moe.dispatch(x, dest, ids)
        return recv_x, recv_ids, moe.combine(recv_x * 3 + rank, recv_ids, dest)
    graph, outs = capture(step, lambda: None, x.device, world_size=2)  # warm-ups on a side stream, then one capture
    for replay in range(graph_replays):
        fresh = inputs(10_000 + replay, 16, 5120, torch.bfloat16)
        for static, new in zip((x, dest, ids), fresh):
            static.copy_(new)
        graph.replay()
        check(x, dest, ids, *outs)
    comm.barrier()
    assert moe.missing_ranks() == []
    moe.close()
    return {"ok": torch.ones(1)}


@gpus
def test_gpu_kernels_equal_the_nccl_reference_eagerly_and_in_a_graph():
    got = run_world(2, _gpu_kernels_equal_nccl, 200, 100, backend="symm", device="cuda")
    assert torch.equal(got["ok"], torch.ones(1))
