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

The token choice is captured too, so a step's output is token ids that feed the next replay:
the step graph ends with the greedy choice (the distributed argmax), and a batch that samples
also replays a second, small graph over the step's logits that draws every row on the device
(model.sampling.DeviceSampler: per-row generators registered with the graph, so replays draw
what eager steps would, and `--seed` reproduces).

Several ranks (tensor parallelism over NCCL, or any communicator that declares
`graph_capturable`) capture too. Capture is rank-symmetric by construction: every rank runs the
same engine code on the same requests, so every rank warms up and captures the same steps, with
the same collectives in the same order; NCCL collectives are recorded into the graph like
kernels and replay on every rank together. A warm-up runs the collectives for real first (NCCL
creates its communicators lazily, which must not happen inside a capture).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable

import torch

from collectives import gpu_stamps
from collectives.communicator import Communicator
from model.attention import KVCache
from model.fast_path import MAX_TOKENS, graph_blocker
from model.llama4 import Llama4
from model.sampling import DeviceSampler, SamplingParams

MIN_SLOTS = 256
MAX_GRAPHS = 4  # buckets kept alive (each holds a KV cache)
WARMUP_STEPS = 2  # compiles and tunes every kernel outside the capture


def cache_slots(needed: int, max_context: int) -> int:
    """The bucket of cache slots for a batch that needs `needed`: a power of two >= MIN_SLOTS."""
    slots = MIN_SLOTS
    while slots < needed:
        slots *= 2
    return max(min(slots, max_context), needed)


def comm_blocker(comm: Communicator) -> str | None:
    """Why `comm`'s collectives cannot be captured in a CUDA graph, or None when they can: one
    rank, NCCL through torch.distributed, or a backend that sets `graph_capturable = True`."""
    while hasattr(comm, "inner"):  # a tracer (paused while graphs are captured) or another wrapper
        comm = comm.inner
    if comm.world_size == 1 or getattr(comm, "graph_capturable", False):
        return None
    from collectives.torch_dist import TorchDistCommunicator
    if type(comm) is TorchDistCommunicator and comm.backend == "nccl":
        return None
    return (f"the {type(comm).__name__} ({comm.backend}) collectives cannot be captured in a CUDA graph "
            "(NCCL's can)")


