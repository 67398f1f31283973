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
from model.sampling import DeviceSampler, SamplingParams, next_tokens
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
    modeled: dict = field(default_factory=dict)  # --emulate-node: the virtual clock's times (workers/virtual_clock.py)


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
                 kv_dtype: torch.dtype | None = None, draft=None, cuda_graphs: str = "off",
                 device_sampling: bool | None = None, graph_trace=None) -> None:
        """recorder: a collectives.trace.TraceRecorder when tracing, else None (no cost).
        graph_trace: a workers.graph_trace.GraphTrace: traced plain decoding still replays graphs,
        timed by GPU stamps (without it, traced steps run eagerly).
        kv_dtype: the KV cache's dtype (None: the model's; float8_e4m3fn: an FP8 cache).
        draft: an EAGLE-3 draft (model.eagle3.Eagle3Draft) on the same ranks, for speculative decoding.
        cuda_graphs: "on" (decode steps, and speculative draft and verify steps, replay CUDA graphs;
        an error where they cannot), "auto" (where they can: CUDA, fused kernels, capturable
        collectives, untraced) or "off".
        device_sampling: plain decoding samples on the model's device (model.sampling.DeviceSampler,
        what a graph captures) instead of on the CPU; None: on CUDA, so that graphs on or off draw
        the same tokens for a seed. Speculative decoding samples on the CPU either way."""
        if cuda_graphs not in ("on", "auto", "off"):
            raise ValueError(f"cuda_graphs must be on, auto or off, got {cuda_graphs!r}")
        self.model = model
        self.cuda_graphs = cuda_graphs
        self.graphs = None  # workers.cuda_graphs.GraphPool of decode graphs, made at the first graphed batch
        self.traced_graphs = None  # ... of decode graphs that stamp their GPU times (graph_trace)
        self.graph_trace = graph_trace
        self.spec_graphs = None  # ... of speculative steps (workers/spec_graphs.py)
        self.draft = draft
        self.kv_dtype = kv_dtype
        self.cfg = model.cfg
        self.max_context = max_context or self.cfg.max_position_embeddings
        self.recorder = recorder or NullRecorder()
        self.device_sampling = model.embed_tokens.weight.is_cuda if device_sampling is None else device_sampling

    def _speculative(self, requests: list[Request], spec, on_tokens):
        from workers.speculative import SpecDecoder  # it builds on this module's types
        if self.draft is None:
            raise RequestError("speculative decoding was asked for, but no EAGLE-3 draft is loaded")
        generators = [torch.Generator().manual_seed(r.params.seed if r.params.seed is not None else 0) for r in requests]
        decoder = SpecDecoder(self.model, self.draft, spec, self.recorder)
        needed = max(len(r.prompt_ids) + r.params.max_new_tokens for r in requests) + decoder.margin
        graphs = self._spec_graph(decoder, len(requests), needed)
        return decoder.generate(requests, generators, self._pick, self.kv_dtype, on_tokens, graphs=graphs)

    def _picker(self, graph, requests: list[Request]) -> Callable[[torch.Tensor], torch.Tensor]:
        """pick(logits (B, T, V_r)) -> (B,) ids of the last rows, for plain decoding's eager steps:
        on the device with the graph's sampler (whose replays continue its draws) or a sampler of
        this batch's own, else on the CPU with seeded CPU generators."""
        params = [r.params for r in requests]
        if graph is not None:
            graph.prepare(params)
            sampler, sampling = graph.sampler, graph.sampling
        elif self.device_sampling:
            sampler = DeviceSampler(len(requests), self.model.shard.vocab_start, self.cfg.vocab_size,
                                    self.model.comm, self.model.embed_tokens.weight.device)
            sampler.reset(params)
            sampling = any(not p.greedy for p in params)
        else:
            generators = [torch.Generator().manual_seed(p.seed if p.seed is not None else 0) for p in params]
            return lambda logits: self._pick(logits, requests, generators)

        def pick(logits: torch.Tensor) -> torch.Tensor:
            with self.recorder.span("sampling"):
                return sampler.pick(logits[:, -1], sampling)
        return pick

    def _pick(self, logits: torch.Tensor, requests: list[Request], generators) -> torch.Tensor:
        shard = self.model.shard
        with self.recorder.span("sampling"):
            return next_tokens(logits[:, -1], shard.vocab_start, self.cfg.vocab_size, self.model.comm,
                               [r.params for r in requests], generators)

    def _tracing(self) -> bool:
        return not isinstance(self.recorder, NullRecorder)

    def _graph_reason(self, rows: int, speculative: bool = False) -> str | None:
        """Why a step of `rows` rows x tokens cannot be captured, or None when it can."""
        from workers.cuda_graphs import model_blocker
        if self._tracing() and (self.graph_trace is None or speculative):
            return ("tracing times each collective on the host; traced steps run eagerly" if self.graph_trace is None
                    else "traced speculative steps run eagerly (GPU stamps trace plain decode graphs only)")
        if rows > MAX_GRAPH_ROWS:
            return f"a step of {rows} rows x tokens is over the {MAX_GRAPH_ROWS} a graph step takes"
        return model_blocker(self.model)

    def _graphs_for(self, rows: int, speculative: bool = False) -> bool:
        """Whether steps of `rows` rows x tokens replay graphs (cuda_graphs "on": they must)."""
        if self.cuda_graphs == "off":
            return False
        reason = self._graph_reason(rows, speculative)
        if reason is not None and self.cuda_graphs == "on":
            raise RequestError(f"--cuda-graphs on: {reason}")
        return reason is None

    def _graph(self, batch: int, needed_slots: int):
        """The CUDA graph for this batch's decode steps, or None (eager) where graphs are off or
        impossible; with cuda_graphs "on", impossible is an error that says why."""
        if not self._graphs_for(batch):
            return None
        from workers.cuda_graphs import decode_graph, decode_graphs
        if self._tracing():  # captured with the host tracing paused, stamping into the trace's ledger
            with self.graph_trace.capturing() as ledger:
                if self.traced_graphs is None:
                    self.traced_graphs = decode_graphs(self.model, self.kv_dtype, ledger)
                return decode_graph(self.traced_graphs, batch, needed_slots, self.max_context)
        if self.graphs is None:
            self.graphs = decode_graphs(self.model, self.kv_dtype)
        return decode_graph(self.graphs, batch, needed_slots, self.max_context)

    def _spec_graph(self, decoder, batch: int, needed_slots: int):
        """The speculative steps' graphs for this batch (workers/spec_graphs.py), or None (eager):
        the verify step takes batch x (tokens + 1) rows."""
        if not self._graphs_for(batch * (decoder.spec.shape[2] + 1), speculative=True):
            return None
        from workers.spec_graphs import spec_graph, spec_graphs
        if self.spec_graphs is None:
            self.spec_graphs = spec_graphs(self.model, self.draft, self.kv_dtype)
        return spec_graph(self.spec_graphs, decoder, batch, needed_slots, self.max_context)

    @staticmethod
    def _graph_steps(graph, out: list[list[int]], finish: list[str], commit) -> None:
        """Decoding on a CUDA graph, one step ahead: step k+1 is queued (its input ids are step
        k's choice, greedy or sampled, fed back inside the graph) before the host reads step k's
        ids, so the GPU never waits for the host. A row that finished at step k still decodes in
        step k+1 (its extra token is dropped and its cache is never read again); a row's end is
        passed to the graph in stream order, behind the steps already queued."""
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

        pick = self._picker(graph, requests)
        done = commit(0, pick(logits).tolist())
        if not done and graph is not None:
            traced = getattr(graph, "ledger", None) is not None and self._tracing()
            if traced:  # the steps' ends come from the graph's GPU stamps
                from workers.graph_trace import GraphStepRecorder
                host_recorder, self.recorder = self.recorder, GraphStepRecorder(self.graph_trace, graph, 1, request_ids)
            try:
                self._graph_steps(graph, out, finish, commit)
            finally:
                if traced:
                    self.graph_trace.drain()
                    self.recorder = host_recorder
        step = 0
        while not done and not all(finish):
            step += 1
            self.recorder.step_begin(step, request_ids)
            active = torch.tensor([0 if f else 1 for f in finish], device=device)
            step_ids = torch.tensor([row[-1] for row in out], device=device)[:, None]  # (B, 1)
            logits = self.model(step_ids, cache, n_new=active).logits
            done = commit(step, pick(logits).tolist())
        stats.total_s = time.perf_counter() - start
        return [Completion(r.request_id, out[b], finish[b]) for b, r in enumerate(requests)], stats
