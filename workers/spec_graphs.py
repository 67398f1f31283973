"""CUDA graphs of speculative decoding's device steps: the target's verify step and the EAGLE-3
draft's forwards (its catch-up on the tokens accepted last step, and one forward per tree depth).

Why: a speculative step is several forwards, each hundreds of short kernels at batch 1, so
launched eagerly the host's launch time is the step's time (workers/cuda_graphs.py says more).
Each forward here is one replay. The glue between them stays eager: the draft's top-k and tree
selection (a few small ops per depth), and acceptance and KV compaction, which decide on the host
how many tokens a row keeps; sampled rows draw on the CPU as the eager loop does
(workers/speculative.py), from the graphs' logits.

Shapes are fixed per (batch rows, cache slots, spec shape, aux layers), one bucket of these:
  verify    root + N nodes per row, (B, N+1) tokens and positions, (B, N+1, N+1) ancestor mask
            (chain or tree: a chain's mask is causal); the target attends over its whole cache
            buffer with a length mask (`static`), and the step ends with the distributed argmax.
  catch-up  the accepted tokens of the last step: at most depth + 1 rows, padded to that width
            (padded rows write keys past the row's length, which nothing reads); the first
            catch-up, over the whole prompt, runs eagerly.
  depth d   the (d - 1) * top_k frontier nodes drafted so far, re-run with their ancestor mask;
            the draft cache's lengths are restored inside the graph (the eager path's rollback).
Each bucket owns a target and a draft KV cache, as a decode graph owns its cache. On CPU (tests)
a StaticStep runs the same function on the same static buffers without capturing it.
"""
from __future__ import annotations

from typing import Callable

import torch

from model.draft_tree import TreeGrower
from model.eagle3 import DraftOutput, Eagle3Draft
from model.llama4 import Llama4
from model.sampling import distributed_argmax
from workers.cuda_graphs import GraphPool, cache_slots, capture

MAX_SPEC_GRAPHS = 2  # buckets kept alive (each holds a target and a draft KV cache)


def target_features(aux_hidden: list[torch.Tensor], layer_ids: tuple[int, ...]) -> torch.Tensor:
    """The target's aux outputs (ascending unique layers) -> (B, T, n_aux*H) in the draft's order."""
    aux_set = sorted(set(layer_ids))
    return torch.cat([aux_hidden[aux_set.index(i)] for i in layer_ids], dim=-1)


class StaticStep:
    """`fn` over static input buffers. Calling it copies the inputs in (same shapes and dtypes)
    and replays the captured graph (capture=True), or runs fn on the buffers (capture=False).
    Returns fn's outputs; a graph's are overwritten by its next replay."""

    def __init__(self, fn: Callable, inputs: dict[str, torch.Tensor], reset: Callable[[], None], capture_it: bool,
                 world_size: int) -> None:
        self.fn, self.inputs, self.graph = fn, inputs, None
        self.calls = 0
        if capture_it:
            device = next(iter(inputs.values())).device
            self.graph, self.outputs = capture(lambda: fn(**inputs), reset, device, world_size)

    def __call__(self, **values: torch.Tensor):
        for name, value in values.items():
            buffer = self.inputs[name]
            if value.shape != buffer.shape or value.dtype != buffer.dtype:
                raise ValueError(f"{name}: {tuple(value.shape)} {value.dtype} for a static buffer of "
                                 f"{tuple(buffer.shape)} {buffer.dtype}")
            buffer.copy_(value)
        self.calls += 1
        if self.graph is None:
            return self.fn(**self.inputs)
        self.graph.replay()
        return self.outputs


