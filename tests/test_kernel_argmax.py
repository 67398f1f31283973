"""The LM head's argmax kernel (model/kernels/argmax.py) against torch.argmax, and the vocab-parallel
argmax (model/sampling.py) built on it.

What is asserted, and why: the kernel is a selection, so everything is exact. Fresh random rows of
vocabulary sizes that are not powers of two, cut into many programs (small blocks, so the last
program's merge of the partials and the looping over several blocks per program both run), in
float32 / bf16 / fp16, with many ties (small integer values), -inf everywhere or in places, NaN
(torch: larger than everything, the first one wins), signed zeros (the first of equals wins, its
value kept), padding columns past `valid` holding values that would win if read, and rows that
are strided views. The arrival counters are zero after every call (the next call depends on it).
GPU-only: medium's and Maverick's vocabulary widths at batch 1 and 4, and capture in a CUDA graph.
"""
from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("triton")
from collectives.communicator import SingleRankCommunicator  # noqa: E402
from model.kernels import argmax as am  # noqa: E402
from model.sampling import distributed_argmax  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
pytestmark = pytest.mark.usefixtures("poison_empty")  # tests/conftest.py: unwritten outputs show


def _logits(gen: torch.Generator, rows: int, vocab: int, dtype: torch.dtype, kind: str) -> torch.Tensor:
    """(rows, vocab) on DEVICE. kind: "ties" (values in -3..2: many equal maxima), "randn",
    "special" (ties plus -inf, NaN and signed zeros scattered over the rows)."""
    if kind == "randn":
        x = torch.randn(rows, vocab, generator=gen)
    else:
        x = torch.randint(-3, 3, (rows, vocab), generator=gen).float()
    if kind == "special":
        where = torch.rand(rows, vocab, generator=gen)
        x[where < 0.2] = float("-inf")
        x[(where > 0.5) & (where < 0.6)] = -0.0
        x[0] = float("-inf")  # a row of -inf: index 0
        if rows > 1:
            x[1, torch.randint(0, vocab, (2,), generator=gen)] = float("nan")  # the first NaN wins
        if rows > 2:
            x[2] = torch.where(torch.rand(vocab, generator=gen) < 0.5, -0.0, 0.0)  # all zeros, signs mixed
    return x.to(dtype).to(DEVICE)


