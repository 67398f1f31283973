"""The static-shaped speculative glue against references written node by node, fp32 on CPU, fresh
random inputs, exact equality:
  * ancestor_mask (repeated squaring) equals the row-by-row walk, for random forests;
  * TreeGrower (a chain's own path; a tree's vectorized bookkeeping) grows the trees that the
    node-by-node reference grows (tests/draft_tree_reference.py) with a random draft, over chain
    and tree shapes, depth 1 included, and leaves the draft cache's lengths as it found them;
  * greedy_verdict keeps what model.acceptance.accept_greedy keeps, for chains and random trees
    whose target argmax often follows a drafted child; host decisions replace their rows;
  * commit moves the kept KV rows into place (and only sets lengths for a chain), hands the draft
    the kept tokens and features, and leaves a finished row's length alone.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from model.acceptance import accept_greedy
from model.attention import KVCache
from model.config import tiny
from model.draft_tree import Tree, TreeGrower, ancestor_mask, tree_layout
from model.sampling import SamplingParams
from model.spec_verdict import commit, greedy_verdict, with_host_rows
from tests.draft_tree_reference import depths_of, reference_ancestor_mask, reference_grow
from tests.spec_reference import random_draft
from tests.spec_reference import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(1, 5, 5), (1, 4, 2), (1, 1, 1), (4, 5, 8), (3, 4, 3), (2, 6, 9), (3, 1, 2), (2, 3, 6)]


def random_parents(batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """(B, n) parent rows among 0..n (0: the root), parents before children."""
    return torch.stack([torch.randint(0, i + 1, (batch,), generator=gen) for i in range(n)], dim=1)


@pytest.mark.parametrize("n", [1, 2, 5, 12])
def test_ancestor_mask_equals_the_row_by_row_walk(n):
    gen = torch.Generator().manual_seed(n)
    for _ in range(5):
        parents = random_parents(3, n, gen)
        want = reference_ancestor_mask(parents)
        assert torch.equal(ancestor_mask(parents), want)
        deepest = int(depths_of(parents - 1).max())
        assert torch.equal(ancestor_mask(parents, deepest), want)  # the bound on depth is all it needs


@pytest.fixture(scope="module")
def draft():
    """A random draft with a random embedding (a fresh target's is zeros: every token would look
    alike, and so would the hidden states of sibling nodes) and a peaked head (trees reach their
    full depth), so which hidden state each node reads, past depth 2, decides what is grown."""
    cfg = dataclasses.replace(tiny(96), hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=16)
    draft = random_draft(cfg, seed=5, draft_vocab=48, std=0.2).eval()
    with torch.no_grad():
        draft.lm_head.weight.mul_(5.0)
        embed = draft.target.embed.weight
        embed.copy_(torch.randn(embed.shape, generator=torch.Generator().manual_seed(6)))
    return draft


def _filled_caches(draft, batch: int, gen: torch.Generator) -> tuple[KVCache, KVCache]:
    """Two draft caches holding the same random prefix of rows' own lengths."""
    lengths = torch.randint(3, 12, (batch,), generator=gen)
    tokens = torch.randint(0, draft.cfg.vocab_size, (batch, int(lengths.max())), generator=gen)
    features = torch.randn(batch, tokens.shape[1], draft.cfg.n_aux * draft.cfg.target_hidden_size, generator=gen)
    caches = (draft.new_cache(batch, 64), draft.new_cache(batch, 64))
    for cache in caches:
        draft(tokens, cache, target_features=features, n_new=lengths)
    return caches


@pytest.mark.parametrize("shape", SHAPES)
def test_grower_equals_the_node_by_node_reference(draft, shape):
    batch = 3
    gen = torch.Generator().manual_seed(sum(shape))
    depths = set()
    for _ in range(3):
        fast_cache, reference_cache = _filled_caches(draft, batch, gen)
        root_logits = torch.randn(batch, draft.cfg.draft_vocab_size, generator=gen) * 3
        root_hidden = torch.randn(batch, draft.cfg.hidden_size, generator=gen)
        start = fast_cache.lengths.clone()
        grower = TreeGrower(draft, fast_cache, shape, [SamplingParams()] * batch, [None] * batch)
        got = grower.grow(root_logits, root_hidden)
        want = reference_grow(draft, reference_cache, shape, root_logits, root_hidden)
        assert torch.equal(got.tokens, want.tokens)
        assert torch.equal(got.parents, want.parents) and torch.equal(got.depths, want.depths)
        assert torch.equal(got.mask, reference_ancestor_mask(want.parents))
        assert got.chain == (shape[0] == 1) and got.proposals is None
        assert torch.equal(fast_cache.lengths, start)
        depths.update(got.depths.flatten().tolist())
    assert max(depths) == min(shape[1], shape[2]), "no tree reached its full depth"


def _random_tree(batch: int, n: int, vocab: int, gen: torch.Generator) -> tuple[Tree, torch.Tensor]:
    """A random tree with distinct tokens, and a target argmax (B, N+1) that follows a random child
    of a row more often than not."""
    parents = random_parents(batch, n, gen)
    tokens = torch.stack([torch.randperm(vocab, generator=gen)[:n] for _ in range(batch)])
    argmax = torch.randint(0, vocab, (batch, n + 1), generator=gen)
    for b in range(batch):
        for row in range(n + 1):
            children = (parents[b] == row).nonzero()[:, 0]
            if len(children) and torch.rand((), generator=gen) < 0.7:
                argmax[b, row] = tokens[b, children[torch.randint(0, len(children), (), generator=gen)]]
    tree = Tree(tokens=tokens, parents=parents, depths=depths_of(parents - 1), mask=ancestor_mask(parents))
    return tree, argmax


