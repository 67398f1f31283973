"""The step-head kernel (model/kernels/embed_norm.py: embedding gather + first RMSNorm + the step's
positions and cache lengths) against its torch reference, what Llama4.forward's torch ops compute.

What is asserted, and why:
  * the embedding rows are copies: equal to VocabEmbedding's, ids outside the rank's slice (below,
    above, negative, in the padding past vocab_valid) embed to zero;
  * normed is within 1e-6 relative (float32) / 2 ulps (bf16, fp16) of `rms_norm` (the mean of
    squares is summed in a tree) and bit-equal to collectives/fused_norm.py's kernel on the same
    rows (the same `rmsnorm_row`, so every norm of the fused path rounds alike);
  * the bookkeeping equals the torch ops: start = the lengths before, positions = start + t (or
    the given positions, returned as given), lengths advanced in place by n_new (int32 or int64,
    strided, default T);
  * every output element is written (poisoned empties), bad input is refused with its name.
Fresh random inputs per case: hidden sizes and vocabularies that are not powers of two, several
rows and tokens. GPU-only: medium's width in a CUDA graph, replayed over new ids and lengths.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")
from collectives import fused_norm  # noqa: E402
from collectives.communicator import Communicator, rms_norm  # noqa: E402
from model.kernels import embed_norm as en  # noqa: E402
from tests.numerics import assert_within_2_ulps  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poison_empty")  # tests/conftest.py: unwritten outputs show


def _weights(gen, vocab: int, hidden: int, dtype, norm_dtype):
    weight = (torch.randn(vocab, hidden, generator=gen) * torch.logspace(-2, 1, hidden)).to(dtype).to(DEVICE)
    norm_weight = (1 + 0.2 * torch.randn(hidden, generator=gen)).to(norm_dtype).to(DEVICE)
    return weight, norm_weight


def _ids(gen, batch: int, n_tokens: int, low: int, high: int) -> torch.Tensor:
    return torch.randint(low, high, (batch, n_tokens), generator=gen).to(DEVICE)


@pytest.mark.parametrize("dtype,norm_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_rows_and_norm_match_reference(dtype, norm_dtype):
    gen = torch.Generator().manual_seed(11)
    for batch, n_tokens, vocab, hidden, start, valid in [(1, 1, 509, 96, 0, 509), (2, 3, 300, 1000, 600, 250),
                                                        (4, 4, 77, 64, 77, 77), (3, 1, 1000, 2048, 0, 999)]:
        weight, norm_weight = _weights(gen, vocab, hidden, dtype, norm_dtype)
        ids = _ids(gen, batch, n_tokens, start - 20, start + vocab + 20)  # some outside the slice, some negative
        got = en.embed_norm(ids, weight, vocab_start=start, vocab_valid=valid, norm_weight=norm_weight, eps=1e-5)
        want = en.reference_embed_norm(ids, weight, vocab_start=start, vocab_valid=valid, norm_weight=norm_weight,
                                       eps=1e-5)
        assert got.rows.dtype == dtype and torch.equal(got.rows, want.rows)
        assert got.normed.dtype == want.normed.dtype and not got.normed.isnan().any()
        assert_within_2_ulps(got.normed, want.normed)
        same_kernel, _ = fused_norm.add_rmsnorm(want.rows.contiguous(), None, norm_weight, 1e-5)
        assert torch.equal(got.normed, same_kernel)
        assert got.positions is None and got.start is None
        owned = ((ids - start) >= 0) & ((ids - start) < valid)
        assert bool((got.rows[~owned] == 0).all()) and bool(owned.any())


def test_rows_only():
    """Several ranks: the rows alone (a partial sum for the communicator), no norm written."""
    gen = torch.Generator().manual_seed(12)
    weight, _ = _weights(gen, 128, 80, torch.bfloat16, torch.bfloat16)
    ids = _ids(gen, 2, 2, 0, 256)
    got = en.embed_norm(ids, weight, vocab_start=128, vocab_valid=100)
    assert got.normed is None and torch.equal(got.rows, en.reference_embed_norm(ids, weight, vocab_start=128,
                                                                               vocab_valid=100).rows)


@pytest.mark.parametrize("n_new_kind", ["none", "int64", "int32_strided"])
@pytest.mark.parametrize("given_positions", [False, True])
def test_step_bookkeeping(n_new_kind, given_positions):
    gen = torch.Generator().manual_seed(13)
    batch, n_tokens = 3, 5
    weight, norm_weight = _weights(gen, 64, 48, torch.float32, torch.float32)
    ids = _ids(gen, batch, n_tokens, 0, 64)
    lengths = torch.randint(0, 1000, (batch,), generator=gen).to(DEVICE)
    counts = torch.randint(0, n_tokens + 1, (batch, 2), generator=gen).to(DEVICE)  # (B, 2): column 1 is strided
    n_new = {"none": None, "int64": counts[:, 0].contiguous(), "int32_strided": counts.int()[:, 1]}[n_new_kind]
    positions = (lengths[:, None] + torch.tensor([0, 1, 1, 2, 3], device=DEVICE)) if given_positions else None
    ours, theirs = lengths.clone(), lengths.clone()
    got = en.embed_norm(ids, weight, norm_weight=norm_weight, lengths=ours, n_new=n_new, positions=positions)
    want = en.reference_embed_norm(ids, weight, norm_weight=norm_weight, lengths=theirs, n_new=n_new,
                                   positions=positions)
    assert torch.equal(got.start, lengths) and torch.equal(ours, theirs)  # advanced in place, as lengths += n_new
    assert not torch.equal(ours, lengths) or n_new_kind != "none"
    assert got.positions.dtype == torch.int64 and torch.equal(got.positions, want.positions)
    if given_positions:
        assert got.positions is positions
    assert torch.equal(got.rows, want.rows)
    assert_within_2_ulps(got.normed, want.normed)


class _TwoRanks(Communicator):
    """Rank 0 of two in one process: all_reduce adds the other rank's precomputed partial."""

    def __init__(self, other: torch.Tensor) -> None:
        self.rank, self.world_size, self.other, self.calls = 0, 2, other, []

    def all_reduce(self, x):
        self.calls.append("all_reduce")
        return x + self.other

    def allreduce_add_rmsnorm(self, partial, residual, weight, eps, quant_scale=None):
        self.calls.append(("allreduce_add_rmsnorm", residual))
        return super().allreduce_add_rmsnorm(partial, residual, weight, eps, quant_scale)

    all_gather = all_to_all = broadcast = barrier = None