def _assert_pairs_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """(B, 2) pairs: ids exact; values exact, NaN where NaN (any NaN), and the sign of a zero kept."""
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    number = ~want[:, 0].isnan()
    assert torch.equal(torch.signbit(got[number, 0]), torch.signbit(want[number, 0]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_argmax(dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(str(dtype).encode()) % 1000)
    # (rows, vocab, block, programs at most): one program; many; several blocks per program (509 / 16 =
    # 32 blocks over 5 programs: 7 each, the last short); a row shorter than a block
    cases = [(1, 1, 16, 8), (3, 7, 16, 8), (2, 509, 16, 5), (4, 1000, 128, 256), (2, 4099, 1024, 256), (1, 33, 64, 2)]
    for case, (rows, vocab, block, programs) in enumerate(cases):
        for kind in ("ties", "randn", "special"):
            logits = _logits(gen, rows, vocab, dtype, kind)
            offset = int(torch.randint(0, 100_000, (1,), generator=gen))
            got = am.argmax(logits, offset=offset, block=block, max_programs=programs)
            assert got.dtype == torch.int64
            assert torch.equal(got, logits.argmax(dim=-1) + offset), (case, kind)
            _assert_pairs_equal(am.max_argmax(logits, offset=offset, block=block, max_programs=programs),
                                am.reference_max_argmax(logits, offset=offset))
    assert not am._COUNTERS[logits.device].any(), "an arrival counter was left set"


def test_valid_columns_only():
    """Columns past `valid` (a rank's vocabulary padding) are never read: values there that would
    win (+inf, NaN, large) change nothing; the result equals torch.argmax of the row with -inf
    written there (what Llama4.forward writes). No valid column: index 0 and -inf."""
    gen = torch.Generator().manual_seed(3)
    for rows, vocab, valid, block in [(3, 600, 517, 64), (2, 100, 1, 16), (1, 4099, 4000, 1024), (2, 40, 0, 16)]:
        logits = _logits(gen, rows, vocab, torch.bfloat16, "special")
        logits[:, valid:] = torch.tensor([float("inf"), float("nan"), 1e4])[torch.arange(vocab - valid) % 3].to(logits)
        want = am.reference_argmax(logits, valid=valid, offset=7)
        assert torch.equal(am.argmax(logits, valid=valid, offset=7, block=block), want)
        _assert_pairs_equal(am.max_argmax(logits, valid=valid, offset=7, block=block),
                            am.reference_max_argmax(logits, valid=valid, offset=7))
    none = am.max_argmax(torch.zeros(2, 40, device=DEVICE), valid=0, offset=5)
    assert none[:, 0].eq(float("-inf")).all() and none[:, 1].eq(5).all()


def test_out_buffer():
    """`out`: the ids land in a given (strided) int64 buffer, e.g. a decode graph's token column, and
    distributed_argmax returns that buffer whichever path it takes."""
    gen = torch.Generator().manual_seed(6)
    logits = _logits(gen, 3, 300, torch.float32, "ties")
    tokens = torch.full((3, 2), -1, dtype=torch.long, device=DEVICE)  # (B, T): column 0 is strided
    got = am.argmax(logits, offset=4, out=tokens[:, 0], block=64)
    assert got.data_ptr() == tokens.data_ptr() and torch.equal(tokens[:, 0], logits.argmax(-1) + 4)
    assert bool((tokens[:, 1] == -1).all())
    for kernel in (True, False):
        out = torch.zeros(3, dtype=torch.long, device=DEVICE)
        assert distributed_argmax(logits, 4, SingleRankCommunicator(), kernel=kernel, out=out) is out
        assert torch.equal(out, logits.argmax(-1) + 4)
    with pytest.raises(ValueError, match="out must be an int64"):
        am.argmax(logits, out=torch.zeros(3, dtype=torch.int32, device=DEVICE))


def test_strided_rows():
    """The decode graph passes logits[:, -1] of (B, T, V): rows T * V apart."""
    gen = torch.Generator().manual_seed(4)
    logits = _logits(gen, 3 * 4, 777, torch.float16, "ties").view(3, 4, 777)
    last = logits[:, -1]
    assert last.stride() == (4 * 777, 1)
    assert torch.equal(am.argmax(last, block=64), last.argmax(dim=-1))


class _TwoRanks(SingleRankCommunicator):
    """Rank `rank` of two in one process: all_gather puts the other rank's precomputed part beside ours."""

    def __init__(self, rank: int, other: torch.Tensor) -> None:
        super().__init__()
        self.rank, self.world_size, self.other = rank, 2, other

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        parts = [x, self.other] if self.rank == 0 else [self.other, x]
        return torch.cat(parts, dim=dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_distributed_argmax_on_the_kernel(dtype):
    """distributed_argmax with the kernel's local part picks what torch.argmax over the whole
    vocabulary picks, at one rank and on each of two ranks (ties across the cut go to rank 0's
    lower ids), and what its torch local part picks."""
    gen = torch.Generator().manual_seed(5)
    full = _logits(gen, 4, 2 * 300, dtype, "ties")
    full[3, 0] = float("nan")
    want = full.argmax(dim=-1)
    assert torch.equal(distributed_argmax(full, 0, SingleRankCommunicator(), kernel=True), want)
    halves = full[:, :300], full[:, 300:]
    for rank in (0, 1):
        other = am.reference_max_argmax(halves[1 - rank], offset=300 * (1 - rank))[None]  # (1, B, 2)
        comm = _TwoRanks(rank, other)
        got = distributed_argmax(halves[rank], 300 * rank, comm, kernel=True)
        assert torch.equal(got, want)  # row 3's NaN is rank 0's: both ranks pick it
        assert torch.equal(got, distributed_argmax(halves[rank], 300 * rank, comm, kernel=False))
        out = torch.zeros(4, dtype=torch.long, device=DEVICE)
        assert distributed_argmax(halves[rank], 300 * rank, comm, kernel=True, out=out) is out
        assert torch.equal(out, want)


@pytest.mark.parametrize("world", [2, 3, 5])
def test_pick_winner_is_torch_argmax_of_the_whole_row(world):
    """The winner kernel over `world` ranks' (max, id) pairs picks what torch.argmax of the whole row
    picks: ties across the cuts go to the lowest id, a NaN in any rank wins (the first NaN), a row of
    -inf gives id 0; written into `out` when given."""
    import time
    gen = torch.Generator().manual_seed(int(time.time_ns() % 2**31))
    width = 37
    full = _logits(gen, 6, world * width, torch.float32, "special")
    full[2, (world - 1) * width + 3] = float("nan")  # the last rank's NaN, the only one of row 2:
    full[2, : (world - 1) * width] = torch.nan_to_num(full[2, : (world - 1) * width], nan=0.0)
    pairs = torch.stack([am.reference_max_argmax(full[:, r * width:(r + 1) * width], offset=r * width)
                         for r in range(world)]).contiguous()  # (world, B, 2)
    want = full.argmax(dim=-1)
    assert torch.equal(am.pick_winner(pairs), want)
    out = torch.full((6,), -1, dtype=torch.long, device=DEVICE)
    assert am.pick_winner(pairs, out=out) is out and torch.equal(out, want)
    with pytest.raises(ValueError, match="float32 \\(world, B, 2\\)"):
        am.pick_winner(pairs[..., :1])


@pytest.mark.parametrize("bad,message", [
    (lambda: torch.zeros(2, 3, 4), "must be \\(B, V\\)"),
    (lambda: torch.zeros(2, 8, dtype=torch.int32), "must be \\(B, V\\)"),
    (lambda: torch.zeros(8, 2).t(), "unit stride"),
])
def test_refuses_bad_logits(bad, message):
    with pytest.raises(ValueError, match=message):
        am.argmax(bad().to(DEVICE))


def test_refuses_bad_arguments():
    logits = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="valid must be in 0..8"):
        am.argmax(logits, valid=9)
    with pytest.raises(ValueError, match="power of two"):
        am.argmax(logits, block=24)
    with pytest.raises(ValueError, match="max_programs must be"):
        am.argmax(logits, max_programs=0)


@pytest.mark.skipif(DEVICE != "cuda", reason="the vocabulary widths of the presets: GPU only")
@pytest.mark.parametrize("vocab", [32768, 202048, 101024])
@pytest.mark.parametrize("rows", [1, 4])
def test_gpu_preset_widths(vocab, rows):
    gen = torch.Generator().manual_seed(vocab + rows)
    for kind in ("randn", "ties"):
        logits = _logits(gen, rows, vocab, torch.bfloat16, kind)
        assert torch.equal(am.argmax(logits, offset=11), logits.argmax(dim=-1) + 11)
        _assert_pairs_equal(am.max_argmax(logits, offset=11), am.reference_max_argmax(logits, offset=11))
    assert not am._COUNTERS[logits.device].any()


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs: GPU only")
def test_gpu_graph_replay_follows_new_logits():
    """Captured once, replayed over fresh logits: each replay's ids are torch.argmax's of those logits
    (the counters reset inside the graph, replay after replay)."""
    gen = torch.Generator().manual_seed(8)
    logits = _logits(gen, 2, 32768, torch.bfloat16, "randn")
    am.argmax(logits)  # warm-up: compiles and makes the counters outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids = am.argmax(logits, offset=3)
    for _ in range(5):
        logits.copy_(_logits(gen, 2, 32768, torch.bfloat16, "ties"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(ids, logits.argmax(dim=-1) + 3)
