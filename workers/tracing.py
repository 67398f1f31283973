"""Turns tracing on for one rank: wraps its communicator and marks model stages.

Stages are marked with forward hooks on the modules that are stages (each decoder layer's
attention and feed-forward, and the model as a whole for the LM head), so the model code stays
free of tracing calls. The hooks exist only while tracing is on; with tracing off the rank runs
the untouched model and a NullRecorder whose methods do nothing.
"""
from __future__ import annotations

from contextlib import nullcontext

from collectives.trace import TraceRecorder


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


def instrument(model, recorder: TraceRecorder) -> list:
    """Adds the stage hooks to a Llama4; returns their handles (call .remove() to take them off)."""
    handles, starts = [], {}

    def begin(key):
        def hook(module, args):
            starts[key] = recorder.now()
        return hook

    def end(key, name):
        def hook(module, args, output):
            recorder.span_between(name, starts.pop(key), recorder.now())
        return hook

    for i, layer in enumerate(model.layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: setattr(recorder, "layer", i)))
        handles.append(layer.register_forward_hook(
            lambda m, a, o: setattr(recorder, "last_layer_end", recorder.now())))
        ffn_name = "moe" if layer.is_moe else "mlp"
        for module, name in ((layer.self_attn, "attention"), (layer.feed_forward, ffn_name)):
            handles.append(module.register_forward_pre_hook(begin((i, name))))
            handles.append(module.register_forward_hook(end((i, name), name)))

    def lm_head(module, args, output):
        recorder.layer = -1
        if recorder.last_layer_end is not None:
            recorder.span_between("lm_head", recorder.last_layer_end, recorder.now())
            recorder.last_layer_end = None

    handles.append(model.register_forward_hook(lm_head))
    return handles