def capture(step: Callable[[], object], reset: Callable[[], None], device: torch.device, world_size: int,
            generators: tuple[torch.Generator, ...] = (), ledger=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Runs `step` WARMUP_STEPS times on a side stream (every kernel compiled and tuned, every
    NCCL communicator created, outside the capture), calling reset() after each, then captures
    one call. Returns the graph and what the captured call returned (its static outputs).
    generators: device generators the step draws from; registered, so each replay advances them.
    ledger: a collectives.gpu_stamps.StampLedger: the captured step stamps GPU times into it (its
    fused norm / all-reduce kernels, and the step's begin and end: stamped by its first and last
    kernels where the warm-up saw them do it, else by stamp kernels of their own); the slots it
    took are the last ones of the ledger after this call.
    Every rank must capture the same steps in the same order (see the module docstring)."""
    stamping = (lambda: gpu_stamps.stamping(ledger)) if ledger is not None else contextlib.nullcontext
    first_slot = len(ledger.labels) if ledger is not None else 0
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), stamping():  # warm-up off the default stream, as capture requires
        for _ in range(WARMUP_STEPS):
            if ledger is not None:
                ledger.expect_edges()  # which step edges its own first / last kernels stamp
            step()
            reset()
    folded = set(ledger.folded_edges) if ledger is not None else set()
    if ledger is not None:
        ledger.rewind(first_slot)  # the warm-up compiled the stamping kernels; its slots are not kept
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    for generator in generators:
        graph.register_generator_state(generator)
    # several ranks: another thread (NCCL's watchdog) may query events while this one captures
    with torch.cuda.graph(graph, capture_error_mode="thread_local" if world_size > 1 else "global"), stamping():
        if ledger is not None:
            ledger.expect_edges(folded)
            if "begin" not in folded:  # a stamp kernel stands in for a first kernel that does not stamp
                ledger.stamp(("step", "begin"))
        outputs = step()
        if ledger is not None:
            if "end" not in folded:
                ledger.stamp(("step", "end"))
            ledger.expect_edges(())
    reset()
    return graph, outputs


class DecodeGraph:
    """One captured step of `n_tokens` new tokens per row over its own static KV cache, and its
    token choice: greedy in the step graph, sampled in a second graph (captured at the first
    batch that samples)."""

    def __init__(self, model: Llama4, cache: KVCache, n_tokens: int = 1, ledger=None) -> None:
        if cache.batch * n_tokens > MAX_TOKENS:
            raise ValueError(f"a graph step takes at most {MAX_TOKENS} rows x tokens, got "
                             f"{cache.batch} x {n_tokens}")
        ids_slot = self._buffers(model, cache, n_tokens, ledger)
        batch, device = cache.batch, self.device
        saved = cache.lengths.clone()
        # the warm-up's KV writes sit past every row's length once the lengths are restored
        self.graph, self.logits = capture(self._step, lambda: cache.lengths.copy_(saved), device,
                                          model.comm.world_size, ledger=ledger)  # logits: (B, T, V_r)
        # traced: the step's ids and GPU stamps (ledger slots from ids_slot on), copied out after each replay
        self._copied_slots = slice(ids_slot, len(ledger.labels) if ledger is not None else ids_slot + batch)
        self.stamp_slots = slice(ids_slot + batch, len(ledger.labels)) if ledger is not None else None
        self.sample_graph = None
        self.sampling = False
        # the ids (traced: and stamps) of two replays in flight, read back without stalling the stream
        width = self._copied_slots.stop - self._copied_slots.start
        self._host = [torch.empty(width, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self._copied = [torch.cuda.Event() for _ in range(2)]
        self._slot = 0

    def _buffers(self, model: Llama4, cache: KVCache, n_tokens: int, ledger=None) -> int:
        """The step's static inputs and outputs (what `_step` reads and writes). Returns the ledger slot
        of the ids: traced, they sit just before the step's stamps, so one copy brings both back."""
        self.model, self.cache, self.ledger = model, cache, ledger
        self.device = device = cache.lengths.device
        batch = cache.batch
        ids_slot = len(ledger.labels) if ledger is not None else 0
        if ledger is not None:
            for row in range(batch):
                ledger.take(("ids", row))
            self.next_ids = ledger.stamps[ids_slot:ids_slot + batch]  # (B,) the step's choice
        else:
            self.next_ids = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) the step's choice
        # decoding feeds its choice back: the next replay reads the ids the argmax kernel wrote, no copy
        self.tokens = (self.next_ids.view(batch, 1) if n_tokens == 1
                       else torch.zeros(batch, n_tokens, dtype=torch.long, device=device))  # (B, T)
        self.n_new = torch.full((batch,), n_tokens, dtype=torch.long, device=device)  # (B,)
        self.sampler = DeviceSampler(batch, model.shard.vocab_start, model.cfg.vocab_size, model.comm, device)
        return ids_slot

    def _step(self) -> torch.Tensor:
        logits = self.model(self.tokens, self.cache, n_new=self.n_new, static=True).logits
        self.sampler.pick(logits[:, -1], sampling=False, out=self.next_ids)
        return logits

    def _sample(self) -> None:
        self.sampler.pick(self.logits[:, -1], sampling=True, out=self.next_ids)

    def prepare(self, params: list[SamplingParams]) -> None:
        """This batch's sampling, set before its first draw (the prefill's `pick`): a batch with a
        sampling row replays the sampling graph after each step (captured now if it is new: its
        warm-up draws, so it comes before the generators are seeded)."""
        self.sampling = any(not p.greedy for p in params)
        if self.sampling and self.sample_graph is None:
            with torch.inference_mode():
                self.logits.zero_()  # what the warm-up reads
            self.sample_graph, _ = capture(self._sample, lambda: None, self.device, self.model.comm.world_size,
                                           tuple(self.sampler.generators))
        self.sampler.reset(params)

    def pick(self, local_logits: torch.Tensor) -> torch.Tensor:
        """local_logits: (B, V_r) of an eager step (the prefill's last rows). The ids (B,), drawn
        from the generators the replays continue from."""
        return self.sampler.pick(local_logits, self.sampling)

    def set_inputs(self, tokens: list[int], active: list[int]) -> None:
        """The next replay's input ids (one per row) and rows still decoding (1) or finished (0),
        queued on the stream behind the replays already launched."""
        self.tokens[:, 0].copy_(torch.tensor(tokens), non_blocking=True)
        self.set_active(active)

    def set_active(self, active: list[int]) -> None:
        """Rows still decoding (1) or finished (0) from the next replay queued on."""
        self.n_new.copy_(torch.tensor(active), non_blocking=True)

    def launch(self) -> int:
        """Queues one step (its input: the previous step's choice, or set_inputs), its token
        choice, and the copy of the ids to the host. Returns a handle for `read`; two may be in
        flight."""
        self.graph.replay()
        if self.sampling:
            self.sample_graph.replay()
        slot, self._slot = self._slot, self._slot ^ 1
        source = self.next_ids if self.ledger is None else self.ledger.stamps[self._copied_slots]
        self._host[slot].copy_(source, non_blocking=True)  # traced: the ids and the step's stamps at once
        self._copied[slot].record()
        return slot

    def read(self, slot: int) -> list[int]:
        """The ids of the step `launch` returned `slot` for (waits for that step only)."""
        self._copied[slot].synchronize()
        self.last_read = slot
        return self._host[slot][:self.cache.batch].tolist()

    def stamp_values(self) -> tuple[list[tuple], list[int]]:
        """The labels and GPU ns of the traced step last `read` (a graph captured with a ledger);
        the values are a copy (the pinned buffer is reused two launches later)."""
        return self.ledger.labels[self.stamp_slots], self._host[self.last_read][self.cache.batch:].tolist()


