"""Host-side glue of a speculative step, counted on the CPU: torch operators per step outside the
target's and the draft's forwards (and outside the CUDA-graph steps, which a GPU replays as one
launch each).

Why: on a GPU every eager torch operator costs ~8-10 us of host launch time, and a speculative
step of the embedded model is a handful of graph replays and whatever glue runs between them, so
the glue's operator count is the step's host time. It can be counted without a GPU.

Counted per speculative step (`SpecDecoder.speculative_step`, all rows greedy, batch 1), on the
embedded default model and its shipped EAGLE-3 draft, fp32, world size 1:
  ops       every torch operator dispatched outside a forward / graph step (views included:
            each costs host time, though no launch)
  launches  the ops that launch a kernel on a GPU (no views, no empty allocations)
  syncs     what would stop the host on a GPU: scalar reads (item / int / bool), .tolist() and
            .cpu() of tensors, torch.tensor(..., device=...) uploads
  graph     operators inside graph steps (CPU: StaticSteps that run their function uncaptured)
for the eager path (no graphs: what a CPU run does) and the graph path (what a GPU runs), after
one uncounted run (what a process builds once per tree shape is not a per-step cost).

    python benchmarks/spec_glue_ops.py [--tokens 60] [--detail]

With --device cuda it times the real thing instead: the embedded model in --dtype (bf16 by
default), CUDA graphs on, one greedy request of --tokens tokens, plain decoding and each spec
setting; per setting the median step time, decode tokens/s, acceptance length, steps that were
one graph replay, and synchronizing CUDA calls per speculative step (sync debug mode; the one
read of the step's output table is 1):

    python benchmarks/spec_glue_ops.py --device cuda [--dtype bf16] [--tokens 200]
"""
from __future__ import annotations

import argparse
import sys
import traceback
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from collectives.communicator import SingleRankCommunicator  # noqa: E402
from model.sampling import SamplingParams  # noqa: E402
from model.spec import SpecConfig  # noqa: E402
from tests.spec_reference import default_target, load_pair, shipped_draft, torch_threads  # noqa: E402
from workers.cuda_graphs import cache_slots  # noqa: E402
from workers.engine import Engine, Request  # noqa: E402

SPECS = {"chain3": SpecConfig(draft_len=3), "tree 4x5, 8 nodes": SpecConfig(tree=True)}
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh"}
ROOT = str(Path(__file__).resolve().parent.parent) + "/"


class GlueCounter(TorchDispatchMode):
    """Counts operators while `in_step` and not `inside` a forward or graph step."""

    def __init__(self, sites: bool = False) -> None:
        super().__init__()
        self.counts, self.where = Counter(), Counter()
        self.in_step = self.inside = 0
        self.sites = sites

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.in_step:
            if self.inside:
                self.counts["graph"] += 1
            else:
                name = func.overloadpacket.__name__
                self.counts["ops"] += 1
                self.counts["launches"] += not func.is_view and name not in NO_KERNEL
                self.counts["syncs"] += name == "_local_scalar_dense"
                if self.sites:
                    self.where[f"{_site()} {name}"] += 1
        return out

    def note_sync(self) -> None:
        if self.in_step and not self.inside:
            self.counts["syncs"] += 1


def _site() -> str:
    frames = [f for f in traceback.extract_stack() if f.filename.startswith(ROOT) and "benchmarks/" not in f.filename]
    return f"{frames[-1].filename[len(ROOT):]}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"


@contextmanager
def counting(model, draft, counter: GlueCounter):
    """Marks forwards, graph steps and the speculative step; counts host reads and uploads."""
    import workers.spec_graphs as spec_graphs
    from workers.speculative import SpecDecoder

    def inside(fn):
        def wrapped(*args, **kwargs):
            counter.inside += 1
            try:
                return fn(*args, **kwargs)
            finally:
                counter.inside -= 1
        return wrapped

    def stepping(fn):
        def wrapped(*args, **kwargs):
            counter.in_step += 1
            try:
                return fn(*args, **kwargs)
            finally:
                counter.in_step -= 1
        return wrapped

    def syncing(fn):
        def wrapped(*args, **kwargs):
            counter.note_sync()
            return fn(*args, **kwargs)
        return wrapped

    def uploading(fn):
        def wrapped(*args, **kwargs):
            if kwargs.get("device") is not None:
                counter.note_sync()
            return fn(*args, **kwargs)
        return wrapped

    init, step = spec_graphs.StaticStep.__init__, SpecDecoder.speculative_step
    tolist, cpu, tensor = torch.Tensor.tolist, torch.Tensor.cpu, torch.tensor

    def static_init(self, fn, *args, **kwargs):
        init(self, inside(fn), *args, **kwargs)

    model.forward, draft.forward = inside(model.forward), inside(draft.forward)
    spec_graphs.StaticStep.__init__ = static_init
    SpecDecoder.speculative_step = stepping(step)
    torch.Tensor.tolist, torch.Tensor.cpu, torch.tensor = syncing(tolist), syncing(cpu), uploading(tensor)
    try:
        with counter:
            yield counter
    finally:
        torch.Tensor.tolist, torch.Tensor.cpu, torch.tensor = tolist, cpu, tensor
        spec_graphs.StaticStep.__init__, SpecDecoder.speculative_step = init, step
        del model.forward, draft.forward


