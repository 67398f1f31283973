"""Turns tracing on for one rank: wraps its communicator and marks model stages.

Stages are marked by wrapping the `forward` of the modules that are stages (each decoder layer's
attention and feed-forward, and the model as a whole for the LM head), so the model code stays
free of tracing calls. A wrapper is an instance attribute that shadows the class's forward: one
extra Python call per stage, several times cheaper than torch's forward hooks (which send every
call of the module down nn.Module's slow path). The LM head's span runs from the end of the last
collective of the forward (the last layer's fused AllReduce + RMSNorm) to the end of the forward.
The wrappers exist only while tracing is on; with tracing off the rank runs the untouched model
and a NullRecorder whose methods do nothing.
"""
from __future__ import annotations

from contextlib import nullcontext

from collectives.trace import COLL_FIELDS, TraceRecorder


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


def _stage(recorder: TraceRecorder, forward, name: str, layer: int | None = None):
    """A stage's forward, recorded: one closure call, two clock reads, one C-level list extend."""
    now, add_span = recorder.now, recorder.add_span
    if layer is None:
        def traced(*args, **kwargs):
            start = now()
            out = forward(*args, **kwargs)
            add_span((name, recorder.layer, recorder.step, start, now()))
            return out
    else:
        def traced(*args, **kwargs):
            recorder.layer = layer
            start = now()
            out = forward(*args, **kwargs)
            add_span((name, layer, recorder.step, start, now()))
            return out
    return traced


T1_FROM_END = len(COLL_FIELDS) - COLL_FIELDS.index("t1")


def _lm_head_stage(recorder: TraceRecorder, forward):
    """The model's forward: its LM head runs from the end of the forward's last collective (read
    back from the recorder's rows, which are only emptied between steps) to the forward's end."""
    rows = recorder.coll_rows

    def traced(*args, **kwargs):
        n_before = len(rows)
        out = forward(*args, **kwargs)
        recorder.layer = -1
        if len(rows) > n_before:
            recorder.span_between("lm_head", rows[-T1_FROM_END], recorder.now())
        return out
    return traced


def instrument(model, recorder: TraceRecorder) -> list:
    """Marks the stages of a Llama4; returns handles (call .remove() to take the marks off)."""
    handles = []
    for i, layer in enumerate(model.layers):
        handles.append(_ForwardWrapper(layer.self_attn, _stage(recorder, layer.self_attn.forward, "attention", i)))
        name = "moe" if layer.is_moe else "mlp"
        handles.append(_ForwardWrapper(layer.feed_forward, _stage(recorder, layer.feed_forward.forward, name)))
    handles.append(_ForwardWrapper(model, _lm_head_stage(recorder, model.forward)))
    return handles
