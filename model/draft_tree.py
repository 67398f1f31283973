"""Growing the EAGLE-2 dynamic draft tree (a chain is the tree with top_k = 1), and the inputs
that let the target verify every node in ONE forward.

Growth, for each batch row at once:
  depth 1: the root's draft distribution (from the draft's catch-up forward) gives top_k children.
  depth d: the top_k nodes of depth d-1 by cumulative log-probability (the frontier) go through the
           draft, each yields top_k children, and all top_k^2 become candidates of depth d.
  finally: the best `tokens` candidates of all depths, by cumulative log-probability, are the tree.
Log-probabilities never rise along a path, so the best-n set always contains every selected
node's ancestors (ties go to the shallower node, which the stable sort below guarantees).

Each draft forward re-runs ALL frontier nodes drafted so far with an ancestor mask, and the draft's
KV cache is rolled back to the committed prefix afterwards. Speculative draft states thus never
outlive the step that made them (the committed draft cache only ever holds rows computed from
target features), and a node never needs a cached key it could not see. The price is re-running
a few earlier rows per depth, which is noise next to the attention over the prefix.

Sampling rows of a chain draw each draft token from the draft distribution q (the proposal that
Leviathan et al.'s rejection rule needs) and keep q over the target vocabulary; tree nodes are
deterministic top-k picks, which the acceptance rule treats as point-mass proposals.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from collectives.communicator import Communicator
from model.attention import KVCache
from model.eagle3 import Eagle3Draft
from model.sampling import SamplingParams, filter_logits


@dataclass
class Tree:
    tokens: torch.Tensor  # (B, N) target ids of the drafted nodes, ancestors before descendants
    parents: torch.Tensor  # (B, N) verification row of each node's parent (row 0 is the root)
    depths: torch.Tensor  # (B, N) 1 = a child of the root
    proposals: torch.Tensor | None = None  # (B, N, V) q each node was sampled from; None: top-k picks

    def verify_inputs(self, root: torch.Tensor, start: torch.Tensor):
        """root: (B,) last accepted tokens; start: (B,) target cache lengths. Returns tokens (B, N+1),
        positions (B, N+1) = start + depth, and the mask (B, N+1, N+1): ancestors and self."""
        tokens = torch.cat([root[:, None], self.tokens], dim=1)
        depths = torch.cat([torch.zeros_like(self.depths[:, :1]), self.depths], dim=1)
        return tokens, start[:, None] + depths, ancestor_mask(self.parents)


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """parents: (B, N) row of each node's parent among rows 0..N (0: the root), parents first.
    Returns (B, N+1, N+1) bool: row i sees row j iff j is i or an ancestor of i."""
    batch, n = parents.shape
    visible = torch.eye(n + 1, dtype=torch.bool, device=parents.device).repeat(batch, 1, 1)
    rows = torch.arange(batch, device=parents.device)
    for i in range(n):
        visible[:, i + 1] |= visible[rows, parents[:, i]]
    return visible


def draft_topk(local_logits: torch.Tensor, k: int, vocab_start: int, comm: Communicator):
    """local_logits: (M, Vd_r), this rank's slice of the draft vocabulary. Returns the global top-k
    log-probabilities and draft ids, (M, k) each, equal on all ranks: one small all-gather."""
    local_logits = local_logits.float()
    lse = torch.logsumexp(local_logits, dim=-1, keepdim=True)  # (M, 1)
    values, ids = local_logits.topk(min(k, local_logits.shape[-1]), dim=-1)  # (M, k')
    packed = torch.cat([values, (ids + vocab_start).float(), lse], dim=-1)  # ids < 2^24: exact in fp32
    gathered = comm.all_gather(packed[None], dim=0)  # (W, M, 2k'+1)
    kk = values.shape[-1]
    all_values = gathered[..., :kk].permute(1, 0, 2).flatten(1)  # (M, W*k')
    all_ids = gathered[..., kk:2 * kk].permute(1, 0, 2).flatten(1)
    total = torch.logsumexp(gathered[..., -1], dim=0)  # (M,)
    top_values, where = all_values.topk(k, dim=-1)
    return (top_values - total[:, None]).clamp(max=0.0), all_ids.gather(1, where).long()


def draft_distributions(draft: Eagle3Draft, local_logits: torch.Tensor, params: list[SamplingParams]):
    """local_logits: (M, Vd_r), one row per sampling batch row. One all-gather; returns q over the
    draft vocabulary (M, Vd) (to sample from) and over the target vocabulary (M, V) (to accept with)."""
    # (M, Vd) on the CPU, where the requests' seeded generators draw
    full = draft.comm.all_gather(local_logits, dim=-1)[:, : draft.cfg.draft_vocab_size].float().cpu()
    q_draft = torch.empty_like(full, dtype=torch.float32)  # (M, Vd)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):  # rows that filter alike go together
        groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
    for i in groups.values():
        q_draft[i] = torch.softmax(filter_logits(full[i], params[i[0]]), dim=-1)
    q_target = q_draft.new_zeros(len(q_draft), draft.cfg.vocab_size)
    q_target[:, draft.to_target_ids(torch.arange(q_draft.shape[1], device=draft.d2t.device)).cpu()] = q_draft
    return q_draft, q_target


class TreeGrower:
    """Grows one tree per batch row from the root's draft logits and pre-norm hidden state."""

    def __init__(self, draft: Eagle3Draft, cache: KVCache, shape: tuple[int, int, int],
                 params: list[SamplingParams], generators: list[torch.Generator]) -> None:
        self.draft, self.cache = draft, cache
        self.top_k, self.depth, self.n_tokens = shape
        # rows that sample draft tokens from q (chains only; tree picks are deterministic)
        self.sampled = [b for b, p in enumerate(params) if not p.greedy] if self.top_k == 1 else []
        self.params, self.generators = params, generators

    def children(self, local_logits: torch.Tensor, parent_scores: torch.Tensor, proposals: list):
        """local_logits: (B, F, Vd_r) of F parents with scores (B, F). Returns the top_k children of
        every parent: cumulative scores and draft ids, (B, F*k) each."""
        batch, n_parents, _ = local_logits.shape
        logp, ids = draft_topk(local_logits.flatten(0, 1), self.top_k, self.draft.shard.vocab_start, self.draft.comm)
        logp, ids = logp.view(batch, n_parents * self.top_k), ids.view(batch, n_parents * self.top_k)
        if self.sampled:  # chain: F = k = 1; draw the child from q instead of taking the best
            rows = torch.tensor(self.sampled, device=ids.device)
            q_draft, q_target = draft_distributions(self.draft, local_logits[rows, 0],
                                                    [self.params[b] for b in self.sampled])
            for q, b in zip(q_draft, self.sampled):
                ids[b, 0] = int(torch.multinomial(q, 1, generator=self.generators[b]))
            q_rows = q_target.new_zeros(batch, q_target.shape[1])
            q_rows[rows.cpu()] = q_target
            proposals.append(q_rows)  # (B, V); greedy rows keep zeros and never read them
        return parent_scores.repeat_interleave(self.top_k, dim=1) + logp, ids

    def grow(self, root_logits: torch.Tensor, root_hidden: torch.Tensor) -> Tree:
        """root_logits: (B, Vd_r); root_hidden: (B, H). The draft cache holds the committed prefix
        (root row included) and is left exactly so."""
        k, batch, device = self.top_k, root_logits.shape[0], root_logits.device
        start = self.cache.lengths.clone()  # (B,) the root sits at position start - 1
        proposals: list = []
        scores, ids = self.children(root_logits[:, None], torch.zeros(batch, 1, device=device), proposals)  # (B, k)
        pool_scores, pool_ids = [scores], [ids]
        pool_parent = [torch.full((batch, k), -1, dtype=torch.long, device=device)]  # pool index, -1 = root
        frontier = torch.arange(k, device=device).expand(batch, k)  # pool indices of the frontier
        # frontier nodes drafted so far: pool index, parent among them (-1: root), hidden state fed in
        done_pool = torch.empty(batch, 0, dtype=torch.long, device=device)
        done_parent = torch.empty(batch, 0, dtype=torch.long, device=device)
        done_hidden = root_hidden.new_empty(batch, 0, root_hidden.shape[-1])
        parent_hidden = root_hidden[:, None].expand(batch, k, -1)  # (B, k, H)
        for depth in range(2, self.depth + 1):
            parent_rows = _index_of(torch.cat(pool_parent, 1).gather(1, frontier), done_pool)  # (B, k), -1 = root
            done_pool = torch.cat([done_pool, frontier], dim=1)
            done_parent = torch.cat([done_parent, parent_rows], dim=1)
            done_hidden = torch.cat([done_hidden, parent_hidden], dim=1)  # (B, P, H)
            out = self._draft_forward(done_pool, done_parent, done_hidden, torch.cat(pool_ids, 1), start)
            parent_hidden = out.hidden[:, -k:]  # (B, k, H) outputs of the frontier just drafted
            scores, ids = self.children(out.logits, torch.cat(pool_scores, 1).gather(1, frontier), proposals)
            offset = sum(s.shape[1] for s in pool_scores)
            pool_scores.append(scores)
            pool_ids.append(ids)
            pool_parent.append(frontier.repeat_interleave(k, dim=1))
            frontier = offset + scores.topk(k, dim=-1).indices.sort(dim=-1).values  # (B, k)
        return self._select(torch.cat(pool_scores, 1), torch.cat(pool_ids, 1), torch.cat(pool_parent, 1), proposals)

    def _draft_forward(self, pool, parent_rows, hidden, all_ids, start):
        """Runs the frontier nodes drafted so far (B, P) through the draft, then rolls its cache back."""
        depth = _depths(parent_rows)  # (B, P) 1-based
        tokens = self.draft.to_target_ids(all_ids.gather(1, pool))
        mask = ancestor_mask(parent_rows + 1)[:, 1:, 1:]  # (B, P, P)
        return self._run_draft(tokens, hidden, start[:, None] - 1 + depth, mask, start)

    def _run_draft(self, tokens, hidden, positions, mask, start):
        """The draft over P nodes: tokens, positions (B, P), hidden (B, P, H), mask (B, P, P); logits
        of the last top_k rows (the frontier). The cache is rolled back to `start` after. A CUDA
        graph of this call replaces it in workers/spec_graphs.py."""
        batch, n = tokens.shape
        frontier_rows = torch.arange(n - self.top_k, n, device=tokens.device).expand(batch, -1)
        out = self.draft(tokens, self.cache, hidden=hidden, positions=positions, step_mask=mask,
                         logit_rows=frontier_rows)
        self.cache.rollback(start)
        return out

    def _select(self, scores, ids, parent, proposals) -> Tree:
        """The best n_tokens candidates (B, M) of the pool, in pool order (ancestors first)."""
        batch = scores.shape[0]
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, : self.n_tokens]
        chosen = order.sort(dim=-1).values  # (B, N) pool indices
        parent_pool = parent.gather(1, chosen)
        parent_rows = _index_of(parent_pool, chosen) + 1  # 0 = root
        if bool(((parent_pool >= 0) & (parent_rows == 0)).any()):
            raise AssertionError("draft tree selection dropped an ancestor of a selected node")
        depths = _depths(parent_rows - 1)
        tree_proposals = torch.stack(proposals, dim=1) if proposals else None  # chains: node i = depth i+1
        tokens = self.draft.to_target_ids(ids.gather(1, chosen))
        return Tree(tokens=tokens, parents=parent_rows, depths=depths,
                    proposals=tree_proposals[:, : chosen.shape[1]] if tree_proposals is not None else None)


def _index_of(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """For values (B, M), their column in table (B, P) row-wise; -1 where absent (or value < 0)."""
    if table.shape[1] == 0:
        return torch.full_like(values, -1)
    hit = values[:, :, None] == table[:, None, :]  # (B, M, P)
    return torch.where(hit.any(-1), hit.int().argmax(-1), -1)


def _depths(parent_rows: torch.Tensor) -> torch.Tensor:
    """parent_rows: (B, P) parent among the same rows (-1: the root), parents first. Depth, 1-based."""
    depth = torch.ones_like(parent_rows)
    for i in range(parent_rows.shape[1]):
        has = parent_rows[:, i] >= 0
        depth[:, i] = torch.where(has, depth.gather(1, parent_rows[:, i:i + 1].clamp(min=0))[:, 0] + 1, 1)
    return depth
