"""One EAGLE-3 draft forward on a GPU: the torch ops against the fused kernels, replayed from a CUDA graph.

Why: a chain-3 speculative step runs the draft three times (the catch-up on the accepted tokens,
then one forward per depth) inside its one graph; `generate --draft-len=3` reports the whole step,
this isolates the draft's share. The embedded target and its shipped draft, batch 1, the draft
cache holding `--context` keys (random: attention reads them all the same), each forward as
workers/spec_graphs.py runs it (static, its cache length restored after): the catch-up (4 tokens
with target features, one row's logits) and a depth step (2 drafted tokens with the draft's own
hidden states, a causal step mask, the last row's logits). Median / p90 of CUDA-event-timed
replays, and how the fused forward's outputs compare with the torch one's.

    python benchmarks/draft_step_bench.py [--dtype bf16] [--context 512] [--iters 300] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import machine, median, percentile, print_table  # noqa: E402


def _models(dtype: str):
    from collectives.communicator import SingleRankCommunicator
    from model.config import load_model_config
    from model.eagle3_checkpoint import load_draft
    from model.embedded import default_draft_dir, ensure_default_model
    from model.parallel import layout
    from workers.model_build import build_model
    from workers.run_config import RunConfig
    path = ensure_default_model()
    run = RunConfig(model_path=str(path), dtype=dtype, device="cuda", world_size=1, kernels="triton", comm="nccl")
    cfg = load_model_config(path)
    model, _ = build_model(run, cfg, layout(cfg, 1, 0, "tp"), SingleRankCommunicator())
    return {kernels: load_draft(default_draft_dir(), model, kernels=kernels)[0] for kernels in ("torch", "triton")}


def _inputs(draft, step: str, context: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    dtype, cfg = draft.fc.weight.dtype, draft.cfg
    rows = 4 if step == "catch_up" else 2
    inputs = {"tokens": torch.randint(3, cfg.vocab_size, (1, rows), generator=gen)}
    if step == "catch_up":
        inputs.update(target_features=torch.randn(1, rows, cfg.n_aux * cfg.target_hidden_size, generator=gen),
                      n_new=torch.full((1,), rows), logit_rows=torch.zeros(1, 1, dtype=torch.long))
    else:
        inputs.update(hidden=torch.randn(1, rows, cfg.hidden_size, generator=gen),
                      positions=torch.arange(context, context + rows)[None],
                      step_mask=torch.ones(1, rows, rows, dtype=torch.bool).tril(),
                      logit_rows=torch.full((1, 1), rows - 1))
    return {k: v.to("cuda", dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}


def _time(draft, step: str, context: int, iters: int):
    """(replay seconds per forward, the forward's outputs) of one captured static draft forward."""
    from workers.cuda_graphs import capture
    from workers.step_bench import time_steps
    cache = draft.new_cache(1, context + 16)
    gen = torch.Generator("cuda").manual_seed(1)  # the same keys and values for each draft
    for stored in cache.k + cache.v:
        stored.normal_(generator=gen)
    inputs = _inputs(draft, step, context)
    tokens = inputs.pop("tokens")

    def reset() -> None:
        cache.lengths.fill_(context)

    reset()
    graph, out = capture(lambda: draft(tokens, cache, static=True, **inputs), reset, torch.device("cuda"), 1)
    reset()
    graph.replay()
    torch.cuda.synchronize()
    result = (out.logits.float().clone(), out.hidden.float().clone())
    return time_steps(graph.replay, reset, iters), result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("draft_step_bench: no CUDA device", file=sys.stderr)
        return 2
    drafts = _models(args.dtype)
    rows, results = [], []
    for step in ("catch_up", "depth"):
        outputs = {}
        for kernels, draft in drafts.items():
            times, outputs[kernels] = _time(draft, step, args.context, args.iters)
            us = [t * 1e6 for t in times]
            results.append({"step": step, "kernels": kernels, "median_us": round(median(us), 2),
                            "p90_us": round(percentile(us, 0.9), 2)})
            rows.append([step, kernels, median(us), percentile(us, 0.9)])
        (ref_logits, ref_hidden), (logits, hidden) = outputs["torch"], outputs["triton"]
        err = [((a - b).abs().max() / b.abs().max()).item() for a, b in ((logits, ref_logits), (hidden, ref_hidden))]
        same_top1 = bool(torch.equal(logits.argmax(-1), ref_logits.argmax(-1)))
        results.append({"step": step, "relative_error": {"logits": err[0], "hidden": err[1]}, "same_top1": same_top1})
        print(f"{step}: fused vs torch relative error logits {err[0]:.2e} hidden {err[1]:.2e}, same top-1 {same_top1}")
    print_table(["step", "kernels", "median us", "p90 us"], rows)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine(), "command": " ".join(sys.argv),
                                              "dtype": args.dtype, "context": args.context, "results": results},
                                             indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
