"""Greedy acceptance and the commit of an accepted path as a fixed set of tensor ops on the device.

Why: at batch 1 a speculative step's forwards are CUDA-graph replays of a few hundred us, and each
eager torch op between them costs ~8-10 us of host time; reading the target's choices back to
walk the tree on the host would also stop the host once per step for nothing. Here every shape is
fixed by the tree shape, nothing is read back, and so the whole step, glue included, can be
captured in one graph (workers/spec_graphs.py). The host reads one small table per step.

Greedy acceptance keeps a node iff it and each of its ancestors carry the target's argmax at their
parent; that is `model.acceptance.accept_greedy`'s walk, because siblings carry distinct tokens
(top-k picks of one distribution, mapped by a d2t that the checkpoint loader checks injective), so
at most one child of a node can match and the kept nodes form one path from the root. Sampling
rows are decided on the host (`accept_sampled`) and written over their rows (`with_host_rows`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from model.attention import KVCache
from model.draft_tree import Tree


@dataclass
class Verdict:
    n_accepted: torch.Tensor  # (B,) drafts kept
    extra: torch.Tensor  # (B,) the target's token after the kept path
    keep: torch.Tensor  # (B, W) verification rows of the root and the kept path, in order; later entries: padding
    after: torch.Tensor  # (B, W) the row whose token follows keep[:, i] on the path (padding alike)
    in_place: bool  # every kept path is rows 1..n (a chain): its KV rows are already where they belong


@dataclass
class Pending:
    """What the draft reads next (its catch-up), and the new root."""

    tokens: torch.Tensor  # (B, W) the kept path's tokens, then the extra token; padding after n
    features: torch.Tensor  # (B, W, F) the target feature of each kept row
    n: torch.Tensor  # (B,) kept rows: 1 + n_accepted, 0 for a finished row
    last: torch.Tensor  # (B,) row of the last kept one (0 for a finished row)
    root: torch.Tensor  # (B,) the extra token: the next step's root


@dataclass(frozen=True)
class _Rows:
    keep: torch.Tensor  # (B, W + 1) 0..W, clamped to the last verification row N (padding must be a row)
    after: torch.Tensor  # (B, W) keep[1:] and its last entry again
    nodes: torch.Tensor  # (B, N) 1..N


@lru_cache(maxsize=32)
def _rows(batch: int, width: int, n: int, device: torch.device) -> _Rows:
    keep = torch.arange(width + 1, device=device).clamp(max=n).repeat(batch, 1)
    return _Rows(keep=keep, after=torch.cat([keep[:, 1:width], keep[:, width - 1: width]], dim=1),
                 nodes=torch.arange(1, n + 1, device=device).repeat(batch, 1))


def verdict_tables(batch: int, width: int, n: int, device: torch.device) -> _Rows:
    """The fixed rows greedy_verdict reads (a CUDA graph that captured them holds on to them)."""
    return _rows(batch, width, n, device)


def greedy_verdict(tree: Tree, argmax: torch.Tensor, width: int) -> Verdict:
    """argmax: (B, N+1) the target's choice at the root and every node. width: W > the deepest
    path (depth + 1, the draft's catch-up block)."""
    batch, n = tree.tokens.shape
    rows = _rows(batch, width, n, argmax.device)
    if tree.chain:  # node i's parent is row i: the kept path is the matching prefix
        n_accepted = (tree.tokens == argmax[:, :n]).cumprod(dim=1).sum(dim=1)  # (B,)
        extra = argmax.gather(1, n_accepted[:, None])[:, 0]
        return Verdict(n_accepted, extra, rows.keep[:, :width], rows.after, in_place=True)
    wrong = tree.tokens != argmax.gather(1, tree.parents)  # (B, N) not the target's choice at its parent
    kept = ~(tree.mask[:, 1:, 1:] & wrong[:, None, :]).any(dim=-1)  # (B, N) no wrong node on the way
    n_accepted = kept.sum(dim=1)
    extra = argmax.gather(1, (kept * rows.nodes).amax(dim=1, keepdim=True))[:, 0]  # at the deepest kept row
    keep = rows.keep.clone()  # a kept node of depth d is path entry d; the rest go to column W, dropped
    keep.scatter_(1, torch.where(kept, tree.depths, width), rows.nodes)
    keep = keep[:, :width]
    return Verdict(n_accepted, extra, keep, torch.cat([keep[:, 1:], keep[:, -1:]], dim=1), in_place=False)


def with_host_rows(verdict: Verdict, rows: list[int], decided: list[tuple[list[int], int]], n: int) -> Verdict:
    """The verdict with batch rows `rows` replaced by host decisions (accepted rows, extra token),
    e.g. of `model.acceptance.accept_sampled`. One upload."""
    width = verdict.keep.shape[1]
    table = []
    for b, (path, extra) in zip(rows, decided):
        keep = [0] + path + [min(i, n) for i in range(len(path) + 1, width + 1)]  # (W + 1)
        table.append([b, len(path), extra] + keep)
    table = torch.tensor(table, device=verdict.keep.device)  # (R, 3 + W + 1)
    index = table[:, 0]
    keep = verdict.keep.index_copy(0, index, table[:, 3: 3 + width])
    after = verdict.after.index_copy(0, index, table[:, 4:])
    in_place = verdict.in_place and all(path == list(range(1, len(path) + 1)) for path, _ in decided)
    return replace(verdict, n_accepted=verdict.n_accepted.index_copy(0, index, table[:, 1]),
                   extra=verdict.extra.index_copy(0, index, table[:, 2]), keep=keep, after=after, in_place=in_place)


def commit(cache: KVCache, start: torch.Tensor, tokens: torch.Tensor, features: torch.Tensor, verdict: Verdict,
           active: torch.Tensor) -> Pending:
    """Keeps the root and the accepted path of every active row (active: (B,) 1 / 0): their target
    KV rows, which the verification step wrote at slots start + row, are compacted into place and
    the rest forgotten. tokens: (B, N+1) the verification step's; features: (B, N+1, F) its target
    features. Returns the draft's next block: each kept row's feature paired with the token after
    it, the last with the extra token."""
    n_keep = (verdict.n_accepted + 1) * active  # (B,)
    if verdict.in_place:
        cache.lengths.copy_(start + n_keep)
    else:
        cache.compact(start, verdict.keep, n_keep)
    pending = tokens.gather(1, verdict.after)  # (B, W)
    pending.scatter_(1, verdict.n_accepted[:, None], verdict.extra[:, None])
    width = verdict.keep.shape[1]
    if verdict.in_place and features.shape[1] == width:  # the kept rows are rows 0..W-1 already
        kept_features = features
    else:
        kept_features = features.gather(1, verdict.keep[..., None].expand(-1, -1, features.shape[-1]))
    return Pending(tokens=pending, features=kept_features, n=n_keep, last=verdict.n_accepted * active,
                   root=verdict.extra)