def graph_engine(model, draft) -> Engine:
    """An engine whose speculative steps run on graph buckets that do not capture (as on a GPU,
    without the replays)."""
    from workers.spec_graphs import SpecGraphs
    engine = Engine(model, draft=draft, cuda_graphs="auto")

    def spec_graph(decoder, batch, needed):
        return SpecGraphs(model, draft, None, batch, cache_slots(needed, engine.max_context + decoder.margin),
                          decoder.spec.shape, decoder.layer_ids, capture_it=False)
    engine._spec_graph = spec_graph
    return engine


def measure(model, draft, spec: SpecConfig, graphs: bool, tokens: int, sites: bool) -> dict:
    engine = graph_engine(model, draft) if graphs else Engine(model, draft=draft)
    request = [Request(tuple(range(300, 330)), SamplingParams(max_new_tokens=tokens, stop_on_eos=False))]
    engine.generate(request, spec=spec)  # per-process tables (a shape's layout) are built once, not counted
    counter = GlueCounter(sites)
    with counting(model, draft, counter):
        done, stats = engine.generate(request, spec=spec)
    steps = stats.spec["steps"]
    row = {k: round(counter.counts[k] / steps, 1) for k in ("ops", "launches", "syncs", "graph")}
    row.update(steps=steps, acceptance_length=round(done[0].spec["acceptance_length"], 3))
    if sites:
        row["sites"] = [(round(n / steps, 1), where) for where, n in counter.where.most_common(25)]
    return row


def gpu_times(dtype: str, tokens: int) -> None:
    """Plain vs speculative decoding on CUDA graphs: step times, tokens/s and syncs per step."""
    import statistics
    import time
    import warnings

    from model.config import load_model_config
    from model.eagle3_checkpoint import load_draft
    from model.parallel import layout
    from workers.model_build import build_model
    from workers.run_config import RunConfig
    from workers.speculative import SpecDecoder
    path = default_target()
    run = RunConfig(model_path=str(path), dtype=dtype, device="cuda", world_size=1, comm="gloo")
    cfg = load_model_config(path)
    model, _ = build_model(run, cfg, layout(cfg, 1, 0, "tp"), SingleRankCommunicator())
    draft, _ = load_draft(shipped_draft(), model)
    engine = Engine(model.eval(), kv_dtype=run.kv_torch_dtype, draft=draft, cuda_graphs="on")
    request = [Request(tuple(range(300, 330)), SamplingParams(max_new_tokens=tokens, stop_on_eos=False))]
    step, syncs = SpecDecoder.speculative_step, []

    def counted(self, *args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return step(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                syncs.append(sum("synchroniz" in str(w.message) for w in caught))
    for name, spec in {"plain": None, **SPECS}.items():
        engine.generate(request, spec=spec)  # captures
        syncs.clear()
        SpecDecoder.speculative_step = counted
        try:
            engine.generate(request, spec=spec)
        finally:
            SpecDecoder.speculative_step = step
        torch.cuda.synchronize()
        begin = time.perf_counter()
        done, stats = engine.generate(request, spec=spec)
        wall = time.perf_counter() - begin
        info = done[0].spec or {}
        print(f"{name:18s} step {1e3 * statistics.median(stats.step_s):.3f} ms  "
              f"{(len(done[0].token_ids) - 1) / sum(stats.step_s):.0f} tok/s (decode)  "
              f"{len(done[0].token_ids) / wall:.0f} tok/s (wall)  acceptance {info.get('acceptance_length')}  "
              f"one-graph steps {info.get('one_graph_steps')}/{info.get('verify_steps')}  "
              f"syncs per step {statistics.mean(syncs) if syncs else '-'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=60)
    p.add_argument("--detail", action="store_true", help="per call site, ops per step")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="bf16", help="--device cuda: the model's dtype")
    args = p.parse_args()
    if args.device == "cuda":
        return gpu_times(args.dtype, args.tokens)
    with torch_threads(1):
        model, draft = load_pair(SingleRankCommunicator(), str(default_target()), str(shipped_draft()))
        for name, spec in SPECS.items():
            for graphs in (False, True):
                row = measure(model, draft, spec, graphs, args.tokens, args.detail)
                sites = row.pop("sites", [])
                print(f"{name:18s} {'graph' if graphs else 'eager'}  " + "  ".join(f"{k} {v}" for k, v in row.items()))
                for n, where in sites:
                    print(f"    {n:7.1f}  {where}")


if __name__ == "__main__":
    main()
