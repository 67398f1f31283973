"""Kernel launches per decode step of the fused GPU path, counted on the CPU.

Why: inside a CUDA graph a decode step of the `medium` model is dominated by per-kernel fixed cost
(~2-3 us of launch, ramp and tail each), so the launch count is a figure of merit of its own, and
it can be counted without a GPU: the fused path runs on CPU tensors under Triton's interpreter.

Counted: every Triton kernel launch (a patched `run` of the interpreter's or the compiler's kernel
objects) and every torch operator that would be a kernel on a GPU, seen by a TorchDispatchMode:
all aten ops except views and allocations (`empty*`), which launch nothing. The Triton
interpreter's own tensor traffic is hidden from the mode while a kernel runs. The step is what
workers/cuda_graphs.py captures for one row: `DecodeGraph._step`, i.e. `Llama4.forward(static=True)`
of 1 new token (decode) or 4 (verify) with the graph's n_new, then the greedy pick (on a GPU the
distributed argmax's kernel, counted as such here) and the copies of the chosen ids; on a model
with the preset's layer structure (layer count, MoE / dense and RoPE / NoPE pattern, attention
features) but tiny widths: launches do not depend on widths. `--draft` counts one EAGLE-3 draft
forward instead (`Eagle3Draft.forward(static=True)`, one row, on the torch ops and on the fused
kernels), the two kinds a chain-3 speculative step runs (workers/spec_graphs.py): the catch-up (4 tokens with target features, one row's logits) and a
depth step (2 drafted tokens with the draft's own hidden states, a step mask, the last row's logits).

    TRITON_INTERPRET=1 python benchmarks/launch_count.py [--model medium] [--dtype bf16 fp8] [--steps decode verify]
                                                         [--detail]
    TRITON_INTERPRET=1 python benchmarks/launch_count.py --draft [--detail]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
STEPS = {"decode": 1, "verify": 4}  # new tokens per row, as `dgx-emu bench decode` names its steps


class _AtenCounter(TorchDispatchMode):
    def __init__(self, counts: Counter, order: list | None = None) -> None:
        super().__init__()
        self.counts, self.order = counts, order

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        tensors = out if isinstance(out, (tuple, list)) else (out,)
        if not func.is_view and name not in NO_KERNEL and any(isinstance(t, torch.Tensor) for t in tensors):
            self.counts[f"torch {name}"] += 1
            if self.order is not None:
                self.order.append(f"torch {name}")
        return out


def _kernel_classes() -> list[type]:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    return [InterpretedFunction, JITFunction]


@contextmanager
def count_launches(counts: Counter, order: list | None = None):
    """Within the block, adds one to counts["triton <kernel>"] per Triton launch and to
    counts["torch <op>"] per torch operator that launches a kernel on a GPU; `order` (a list)
    also gets each launch's name, in launch order."""
    patched = []

    def wrap(cls):
        original = cls.run

        def run(self, *args, **kwargs):
            if kwargs.get("warmup"):
                return original(self, *args, **kwargs)
            name = f"triton {self.fn.__name__ if hasattr(self, 'fn') else self.__name__}"
            counts[name] += 1
            if order is not None:
                order.append(name)
            with _disable_current_modes():  # the interpreter's own copies are no launches
                return original(self, *args, **kwargs)
        cls.run = run
        patched.append((cls, original))

    for cls in _kernel_classes():
        wrap(cls)
    try:
        with _AtenCounter(counts, order):
            yield counts
    finally:
        for cls, original in patched:
            cls.run = original


def small_config(name: str):
    """The preset's layer structure at tiny widths (launch counts do not depend on widths)."""
    from workers.step_bench import RANDOM_PRESETS
    cfg = RANDOM_PRESETS[name]()
    return dataclasses.replace(cfg, vocab_size=256, hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=16,
                               intermediate_size=32, intermediate_size_mlp=64, n_experts=min(cfg.n_experts, 8),
                               attention_chunk_size=min(cfg.attention_chunk_size or 64, 64))


def step_launches(name: str = "medium", dtype: str = "bf16", context: int = 20, tokens: int = 1,
                  fp8_scheme: str = "channel") -> Counter:
    """Launches of one captured graph step (1 row, `tokens` new tokens) over `context` cached keys."""
    from workers.step_bench import random_model
    model = random_model(small_config(name), dtype, "triton", device="cpu", fp8_scheme=fp8_scheme)
    cache = model.new_cache(1, context + 8)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    model(prompt, cache)  # history (a prefill of more than 16 tokens runs the torch ops)
    counts: Counter = Counter()
    step = _graph_step(model, cache, tokens)
    with torch.no_grad(), _gpu_norm(), _gpu_pick():
        saved = cache.lengths.clone()
        step()  # warm-up, as before a graph capture (kernel scratch made)
        cache.lengths.copy_(saved)
        with count_launches(counts):
            step()
    return counts


def _graph_step(model, cache, tokens: int):
    """workers/cuda_graphs.py's DecodeGraph._step on CPU tensors: its buffers, not its capture."""
    from workers.cuda_graphs import DecodeGraph
    graph = DecodeGraph.__new__(DecodeGraph)
    graph._buffers(model, cache, tokens)
    forward = type(model).forward.__wrapped__  # without inference mode, under which the dispatch mode
    graph.model = lambda *args, **kwargs: forward(model, *args, **kwargs)  # misses some ops (casts)
    return graph._step


