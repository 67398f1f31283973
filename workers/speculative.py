"""Speculative decoding with an EAGLE-3 draft: the per-rank loop every rank runs in lockstep.

A batch is still ONE call: prefill, then `speculative_step` until every row is done. Each step
  1. draft   the draft catches up on the target features of the tokens accepted last step (the
             only rows it ever commits to its KV cache), then grows a chain or an EAGLE-2 tree;
  2. verify  ONE target forward over root + nodes, with an ancestor mask and per-node positions,
             which also returns the aux features of every node;
  3. accept  greedy acceptance or lossless rejection sampling (model/acceptance.py), per row;
  4. commit  the accepted path's target KV rows are compacted into place, the rest forgotten,
             and the path's features are queued for the draft's next catch-up.
Every row keeps its own accepted length; rows that finish ride along with zero new tokens. All
choices are made identically on every rank (distributed top-k/argmax, seeded generators), so
there is no driver round trip per step.

With CUDA graphs (workers/spec_graphs.py, chosen by the engine) the verify step and the draft's
forwards replay captured graphs over static buffers; the loop and its glue are the same.

Metrics per request: acceptance length (1 + accepted drafts per verification step, averaged, as
vLLM defines it), acceptance rate per draft position (fraction of steps whose position-i draft was
accepted), draft and verify seconds, tokens/s. In a trace, every step record carries `accepted`
(drafts kept per request) and `tokens`, inside the step's "draft" and "verify" spans.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model.acceptance import accept_greedy, accept_sampled
from model.config import ConfigError
from model.draft_tree import Tree, TreeGrower
from model.eagle3 import Eagle3Draft
from model.llama4 import Llama4
from model.sampling import distributed_argmax, filter_logits
from model.spec import SpecConfig, resolve_layer_ids
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

    def record(self, n_accepted: int, depth: int, draft_s: float, verify_s: float, step_s: float) -> None:
        if not self.per_position:
            self.per_position = [0] * depth
        self.steps += 1
        self.accepted += n_accepted
        for i in range(n_accepted):
            self.per_position[i] += 1
        self.draft_s += draft_s
        self.verify_s += verify_s
        self.decode_s += step_s

    def summary(self, new_tokens: int) -> dict:
        steps = max(self.steps, 1)
        return {"acceptance_length": 1.0 + self.accepted / steps if self.steps else None,
                "acceptance_per_position": [n / steps for n in self.per_position] if self.steps else [],
                "verify_steps": self.steps, "draft_s": self.draft_s, "verify_s": self.verify_s,
                "tokens_per_s": (new_tokens - 1) / self.decode_s if self.decode_s > 0 and new_tokens > 1 else None}


@dataclass
class BatchState:
    cache: object  # the target's KVCache
    draft_cache: object
    root: torch.Tensor  # (B,) last accepted token, not yet in the target cache
    pending_tokens: torch.Tensor  # (B, M) tokens the draft still has to read, row t pairs with
    pending_features: torch.Tensor  # (B, M, n_aux*H) the target feature at the token before
    pending_n: torch.Tensor  # (B,) real rows of the pending block (0: finished)
    active: list[bool]


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
        self.aux_set = tuple(sorted(set(self.layer_ids)))
        self.graphs: SpecGraphs | None = None

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
        plain sampling; `start` then sets it as the root."""
        if self.graphs is not None:
            cache, draft_cache = self.graphs.cache, self.graphs.draft_cache
        else:
            cache = self.model.new_cache(prompt.shape[0], max_len + self.margin, dtype=kv_dtype)
            draft_cache = self.draft.new_cache(prompt.shape[0], max_len + self.margin)
        out = self.model(prompt, cache, n_new=lengths, aux_layers=self.aux_set)
        batch_rows = torch.arange(prompt.shape[0], device=prompt.device)
        logits = out.logits[batch_rows, lengths - 1][:, None]  # (B, 1, V_r)
        state = BatchState(cache=cache, draft_cache=draft_cache,
                           root=prompt[:, 0], pending_tokens=F.pad(prompt[:, 1:], (0, 1)),
                           pending_features=self.features(out.aux_hidden), pending_n=lengths.clone(),
                           active=[True] * prompt.shape[0])
        return state, logits

    def start(self, state: BatchState, first: torch.Tensor, lengths: torch.Tensor) -> None:
        """first: (B,) the token sampled after the prompt: the root of step 1, and the last token the draft reads."""
        state.root = first.clone()
        state.pending_tokens[torch.arange(len(first), device=first.device), lengths - 1] = first

    def speculative_step(self, state: BatchState, requests, generators, stats: list[RowStats]) -> list[list[int]]:
        """One propose / verify / accept round for every row. Returns each row's new tokens."""
        rows = torch.arange(len(requests), device=state.root.device)
        t0 = time.perf_counter()
        with self.recorder.span("draft"):  # 1. catch up on the target features of the last accepted tokens, grow
            root_logits, root_hidden = self.catch_up(state, rows)  # (B, Vd_r), (B, H)
            grow_args = (self.draft, state.draft_cache, self.spec.shape, [r.params for r in requests], generators)
            grower = self.graphs.grower(*grow_args) if self.graphs is not None else TreeGrower(*grow_args)
            tree = grower.grow(root_logits, root_hidden)
        t1 = time.perf_counter()
        with self.recorder.span("verify"):  # 2. every node in ONE target forward: ancestor mask, per-node positions
            start = state.cache.lengths.clone()  # (B,)
            tokens, positions, mask = tree.verify_inputs(state.root, start)  # (B, N+1) x2, (B, N+1, N+1)
            n_new = torch.tensor(state.active, device=tokens.device) * tokens.shape[1]  # (B,) 0: finished row
            if self.graphs is not None:
                logits, features, argmax = self.graphs.verify(tokens=tokens, positions=positions, mask=mask,
                                                              n_new=n_new)
            else:
                out = self.model(tokens, state.cache, n_new=n_new, positions=positions, step_mask=mask,
                                 aux_layers=self.aux_set)
                logits, features, argmax = out.logits, self.features(out.aux_hidden), None  # (B, N+1, V_r), ...
            accepted = self.accept(logits, tree, requests, generators, argmax)  # 3. per row: (path rows, extra token)
        t2 = time.perf_counter()
        self.commit(state, start, tokens, features, accepted)  # 4. KV and draft inputs
        step_s, new = time.perf_counter() - t0, []
        for b, (path, extra) in enumerate(accepted):
            if state.active[b]:
                stats[b].record(len(path), self.spec.shape[1], t1 - t0, t2 - t1, step_s)
            new.append([int(t) for t in tokens[b, path].tolist()] + [extra] if state.active[b] else [])
        return new

    def catch_up(self, state: BatchState, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft reads the pending block (the tokens accepted last step, with their target
        features). Returns the root's draft logits (B, Vd_r) and hidden state (B, H). A graph takes
        blocks up to its width, padded; the prompt's block after the prefill runs eagerly."""
        last = (state.pending_n - 1).clamp(min=0)  # (B,) the root's row in the pending block
        pad = self.graphs.width - state.pending_tokens.shape[1] if self.graphs is not None else -1
        if pad >= 0:
            return self.graphs.catch_up(tokens=F.pad(state.pending_tokens, (0, pad)),  # (B, W)
                                        features=F.pad(state.pending_features, (0, 0, 0, pad)),  # (B, W, F)
                                        n_new=state.pending_n, last=last)
        out = self.draft(state.pending_tokens, state.draft_cache, target_features=state.pending_features,
                         n_new=state.pending_n, logit_rows=last[:, None])
        return out.logits[:, 0], out.hidden[rows, last]

    def commit(self, state: BatchState, start: torch.Tensor, tokens: torch.Tensor, features: torch.Tensor,
               accepted: list[tuple[list[int], int]]) -> None:
        """Keeps root + accepted path of every active row: their target KV rows are compacted into
        place, and the draft is queued to read them next step, each row's target feature paired
        with the token after it (the last one with the target's extra token), at positions start.. ."""
        device, batch = tokens.device, len(accepted)
        n_keep = torch.tensor([len(path) + 1 if on else 0 for (path, _), on in zip(accepted, state.active)],
                              device=device)  # (B,)
        keep = torch.arange(int(n_keep.max().clamp(min=1)), device=device).repeat(batch, 1)  # (B, M) row offsets
        for b, (path, _) in enumerate(accepted):
            if state.active[b] and path:
                keep[b, 1: len(path) + 1] = torch.tensor(path, device=device)
        state.cache.compact(start, keep, n_keep)
        extra = torch.tensor([token for _, token in accepted], device=device)  # (B,)
        state.pending_tokens = tokens.gather(1, torch.cat([keep[:, 1:], keep[:, -1:]], dim=1))  # (B, M)
        state.pending_tokens[torch.arange(batch, device=device), (n_keep - 1).clamp(min=0)] = extra
        state.pending_features = features.gather(1, keep[..., None].expand(-1, -1, features.shape[-1]))  # (B, M, F)
        state.pending_n, state.root = n_keep, extra

    def accept(self, local_logits: torch.Tensor, tree: Tree, requests, generators,
               argmax: torch.Tensor | None = None) -> list[tuple[list[int], int]]:
        """local_logits: (B, N+1, V_r); argmax: their global argmax (B, N+1) if already taken.
        Greedy rows need only the distributed argmax; sampling rows gather the full distribution
        at every node."""
        batch, rows = local_logits.shape[:2]
        shard, vocab = self.model.shard, self.model.cfg.vocab_size
        if argmax is None:
            argmax = distributed_argmax(local_logits.flatten(0, 1), shard.vocab_start, self.model.comm).view(batch, rows)
        sampled = [b for b, r in enumerate(requests) if not r.params.greedy]
        full = None  # (B_s, N+1, V) on the CPU, where the requests' seeded generators draw
        if sampled:
            full = self.model.comm.all_gather(local_logits[sampled], dim=-1)[..., :vocab].float().cpu()
        tokens, parents, argmax = tree.tokens.tolist(), tree.parents.tolist(), argmax.tolist()
        result = []
        for b, request in enumerate(requests):
            if request.params.greedy:
                result.append(accept_greedy(argmax[b], tokens[b], parents[b]))
                continue
            probs = torch.softmax(filter_logits(full[sampled.index(b)], request.params), dim=-1)  # (N+1, V)
            proposals = tree.proposals[b] if tree.proposals is not None else None
            result.append(accept_sampled(probs, tokens[b], parents[b], proposals, generators[b]))
        return result

