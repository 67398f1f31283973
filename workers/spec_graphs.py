"""CUDA graphs of speculative decoding: a whole greedy step in ONE graph, and its forwards one by one.

Why: a speculative step is several forwards, each hundreds of short kernels at batch 1, plus the
glue between them (top-k, tree bookkeeping, acceptance, KV compaction), ~8-10 us of host time per
eager op. Replaying the forwards alone left the glue eager: 7.3 ms a step where plain decoding
takes 0.13. The glue is static-shaped and reads nothing back (model/draft_tree.py,
model/spec_verdict.py), so for greedy batches the WHOLE step is one graph:
  `step`    grow the tree (one draft forward per depth), verify it (target forward + argmax),
            accept greedily, commit (compact the target's KV, set lengths), and run the draft's
            catch-up on the accepted tokens, which leaves the next step's root logits and hidden
            state in the step's own input buffers; returns (B, 1 + W): kept rows and new tokens,
            the one thing the host reads per step.
Batches with sampling rows draw on the CPU between the forwards (workers/speculative.py), so they
replay the forwards one by one instead, captured at the first such batch (`per_forward`):
  verify    root + N nodes per row, (B, N+1) tokens and positions, (B, N+1, N+1) ancestor mask
            (chain or tree: a chain's mask is causal); the target attends over its whole cache
            buffer with a length mask (`static`), and the step ends with the distributed argmax.
  catch-up  the accepted tokens of the last step: at most depth + 1 rows, padded to that width
            (padded rows write keys past the row's length, which nothing reads).
  depth d   the (d - 1) * top_k frontier nodes drafted so far, re-run with their ancestor mask;
            the draft cache's lengths are restored inside the graph (the eager path's rollback).
Each bucket owns a target and a draft KV cache, as a decode graph owns its cache. On CPU (tests)
a StaticStep runs the same function on the same static buffers without capturing it.
"""
from __future__ import annotations

from typing import Callable

import torch

from model.draft_tree import TreeGrower, shape_tables
from model.eagle3 import DraftOutput, Eagle3Draft
from model.llama4 import Llama4
from model.sampling import SamplingParams, distributed_argmax
from model.spec_verdict import commit, greedy_verdict, verdict_tables
from workers.cuda_graphs import GraphPool, cache_slots, capture

MAX_SPEC_GRAPHS = 2  # buckets kept alive (each holds a target and a draft KV cache)


def target_features(aux_hidden: list[torch.Tensor], layer_ids: tuple[int, ...]) -> torch.Tensor:
    """The target's aux outputs (ascending unique layers) -> (B, T, n_aux*H) in the draft's order."""
    aux_set = sorted(set(layer_ids))
    return torch.cat([aux_hidden[aux_set.index(i)] for i in layer_ids], dim=-1)


