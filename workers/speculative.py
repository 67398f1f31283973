"""Speculative decoding with an EAGLE-3 draft: the per-rank loop every rank runs in lockstep.

A batch is still ONE call: prefill (the target's, then the draft's catch-up on the prompt), then
`speculative_step` until every row is done. Each step
  1. draft   grows a chain or an EAGLE-2 tree from the root's draft logits and hidden state;
  2. verify  ONE target forward over root + nodes, with an ancestor mask and per-node positions,
             which also returns the aux features of every node;
  3. accept  greedy acceptance on the device (model/spec_verdict.py); sampling rows by lossless
             rejection sampling on the host (model/acceptance.py), written over their rows;
  4. commit  the accepted path's target KV rows are compacted into place, the rest forgotten;
  5. read    the host reads each row's kept count and new tokens: the step's one read;
  6. catch up the draft reads the target features of the accepted tokens (the only rows it ever
             commits to its KV cache), which gives the next root's draft logits and hidden state.
Every row keeps its own accepted length; rows that finish ride along with zero new tokens. All
choices are made identically on every rank (distributed top-k/argmax, seeded generators), so
there is no driver round trip per step.

With CUDA graphs (workers/spec_graphs.py, chosen by the engine), a greedy batch runs each step as
ONE graph replay (all six parts, the read being of its output), and a batch with sampling rows
replays the forwards one by one with the glue between them eager, as without graphs.

Metrics per request: acceptance length (1 + accepted drafts per verification step, averaged, as
vLLM defines it), acceptance rate per draft position (fraction of steps whose position-i draft was
accepted), draft and verify seconds (a one-graph step is not split: its time counts as verify,
and `one_graph_steps` says how many steps were so), tokens/s. In a trace, every step record
carries `accepted` (drafts kept per request) and `tokens`, inside the step's "draft" and
"verify" spans.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model.acceptance import accept_sampled
from model.config import ConfigError
from model.draft_tree import Tree, TreeGrower
from model.eagle3 import Eagle3Draft
from model.llama4 import Llama4
from model.sampling import distributed_argmax, filter_logits
from model.spec import SpecConfig, resolve_layer_ids
from model.spec_verdict import commit, greedy_verdict, with_host_rows
from workers.engine import Completion, GenerationStats, Request
from workers.spec_graphs import SpecGraphs, target_features


@dataclass
class RowStats:
    steps: int = 0
    accepted: int = 0  # drafts accepted, over all steps
    per_position: list[int] = field(default_factory=list)  # steps whose draft at position i+1 was accepted
    draft_s: float = 0.0
    verify_s: float = 0.0
    decode_s: float = 0.0
    one_graph_steps: int = 0

    def record(self, n_accepted: int, depth: int, draft_s: float, verify_s: float, step_s: float,
               one_graph: bool = False) -> None:
        if not self.per_position:
            self.per_position = [0] * depth
        self.steps += 1
        self.accepted += n_accepted
        for i in range(n_accepted):
            self.per_position[i] += 1
        self.draft_s += draft_s
        self.verify_s += verify_s
        self.decode_s += step_s
        self.one_graph_steps += one_graph

    def summary(self, new_tokens: int) -> dict:
        steps = max(self.steps, 1)
        return {"acceptance_length": 1.0 + self.accepted / steps if self.steps else None,
                "acceptance_per_position": [n / steps for n in self.per_position] if self.steps else [],
                "verify_steps": self.steps, "draft_s": self.draft_s, "verify_s": self.verify_s,
                "one_graph_steps": self.one_graph_steps,
                "tokens_per_s": (new_tokens - 1) / self.decode_s if self.decode_s > 0 and new_tokens > 1 else None}


@dataclass
class BatchState:
    cache: object  # the target's KVCache
    draft_cache: object
    root: torch.Tensor  # (B,) last accepted token, not yet in the target cache
    active: list[bool]
    active_rows: torch.Tensor  # (B,) 1 / 0 on the device: `uploaded`, the `active` of its last upload
    uploaded: list[bool]
    verify_rows: torch.Tensor  # (B,) rows each batch row adds in a verification step (0: finished)
    root_logits: torch.Tensor | None = None  # (B, Vd_r) the draft's logits at the root (after catch-up)
    root_hidden: torch.Tensor | None = None  # (B, H) the draft's pre-norm hidden state there
    prompt_block: tuple | None = None  # tokens (B, P), features (B, P, F), n (B,): the draft's first catch-up


class SpecDecoder:
    def __init__(self, model: Llama4, draft: Eagle3Draft, spec: SpecConfig, recorder) -> None:
        try:
            self.layer_ids = resolve_layer_ids(spec, model.cfg.n_layers, draft.cfg.layer_ids)
        except ConfigError as e:
            raise ConfigError(f"speculative decoding: {e}") from None
        if len(self.layer_ids) != draft.cfg.n_aux:
            raise ConfigError(f"speculative decoding: {len(self.layer_ids)} layer ids {list(self.layer_ids)} for a "
                              f"draft whose fc reads {draft.cfg.n_aux} target layers")
        if spec.shape[0] > draft.cfg.draft_vocab_size:
            raise ConfigError(f"tree top_k ({spec.shape[0]}) exceeds the draft vocabulary "
                              f"({draft.cfg.draft_vocab_size})")
        self.model, self.draft, self.spec, self.recorder = model, draft, spec, recorder
        speculating = getattr(recorder, "speculating", None)  # the virtual clock's steps (--emulate-node)
        if speculating is not None:  # cost this draft's forwards and picks (workers/virtual_clock.py)
            speculating(draft, spec.shape)
        self.aux_set = tuple(sorted(set(self.layer_ids)))
        self.graphs: SpecGraphs | None = None
        self.sampled: list[int] = []  # batch rows that sample

    @property
    def margin(self) -> int:
        """Cache slots past a row's last token that a step may write: verification rows and the
        draft's re-run frontier."""
        k, depth, tokens = self.spec.shape
        return tokens + 1 + (depth - 1) * k + depth + 2

    def generate(self, requests: list[Request], generators: list[torch.Generator], pick, kv_dtype=None,
                 on_tokens=None, graphs: SpecGraphs | None = None) -> tuple[list[Completion], GenerationStats]:
        """The batch to completion. pick(logits (B, 1, V_r)) -> (B,) chooses the token after the
        prompt as plain decoding does; every later token comes from a speculative step.
        graphs: this batch's CUDA graphs (their caches emptied), or None: eager steps."""
        self.graphs = graphs
        self.sampled = [b for b, r in enumerate(requests) if not r.params.greedy]
        if graphs is not None and self.sampled:
            graphs.nodes  # noqa: B018 (the per-forward steps, captured before anything is timed)
        batch, device = len(requests), self.model.embed_tokens.weight.device
        lengths = torch.tensor([len(r.prompt_ids) for r in requests], device=device)
        budget = [r.params.max_new_tokens for r in requests]
        prompt = torch.zeros(batch, int(lengths.max()), dtype=torch.long, device=device)
        for b, r in enumerate(requests):
            prompt[b, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        stats, row_stats, begin = GenerationStats(), [RowStats() for _ in requests], time.perf_counter()
        request_ids = [r.request_id for r in requests]
        self.recorder.step_begin(0, request_ids)
        state, logits = self.prefill(prompt, lengths, max(len(r.prompt_ids) + n for r, n in zip(requests, budget)),
                                     kv_dtype)
        first = pick(logits, requests, generators)
        self.start(state, first, lengths)
        out, finish = [[] for _ in requests], [""] * batch
        new, step, last = [[int(t)] for t in first.tolist()], 0, 0.0
        while True:
            for b, tokens in enumerate(new):
                kept = []
                for token in tokens:
                    if finish[b]:
                        break
                    kept.append(token)
                    if requests[b].params.stop_on_eos and token in self.model.cfg.eos_token_ids:
                        finish[b] = "eos"
                    elif len(out[b]) + len(kept) >= budget[b]:
                        finish[b] = "length"
                out[b] += kept
                new[b] = kept
            now = time.perf_counter()
            if step == 0:
                stats.ttft_s = now - begin
            else:
                stats.step_s.append(now - last)
            last = now
            self.recorder.step_end(sum(len(n) for n in new), **({"accepted": accepted} if step else {}))
            if on_tokens:
                on_tokens(step, new)
            state.active = [not f for f in finish]
            if all(finish):
                break
            step += 1
            self.recorder.step_begin(step, request_ids)
            before = [r.accepted for r in row_stats]
            new = self.speculative_step(state, requests, generators, row_stats)
            accepted = [r.accepted - b for r, b in zip(row_stats, before)]  # drafts kept per request (trace)
        stats.total_s = time.perf_counter() - begin
        stats.spec = {"config": self.spec.describe(), "layer_ids": list(self.layer_ids), "steps": step}
        return [Completion(r.request_id, out[b], finish[b], spec=row_stats[b].summary(len(out[b])))
                for b, r in enumerate(requests)], stats

    def features(self, aux_hidden: list[torch.Tensor]) -> torch.Tensor:
        """The target's aux outputs (ascending unique layers) -> (B, T, n_aux*H) in the draft's order."""
        return target_features(aux_hidden, self.layer_ids)

    def prefill(self, prompt: torch.Tensor, lengths: torch.Tensor, max_len: int,
                kv_dtype) -> tuple[BatchState, torch.Tensor]:
        """Target prefill (B, P) -> (state, last-row logits). The first token comes from the caller's
        plain sampling; `start` then sets it as the root and runs the draft over the prompt."""
        if self.graphs is not None:
            cache, draft_cache = self.graphs.cache, self.graphs.draft_cache
        else:
            cache = self.model.new_cache(prompt.shape[0], max_len + self.margin, dtype=kv_dtype)
            draft_cache = self.draft.new_cache(prompt.shape[0], max_len + self.margin)
        out = self.model(prompt, cache, n_new=lengths, aux_layers=self.aux_set)
        batch_rows = torch.arange(prompt.shape[0], device=prompt.device)
        logits = out.logits[batch_rows, lengths - 1][:, None]  # (B, 1, V_r)
        active = [True] * prompt.shape[0]
        state = BatchState(cache=cache, draft_cache=draft_cache, root=prompt[:, 0], active=active,
                           active_rows=torch.ones_like(lengths), uploaded=list(active),
                           verify_rows=torch.full_like(lengths, self.spec.shape[2] + 1),
                           prompt_block=(F.pad(prompt[:, 1:], (0, 1)), self.features(out.aux_hidden), lengths.clone()))
        return state, logits

    def start(self, state: BatchState, first: torch.Tensor, lengths: torch.Tensor) -> None:
        """first: (B,) the token sampled after the prompt: the root of step 1, and the last token the
        draft reads in its catch-up on the prompt (eager: a prompt has any length)."""
        state.root = first.to(lengths.device, copy=True)  # picked on the host: uploaded here, not inside step 1
        tokens, features, n = state.prompt_block
        tokens[torch.arange(len(first), device=first.device), lengths - 1] = first
        state.root_logits, state.root_hidden = self.catch_up(state, tokens, features, n, (n - 1).clamp(min=0),
                                                             graph=False)
        state.prompt_block = None

    def speculative_step(self, state: BatchState, requests, generators, stats: list[RowStats]) -> list[list[int]]:
        """One propose / verify / accept round for every row. Returns each row's new tokens."""
        if state.active != state.uploaded:  # a row finished: 0 new tokens from now on
            state.active_rows = torch.tensor(state.active, dtype=torch.long, device=state.root.device)
            state.verify_rows = state.active_rows * (self.spec.shape[2] + 1)
            state.uploaded = list(state.active)
        t0 = time.perf_counter()
        one_graph = self.graphs is not None and not self.sampled
        if one_graph:
            table = self.graphs.run_step(state).tolist()  # the step's one read
            draft_s = 0.0
        else:
            table, draft_s = self.step_by_step(state, requests, generators)
        step_s = time.perf_counter() - t0
        new = []
        for b, row in enumerate(table):  # row: kept rows n (root + path), then the path's tokens and the extra
            if state.active[b]:
                stats[b].record(row[0] - 1, self.spec.shape[1], draft_s, step_s - draft_s, step_s, one_graph)
            new.append(row[1: 1 + row[0]] if state.active[b] else [])
        return new

    def step_by_step(self, state: BatchState, requests, generators) -> tuple[list[list[int]], float]:
        """A step with the forwards one by one (eager, or replays of per-forward graphs). Returns the
        read table (B rows of kept rows n, then tokens) and the seconds spent drafting."""
        t0 = time.perf_counter()
        with self.recorder.span("draft"):  # 1. grow the tree from the root
            grow_args = (self.draft, state.draft_cache, self.spec.shape, [r.params for r in requests], generators)
            grower = self.graphs.grower(*grow_args) if self.graphs is not None else TreeGrower(*grow_args)
            tree = grower.grow(state.root_logits, state.root_hidden)
        t1 = time.perf_counter()
        with self.recorder.span("verify"):  # 2. every node in ONE target forward: ancestor mask, per-node positions
            start = state.cache.lengths.clone()  # (B,)
            tokens, positions, mask = tree.verify_inputs(state.root, start)  # (B, N+1) x2, (B, N+1, N+1)
            logits, features, argmax = self.verify(state, tree, tokens, positions, mask)
            verdict = greedy_verdict(tree, argmax, self.spec.shape[1] + 1)  # 3. accept
            if self.sampled:
                decided = self.accept_sampled(logits, tree, requests, generators)
                verdict = with_host_rows(verdict, self.sampled, decided, tree.tokens.shape[1])
            pending = commit(state.cache, start, tokens, features, verdict, state.active_rows)  # 4.
            table = torch.cat([pending.n[:, None], pending.tokens], dim=1).tolist()  # 5. the step's one read
        t2 = time.perf_counter()
        with self.recorder.span("draft"):  # 6. the draft reads the kept rows (eager: no wider than the longest)
            width = max(1, max(row[0] for row in table)) if self.graphs is None else pending.tokens.shape[1]
            state.root_logits, state.root_hidden = self.catch_up(state, pending.tokens[:, :width],
                                                                 pending.features[:, :width], pending.n, pending.last)
        state.root = pending.root
        return table, (t1 - t0) + (time.perf_counter() - t2)

    def verify(self, state: BatchState, tree: Tree, tokens, positions, mask):
        """-> logits (B, N+1, V_r), target features (B, N+1, F), the target's argmax (B, N+1)."""
        n_new = state.verify_rows  # (B,) 0: a finished row
        if self.graphs is not None:
            inputs = {"tokens": tokens, "positions": positions, "n_new": n_new}
            if not tree.chain:  # a chain's mask is causal, as the step's buffer has been since it was made
                inputs["mask"] = mask
            return self.graphs.verify(**inputs)
        out = self.model(tokens, state.cache, n_new=n_new, positions=positions, step_mask=mask,
                         aux_layers=self.aux_set)
        argmax = distributed_argmax(out.logits.flatten(0, 1), self.model.shard.vocab_start, self.model.comm)
        return out.logits, self.features(out.aux_hidden), argmax.view(tokens.shape)

    def catch_up(self, state: BatchState, tokens, features, n_new, last, graph: bool = True):
        """The draft reads a block: tokens (B, T), each row's target feature (B, T, F) paired with the
        token after it, n_new (B,) real rows, last (B,) the root's row. Returns the root's draft
        logits (B, Vd_r) and hidden state (B, H). A graph takes blocks up to its width, padded."""
        pad = self.graphs.width - tokens.shape[1] if self.graphs is not None and graph else -1
        if pad >= 0:
            return self.graphs.catch_up(tokens=F.pad(tokens, (0, pad)) if pad else tokens,  # (B, W)
                                        features=F.pad(features, (0, 0, 0, pad)) if pad else features,  # (B, W, F)
                                        n_new=n_new, last=last)
        out = self.draft(tokens, state.draft_cache, target_features=features, n_new=n_new, logit_rows=last[:, None])
        return out.logits[:, 0], out.hidden[torch.arange(len(last), device=last.device), last]

    def accept_sampled(self, local_logits: torch.Tensor, tree: Tree, requests,
                       generators) -> list[tuple[list[int], int]]:
        """Lossless rejection sampling for the sampling rows, on the host: (accepted rows, extra
        token) each. local_logits: (B, N+1, V_r); the full distribution is gathered at every node."""
        vocab = self.model.cfg.vocab_size
        # (B_s, N+1, V) on the CPU, where the requests' seeded generators draw
        full = self.model.comm.all_gather(local_logits[self.sampled], dim=-1)[..., :vocab].float().cpu()
        tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
        decided = []
        for i, b in enumerate(self.sampled):
            probs = torch.softmax(filter_logits(full[i], requests[b].params), dim=-1)  # (N+1, V)
            proposals = tree.proposals[b] if tree.proposals is not None else None
            decided.append(accept_sampled(probs, tokens[b], parents[b], proposals, generators[b]))
        return decided