@pytest.mark.parametrize("replicated", [False, True])
def test_step_head_of_two_ranks(replicated):
    """fast_path.step_head on rank 0 of two: its slice's rows (no norm in the kernel) go through ONE
    allreduce_add_rmsnorm with no residual; the residual is the whole embedding, normed its RMSNorm,
    and the context carries the snapshot of the lengths, which advanced. With the table replicated
    on every rank the kernel embeds and norms every id itself and nothing is communicated."""
    from model import fast_path
    from model.attention import KVCache
    gen = torch.Generator().manual_seed(16)
    weight, norm_weight = _weights(gen, 200, 64, torch.float32, torch.float32)  # the whole vocabulary
    ids = _ids(gen, 2, 3, 0, 200)
    other = en.reference_embed_norm(ids, weight[100:], vocab_start=100).rows  # rank 1's partial
    comm = _TwoRanks(other)
    layer = SimpleNamespace(input_layernorm=SimpleNamespace(weight=norm_weight, eps=1e-5))
    table = (SimpleNamespace(weight=weight, vocab_start=0, vocab_valid=200, replicated=True) if replicated
             else SimpleNamespace(weight=weight[:100], vocab_start=0, vocab_valid=100, replicated=False))
    model = SimpleNamespace(embed_tokens=table, layers=[layer], comm=comm, inv_freq=torch.ones(4, device=DEVICE))
    cache = KVCache(1, 2, 32, 1, 8, torch.float32, DEVICE)
    cache.lengths.copy_(torch.tensor([3, 7]))
    normed, residual, ctx = fast_path.step_head(model, ids, cache, None, None, None, static=True)
    assert comm.calls == ([] if replicated else [("allreduce_add_rmsnorm", None), "all_reduce"])
    assert torch.equal(residual, weight[ids])
    assert_within_2_ulps(normed, rms_norm(weight[ids], norm_weight, 1e-5))
    assert torch.equal(ctx.start, torch.tensor([3, 7], device=DEVICE)) and torch.equal(cache.lengths, ctx.start + 3)
    assert torch.equal(ctx.positions, ctx.start[:, None] + torch.arange(3, device=DEVICE))
    assert ctx.n_keys == 32 and ctx.inv_freq is model.inv_freq