@contextmanager
def _gpu_pick():
    """The greedy pick as a GPU runs it: distributed_argmax's kernel (its default on CUDA tensors;
    the interpreter runs it on CPU tensors). Code without that kernel keeps its torch ops."""
    import inspect
    from model import sampling
    original = sampling.distributed_argmax
    if "kernel" in inspect.signature(original).parameters:
        sampling.distributed_argmax = lambda *args, **kwargs: original(*args, **{"kernel": True, **kwargs})
    try:
        yield
    finally:
        sampling.distributed_argmax = original


def draft_launches(step: str = "catch_up", kernels: str = "triton", context: int = 20) -> Counter:
    """Launches of one static draft forward (1 row, bf16, tiny widths) over `context` cached keys:
    step "catch_up" or "depth" (module docstring), on `kernels` ("torch" / "triton")."""
    from collectives.communicator import SingleRankCommunicator
    from model.eagle3 import Eagle3Config, Eagle3Draft, SharedTargetParts, draft_layout
    from model.llama4 import VocabEmbedding
    from model.parallel import layout
    cfg = Eagle3Config(hidden_size=32, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=32,
                       vocab_size=64, draft_vocab_size=48, target_hidden_size=32)
    gen = torch.Generator().manual_seed(0)
    target = dataclasses.replace(cfg.attention_config(), vocab_size=cfg.vocab_size)  # as wide as the draft
    embed = VocabEmbedding(layout(target), cfg.hidden_size)  # the target's embedding
    draft = Eagle3Draft(cfg, draft_layout(cfg, 1, 0), SingleRankCommunicator(), SharedTargetParts(embed), kernels)
    for param in list(draft.parameters()) + [embed.weight]:
        param.data.copy_(torch.randn(param.shape, generator=gen) * 0.05 + (1.0 if param.dim() == 1 else 0.0))
    draft, embed = draft.to(torch.bfloat16).eval(), embed.to(torch.bfloat16)
    cache = draft.new_cache(1, context + 8)
    features = cfg.n_aux * cfg.target_hidden_size
    prompt = torch.randint(0, cfg.vocab_size, (1, context), generator=gen)
    draft(prompt, cache, target_features=torch.randn(1, context, features, generator=gen).bfloat16())  # history
    rows = 4 if step == "catch_up" else 2
    tokens = torch.randint(0, cfg.vocab_size, (1, rows), generator=gen)
    if step == "catch_up":
        inputs = dict(target_features=torch.randn(1, rows, features, generator=gen).bfloat16(),
                      n_new=torch.full((1,), rows), logit_rows=torch.zeros(1, 1, dtype=torch.long))
    else:
        inputs = dict(hidden=torch.randn(1, rows, cfg.hidden_size, generator=gen).bfloat16(),
                      positions=torch.arange(context, context + rows)[None],
                      step_mask=torch.ones(1, rows, rows, dtype=torch.bool).tril(),
                      logit_rows=torch.full((1, 1), rows - 1))
    counts: Counter = Counter()
    forward = type(draft).forward.__wrapped__  # without inference mode (see step_launches)
    with torch.no_grad(), _gpu_norm():
        saved = cache.lengths.clone()
        forward(draft, tokens, cache, static=True, **inputs)  # warm-up, as before a graph capture
        cache.lengths.copy_(saved)
        with count_launches(counts):
            forward(draft, tokens, cache, static=True, **inputs)
    return counts


@contextmanager
def _gpu_norm():
    """The residual add + RMSNorm as a GPU runs it: collectives/fused_norm.py's one kernel where the
    communicator takes it on CUDA tensors (contiguous rows of one dtype), the torch ops elsewhere;
    the interpreter runs the kernel on CPU tensors."""
    from collectives import communicator, fused_norm
    original = communicator.add_rmsnorm

    def as_on_cuda(reduced, residual, weight, eps, quant_scale=None, fp8_rows=None):
        if fused_norm.available(reduced) and (residual is None or (
                residual.is_contiguous() and residual.shape == reduced.shape and residual.dtype == reduced.dtype)):
            return fused_norm.add_rmsnorm(reduced, residual, weight, eps, quant_scale, fp8_rows)
        return original(reduced, residual, weight, eps, quant_scale, fp8_rows)

    communicator.add_rmsnorm = as_on_cuda
    try:
        yield
    finally:
        communicator.add_rmsnorm = original


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="medium", choices=["medium", "maverick-slice"])
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS), help="decode: 1 token, verify: 4")
    p.add_argument("--detail", action="store_true", help="launches per kernel / op")
    p.add_argument("--draft", action="store_true", help="an EAGLE-3 draft forward, torch ops vs fused kernels")
    args = p.parse_args(argv)
    if args.draft:
        for step in ("catch_up", "depth"):
            for kernels in ("torch", "triton"):
                _report(f"draft {step} ({kernels})", "draft forward", draft_launches(step, kernels), args.detail)
        return 0
    for step in args.steps:
        for dtype in args.dtype:
            _report(f"{args.model} {dtype} {step}", "graph step", step_launches(args.model, dtype, tokens=STEPS[step]),
                    args.detail)
    return 0


def _report(name: str, what: str, counts: Counter, detail: bool) -> None:
    triton_n = sum(v for k, v in counts.items() if k.startswith("triton"))
    print(f"{name}: {sum(counts.values())} launches per {what} ({triton_n} Triton, "
          f"{sum(counts.values()) - triton_n} torch)")
    if detail:
        for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {n:4d}  {key}")


if __name__ == "__main__":
    sys.exit(main())
