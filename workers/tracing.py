"""Turns tracing on for one rank: wraps its communicator and marks model stages.

Stages are marked by wrapping the `forward` of each decoder layer (its attention and feed-forward
stages) and of the model as a whole (the LM head), so the model code stays free of tracing
calls. A wrapper is an instance attribute that shadows the class's forward: one extra Python
call, several times cheaper than torch's forward hooks (which send every call of the module
down nn.Module's slow path). Stage boundaries that coincide with a collective's start or end
take the collective's timestamp instead of a new one: a forward's first decoder layer costs one
new timestamp and the others none (each starts where the previous layer's last collective
ended), and the LM head's span runs from the end of the forward's last collective (the last layer's
fused AllReduce + RMSNorm) to the end of the forward.
The wrappers exist only while tracing is on; with tracing off the rank runs the untouched model
and a NullRecorder whose methods do nothing.
"""
from __future__ import annotations

from contextlib import nullcontext

from collectives.trace import COLL_T0, COLL_WIDTH, TraceRecorder


class NullRecorder:
    """Stands in for a TraceRecorder when tracing is off."""

    def span(self, name: str):
        return nullcontext()

    def step_begin(self, step: int, requests: list[str]) -> None:
        pass

    def step_end(self, tokens: int, **fields) -> None:
        pass

    def close(self) -> None:
        pass


class _ForwardWrapper:
    """Shadows module.forward with `wrapper` until removed."""

    def __init__(self, module, wrapper) -> None:
        self.module = module
        module.forward = wrapper

    def remove(self) -> None:
        del self.module.forward  # the class's forward shows through again


T0, T1_FROM_END = COLL_T0, COLL_WIDTH - COLL_T0 - 1  # a collective row's t0; its t1, counted from the row's end


class StructureError(RuntimeError):
    """The model did not communicate where its traced stages assume it does."""


class _LayerChain:
    """Where the previous decoder layer of the running forward left the collective rows: the
    model's layer loop does no device work between layers, so a layer that starts right after
    the previous one (no collective since) starts when that layer's last collective ended, and
    takes no timestamp of its own."""

    __slots__ = ("end_row",)

    def __init__(self) -> None:
        self.end_row = -1


def _layer_stages(recorder: TraceRecorder, forward, layer: int, ffn_name: str, chain: _LayerChain):
    """A decoder layer's forward, recorded as its two stages from at most ONE new timestamp. The
    layer is attention, its fused AllReduce+RMSNorm, the feed-forward (MoE dispatch and combine
    may communicate inside it), then its fused AllReduce+RMSNorm; the collectives are timed
    anyway, so attention runs from the layer's start to its first collective's start and the
    feed-forward from that collective's end to the last one's start. The layer's start is the end
    of the previous layer's last collective when one directly precedes it, else a new timestamp.
    On a GPU that is one CUDA event for the first layer and none for the others, instead of four
    per layer; everywhere it is one wrapper instead of two."""
    now, add_span, rows = recorder.now, recorder.add_span, recorder.coll_rows

    def traced(*args, **kwargs):
        recorder.layer = layer
        first = len(rows)
        start = rows[first - T1_FROM_END] if first == chain.end_row else now()
        out = forward(*args, **kwargs)
        last = len(rows) - COLL_WIDTH  # the last collective's row (rows are only emptied between steps)
        if last <= first:
            raise StructureError(f"decoder layer {layer} made {(last + COLL_WIDTH - first) // COLL_WIDTH} traced "
                                 "collective(s); its stages need one after attention and one after the feed-forward")
        chain.end_row = len(rows)
        step = recorder.step
        add_span(("attention", layer, step, start, rows[first + T0],
                  ffn_name, layer, step, rows[first + T0 + 1], rows[last + T0]))
        return out
    return traced


def _lm_head_stage(recorder: TraceRecorder, forward, chain: _LayerChain):
    """The model's forward: its LM head runs from the end of the forward's last collective (read
    back from the recorder's rows) to the forward's end. A forward starts a new layer chain (rows
are emptied between steps, so an old chain's end could match a new step's row count)."""
    rows = recorder.coll_rows

    def traced(*args, **kwargs):
        chain.end_row = -1
        n_before = len(rows)
        out = forward(*args, **kwargs)
        recorder.layer = -1
        if len(rows) > n_before:
            recorder.span_between("lm_head", rows[-T1_FROM_END], recorder.now())
        return out
    return traced


def instrument(model, recorder: TraceRecorder) -> list:
    """Marks the stages of a Llama4; returns handles (call .remove() to take the marks off)."""
    handles, chain = [], _LayerChain()
    for i, layer in enumerate(model.layers):
        ffn_name = "moe" if layer.is_moe else "mlp"
        handles.append(_ForwardWrapper(layer, _layer_stages(recorder, layer.forward, i, ffn_name, chain)))
    handles.append(_ForwardWrapper(model, _lm_head_stage(recorder, model.forward, chain)))
    return handles