def _chain(batch: int, n: int, vocab: int, gen: torch.Generator) -> tuple[Tree, torch.Tensor]:
    tokens = torch.randint(0, vocab, (batch, n), generator=gen)
    argmax = torch.cat([tokens, torch.randint(0, vocab, (batch, 1), generator=gen)], dim=1)
    wrong = torch.rand(batch, n, generator=gen) < 0.3
    argmax[:, :n][wrong] = (argmax[:, :n][wrong] + 1) % vocab
    return dataclasses.replace(tree_layout((1, n, n), batch, torch.device("cpu")).chain, tokens=tokens), argmax


def _check_verdict(verdict, tree: Tree, argmax: torch.Tensor, width: int) -> None:
    n = tree.tokens.shape[1]
    for b in range(tree.tokens.shape[0]):
        path, extra = accept_greedy(argmax[b].tolist(), tree.tokens[b].tolist(), tree.parents[b].tolist())
        assert int(verdict.n_accepted[b]) == len(path) and int(verdict.extra[b]) == extra
        keep = verdict.keep[b].tolist()
        assert keep[: len(path) + 1] == [0] + path
        assert all(0 <= row <= n for row in keep) and len(keep) == width
        assert verdict.after[b].tolist()[: len(path)] == path


@pytest.mark.parametrize("n", [1, 3, 8])
def test_greedy_verdict_keeps_what_the_greedy_walk_keeps(n):
    gen = torch.Generator().manual_seed(n)
    for make in (_random_tree, _chain):
        for _ in range(20):
            tree, argmax = make(4, n, 50, gen)
            width = int(tree.depths.max()) + 1
            verdict = greedy_verdict(tree, argmax, width)
            assert verdict.in_place == tree.chain
            _check_verdict(verdict, tree, argmax, width)


def test_host_decisions_replace_their_rows():
    gen = torch.Generator().manual_seed(1)
    tree, argmax = _random_tree(4, 6, 50, gen)
    width = int(tree.depths.max()) + 1
    verdict = greedy_verdict(tree, argmax, width)
    path = [1] if int(tree.parents[2, 0]) == 0 else []  # node 1's parent is the root: a valid path
    patched = with_host_rows(verdict, [2], [(path, 7)], n=6)
    assert int(patched.n_accepted[2]) == len(path) and int(patched.extra[2]) == 7
    assert patched.keep[2, : len(path) + 1].tolist() == [0] + path and int(patched.keep[2].max()) <= 6
    for field in ("n_accepted", "extra", "keep", "after"):  # other rows untouched
        keep_rows = [0, 1, 3]
        assert torch.equal(getattr(patched, field)[keep_rows], getattr(verdict, field)[keep_rows])


@pytest.mark.parametrize("make", [_random_tree, _chain])
def test_commit_moves_the_kept_rows_into_place(make):
    gen = torch.Generator().manual_seed(3)
    batch, n, layers = 4, 6, 2
    tree, argmax = make(batch, n, 50, gen)
    width = n + 1 if tree.chain else int(tree.depths.max()) + 1
    verdict = greedy_verdict(tree, argmax, width)
    cache = KVCache(layers, batch, 40, 2, 8, torch.float32)
    for stored in cache.k + cache.v:
        stored.copy_(torch.randn(stored.shape, generator=gen))
    before = [stored.clone() for stored in cache.k + cache.v]
    start = torch.randint(2, 20, (batch,), generator=gen)
    cache.lengths.copy_(start + n + 1)  # the verification step wrote root + N rows
    tokens = torch.cat([torch.randint(0, 50, (batch, 1), generator=gen), tree.tokens], dim=1)
    features = torch.randn(batch, n + 1, 5, generator=gen)
    active = torch.tensor([1, 1, 0, 1])
    pending = commit(cache, start, tokens, features, verdict, active)
    for b in range(batch):
        kept = int(verdict.n_accepted[b]) + 1 if active[b] else 0
        assert int(cache.lengths[b]) == int(start[b]) + kept and int(pending.n[b]) == kept
        rows = verdict.keep[b, :kept].tolist()
        for stored, old in zip(cache.k + cache.v, before):
            assert torch.equal(stored[b, :, : int(start[b])], old[b, :, : int(start[b])])  # the prefix stays
            for i, row in enumerate(rows):
                assert torch.equal(stored[b, :, int(start[b]) + i], old[b, :, int(start[b]) + row])
        if kept:
            path_tokens = tokens[b, rows[1:]].tolist() + [int(verdict.extra[b])]
            assert pending.tokens[b, :kept].tolist() == path_tokens
            assert torch.equal(pending.features[b, :kept], features[b, rows])
            assert int(pending.last[b]) == kept - 1
    assert torch.equal(pending.root, verdict.extra)


def test_target_ids_follow_every_change_of_d2t():
    """to_target_ids reads a cached table: it must follow d2t's in-place changes (a load, a new
    draft vocabulary), and work for a draft made in inference mode (no version counter)."""
    cfg = dataclasses.replace(tiny(96), hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=16)
    ids = torch.tensor([[0, 5, 47], [3, 3, 1]])
    draft = random_draft(cfg, seed=5, draft_vocab=48)
    assert torch.equal(draft.to_target_ids(ids), ids + draft.d2t[ids])
    draft.set_draft_vocab(torch.arange(48) * 2)
    assert torch.equal(draft.to_target_ids(ids), ids * 2)
    with torch.no_grad():
        draft.d2t.copy_(torch.arange(48) + 1)  # what loading a checkpoint does
    assert torch.equal(draft.to_target_ids(ids), 2 * ids + 1)
    with torch.inference_mode():
        frozen = random_draft(cfg, seed=7, draft_vocab=48)
    assert torch.equal(frozen.to_target_ids(ids), ids + frozen.d2t[ids])
