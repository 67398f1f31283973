"""The per-rank Worker: one virtual GPU. Ray-agnostic, so tests drive it in-process.

It owns the rank's device, its communicator, its shard of the model and the generation engine.
`cluster/` wraps it in a Ray actor; a world of one runs it directly in the driver's process.
"""
from __future__ import annotations

import os
import time

import torch

from collectives.communicator import Communicator
from model.config import load_model_config
from model.eagle3_checkpoint import load_draft
from model.llama4 import Llama4
from model.parallel import ShardLayout, layout
from workers.cost_model import emulated_comm
from workers.engine import Completion, Engine, GenerationStats, Request
from collectives.faults import DelayedCommunicator
from collectives.clocked import ClockedCommunicator
from collectives.trace import TraceRecorder, TracingCommunicator
from workers.model_build import build_model, default_dtype  # noqa: F401 (default_dtype: re-exported)
from workers.node_spec import NodeSpec
from workers.run_config import RunConfig
from workers.tracing import NullRecorder, instrument
from workers.virtual_clock import ClockedSteps, VirtualClock


class Worker:
    def __init__(self, rank: int, run: RunConfig, comm: Communicator, gpu: dict | None = None,
                 node: NodeSpec | None = None) -> None:
        """gpu: the spec of the GPU this rank stands for (name, hbm_bytes, ...). node: the node that
        run.emulate_node names, resolved by the caller (cluster.hardware.emulated_node); given
        exactly when run.emulate_node is set. Both come from above: workers/ never reads cluster/."""
        if comm.rank != rank or comm.world_size != run.world_size:
            raise ValueError(f"communicator is rank {comm.rank}/{comm.world_size}, worker is {rank}/{run.world_size}")
        if bool(run.emulate_node) != (node is not None):
            raise ValueError(f"emulate_node is {run.emulate_node!r} but the worker was given node {node!r}: pass the "
                             "NodeSpec it names (cluster.hardware.emulated_node) exactly when emulating")
        self.rank, self.run, self.gpu = rank, run, gpu or {}
        self.recorder, self.tracer, self.stage_marks = None, None, []
        self.clock, self.clock_marks = None, []
        raw = comm
        if run.trace_dir:
            self.recorder = TraceRecorder(run.trace_dir, rank, run.world_size, comm.backend, run.device)
            comm = self.tracer = TracingCommunicator(comm, self.recorder)
        if run.delay_rank == rank:  # outside the tracer: the trace sees this rank arrive late
            comm = DelayedCommunicator(comm, run.delay_s)
        if run.emulate_node:  # outermost: the exchange of modeled times goes through the raw communicator
            self.clock = VirtualClock(node, rank, run.world_size, run.trace_dir, comm=emulated_comm(run.comm))
            comm = ClockedCommunicator(comm, raw, self.clock, run.device)
        self.comm = comm
        torch.set_num_threads(run.threads_per_rank)
        self.device = torch.device(run.device)
        self.model_cfg = load_model_config(run.model_path)
        self.shard: ShardLayout = layout(self.model_cfg, run.world_size, rank, run.moe_mode, run.replicate_embedding)
        self.model: Llama4 | None = None
        self.engine: Engine | None = None
        self.load_s = 0.0

    def load(self, progress=None) -> dict:
        """Builds this rank's modules at their shard shapes and reads its slices. Returns a report."""
        start = time.perf_counter()
        model, read = build_model(self.run, self.model_cfg, self.shard, self.comm, progress)
        self.model = model.eval()
        self._mark(self.recorder is not None)
        self.draft = None
        if self.run.draft_path:  # EAGLE-3, one-model mode: the draft's shard lives beside the target's
            self.draft, draft_read = load_draft(self.run.draft_path, self.model)
            read += draft_read
        self.engine = Engine(self.model, self.run.max_context, self._engine_recorder(self.recorder),
                             kv_dtype=self.run.kv_torch_dtype, draft=self.draft, cuda_graphs=self.run.engine_graphs,
                             graph_trace=self._graph_trace())
        self.load_s = time.perf_counter() - start
        weights = self.model.weight_bytes() + (self.draft.weight_bytes() if self.draft is not None else 0)
        report = {"rank": self.rank, "pid": os.getpid(), "device": str(self.device), "weights_bytes": weights,
                  "bytes_read": read, "load_s": self.load_s, "stands_for": self.gpu.get("name")}
        if self.gpu:
            report["hbm_fraction"] = weights / self.gpu["hbm_bytes"]
        return report

    def set_tracing(self, on: bool) -> None:
        """Pauses or resumes tracing of a rank started with a trace directory (paused, the rank
        runs as if tracing were off: untouched model, direct communicator, NullRecorder)."""
        if self.recorder is None or self.engine is None:
            raise RuntimeError(f"rank {self.rank}: set_tracing() needs a loaded rank started with a trace directory")
        self._mark(on)
        self.tracer.set_enabled(on)
        self.engine.recorder = self._engine_recorder(self.recorder if on else NullRecorder())
        if self.clock is not None:
            self.clock.set_recording(on)

    def _mark(self, tracing: bool) -> None:
        """(Re)wraps the model: the virtual clock's wrappers inside, the trace's stage marks outside
        (a stage mark's removal takes the attribute it shadows, so both are laid anew)."""
        for mark in self.stage_marks + self.clock_marks:
            mark.remove()
        self.clock_marks = self.clock.instrument(self.model) if self.clock is not None else []
        self.stage_marks = instrument(self.model, self.recorder) if tracing else []

    def _graph_trace(self):
        """Traced GPU ranks (no virtual clock) keep replaying decode graphs, timed by GPU stamps."""
        if self.recorder is None or self.device.type != "cuda" or self.clock is not None or self.run.engine_graphs == "off":
            return None
        from workers.graph_trace import GraphTrace

        def pause() -> None:
            self.tracer.set_enabled(False)
            self._mark(False)

        def resume() -> None:
            self.tracer.set_enabled(True)
            self._mark(True)
        return GraphTrace(self.recorder, self.tracer, self.model, pause, resume)

    def _engine_recorder(self, recorder):
        return ClockedSteps(recorder, self.clock) if self.clock is not None else recorder

    def generate(self, requests: list[Request], on_tokens=None, spec=None) -> tuple[list[Completion], GenerationStats]:
        """spec: a model.spec.SpecConfig for speculative decoding with the loaded draft, or None."""
        if self.engine is None:
            raise RuntimeError(f"rank {self.rank}: generate() before load()")
        completions, stats = self.engine.generate(requests, on_tokens, spec=spec)
        if self.clock is not None:
            stats.modeled = self.clock.take_stats()
        return completions, stats

    def kv_cache_bytes(self, requests: list[Request]) -> int:
        """KV-cache bytes this rank allocates for a batch (what generate() will hold)."""
        cfg, s = self.model_cfg, self.shard
        slots = len(requests) * max(len(r.prompt_ids) + r.params.max_new_tokens for r in requests)
        per_slot = 2 * cfg.n_layers * s.n_kv_heads_per_rank * cfg.head_dim
        return slots * per_slot * torch.tensor([], dtype=self.run.kv_torch_dtype).element_size()

    def close(self) -> None:
        if self.clock is not None:
            self.clock.close()
        self.comm.close()
