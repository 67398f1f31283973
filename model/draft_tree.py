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

Why the code looks as it does: on a GPU each torch op between the draft's forwards costs ~8-10 us
of host time, more than the forwards themselves at batch 1, and the step is captured in a CUDA
graph where nothing may be read back. So every shape is fixed by (top_k, depth, tokens), what
the shape alone decides (which drafted row is whose, its depth, a chain's parents and causal
mask) is built once per shape (`tree_layout`), and the rest is a fixed handful of ops per depth:
no per-node loops, no host reads. A chain takes a path of its own (the top-1 child per depth).

Sampling rows of a chain draw each draft token from the draft distribution q (the proposal that
Leviathan et al.'s rejection rule needs) and keep q over the target vocabulary; tree nodes are
deterministic top-k picks, which the acceptance rule treats as point-mass proposals.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

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
    mask: torch.Tensor | None = None  # (B, N+1, N+1) ancestors and self; None: built from parents
    chain: bool = False  # node i is the child of node i-1 (parents 0..N-1): accepted paths are prefixes

    def verify_inputs(self, root: torch.Tensor, start: torch.Tensor):
        """root: (B,) last accepted tokens; start: (B,) target cache lengths. Returns tokens (B, N+1),
        positions (B, N+1) = start + depth, and the mask (B, N+1, N+1): ancestors and self."""
        tokens = torch.cat([root[:, None], self.tokens], dim=1)
        if self.chain:
            depths = _static(self.depths.shape[0], self.depths.shape[1], self.depths.device).rows
        else:
            depths = torch.cat([torch.zeros_like(self.depths[:, :1]), self.depths], dim=1)
        mask = self.mask if self.mask is not None else ancestor_mask(self.parents)
        return tokens, start[:, None] + depths, mask


def ancestor_mask(parents: torch.Tensor, max_depth: int | None = None) -> torch.Tensor:
    """parents: (B, N) row of each node's parent among rows 0..N (0: the root), parents first.
    Returns (B, N+1, N+1) bool: row i sees row j iff j is i or an ancestor of i. By repeated
    squaring of (self + parent) reachability: ceil(log2(depth)) small matmuls, exact in fp32.
    max_depth: a bound on node depths (default N)."""
    batch, n = parents.shape
    step = torch.zeros(batch, n + 1, n + 1, device=parents.device)  # step[i, j] = 1: j is i's parent
    step[:, 1:].scatter_(2, parents[:, :, None], 1.0)
    reach = step + _static(batch, n, parents.device).eye  # paths of length <= 1
    for _ in range(((max_depth or n) - 1).bit_length()):  # then <= 2, 4, ... >= max_depth
        reach = torch.bmm(reach, reach).clamp_(max=1.0)
    return reach > 0


@dataclass(frozen=True)
class _Rows:
    rows: torch.Tensor  # (B, N+1) 0..N
    eye: torch.Tensor  # (B, N+1, N+1) float identity


@lru_cache(maxsize=64)
def _static(batch: int, n: int, device: torch.device) -> _Rows:
    return _Rows(rows=torch.arange(n + 1, device=device).repeat(batch, 1),
                 eye=torch.eye(n + 1, device=device).repeat(batch, 1, 1))


@dataclass(frozen=True)
class TreeLayout:
    """What a tree shape (top_k, depth, tokens) fixes for a batch, built once. Drafted row r (the
    r-th frontier node run through the draft) sits at depth r // top_k + 1; the candidate pool
    holds top_k nodes of depth 1, then top_k^2 per deeper depth."""

    offsets: torch.Tensor  # (B, P) depth - 1 of every drafted row (P = (depth - 1) * top_k)
    node_masks: dict  # chains: rows drafted -> (B, P, P) causal mask
    eye: torch.Tensor  # (B, P, P) bool identity: a tree's drafted rows before their ancestors are added
    first_frontier: torch.Tensor  # (B, top_k) pool indices of the depth-1 nodes
    root_parents: torch.Tensor  # (B, top_k) -1: the depth-1 nodes' parent is the root
    pool_depths: torch.Tensor  # (B, M) depth of every candidate
    chain: Tree | None  # top_k == 1: the chain's parents, depths and causal verify mask (tokens empty)


@lru_cache(maxsize=32)
def tree_layout(shape: tuple[int, int, int], batch: int, device: torch.device) -> TreeLayout:
    k, depth, n = shape
    drafted = (depth - 1) * k
    offsets = (torch.arange(drafted, device=device) // k).repeat(batch, 1)
    pool = torch.cat([torch.ones(k, dtype=torch.long, device=device),
                      torch.arange(2, depth + 1, device=device).repeat_interleave(k * k)])
    chain = None
    if k == 1:
        rows = torch.arange(n, device=device).repeat(batch, 1)
        causal = torch.ones(n + 1, n + 1, dtype=torch.bool, device=device).tril().repeat(batch, 1, 1)
        chain = Tree(tokens=rows[:, :0], parents=rows, depths=rows + 1, mask=causal, chain=True)
    return TreeLayout(
        offsets=offsets,
        node_masks={p: torch.ones(p, p, dtype=torch.bool, device=device).tril().repeat(batch, 1, 1)
                    for p in range(1, drafted + 1)} if k == 1 else {},
        eye=torch.eye(drafted, dtype=torch.bool, device=device).repeat(batch, 1, 1),
        first_frontier=torch.arange(k, device=device).repeat(batch, 1),
        root_parents=torch.full((batch, k), -1, dtype=torch.long, device=device),
        pool_depths=pool.repeat(batch, 1), chain=chain)


def shape_tables(shape: tuple[int, int, int], batch: int, device: torch.device) -> tuple:
    """Every per-shape table that growing a tree and verify_inputs read. A CUDA graph does not keep
    alive what it read, so a graph that captured them holds this tuple."""
    return tree_layout(shape, batch, device), _static(batch, shape[2], device)


def draft_topk(local_logits: torch.Tensor, k: int, vocab_start: int, comm: Communicator):
    """local_logits: (M, Vd_r), this rank's slice of the draft vocabulary. Returns the global top-k
    log-probabilities and draft ids, (M, k) each, equal on all ranks: one small all-gather."""
    local_logits = _fp32(local_logits)
    lse = torch.logsumexp(local_logits, dim=-1, keepdim=True)  # (M, 1)
    values, ids = local_logits.topk(min(k, local_logits.shape[-1]), dim=-1)  # (M, k')
    if comm.world_size == 1:  # nothing to merge: the same numbers as below, in 5 ops instead of 15
        return (values - lse).clamp(max=0.0), ids + vocab_start if vocab_start else ids
    packed = torch.cat([values, (ids + vocab_start).float(), lse], dim=-1)  # ids < 2^24: exact in fp32
    gathered = comm.all_gather(packed[None], dim=0)  # (W, M, 2k'+1)
    kk = values.shape[-1]
    all_values = gathered[..., :kk].permute(1, 0, 2).flatten(1)  # (M, W*k')
    all_ids = gathered[..., kk:2 * kk].permute(1, 0, 2).flatten(1)
    total = torch.logsumexp(gathered[..., -1], dim=0)  # (M,)
    top_values, where = all_values.topk(k, dim=-1)
    return (top_values - total[:, None]).clamp(max=0.0), all_ids.gather(1, where).long()


def draft_top1(local_logits: torch.Tensor, vocab_start: int, comm: Communicator) -> torch.Tensor:
    """local_logits: (M, Vd_r). The draft ids draft_topk(k=1) picks, (M, 1), without its scores."""
    if comm.world_size == 1:
        ids = _fp32(local_logits).topk(1, dim=-1).indices
        return ids + vocab_start if vocab_start else ids
    return draft_topk(local_logits, 1, vocab_start, comm)[1]


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
        self.draft, self.cache, self.shape = draft, cache, tuple(shape)
        self.top_k, self.depth, self.n_tokens = shape
        # rows that sample draft tokens from q (chains only; tree picks are deterministic)
        self.sampled = [b for b, p in enumerate(params) if not p.greedy] if self.top_k == 1 else []
        self.params, self.generators = params, generators
        self.vocab_start = draft.shard.vocab_start

    def grow(self, root_logits: torch.Tensor, root_hidden: torch.Tensor) -> Tree:
        """root_logits: (B, Vd_r); root_hidden: (B, H). The draft cache holds the committed prefix
        (root row included) and is left exactly so."""
        layout = tree_layout(self.shape, root_logits.shape[0], root_logits.device)
        start = self._start()  # (B,) the root sits at position start - 1
        if self.top_k == 1:
            return self._grow_chain(root_logits, root_hidden, layout, start)
        return self._grow_tree(root_logits, root_hidden, layout, start)

    def _start(self) -> torch.Tensor:
        """The draft cache's lengths before growth (a copy: the eager forwards move them)."""
        return self.cache.lengths.clone()

    def _grow_chain(self, root_logits, root_hidden, layout: TreeLayout, start) -> Tree:
        """Each depth: the chain so far through the draft, the last node's top-1 (or sampled) child."""
        proposals: list = []
        targets = [self.draft.to_target_ids(self._chain_child(root_logits, proposals))]  # (B, 1) each
        fed = [root_hidden[:, None]]  # (B, 1, H) each: node i reads its parent's hidden state
        positions = start[:, None] + layout.offsets  # (B, P_max) of the drafted rows
        for nodes in range(1, self.depth):
            out = self._run_draft(_joined(targets), _joined(fed), positions[:, :nodes], layout.node_masks[nodes], start)
            fed.append(out.hidden[:, -1:])
            targets.append(self.draft.to_target_ids(self._chain_child(out.logits[:, -1], proposals)))
        tokens = _joined(targets)[:, : self.n_tokens]  # (B, N)
        chain = layout.chain
        return Tree(tokens=tokens, parents=chain.parents, depths=chain.depths, mask=chain.mask, chain=True,
                    proposals=torch.stack(proposals, dim=1)[:, : self.n_tokens] if proposals else None)

    def _chain_child(self, local_logits: torch.Tensor, proposals: list) -> torch.Tensor:
        """local_logits: (B, Vd_r) -> draft ids (B, 1): the top-1, or for sampling rows a draw from q."""
        ids = draft_top1(local_logits, self.vocab_start, self.draft.comm)
        if self.sampled:
            rows = torch.tensor(self.sampled, device=ids.device)
            q_draft, q_target = draft_distributions(self.draft, local_logits[rows],
                                                    [self.params[b] for b in self.sampled])
            for q, b in zip(q_draft, self.sampled):
                ids[b, 0] = int(torch.multinomial(q, 1, generator=self.generators[b]))
            q_rows = q_target.new_zeros(ids.shape[0], q_target.shape[1])
            q_rows[rows.cpu()] = q_target
            proposals.append(q_rows)  # (B, V); greedy rows keep zeros and never read them
        return ids

    def _grow_tree(self, root_logits, root_hidden, layout: TreeLayout, start) -> Tree:
        k, batch = self.top_k, root_logits.shape[0]
        scores, ids = draft_topk(root_logits, k, self.vocab_start, self.draft.comm)  # (B, k): depth 1
        pool_scores, pool_ids, pool_parents = [scores], [ids], [layout.root_parents]
        frontier, frontier_scores = layout.first_frontier, scores  # (B, k) pool indices, their scores
        tokens = self.draft.to_target_ids(ids)  # (B, P) target ids of the drafted rows
        fed = root_hidden[:, None].expand(batch, k, -1)  # (B, P, H) hidden state each drafted row reads
        mask = layout.eye.clone()  # (B, P_max, P_max) drafted rows: self and ancestors
        positions = start[:, None] + layout.offsets  # (B, P_max)
        for depth in range(2, self.depth + 1):
            nodes = (depth - 1) * k
            out = self._run_draft(tokens, fed, positions[:, :nodes], mask[:, :nodes, :nodes], start)
            logp, ids = draft_topk(out.logits.flatten(0, 1), k, self.vocab_start, self.draft.comm)  # (B*k, k)
            scores = (frontier_scores[:, :, None] + logp.view(batch, k, k)).flatten(1)  # (B, k*k) cumulative
            ids = ids.view(batch, k * k)  # candidate c is child c % k of frontier node c // k
            pool_parents.append(frontier[:, :, None].expand(batch, k, k).flatten(1))
            offset = sum(s.shape[1] for s in pool_scores)
            pool_scores.append(scores)
            pool_ids.append(ids)
            if depth == self.depth:
                break
            pick = scores.topk(k, dim=-1).indices.sort(dim=-1).values  # (B, k) the next frontier
            frontier, frontier_scores = offset + pick, scores.gather(1, pick)
            parent_rows = pick // k + (depth - 2) * k  # (B, k) drafted rows of their parents
            mask[:, nodes:nodes + k] = (mask.gather(1, parent_rows[:, :, None].expand(-1, -1, mask.shape[2]))
                                        | layout.eye[:, nodes:nodes + k])
            tokens = torch.cat([tokens, self.draft.to_target_ids(ids.gather(1, pick))], dim=1)
            parent_hidden = out.hidden.gather(1, parent_rows[:, :, None].expand(-1, -1, out.hidden.shape[-1]))
            fed = torch.cat([fed, parent_hidden], dim=1)  # each new frontier node reads ITS parent's output
        return self._select(torch.cat(pool_scores, 1), torch.cat(pool_ids, 1), torch.cat(pool_parents, 1), layout)

    def _run_draft(self, tokens, hidden, positions, mask, start):
        """The draft over P nodes: tokens, positions (B, P), hidden (B, P, H), mask (B, P, P); logits
        of the last top_k rows (the frontier). The cache is rolled back to `start` after. A CUDA
        graph of this call replaces it in workers/spec_graphs.py."""
        frontier_rows = _frontier_rows(tokens.shape[0], tokens.shape[1], self.top_k, tokens.device)
        out = self.draft(tokens, self.cache, hidden=hidden, positions=positions, step_mask=mask,
                         logit_rows=frontier_rows)
        self.cache.lengths.copy_(start)  # a rollback: start was read from this cache before
        return out

    def _select(self, scores, ids, parents, layout: TreeLayout) -> Tree:
        """The best n_tokens candidates (B, M) of the pool, in pool order (ancestors first)."""
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, : self.n_tokens]
        chosen = order.sort(dim=-1).values  # (B, N) pool indices
        parent_pool = parents.gather(1, chosen)  # -1: the root
        # a node's parent is selected too (module docstring): its row is its rank among the chosen
        parent_rows = torch.searchsorted(chosen, parent_pool) + (parent_pool >= 0)  # (B, N) 0 = root
        depths = layout.pool_depths.gather(1, chosen)
        return Tree(tokens=self.draft.to_target_ids(ids.gather(1, chosen)), parents=parent_rows, depths=depths,
                    mask=ancestor_mask(parent_rows, min(self.depth, self.n_tokens)))


@lru_cache(maxsize=64)
def _frontier_rows(batch: int, nodes: int, k: int, device: torch.device) -> torch.Tensor:
    return torch.arange(nodes - k, nodes, device=device).repeat(batch, 1)  # (B, k) the last k drafted rows


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
