"""The reference the draft tree's fast path is tested against: EAGLE-2 growth written node by node
(each drafted row's depth by walking its parents, its ancestor mask row by row, every index found
by search), as model/draft_tree.py once did before it was made static-shaped. Greedy rows only.

It is slow on a GPU (hundreds of launches a step) and that is all that was wrong with it; it is
kept here so the vectorized grower has something independent to equal, tree for tree.
"""
from __future__ import annotations

import torch

from model.draft_tree import Tree


def reference_ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """parents: (B, N) parent rows among 0..N (0: the root), parents first -> (B, N+1, N+1) bool."""
    batch, n = parents.shape
    visible = torch.eye(n + 1, dtype=torch.bool).repeat(batch, 1, 1)
    rows = torch.arange(batch)
    for i in range(n):
        visible[:, i + 1] |= visible[rows, parents[:, i].cpu()]
    return visible.to(parents.device)


def index_of(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """For values (B, M), their column in table (B, P) row-wise; -1 where absent (or value < 0)."""
    if table.shape[1] == 0:
        return torch.full_like(values, -1)
    hit = values[:, :, None] == table[:, None, :]  # (B, M, P)
    return torch.where(hit.any(-1), hit.int().argmax(-1), -1)


def depths_of(parent_rows: torch.Tensor) -> torch.Tensor:
    """parent_rows: (B, P) parent among the same rows (-1: the root), parents first. Depth, 1-based."""
    depth = torch.ones_like(parent_rows)
    for i in range(parent_rows.shape[1]):
        has = parent_rows[:, i] >= 0
        depth[:, i] = torch.where(has, depth.gather(1, parent_rows[:, i:i + 1].clamp(min=0))[:, 0] + 1, 1)
    return depth


def reference_topk(local_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """World size 1: (log-probabilities, draft ids) of the top k, (M, k) each."""
    logits = local_logits.float()
    values, ids = logits.topk(k, dim=-1)
    return (values - torch.logsumexp(logits, dim=-1, keepdim=True)).clamp(max=0.0), ids


def reference_grow(draft, cache, shape: tuple[int, int, int], root_logits: torch.Tensor,
                   root_hidden: torch.Tensor) -> Tree:
    """Greedy EAGLE-2 growth over `cache` (left as it was), node by node."""
    k, max_depth, n_tokens = shape
    batch, device = root_logits.shape[0], root_logits.device
    start = cache.lengths.clone()
    scores, ids = reference_topk(root_logits, k)  # (B, k)
    pool_scores, pool_ids = [scores], [ids]
    pool_parent = [torch.full((batch, k), -1, dtype=torch.long, device=device)]  # pool index, -1 = root
    frontier = torch.arange(k, device=device).expand(batch, k)
    done_pool = torch.empty(batch, 0, dtype=torch.long, device=device)
    done_parent = torch.empty(batch, 0, dtype=torch.long, device=device)
    done_hidden = root_hidden.new_empty(batch, 0, root_hidden.shape[-1])
    parent_hidden = root_hidden[:, None].expand(batch, k, -1)
    for _ in range(2, max_depth + 1):
        parent_rows = index_of(torch.cat(pool_parent, 1).gather(1, frontier), done_pool)  # (B, k), -1 = root
        done_pool = torch.cat([done_pool, frontier], dim=1)
        done_parent = torch.cat([done_parent, parent_rows], dim=1)
        done_hidden = torch.cat([done_hidden, parent_hidden], dim=1)
        n = done_pool.shape[1]
        out = draft(draft.to_target_ids(torch.cat(pool_ids, 1).gather(1, done_pool)), cache, hidden=done_hidden,
                    positions=start[:, None] - 1 + depths_of(done_parent),
                    step_mask=reference_ancestor_mask(done_parent + 1)[:, 1:, 1:],
                    logit_rows=torch.arange(n - k, n, device=device).expand(batch, -1))
        cache.lengths.copy_(start)
        logp, child = reference_topk(out.logits.flatten(0, 1), k)
        scores = torch.cat(pool_scores, 1).gather(1, frontier).repeat_interleave(k, dim=1) + logp.view(batch, k * k)
        offset = sum(s.shape[1] for s in pool_scores)
        pool_scores.append(scores)
        pool_ids.append(child.view(batch, k * k))
        pool_parent.append(frontier.repeat_interleave(k, dim=1))
        new_frontier = offset + scores.topk(k, dim=-1).indices.sort(dim=-1).values
        # each new frontier node reads its parent's output (the parent is in the frontier just drafted)
        parent_of_new = index_of(torch.cat(pool_parent, 1).gather(1, new_frontier), done_pool)
        parent_hidden = torch.stack([out.hidden[b, parent_of_new[b]] for b in range(batch)])
        frontier = new_frontier
    scores, ids, parent = torch.cat(pool_scores, 1), torch.cat(pool_ids, 1), torch.cat(pool_parent, 1)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :n_tokens]
    chosen = order.sort(dim=-1).values
    parent_pool = parent.gather(1, chosen)
    parent_rows = index_of(parent_pool, chosen) + 1
    assert not bool(((parent_pool >= 0) & (parent_rows == 0)).any()), "the selection dropped an ancestor"
    return Tree(tokens=draft.to_target_ids(ids.gather(1, chosen)), parents=parent_rows,
                depths=depths_of(parent_rows - 1))