class StaticStep:
    """`fn` over static input buffers. Calling it copies the inputs in (same shapes and dtypes;
    a value that IS its buffer is in place already) and replays the captured graph (capture=True),
    or runs fn on the buffers (capture=False). Returns fn's outputs; a graph's are overwritten by
    its next replay."""

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
            if value is buffer:
                continue
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
    """The whole-step graph and the per-forward steps of one bucket, over its own two caches."""

    def __init__(self, model: Llama4, draft: Eagle3Draft, kv_dtype: torch.dtype | None, batch: int, slots: int,
                 shape: tuple[int, int, int], layer_ids: tuple[int, ...], capture_it: bool = True) -> None:
        self.model, self.draft, self.layer_ids = model, draft, tuple(layer_ids)
        self.aux_set = tuple(sorted(set(layer_ids)))
        self.cache = model.new_cache(batch, slots, kv_dtype)
        self.draft_cache = draft.new_cache(batch, slots)
        self.shape, self.batch, self.capture_it = tuple(shape), batch, capture_it
        self.top_k, self.depth, self.n_tokens = shape
        self.width = self.depth + 1  # catch-up rows: an accepted path of at most `depth` drafts, and its root
        self.device, self.world = self.cache.lengths.device, model.comm.world_size
        self.rows = torch.arange(batch, device=self.device)  # (B,)
        self._per_forward: dict | None = None
        # the fixed tables the step reads, made outside any capture and held while its graph lives
        self.tables = (*shape_tables(self.shape, batch, self.device),
                       verdict_tables(batch, self.width, self.n_tokens, self.device), draft.target_id_table())
        head = draft.lm_head_weight()
        self.step = StaticStep(self._step, {
            "active": torch.ones(batch, dtype=torch.long, device=self.device),
            "root": torch.zeros(batch, dtype=torch.long, device=self.device),
            "root_logits": torch.zeros(batch, head.shape[0], dtype=head.dtype, device=self.device),
            "root_hidden": torch.zeros(batch, draft.cfg.hidden_size, dtype=draft.fc.weight.dtype, device=self.device),
        }, self.empty, capture_it, self.world)

    def empty(self) -> None:
        """Both caches emptied (a new batch; after a warm-up, whose writes then sit past every row's
        length)."""
        self.cache.lengths.zero_()
        self.draft_cache.lengths.zero_()

    def _step(self, active, root, root_logits, root_hidden):
        """One greedy speculative step (module docstring); active: (B,) 1 / 0. -> (B, 1 + W) long:
        kept rows (0: a finished row), then the kept path's tokens and the extra token."""
        params = [SamplingParams()] * self.batch
        tree = _DirectGrower(self, self.draft, self.draft_cache, self.shape, params, [None] * self.batch).grow(
            root_logits, root_hidden)
        start = self.cache.lengths.clone()
        tokens, positions, mask = tree.verify_inputs(root, start)
        _, features, argmax = self._verify(tokens, positions, mask, active * tokens.shape[1])
        pending = commit(self.cache, start, tokens, features, greedy_verdict(tree, argmax, self.width), active)
        next_logits, next_hidden = self._catch_up(pending.tokens, pending.features, pending.n, pending.last)
        root.copy_(pending.root)
        root_logits.copy_(next_logits)
        root_hidden.copy_(next_hidden)
        return torch.cat([pending.n[:, None], pending.tokens], dim=1)

    def run_step(self, state) -> torch.Tensor:
        """The whole-step graph on a workers.speculative.BatchState, whose root, root logits and
        hidden state then live in this step's buffers (the next call copies nothing)."""
        inputs = self.step.inputs
        out = self.step(active=state.active_rows, root=state.root, root_logits=state.root_logits,
                        root_hidden=state.root_hidden)
        state.active_rows, state.root = inputs["active"], inputs["root"]
        state.root_logits, state.root_hidden = inputs["root_logits"], inputs["root_hidden"]
        return out

    def _per_forward_steps(self) -> dict:
        """The verify, catch-up and per-depth draft steps, made (captured) at first use."""
        if self._per_forward is None:
            batch, device, draft = self.batch, self.device, self.draft

            def long(*size: int) -> torch.Tensor:
                return torch.zeros(size, dtype=torch.long, device=device)

            def causal(n: int) -> torch.Tensor:  # warm-up masks: every row sees itself (no empty softmax)
                return torch.ones(n, n, dtype=torch.bool, device=device).tril().repeat(batch, 1, 1)

            # made at first use, over caches that may hold a batch: the warm-ups' writes sit past every
            # row's length, and each warm-up's lengths are put back as they were (not emptied)
            saved = self.cache.lengths.clone(), self.draft_cache.lengths.clone()

            def restore() -> None:
                self.cache.lengths.copy_(saved[0])
                self.draft_cache.lengths.copy_(saved[1])

            def step(fn, inputs):
                return StaticStep(fn, inputs, restore, self.capture_it, self.world)

            verify_rows = self.n_tokens + 1
            steps = {"verify": step(self._verify, {
                "tokens": long(batch, verify_rows),
                "positions": torch.arange(verify_rows, device=device).repeat(batch, 1),
                "mask": causal(verify_rows), "n_new": long(batch) + verify_rows})}
            features = draft.cfg.n_aux * draft.cfg.target_hidden_size
            steps["catch_up"] = step(self._catch_up, {
                "tokens": long(batch, self.width),
                "features": torch.zeros(batch, self.width, features, dtype=self.model.embed_tokens.weight.dtype,
                                        device=device),  # the target's residual stream dtype
                "n_new": long(batch) + self.width, "last": long(batch)})
            steps["nodes"] = {  # rows drafted so far (P) -> the draft step over them; a chain's masks stay causal
                nodes: step(self._draft_nodes, {
                    "tokens": long(batch, nodes), "positions": torch.arange(nodes, device=device).repeat(batch, 1),
                    "hidden": torch.zeros(batch, nodes, draft.cfg.hidden_size, dtype=draft.fc.weight.dtype,
                                          device=device),
                    "mask": causal(nodes)})
                for nodes in range(self.top_k, (self.depth - 1) * self.top_k + 1, self.top_k)}
            self._per_forward = steps
        return self._per_forward

    @property
    def verify(self) -> StaticStep:
        return self._per_forward_steps()["verify"]

    @property
    def catch_up(self) -> StaticStep:
        return self._per_forward_steps()["catch_up"]

    @property
    def nodes(self) -> dict[int, StaticStep]:
        return self._per_forward_steps()["nodes"]

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
    """Draft forwards as replays of the per-depth steps (which restore the cache's lengths)."""

    def __init__(self, graphs: SpecGraphs, *args) -> None:
        super().__init__(*args)
        self.graphs = graphs

    def _start(self) -> torch.Tensor:
        return self.cache.lengths  # unchanged: every step restores it

    def _run_draft(self, tokens, hidden, positions, mask, start) -> DraftOutput:
        inputs = {"tokens": tokens, "positions": positions, "hidden": hidden}
        if self.top_k > 1:  # a chain's mask is causal, as its buffer has been since it was made
            inputs["mask"] = mask
        return self.graphs.nodes[tokens.shape[1]](**inputs)


class _DirectGrower(GraphTreeGrower):
    """Draft forwards called directly, inside the whole-step graph."""

    def _run_draft(self, tokens, hidden, positions, mask, start) -> DraftOutput:
        return self.graphs._draft_nodes(tokens, positions, hidden, mask)


def spec_graphs(model: Llama4, draft: Eagle3Draft, kv_dtype: torch.dtype | None) -> GraphPool:
    """Speculative step graphs by (batch rows, cache slots, spec shape, aux layer ids)."""
    return GraphPool(lambda key: SpecGraphs(model, draft, kv_dtype, *key), MAX_SPEC_GRAPHS)


def spec_graph(pool: GraphPool, decoder, batch: int, needed_slots: int, max_context: int) -> SpecGraphs:
    """The bucket for a batch of `decoder` (a SpecDecoder) needing `needed_slots`, caches emptied."""
    slots = cache_slots(needed_slots, max_context + decoder.margin)
    graphs = pool.get((batch, slots, decoder.spec.shape, decoder.layer_ids))
    graphs.empty()
    return graphs
