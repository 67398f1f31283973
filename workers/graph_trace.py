"""Traced decode steps that still replay CUDA graphs: the trace rows come from GPU stamps.

Why: host-side tracing times each collective with CUDA events recorded around the call, which
a captured graph cannot do (one replay launches the whole step), so traced runs used to decode
eagerly -- 10-50x slower on a GPU, which made a trace of a fast run describe a different run.
Here the graph is captured with a StampLedger active (collectives/gpu_stamps.py): the fused
norm / AllReduce+RMSNorm kernels between the sub-layers stamp their start and end (and, for the
multi-GPU kernel, when every peer's data had arrived), and the step gets a stamp before and after.
After each replay the stamps come back with the step's token ids, and `record_step` turns them
into the same rows a host-traced step has:
  * one collective row per fused call (t0 = its start, t1 = its end; `arrived` - t0 is the wait
    for the last peer), with the group's shared sequence numbers;
  * stage spans between them: layer i's attention ends where its post-attention call starts, its
    MoE / MLP where its post-FFN call starts, the LM head (with the argmax) after the last call.
The decoder makes exactly two fused calls per layer; a model that does not is refused when the
graph is captured, not silently mislabeled.

What it costs: a register read and a store per fused kernel, the step's begin and end included
(its first kernel, the embedding's, and its last, the greedy argmax, stamp them: no stamp kernel
of its own on the fused path), and no extra copy: the ids sit just before the stamps in the
ledger and come back with them in the one device-to-host copy an untraced step makes; measured
by benchmarks/trace_cost_gpu.py (see the README). The host keeps each step's raw stamps (one copy of ~50 integers) and turns them into
rows only when the decode loop ends (or every DRAIN_EVERY steps): building ~250 row fields per step
in Python while the next replays wait on the host cost more than the stamps themselves. Every rank
drains at the same steps, so the group's sequence numbers stay aligned. With NCCL as the backend the stamps cover only the local norm kernel after NCCL's
all-reduce, so the all-reduce's time shows in the stage before it.
"""
from __future__ import annotations

import contextlib

from collectives.gpu_stamps import StampLedger

LEDGER_SLOTS = 16384
DRAIN_EVERY = 512  # traced steps kept raw before they become rows (a long generation stays bounded)


class StampError(RuntimeError):
    """A traced graph's stamps do not have the shape of a decode step."""


def stamp_rows(stamps: list[tuple[tuple, int]], stage_names: list[str], group: list[int], next_seq, step: int,
               offset_ns: int) -> tuple[list, list, tuple[int, int]]:
    """stamps: (label, GPU ns) of one step, in slot order. stage_names: the FFN stage of each layer
    ("moe" / "mlp"). Returns flat collective rows, flat span rows and the step's (t0, t1), host ns."""
    if len(stamps) < 2 or stamps[0][0] != ("step", "begin") or stamps[-1][0] != ("step", "end"):
        raise StampError("a traced step must begin and end with its step stamps")
    calls, current = [], None
    for label, t in stamps[1:-1]:
        kind = label[0]
        if kind == "begin":
            current = {"op": label[1], "bytes": label[2], "dtype": label[3], "t0": t + offset_ns}
        elif kind in ("arrived", "end") and current is not None:
            current[kind] = t + offset_ns
            if kind == "end":
                calls.append(current)
                current = None
    n_layers = len(stage_names)
    if not 2 * n_layers <= len(calls) <= 2 * n_layers + 2:
        raise StampError(f"{len(calls)} fused calls in a step of {n_layers} layers (two per layer expected, and at "
                         "several ranks the embedding's all-reduce and the pick's all-gather)")
    # several ranks: the embedding's all-reduce comes before the layers' calls (unless the table is replicated)
    # and, where it is fused (symm), the greedy pick's all-gather (a plain all-reduce of zero-padded slots) after
    # them; both are the step's own (layer -1), as a host-traced step has them
    after = 1 if len(calls) > 2 * n_layers and calls[-1]["op"] == "all_reduce" else 0
    before = len(calls) - 2 * n_layers - after
    if before > 1:
        raise StampError(f"{len(calls)} fused calls in a step of {n_layers} layers: {before} before the layers'")
    t_begin, t_end = stamps[0][1] + offset_ns, stamps[-1][1] + offset_ns

    def row(call: dict, layer: int) -> list:
        return [call["op"], group, next_seq(), call["bytes"], call["dtype"], layer, step, call["t0"], call["end"], None]
    coll, spans, previous_end = [], [], t_begin
    if before:
        coll += row(calls[0], -1)
        previous_end = calls[0]["end"]
    for i, call in enumerate(calls[before:before + 2 * n_layers]):
        layer = i // 2
        spans += ["attention" if i % 2 == 0 else stage_names[layer], layer, step, previous_end, call["t0"]]
        coll += row(call, layer)
        previous_end = call["end"]
    spans += ["lm_head", -1, step, previous_end, calls[-1]["t0"] if after else t_end]
    if after:
        coll += row(calls[-1], -1)
    return coll, spans, (t_begin, t_end)