class GraphPool:
    """Graphs by key, least recently used dropped past `limit`; `make(key)` builds a missing one.
    Every rank asks for the same keys in the same order, so every rank captures alike."""

    def __init__(self, make: Callable[[tuple], object], limit: int = MAX_GRAPHS) -> None:
        self.make, self.limit = make, limit
        self.graphs: OrderedDict[tuple, object] = OrderedDict()

    def get(self, key: tuple):
        graph = self.graphs.pop(key, None)
        if graph is None:
            while len(self.graphs) >= self.limit:
                self.graphs.popitem(last=False)
            graph = self.make(key)
        self.graphs[key] = graph
        return graph


def decode_graphs(model: Llama4, kv_dtype: torch.dtype | None, ledger=None) -> GraphPool:
    """Decode graphs by (batch rows, cache slots); `decode_graph` hands one out for a batch.
    ledger: traced graphs stamp their steps' GPU times into it (workers/graph_trace.py)."""
    return GraphPool(lambda key: DecodeGraph(model, model.new_cache(key[0], key[1], kv_dtype), ledger=ledger))


def decode_graph(pool: GraphPool, batch: int, needed_slots: int, max_context: int) -> DecodeGraph:
    """A graph (and its cache, emptied) for `batch` rows needing `needed_slots` cache slots."""
    graph = pool.get((batch, cache_slots(needed_slots, max_context)))
    graph.cache.lengths.zero_()
    return graph


def model_blocker(model: Llama4) -> str | None:
    """Why no step of `model` can be captured here, or None (the batch may still be too large)."""
    if not model.embed_tokens.weight.is_cuda:
        return "the model is not on a CUDA device"
    return graph_blocker(model) or comm_blocker(model.comm)