class SpecGraphs:
    """The verify, catch-up and per-depth draft steps of one bucket, over its own two caches."""

    def __init__(self, model: Llama4, draft: Eagle3Draft, kv_dtype: torch.dtype | None, batch: int, slots: int,
                 shape: tuple[int, int, int], layer_ids: tuple[int, ...], capture_it: bool = True) -> None:
        self.model, self.draft, self.layer_ids = model, draft, tuple(layer_ids)
        self.aux_set = tuple(sorted(set(layer_ids)))
        self.cache = model.new_cache(batch, slots, kv_dtype)
        self.draft_cache = draft.new_cache(batch, slots)
        self.top_k, depth, n_tokens = shape
        self.width = depth + 1  # catch-up rows: an accepted path of at most `depth` drafts, and its root
        device, world = self.cache.lengths.device, model.comm.world_size
        self.rows = torch.arange(batch, device=device)  # (B,)

        def long(*size: int) -> torch.Tensor:
            return torch.zeros(size, dtype=torch.long, device=device)

        def causal(n: int) -> torch.Tensor:  # warm-up masks: every row sees itself (no empty softmax)
            return torch.ones(n, n, dtype=torch.bool, device=device).tril().repeat(batch, 1, 1)

        verify_rows = n_tokens + 1
        self.verify = StaticStep(self._verify, {
            "tokens": long(batch, verify_rows), "positions": torch.arange(verify_rows, device=device).repeat(batch, 1),
            "mask": causal(verify_rows), "n_new": long(batch) + verify_rows}, self.empty, capture_it, world)
        features = draft.cfg.n_aux * draft.cfg.target_hidden_size
        self.catch_up = StaticStep(self._catch_up, {
            "tokens": long(batch, self.width),
            "features": torch.zeros(batch, self.width, features, dtype=model.embed_tokens.weight.dtype,
                                    device=device),  # the target's residual stream dtype
            "n_new": long(batch) + self.width, "last": long(batch)}, self.empty, capture_it, world)
        self.nodes = {}  # rows drafted so far (P) -> the draft step over them
        for nodes in range(self.top_k, (depth - 1) * self.top_k + 1, self.top_k):
            self.nodes[nodes] = StaticStep(self._draft_nodes, {
                "tokens": long(batch, nodes), "positions": torch.arange(nodes, device=device).repeat(batch, 1),
                "hidden": torch.zeros(batch, nodes, draft.cfg.hidden_size, dtype=draft.fc.weight.dtype, device=device),
                "mask": causal(nodes)}, self.empty, capture_it, world)

    def empty(self) -> None:
        """Both caches emptied (a new batch; after a warm-up, whose writes then sit past every row's
        length)."""
        self.cache.lengths.zero_()
        self.draft_cache.lengths.zero_()

    def _verify(self, tokens, positions, mask, n_new):
        """-> logits (B, N+1, V_r), aux features (B, N+1, F), greedy ids (B, N+1)."""
        out = self.model(tokens, self.cache, n_new=n_new, positions=positions, step_mask=mask,
                         aux_layers=self.aux_set, static=True)
        batch, rows = tokens.shape
        argmax = distributed_argmax(out.logits.flatten(0, 1), self.model.shard.vocab_start, self.model.comm)
        return out.logits, target_features(out.aux_hidden, self.layer_ids), argmax.view(batch, rows)

    def _catch_up(self, tokens, features, n_new, last):
        """-> the root's draft logits (B, Vd_r) and pre-norm hidden state (B, H)."""
        out = self.draft(tokens, self.draft_cache, target_features=features, n_new=n_new,
                         logit_rows=last[:, None], static=True)
        return out.logits[:, 0], out.hidden[self.rows, last]

    def _draft_nodes(self, tokens, positions, hidden, mask):
        """-> DraftOutput: logits of the last top_k rows (B, k, Vd_r), hidden (B, P, H)."""
        batch, nodes = tokens.shape
        saved = self.draft_cache.lengths.clone()
        frontier = torch.arange(nodes - self.top_k, nodes, device=tokens.device).expand(batch, -1)  # (B, k)
        out = self.draft(tokens, self.draft_cache, hidden=hidden, positions=positions, step_mask=mask,
                         logit_rows=frontier, static=True)
        self.draft_cache.lengths.copy_(saved)
        return out

    def grower(self, *args) -> TreeGrower:
        """A TreeGrower (same arguments) whose draft forwards replay this bucket's depth steps."""
        return GraphTreeGrower(self, *args)


class GraphTreeGrower(TreeGrower):
    def __init__(self, graphs: SpecGraphs, *args) -> None:
        super().__init__(*args)
        self.graphs = graphs

    def _run_draft(self, tokens, hidden, positions, mask, start) -> DraftOutput:
        return self.graphs.nodes[tokens.shape[1]](tokens=tokens, positions=positions, hidden=hidden, mask=mask)


def spec_graphs(model: Llama4, draft: Eagle3Draft, kv_dtype: torch.dtype | None) -> GraphPool:
    """Speculative step graphs by (batch rows, cache slots, spec shape, aux layer ids)."""
    return GraphPool(lambda key: SpecGraphs(model, draft, kv_dtype, *key), MAX_SPEC_GRAPHS)


def spec_graph(pool: GraphPool, decoder, batch: int, needed_slots: int, max_context: int) -> SpecGraphs:
    """The bucket for a batch of `decoder` (a SpecDecoder) needing `needed_slots`, caches emptied."""
    slots = cache_slots(needed_slots, max_context + decoder.margin)
    graphs = pool.get((batch, slots, decoder.spec.shape, decoder.layer_ids))
    graphs.empty()
    return graphs
