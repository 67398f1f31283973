"""EAGLE-3 on the node: acceptance length and speed-up over plain decoding (--no-spec).

Loads the embedded default model with its shipped draft on a Ray node of --world-size actors (8 by
default, shared-memory collectives, as `dgx-emu generate` runs), then, for plain decoding, chains
of 1..5 draft tokens and one EAGLE-2 tree setting, decodes each of --prompts single-user prompts
--repeats times, the settings interleaved. Reported per setting: acceptance length (1 + accepted
drafts per verification step) and acceptance rate per draft position, pooled over all runs; and as
medians over runs: decode tokens/s (tokens after the first / decode time, as the CLI computes
it), step latency, draft and verify time per step,
the speed-up over plain decoding, and the break-even acceptance length (a step's cost in plain
steps: the acceptance length a draft needs here to gain anything). Writes
benchmarks/results/spec_<tag>.json.

The target is the trained embedded model and the draft the one shipped with it (trained by
`dgx-emu train-draft --embedded` on its greedy continuations of held-out text); prompts are cut
from the part of that text the draft never read. On CPU actors a draft step costs a good fraction
of a 4-layer target step (both are dominated by collectives), where on the real node one draft
layer is ~1/48 of the target: the break-even acceptance here is far above a GPU's.

    python benchmarks/spec_bench.py [--world-size 8] [--tokens 48] [--prompts 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, median, print_table, save  # noqa: E402
from cluster.node import build_node  # noqa: E402
from model.embedded import default_draft_dir, ensure_default_model  # noqa: E402
from model.sampling import SamplingParams  # noqa: E402
from model.spec import SpecConfig  # noqa: E402
from tests.spec_reference import heldout_prompts  # noqa: E402
from workers.engine import Request  # noqa: E402
from workers.run_config import RunConfig  # noqa: E402

SETTINGS = {"no-spec": None, **{f"chain {k}": SpecConfig(draft_len=k) for k in range(1, 6)},
            "tree 8x2, 16 nodes": SpecConfig(tree=True, top_k=8, depth=2, tree_tokens=16)}


def one_run(node, spec, prompt, tokens: int) -> dict:
    request = [Request(prompt, SamplingParams(max_new_tokens=tokens, stop_on_eos=False))]
    done, stats, info = node.generate(request, spec=spec)
    steps, metrics = len(stats.step_s), done[0].spec
    return {"tok_s": (len(done[0].token_ids) - 1) / sum(stats.step_s), "step_ms": 1e3 * median(stats.step_s),
            "steps": steps, "accepted": (metrics.get("acceptance_length", 1.0) - 1.0) * steps if metrics else 0.0,
            "position_hits": [a * steps for a in metrics.get("acceptance_per_position", [])],
            "draft_ms": 1e3 * metrics.get("draft_s", 0.0) / max(1, steps),
            "verify_ms": 1e3 * metrics.get("verify_s", 0.0) / max(1, steps),
            "ctrl_ms": 1e3 * info.get("control_overhead_per_step_s", 0.0), "tokens": done[0].token_ids}


def summarize(name: str, spec, runs: list[dict], n_prompts: int) -> dict:
    """Acceptance pooled over all runs (accepted drafts / verification steps); times as medians."""
    steps = sum(r["steps"] for r in runs)
    depth = len(runs[0]["position_hits"])
    return {"setting": name, "spec": spec.describe() if spec else None,
            "acceptance_length": 1.0 + sum(r["accepted"] for r in runs) / steps,
            "acceptance_per_position": [sum(r["position_hits"][i] for r in runs) / steps for i in range(depth)],
            "tokens_per_s": median([r["tok_s"] for r in runs]), "step_ms": median([r["step_ms"] for r in runs]),
            "draft_ms_per_step": median([r["draft_ms"] for r in runs]),
            "verify_ms_per_step": median([r["verify_ms"] for r in runs]),
            "control_ms_per_step": median([r["ctrl_ms"] for r in runs]), "n_runs": len(runs), "steps": steps,
            "outputs": [r["tokens"] for r in runs[:n_prompts]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--moe", default="tp")
    p.add_argument("--comm", default="shm")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tag", default="cpu_world8")
    args = p.parse_args()
    model, draft = ensure_default_model(), default_draft_dir()
    run = RunConfig(model_path=str(model), world_size=args.world_size, moe_mode=args.moe, comm=args.comm,
                    draft_path=str(draft))
    prompts = heldout_prompts(args.prompts, seed=2026)
    with build_node(run) as node:
        node.load()
        node.generate([Request(prompts[0], SamplingParams(max_new_tokens=8))], spec=SpecConfig())  # warm-up
        runs = {name: [] for name in SETTINGS}
        for rep in range(args.repeats):  # settings interleaved, so load drifts hit them alike
            for name, spec in SETTINGS.items():
                runs[name] += [one_run(node, spec, p, args.tokens) for p in prompts]
            print(f"  repeat {rep + 1}/{args.repeats}: " + ", ".join(
                f"{name} {median([r['tok_s'] for r in runs[name]]):.1f} tok/s" for name in SETTINGS), file=sys.stderr)
        rows = [summarize(name, SETTINGS[name], runs[name], len(prompts)) for name in SETTINGS]
    base = rows[0]
    for r in rows:
        r["speedup_vs_no_spec"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["break_even_acceptance_length"] = r["step_ms"] / base["step_ms"]  # a step must yield this many tokens
        r["lossless"] = r["outputs"] == base["outputs"]
    print(f"machine: {machine()}")
    print(f"embedded default model, world size {args.world_size} ({args.comm}, moe {args.moe}), greedy, "
          f"{args.prompts} prompts x {args.repeats} repeats x {args.tokens} tokens, batch 1; "
          "prompts from held-out text; the draft shipped with the model (dgx-emu train-draft --embedded)")
    print_table(["setting", "accept len", "accept/position", "tok/s", "speed-up", "step ms", "break-even AL",
                 "draft ms/step", "verify ms/step", "same tokens"],
                [[r["setting"], r["acceptance_length"],
                  " ".join(f"{a:.2f}" for a in r["acceptance_per_position"]) or "-",
                  r["tokens_per_s"], r["speedup_vs_no_spec"], r["step_ms"], r["break_even_acceptance_length"],
                  r["draft_ms_per_step"], r["verify_ms_per_step"], r["lossless"]] for r in rows])
    for r in rows:
        r.pop("outputs")
    print("saved", save(f"spec_{args.tag}", {"machine": machine(), "model": str(model), "draft": str(draft),
                                              "draft_note": "toy-trained by dgx-emu train-draft --embedded",
                                              "world_size": args.world_size, "tokens": args.tokens,
                                              "rows": rows, "command": " ".join(sys.argv), "time": time.ctime()}))


if __name__ == "__main__":
    main()
