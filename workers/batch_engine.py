"""Continuous batching on one rank: a fixed set of slots in one KV cache, rows joining and leaving
between steps. Every rank runs the same engine in lockstep on the same commands (workers/serve_loop.py
hands them out), so every choice below is made identically everywhere, as in workers/engine.py.

A step is
  1. decode:  ONE forward over the rows up to the highest busy slot (plus one free row, see below),
              one token for each running row (the others, free slots and rows still in prefill,
              take n_new = 0 and ride along; the driver fills the lowest free slot first);
  2. prefill: joining rows, oldest first, each fed its next chunk of at most `prefill_chunk` prompt
              tokens, while the step's budget of `prefill_chunk` tokens lasts (the first joining row
              always gets its chunk). A long prompt therefore delays the running rows by at most
              one chunk's forward per step. The chunk that ends a prompt gives the row its first token.
Rows that finish (EOS, budget) or are retired leave their slot at once; a new row resets its
slot's length to 0 and overwrites the old keys as it goes.

Batch invariance (fp32 on CPU actors): a row's logits are the same BITS whatever else is in the
batch, so its greedy tokens are the same alone or among others. What it takes, each measured:
  * a decode forward has at least MIN_ROWS rows (free ones if need be): MKL's fp32 GEMM gives a
    row other bits below 4 rows, and on this project's VM the same bits for any count from 4 up
    (measured: 4..256). Not on every CPU (an Intel host's rows changed from 11 rows up), so the
    engine asks its CPU at start (workers/gemm_rows.py) and, where counts differ, runs every decode
    forward over all its rows;
  * prefill runs each row in its own forward (a one-row view of the cache) with chunk boundaries
    fixed by the row's own prompt (0, C, 2C...), never shared with another row;
  * the MoE's per-expert GEMMs pad small groups to 4 rows, or to all rows with the above
    (model/ffn.py MIN_GEMM_ROWS, Experts.gemm_rows);
  * attention reads a number of key slots that is a multiple of KEY_BLOCK: torch's CPU attention
    rounds differently when the key count's tail is not a whole vector (a key count of 100 vs 101
    changes a row's output; any multiple of 8 gives the same bits). The eager step reads up to the
    longest row, so a free row of the step (the "ruler", one past the highest busy slot; the
    cache has one row more than there are slots) gets the length that makes it a whole block.
Speculative steps (workers/batch_spec.py) run over every row and make no such promise.
Against workers.engine run alone (one full-prompt prefill, one-row decode GEMMs) the tokens agree
but the bits need not: that engine's decode takes the small-GEMM kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.attention import KVCache
from model.llama4 import Llama4
from model.sampling import SamplingParams, next_tokens
from workers.engine import RequestError
from workers.gemm_rows import FIXED, decode_rows_policy, pad_expert_groups

KEY_BLOCK = 64  # attention key counts are rounded up to this (a multiple of any CPU vector width)
MIN_ROWS = 4  # rows in every decode forward: MKL's fp32 GEMM keeps one kernel from 4 rows up
IDLE = SamplingParams()  # settings of rows with nothing to decode (greedy: they draw nothing)


def round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def row_view(cache: KVCache, row: int, n_rows: int = 1) -> KVCache:
    """Rows [row, row + n_rows) of `cache` as a KVCache sharing its storage: a forward on it writes
    those rows' keys, values and lengths in place (basic slicing keeps views)."""
    view = KVCache.__new__(KVCache)
    view.k = [t[row: row + n_rows] for t in cache.k]  # (n_rows, Hkv, S, D) each
    view.v = [t[row: row + n_rows] for t in cache.v]
    view.lengths = cache.lengths[row: row + n_rows]  # (n_rows,)
    view.max_len, view.dtype, view.scales = cache.max_len, cache.dtype, cache.scales
    return view


@dataclass
class Row:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    prefilled: int = 0  # prompt tokens already in the cache
    out: list[int] = field(default_factory=list)
    finish: str | None = None  # "eos", "length" once done

    @property
    def length(self) -> int:
        """Cache slots this row holds (prompt so far, then every generated token but the last)."""
        return self.prefilled + max(len(self.out) - 1, 0)


@dataclass(frozen=True)
class RowEvent:
    slot: int
    request_id: str
    tokens: list[int]  # new tokens this step
    finish: str | None  # "eos" / "length" when the row ended this step (its slot is free again)
    spec: dict | None = None  # speculative decoding: the row's acceptance metrics, when it ended


