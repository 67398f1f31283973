"""EAGLE-3 speculative decoding for the continuous-batching engine (workers/batch_engine.py): every
row of the batch drafts, is verified and accepts its OWN number of draft tokens in one step.

It reuses the fixed-batch decoder (workers/speculative.py) over the engine's whole slot array:
the decoder's BatchState spans every cache row, and a row that is not decoding (a free slot, a
row still in prefill) is simply inactive in it (verifies 0 rows, commits nothing). What joining
adds is the per-row start: the target prefill of each chunk also returns the aux features, and
the draft catches up on them chunk by chunk (row t pairs the feature at t with token t+1, so a
chunk's last pair waits for the next chunk's first token, or, at the end of the prompt, for the
first generated token, which then becomes the row's root).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from model.spec import SpecConfig
from workers.batch_engine import row_view
from workers.speculative import BatchState, RowStats, SpecDecoder
from workers.tracing import NullRecorder


class SpecRows:
    def __init__(self, model, draft, spec: SpecConfig, n_rows: int, slots: int, kv_dtype=None) -> None:
        """Makes the target's KV cache (`cache`, for the engine) and the draft's: n_rows rows of
        `slots` slots plus the margin a speculative step writes past a row's end."""
        self.decoder = SpecDecoder(model, draft, spec, NullRecorder())
        self.model, self.draft = model, draft
        self.cache = model.new_cache(n_rows, slots + self.decoder.margin, kv_dtype)
        self.draft_cache = draft.new_cache(n_rows, slots + self.decoder.margin)
        cache = self.cache
        device = model.embed_tokens.weight.device
        zeros = torch.zeros(n_rows, dtype=torch.long, device=device)
        vd_r, hidden = draft.shard.vocab_per_rank, draft.cfg.hidden_size
        self.state = BatchState(cache=cache, draft_cache=self.draft_cache, root=zeros.clone(), active=[False] * n_rows,
                                active_rows=zeros.clone(), uploaded=[False] * n_rows, verify_rows=zeros.clone(),
                                root_logits=torch.zeros(n_rows, vd_r, device=device),
                                root_hidden=torch.zeros(n_rows, hidden, device=device))
        self.stats = [RowStats() for _ in range(n_rows)]
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> the chunk's unpaired (token, feature)

    @property
    def aux_layers(self) -> tuple[int, ...]:
        return self.decoder.aux_set

    def join(self, slot: int) -> None:
        self.draft_cache.lengths[slot] = 0
        self.stats[slot] = RowStats()
        self.pending.pop(slot, None)

    def prefill_chunk(self, slot: int, chunk: list[int], aux_hidden: list[torch.Tensor], next_token: int) -> None:
        """After the target's forward over `chunk` (aux_hidden from it): the draft reads the chunk's
        pairs (feature t, token t+1). next_token: the prompt token after the chunk, or the first
        generated token after the last chunk (which then becomes the row's root)."""
        features = self.decoder.features(aux_hidden)  # (1, C, F)
        device = features.device
        tokens = torch.tensor([chunk[1:] + [next_token]], dtype=torch.long, device=device)  # (1, C)
        n = len(chunk)
        out = self.draft(tokens, row_view(self.draft_cache, slot), target_features=features,
                         n_new=torch.tensor([n], device=device), logit_rows=torch.tensor([[n - 1]], device=device))
        self.state.root_logits[slot] = out.logits[0, 0]
        self.state.root_hidden[slot] = out.hidden[0, n - 1]
        self.state.root[slot] = next_token

    def step(self, params: list, generators: list, decoding: list[int]) -> dict[int, list[int]]:
        """One propose / verify / accept round; rows `decoding` are active. Returns each active
        row's accepted tokens (1 + its accepted drafts)."""
        active = [False] * len(params)
        for s in decoding:
            active[s] = True
        self.state.active = active
        self.decoder.sampled = [s for s in decoding if not params[s].greedy]
        rows = [SimpleNamespace(params=p) for p in params]
        new = self.decoder.speculative_step(self.state, rows, generators, self.stats)
        return {s: new[s] for s in decoding}

    def summary(self, slot: int, n_tokens: int) -> dict:
        return self.stats[slot].summary(n_tokens)