@pytest.mark.parametrize("call,message", [
    (lambda w, nw: en.embed_norm(torch.zeros(2, dtype=torch.long, device=DEVICE), w), "token_ids must be \\(B, T\\)"),
    (lambda w, nw: en.embed_norm(torch.zeros(1, 1, device=DEVICE), w), "int32/int64"),
    (lambda w, nw: en.embed_norm(torch.zeros(1, 1, dtype=torch.long, device=DEVICE), w.t()), "unit stride along H"),
    (lambda w, nw: en.embed_norm(torch.zeros(1, 1, dtype=torch.long, device=DEVICE), w, norm_weight=nw[:5]),
     "norm_weight must be"),
    (lambda w, nw: en.embed_norm(torch.zeros(2, 1, dtype=torch.long, device=DEVICE), w,
                                 lengths=torch.zeros(3, dtype=torch.long, device=DEVICE)), "lengths must be"),
    (lambda w, nw: en.embed_norm(torch.zeros(1, 1, dtype=torch.long, device=DEVICE), w,
                                 n_new=torch.ones(1, dtype=torch.long, device=DEVICE)), "go with lengths"),
    (lambda w, nw: en.embed_norm(torch.zeros(1, 2, dtype=torch.long, device=DEVICE), w,
                                 lengths=torch.zeros(1, dtype=torch.long, device=DEVICE),
                                 positions=torch.zeros(1, 3, dtype=torch.long, device=DEVICE)), "positions must be"),
])
def test_refuses_bad_input(call, message):
    weight, norm_weight = _weights(torch.Generator().manual_seed(14), 16, 32, torch.float32, torch.float32)
    with pytest.raises(ValueError, match=message):
        call(weight, norm_weight)


def test_refuses_hidden_sizes_it_cannot_hold():
    weight = torch.zeros(4, en.MAX_HIDDEN + 1, device=DEVICE)
    assert not en.available(torch.zeros(1, 1, dtype=torch.long, device=DEVICE), weight)
    with pytest.raises(ValueError, match=f"H <= {en.MAX_HIDDEN}"):
        en.embed_norm(torch.zeros(1, 1, dtype=torch.long, device=DEVICE), weight)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs: GPU only")
def test_gpu_graph_replay_at_medium_width():
    """Medium's embedding (32768 x 2048 bf16), captured once, replayed over new ids and lengths:
    each replay writes what the reference computes for them, and advances the lengths."""
    gen = torch.Generator().manual_seed(15)
    weight, norm_weight = _weights(gen, 32768, 2048, torch.bfloat16, torch.bfloat16)
    ids = _ids(gen, 2, 1, 0, 32768)
    lengths = torch.tensor([5, 9], device=DEVICE)
    n_new = torch.ones(2, dtype=torch.long, device=DEVICE)
    en.embed_norm(ids, weight, norm_weight=norm_weight, lengths=lengths.clone(), n_new=n_new)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step = en.embed_norm(ids, weight, norm_weight=norm_weight, lengths=lengths, n_new=n_new)
    for replay in range(3):
        ids.copy_(_ids(gen, 2, 1, 0, 32768))
        before = lengths.clone()
        graph.replay()
        torch.cuda.synchronize()
        want = en.reference_embed_norm(ids, weight, norm_weight=norm_weight, lengths=before.clone(), n_new=n_new)
        assert torch.equal(step.rows, want.rows) and torch.equal(step.positions, want.positions)
        assert torch.equal(step.start, before) and torch.equal(lengths, before + 1)
        assert_within_2_ulps(step.normed, want.normed)