class BatchEngine:
    def __init__(self, model: Llama4, max_batch: int, max_context: int, prefill_chunk: int,
                 kv_dtype: torch.dtype | None = None, draft=None, spec=None, spec_max_batch: int | None = None) -> None:
        """spec: a model.spec.SpecConfig to decode speculatively with `draft` (an EAGLE-3 draft on
        the same ranks), each row accepting its own number of drafts (workers/batch_spec.py).
        spec_max_batch: once more rows than this decode at once, the engine decodes plainly (every
        row, one token a step) until it is empty, then speculates again -- at high batch a verify of
        N+1 tokens a row costs more than the drafts it accepts save (vLLM's
        speculative_disable_by_batch_size). None: always speculate."""
        if max_batch < 1 or prefill_chunk < 1 or max_context < 2 or spec_max_batch is not None and spec_max_batch < 1:
            raise ValueError(f"max_batch ({max_batch}), prefill_chunk ({prefill_chunk}) and spec_max_batch "
                             f"({spec_max_batch}) must be >= 1, max_context ({max_context}) >= 2")
        if spec is not None and draft is None:
            raise RequestError("speculative decoding was asked for, but no EAGLE-3 draft is loaded")
        self.model, self.cfg = model, model.cfg
        self.max_batch, self.max_context, self.prefill_chunk = max_batch, max_context, prefill_chunk
        self.n_rows = max(max_batch + 1, MIN_ROWS)  # the slots, then spare rows (a free row is the ruler)
        self.device = model.embed_tokens.weight.device
        # CPU: a decode forward's rows follow the busy slots where this CPU's GEMMs allow it, else are all rows
        self.fixed_rows = self.device.type == "cpu" and decode_rows_policy(model, MIN_ROWS, self.n_rows) == FIXED
        if self.fixed_rows:
            pad_expert_groups(model, self.n_rows)
        self.spec_rows, self.spec_max_batch = None, spec_max_batch
        self.speculating = spec is not None  # False from a step above spec_max_batch until the engine empties
        self.plain_steps = 0  # decode steps taken plainly while a draft was loaded
        slots = round_up(max_context + 1, KEY_BLOCK)  # per row: the longest request, a ruler step's keys
        if spec is not None:
            from workers.batch_spec import SpecRows  # it builds on this module's row_view
            self.spec_rows = SpecRows(model, draft, spec, self.n_rows, slots, kv_dtype)
            self.cache = self.spec_rows.cache
        else:
            self.cache = model.new_cache(self.n_rows, slots, kv_dtype)
        self.rows: list[Row | None] = [None] * max_batch
        self.joining: list[int] = []  # slots still in prefill, oldest first
        self.steps = 0
        self.logits_hook = None  # hook(request_id, local logits (V_r,)) for every token chosen: tests read the bits

    # --- the slot table -------------------------------------------------------------------------
    @torch.inference_mode()
    def add(self, slot: int, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """A request takes slot `slot` (free); its prefill starts at the next step."""
        if not 0 <= slot < self.max_batch or self.rows[slot] is not None:
            raise RequestError(f"request {request_id}: slot {slot} is not a free slot of {self.max_batch}")
        if not prompt_ids or len(prompt_ids) + params.max_new_tokens > self.max_context:
            raise RequestError(f"request {request_id}: prompt of {len(prompt_ids)} tokens + {params.max_new_tokens} "
                               f"new does not fit the context of {self.max_context}")
        seed = params.seed if params.seed is not None else 0
        self.rows[slot] = Row(request_id, list(prompt_ids), params, torch.Generator().manual_seed(seed))
        self.cache.lengths[slot] = 0
        if self.spec_rows is not None:
            self.spec_rows.join(slot)
        self.joining.append(slot)

    @torch.inference_mode()
    def retire(self, slot: int) -> Row | None:
        """Frees a slot (a cancelled request); returns the row it held, or None if it was free."""
        row = self.rows[slot] if 0 <= slot < self.max_batch else None
        if row is not None:
            self.rows[slot] = None
            if slot in self.joining:
                self.joining.remove(slot)
            self.cache.lengths[slot] = 0
            if self.spec_rows is not None and not self.busy:
                self.speculating = True  # empty: every row that joins from now on drafts from its prefill
        return row

    @property
    def busy(self) -> bool:
        return any(row is not None for row in self.rows)

    @property
    def running(self) -> int:
        return sum(row is not None for row in self.rows)

    # --- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RowEvent]:
        """Decode one token for every running row, then prefill joining rows within the budget."""
        events = self._decode()
        events += self._prefill()
        self.steps += 1
        return events

    def _decoding(self) -> list[int]:
        return [s for s, row in enumerate(self.rows) if row is not None and row.out]

    def _decode(self) -> list[RowEvent]:
        slots = self._decoding()
        if not slots:
            return []
        params, generators = [IDLE] * self.n_rows, [None] * self.n_rows
        for s in slots:
            params[s], generators[s] = self.rows[s].params, self.rows[s].generator
        if self.speculating and self.spec_max_batch is not None and len(slots) > self.spec_max_batch:
            self.speculating = False  # the rows' target caches hold all but their last token, as a plain step wants
        if self.spec_rows is not None and self.speculating:
            accepted = self.spec_rows.step(params, generators, slots)  # each row its own count
            return [self._emit(s, accepted[s]) for s in slots]
        self.plain_steps += self.spec_rows is not None
        # rows [0, n): every busy slot (the driver fills the lowest free slot first), then a free
        # row as the ruler; at least MIN_ROWS, so the GEMMs keep their kernel whatever n is
        busy = max(s for s, row in enumerate(self.rows) if row is not None)
        n = self.n_rows if self.fixed_rows else max(busy + 2, MIN_ROWS)
        ruler = n - 1
        ids = torch.zeros(n, 1, dtype=torch.long)  # (n, 1)
        n_new = torch.zeros(n, dtype=torch.long)  # (n,)
        for s in slots:
            ids[s, 0], n_new[s] = self.rows[s].out[-1], 1
        longest = max(row.length for row in self.rows if row is not None)
        self.cache.lengths[ruler] = round_up(longest + 1, KEY_BLOCK) - 1  # keys read: a whole block
        view = row_view(self.cache, 0, n)
        logits = self.model(ids.to(self.device), view, n_new=n_new.to(self.device)).logits  # (n, 1, V_r)
        self.cache.lengths[ruler] = 0
        tokens = self._pick(logits[:, -1], params[:n], generators[:n])
        for s in slots if self.logits_hook else ():
            self.logits_hook(self.rows[s].request_id, logits[s, -1])
        return [self._emit(s, [tokens[s]]) for s in slots]

    def _prefill(self) -> list[RowEvent]:
        events, budget = [], self.prefill_chunk
        drafting = self.spec_rows is not None and self.speculating
        aux = self.spec_rows.aux_layers if drafting else ()
        for slot in list(self.joining):
            row = self.rows[slot]
            start = row.prefilled
            chunk = row.prompt[start: start + self.prefill_chunk]
            if len(chunk) > budget and budget < self.prefill_chunk:
                break  # the next row's chunk waits for the next step (its boundaries never move)
            budget -= len(chunk)
            tokens = torch.tensor([chunk], dtype=torch.long, device=self.device)  # (1, C)
            out = self.model(tokens, row_view(self.cache, slot), last_only=True, aux_layers=aux)
            row.prefilled += len(chunk)
            done = row.prefilled == len(row.prompt)
            following = row.prompt[row.prefilled] if not done else None
            if done:
                self.joining.remove(slot)
                following = self._pick(out.logits[:, -1], [row.params], [row.generator])[0]
                if self.logits_hook:
                    self.logits_hook(row.request_id, out.logits[0, -1])
            if drafting:  # the draft reads the chunk's (feature, next token) pairs
                self.spec_rows.prefill_chunk(slot, chunk, out.aux_hidden, following)
            if done:
                events.append(self._emit(slot, [following]))
            if budget <= 0:
                break
        return events

    def _pick(self, local_logits: torch.Tensor, params: list[SamplingParams], generators) -> list[int]:
        shard = self.model.shard
        return next_tokens(local_logits, shard.vocab_start, self.cfg.vocab_size, self.model.comm,
                           params, generators).tolist()

    def _emit(self, slot: int, tokens: list[int]) -> RowEvent:
        """Appends a row's new tokens up to its end (EOS, budget), freeing the slot if it ended."""
        row, kept = self.rows[slot], []
        for token in tokens:
            kept.append(token)
            row.out.append(token)
            if row.params.stop_on_eos and token in self.cfg.eos_token_ids:
                row.finish = "eos"
            elif len(row.out) >= row.params.max_new_tokens:
                row.finish = "length"
            if row.finish:
                break
        spec = self.spec_rows.summary(slot, len(row.out)) if self.spec_rows is not None and row.finish else None
        if row.finish:
            self.retire(slot)
        return RowEvent(slot, row.request_id, kept, row.finish, spec)
