"""CUDA graphs of the decode step: the worker owns the static buffers, the model only promises a
step with no host sync (`Llama4.forward(static=True)` on the fused kernels).

Why: at batch 1 a decode step of a small or sharded model is hundreds of short kernels, and eager
PyTorch spends ~10 us of host time launching each, so the GPU idles between them (the medium
model's eager step measured 10 ms against a 0.18 ms HBM floor). Replaying a captured graph
launches the whole step with one call and the kernels run back to back.

A graph is bound to the addresses it captured, so each graph owns its inputs (token ids, real
token counts) and its KV cache, and lives as long as that cache: one per (batch rows, cache
slots) bucket, reused by every later batch of the same bucket (cache slots are powers of two
from 256, so few buckets exist). Attention reads the whole cache buffer with a length mask,
and the kernels stop at each row's real length, so a long buffer costs no extra bytes.

The graph ends with the greedy choice (the distributed argmax over the vocabulary slices), so a
greedy step returns token ids; rows that sample read the captured logits and sample them as the
eager path does (CPU generators seeded per request), so `--seed` reproduces either way.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from model.attention import KVCache
from model.fast_path import MAX_TOKENS, graph_blocker
from model.llama4 import Llama4
from model.sampling import distributed_argmax

MIN_SLOTS = 256
MAX_GRAPHS = 4  # buckets kept alive (each holds a KV cache)
WARMUP_STEPS = 2  # compiles and tunes every kernel outside the capture


def cache_slots(needed: int, max_context: int) -> int:
    """The bucket of cache slots for a batch that needs `needed`: a power of two >= MIN_SLOTS."""
    slots = MIN_SLOTS
    while slots < needed:
        slots *= 2
    return max(min(slots, max_context), needed)


class DecodeGraph:
    """One captured step of `n_tokens` new tokens per row over its own static KV cache."""

    def __init__(self, model: Llama4, cache: KVCache, n_tokens: int = 1) -> None:
        if cache.batch * n_tokens > MAX_TOKENS:
            raise ValueError(f"a graph step takes at most {MAX_TOKENS} rows x tokens, got "
                             f"{cache.batch} x {n_tokens}")
        self.model, self.cache = model, cache
        device = cache.lengths.device
        self.tokens = torch.zeros(cache.batch, n_tokens, dtype=torch.long, device=device)  # (B, T)
        self.n_new = torch.full((cache.batch,), n_tokens, dtype=torch.long, device=device)  # (B,)
        saved = cache.lengths.clone()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
            for _ in range(WARMUP_STEPS):
                self._step()
                cache.lengths.copy_(saved)  # the warm-up's KV writes sit past every row's length
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, self.next_ids = self._step()  # (B, T, V_r), (B,)
            if n_tokens == 1:  # greedy decoding feeds its choice back: the next replay needs no input
                self.tokens[:, 0].copy_(self.next_ids)
        cache.lengths.copy_(saved)
        # the greedy ids of two replays in flight, read back without stalling the stream
        self._host_ids = [torch.empty(cache.batch, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self._copied = [torch.cuda.Event() for _ in range(2)]
        self._slot = 0

    def _step(self) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(self.tokens, self.cache, n_new=self.n_new, static=True).logits
        return logits, distributed_argmax(logits[:, -1], self.model.shard.vocab_start, self.model.comm)

    def set_inputs(self, tokens: list[int], active: list[int]) -> None:
        """The next replay's input ids (one per row) and rows still decoding (1) or finished (0),
        queued on the stream behind the replays already launched."""
        self.tokens[:, 0].copy_(torch.tensor(tokens), non_blocking=True)
        self.set_active(active)

    def set_active(self, active: list[int]) -> None:
        """Rows still decoding (1) or finished (0) from the next replay queued on."""
        self.n_new.copy_(torch.tensor(active), non_blocking=True)

    def launch(self) -> int:
        """Queues one greedy step (its input: the previous step's choice, or set_inputs) and the
        copy of its ids to the host. Returns a handle for `read`; two may be in flight."""
        self.graph.replay()
        slot, self._slot = self._slot, self._slot ^ 1
        self._host_ids[slot].copy_(self.next_ids, non_blocking=True)
        self._copied[slot].record()
        return slot

    def read(self, slot: int) -> list[int]:
        """The greedy ids of the step `launch` returned `slot` for (waits for that step only)."""
        self._copied[slot].synchronize()
        return self._host_ids[slot].tolist()

    def replay(self, tokens: torch.Tensor, n_new: torch.Tensor) -> None:
        """tokens: (B, T) the step's input ids; n_new: (B,) real tokens per row (0: finished row).
        Advances the cache; read `next_ids` (greedy) or `logits` afterwards."""
        self.tokens.copy_(tokens, non_blocking=True)
        self.n_new.copy_(n_new, non_blocking=True)
        self.graph.replay()


class GraphPool:
    """Decode graphs by (batch rows, cache slots), least recently used dropped past MAX_GRAPHS."""

    def __init__(self, model: Llama4, kv_dtype: torch.dtype | None, max_context: int) -> None:
        self.model, self.kv_dtype, self.max_context = model, kv_dtype, max_context
        self.graphs: OrderedDict[tuple[int, int], DecodeGraph] = OrderedDict()
        self.blocker = graph_blocker(model)

    def get(self, batch: int, needed_slots: int) -> DecodeGraph:
        """A graph (and its cache, emptied) for `batch` rows needing `needed_slots` cache slots."""
        key = (batch, cache_slots(needed_slots, self.max_context))
        graph = self.graphs.pop(key, None)
        if graph is None:
            while len(self.graphs) >= MAX_GRAPHS:
                self.graphs.popitem(last=False)
            cache = self.model.new_cache(batch, key[1], self.kv_dtype)
            graph = DecodeGraph(self.model, cache)
        self.graphs[key] = graph
        graph.cache.lengths.zero_()
        return graph
