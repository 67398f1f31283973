"""The per-rank generation loop. Every rank runs it in lockstep on the same requests.

A whole request batch is one call: prefill all prompts together (right-padded, each row with its
own length), then decode one token per row per step until every row has hit EOS or its budget.
The next token is chosen identically on every rank (distributed argmax, or seeded sampling over
gathered logits), so no rank ever waits on the driver between steps: the control plane costs one
call per batch, not one per token. Finished rows ride along with zero new tokens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from model.fast_path import MAX_TOKENS as MAX_GRAPH_ROWS
from model.llama4 import Llama4
from model.sampling import SamplingParams, next_tokens
from workers.tracing import NullRecorder


class RequestError(ValueError):
    """A request that cannot be served as asked (the message says why)."""


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    params: SamplingParams = SamplingParams()
    request_id: str = "0"


@dataclass
class Completion:
    request_id: str
    token_ids: list[int]
    finish_reason: str  # "eos" or "length"
    spec: dict = field(default_factory=dict)  # speculative decoding metrics (workers/speculative.py)


@dataclass
class GenerationStats:
    ttft_s: float = 0.0
    step_s: list[float] = field(default_factory=list)  # one entry per decode step after the prefill
    total_s: float = 0.0
    spec: dict = field(default_factory=dict)  # speculative decoding: config, layer ids, steps


def validate_requests(requests: list[Request], vocab_size: int, max_context: int) -> None:
    if not requests:
        raise RequestError("no requests given")
    for r in requests:
        if not r.prompt_ids:
            raise RequestError(f"request {r.request_id}: the prompt is empty")
        bad = [t for t in r.prompt_ids if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"request {r.request_id}: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
        need = len(r.prompt_ids) + r.params.max_new_tokens
        if need > max_context:
            raise RequestError(f"request {r.request_id}: prompt ({len(r.prompt_ids)} tokens) + max_new_tokens "
                               f"({r.params.max_new_tokens}) = {need} exceeds the context limit of {max_context}")


class Engine:
    def __init__(self, model: Llama4, max_context: int | None = None, recorder=None,
                 kv_dtype: torch.dtype | None = None, draft=None, cuda_graphs: str = "off") -> None:
        """recorder: a collectives.trace.TraceRecorder when tracing, else None (no cost).
        kv_dtype: the KV cache's dtype (None: the model's; float8_e4m3fn: an FP8 cache).
        draft: an EAGLE-3 draft (model.eagle3.Eagle3Draft) on the same ranks, for speculative decoding.
        cuda_graphs: "on" (plain decode steps replay CUDA graphs; an error where they cannot),
        "auto" (where they can: CUDA, fused kernels, untraced) or "off"."""
        if cuda_graphs not in ("on", "auto", "off"):
            raise ValueError(f"cuda_graphs must be on, auto or off, got {cuda_graphs!r}")
        self.model = model
        self.cuda_graphs = cuda_graphs
        self.graphs = None  # workers.cuda_graphs.GraphPool, made at the first graphed batch
        self.draft = draft
        self.kv_dtype = kv_dtype
        self.cfg = model.cfg
        self.max_context = max_context or self.cfg.max_position_embeddings
        self.recorder = recorder or NullRecorder()

    def _speculative(self, requests: list[Request], spec, on_tokens):
        from workers.speculative import SpecDecoder  # it builds on this module's types
        if self.draft is None:
            raise RequestError("speculative decoding was asked for, but no EAGLE-3 draft is loaded")
        generators = [torch.Generator().manual_seed(r.params.seed if r.params.seed is not None else 0) for r in requests]
        decoder = SpecDecoder(self.model, self.draft, spec, self.recorder)
        return decoder.generate(requests, generators, self._pick, self.kv_dtype, on_tokens)

    def _pick(self, logits: torch.Tensor, requests: list[Request], generators) -> torch.Tensor:
        shard = self.model.shard
        with self.recorder.span("sampling"):
            return next_tokens(logits[:, -1], shard.vocab_start, self.cfg.vocab_size, self.model.comm,
                               [r.params for r in requests], generators)

    def _graph(self, batch: int, needed_slots: int):
        """The CUDA graph for this batch's decode steps, or None (eager) where graphs are off or
        impossible; with cuda_graphs "on", impossible is an error that says why."""
        if self.cuda_graphs == "off":
            return None
        from workers.cuda_graphs import GraphPool
        if self.graphs is None:
            self.graphs = GraphPool(self.model, self.kv_dtype, self.max_context)
        reason = self.graphs.blocker
        if not self.model.embed_tokens.weight.is_cuda:
            reason = "the model is not on a CUDA device"
        elif not isinstance(self.recorder, NullRecorder):
            reason = "tracing times each collective on the host; traced steps run eagerly"
        elif self.model.comm.world_size > 1:
            reason = "steps across several ranks are not captured yet (their collectives are not graph-ready)"
        elif batch > MAX_GRAPH_ROWS:
            reason = f"a batch of {batch} rows is over the {MAX_GRAPH_ROWS} rows a graph step takes"
        if reason is None:
            return self.graphs.get(batch, needed_slots)
        if self.cuda_graphs == "on":
            raise RequestError(f"--cuda-graphs on: {reason}")
        return None

    @staticmethod
    def _greedy_graph_steps(graph, out: list[list[int]], finish: list[str], commit) -> None:
        """Greedy decoding on a CUDA graph, one step ahead: step k+1 is queued (its input ids are
        step k's choice, fed back inside the graph) before the host reads step k's ids, so the GPU
        never waits for the host. A row that finished at step k still decodes in step k+1 (its
        extra token is dropped and its cache is never read again); a row's end is passed to the
        graph in stream order, behind the steps already queued."""
        graph.set_inputs([row[-1] if row else 0 for row in out], [0 if f else 1 for f in finish])
        pending, step = graph.launch(), 1
        while True:
            ahead = graph.launch()
            finished_before = list(finish)
            if commit(step, graph.read(pending)):
                return
            if finish != finished_before:
                graph.set_active([0 if f else 1 for f in finish])
            pending, step = ahead, step + 1

    def generate(self, requests: list[Request], on_tokens: Callable[[int, list[list[int]]], None] | None = None,
                 spec=None) -> tuple[list[Completion], GenerationStats]:
        """Runs the batch to completion. on_tokens(step, new ids per request) is called after each step.
        spec: a model.spec.SpecConfig to decode speculatively with the draft (None: plain decoding)."""
        validate_requests(requests, self.cfg.vocab_size, self.max_context)
        if spec is not None:
            return self._speculative(requests, spec, on_tokens)
        batch = len(requests)
        device = self.model.embed_tokens.weight.device
        generators = [torch.Generator().manual_seed(r.params.seed) if r.params.seed is not None else
                      torch.Generator().manual_seed(0) for r in requests]
        lengths = torch.tensor([len(r.prompt_ids) for r in requests], device=device)
        budget = [r.params.max_new_tokens for r in requests]
        needed = max(len(r.prompt_ids) + r.params.max_new_tokens for r in requests)
        graph = self._graph(batch, needed + 1)  # + 1: a pipelined graph step may run one step past the end
        cache = graph.cache if graph is not None else self.model.new_cache(batch, needed, self.kv_dtype)
        prompt = torch.zeros(batch, int(lengths.max()), dtype=torch.long, device=device)
        for b, r in enumerate(requests):
            prompt[b, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        stats, start = GenerationStats(), time.perf_counter()
        request_ids = [r.request_id for r in requests]
        self.recorder.step_begin(0, request_ids)
        logits = self.model(prompt, cache, n_new=lengths, last_only=True).logits
        out: list[list[int]] = [[] for _ in requests]
        finish = [""] * batch
        clock = {"last": start}

        def commit(step: int, tokens: list[int]) -> bool:
            """Takes one step's tokens; True once every row is done."""
            now = time.perf_counter()
            if step == 0:
                stats.ttft_s = now - start
            else:
                stats.step_s.append(now - clock["last"])
            clock["last"] = now
            new = [[] for _ in requests]
            for b in range(batch):
                if finish[b]:
                    continue
                out[b].append(tokens[b])
                new[b].append(tokens[b])
                if requests[b].params.stop_on_eos and tokens[b] in self.cfg.eos_token_ids:
                    finish[b] = "eos"
                elif len(out[b]) >= budget[b]:
                    finish[b] = "length"
            self.recorder.step_end(sum(len(n) for n in new))
            if on_tokens:
                on_tokens(step, new)
            return all(finish)

        done = commit(0, self._pick(logits, requests, generators).tolist())
        if not done and graph is not None and all(r.params.greedy for r in requests):
            self._greedy_graph_steps(graph, out, finish, commit)
        step = 0
        while not done and not all(finish):
            step += 1
            self.recorder.step_begin(step, request_ids)
            active = torch.tensor([0 if f else 1 for f in finish], device=device)
            step_ids = torch.tensor([row[-1] for row in out], device=device)[:, None]  # (B, 1)
            if graph is not None:
                graph.replay(step_ids, active)
                logits = graph.logits
            else:
                logits = self.model(step_ids, cache, n_new=active).logits
            done = commit(step, self._pick(logits, requests, generators).tolist())
        stats.total_s = time.perf_counter() - start
        return [Completion(r.request_id, out[b], finish[b]) for b, r in enumerate(requests)], stats