class GraphTrace:
    """One rank's tracing of graph-replayed steps: the ledger the graphs are captured with, and the
    conversion of each replay's stamps into trace rows."""

    def __init__(self, recorder, tracer, model, pause, resume) -> None:
        """recorder: the rank's TraceRecorder; tracer: its TracingCommunicator (for the group and
        the shared sequence numbers); pause / resume: turn the host-side tracing off and on while a
        graph is captured (a capture must not record CUDA events or call the tracer's clock)."""
        self.recorder, self.tracer = recorder, tracer
        self.pause, self.resume = pause, resume
        self.stage_names = ["moe" if layer.is_moe else "mlp" for layer in model.layers]
        self.ledger = StampLedger(model.embed_tokens.weight.device, LEDGER_SLOTS)
        self.clock_bracket_ns = self.ledger.calibrate()
        self.requests: list[str] = []
        self.step = 0
        self.pending: list[tuple] = []  # (labels, stamp values, step, requests, tokens, fields) not yet rows

    @contextlib.contextmanager
    def capturing(self):
        """Host tracing paused while graphs are built (warm-up and capture)."""
        self.pause()
        try:
            yield self.ledger
        finally:
            self.resume()

    def record_step(self, graph, tokens: int, **fields) -> None:
        """Keeps the stamps of the replay `graph.read` returned last, as step `self.step`; they
        become rows at the next `drain` (the decode loop's end, or after DRAIN_EVERY steps)."""
        labels, values = graph.stamp_values()
        self.pending.append((labels, values, self.step, self.requests, tokens, fields))
        if len(self.pending) >= DRAIN_EVERY:
            self.drain()

    def drain(self) -> None:
        """The kept steps' rows, in step order, handed to the recorder."""
        pending, self.pending = self.pending, []
        for labels, values, step, requests, tokens, fields in pending:
            coll, spans, (t0, t1) = stamp_rows(list(zip(labels, values)), self.stage_names, self.tracer.group,
                                               self.tracer.next_seq, step, self.ledger.offset_ns)
            self.recorder.add_resolved({"s": step, "r": requests, "tokens": tokens, "graph": True, **fields,
                                        "t0": t0, "t1": t1}, coll, spans)


class GraphStepRecorder:
    """Stands in for the engine's recorder while a traced graph replays: each step's end takes its
    times from the graph's stamps instead of host clocks."""

    def __init__(self, trace: GraphTrace, graph, first_step: int, requests: list[str]) -> None:
        self.trace, self.graph = trace, graph
        trace.step, trace.requests = first_step, requests

    def step_begin(self, step: int, requests: list[str]) -> None:
        self.trace.step, self.trace.requests = step, requests

    def step_end(self, tokens: int, **fields) -> None:
        self.trace.record_step(self.graph, tokens, **fields)
        self.trace.step += 1

    def span(self, name: str):
        return contextlib.nullcontext()

