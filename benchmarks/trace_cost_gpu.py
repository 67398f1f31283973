"""What tracing costs a graph-replayed decode on a GPU: `dgx-emu generate` untraced and with
`--trace DIR`, alternated over several rounds (fresh processes, the same prompt and token count),
the median over rounds of each run's p50 step time, and the traced / untraced ratio (target: at
most 1.03, issue #14). Also checks that every traced run chose the untraced run's tokens.

Why a separate process per run: a traced run captures its graphs with the stamp ledger active, so
the two cannot share graphs, and alternating fresh processes spreads the machine's drift over both
arms (the method of trace_overhead.py on the CPU).

    python benchmarks/trace_cost_gpu.py [--rounds 5] [--tokens 300] [--world-size 1] [--out FILE]
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, median, print_table  # noqa: E402

PROMPT = "The DGX B200 node is"


def generate(tokens: int, world_size: int, trace_dir: str | None, timeout: float) -> dict:
    """One `dgx-emu generate --json` run on the GPU (embedded model, bf16, no speculation)."""
    cmd = [sys.executable, "-m", "launch", "generate", "--device", "cuda", "--dtype", "bf16", "--prompt", PROMPT,
           "--max-new-tokens", str(tokens), "--ignore-eos", "--json", "--world-size", str(world_size), "--no-spec"]
    if trace_dir:
        cmd += ["--trace", trace_dir]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per generate run")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    steps: dict[str, list[float]] = {"untraced": [], "traced": []}
    same_tokens = True
    for r in range(args.rounds):
        arms = ("untraced", "traced") if r % 2 == 0 else ("traced", "untraced")
        ids = {}
        for arm in arms:
            with tempfile.TemporaryDirectory() as trace_dir:
                run = generate(args.tokens, args.world_size, trace_dir if arm == "traced" else None, args.timeout)
            steps[arm].append(run["step_latency_s"]["p50"] * 1e6)
            ids[arm] = run.get("token_ids")
            print(f"round {r + 1}/{args.rounds} {arm:<9} p50 step {steps[arm][-1]:7.1f} us", flush=True)
        same_tokens &= ids["traced"] == ids["untraced"]
    med = {arm: median(v) for arm, v in steps.items()}
    ratio = med["traced"] / med["untraced"]
    print_table(["arm", "runs", "median p50 step us", "x untraced"],
                [[arm, len(v), f"{med[arm]:.1f}", f"{med[arm] / med['untraced']:.3f}"] for arm, v in steps.items()])
    print(f"traced / untraced: {ratio:.3f} (target <= 1.03); tokens equal: {same_tokens}")
    if args.out:
        args.out.write_text(json.dumps({
            "machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "benchmarks/trace_cost_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "results": [{"name": f"generate-{arm}", "model": "embedded", "dtype": "bf16", "tokens": 1,
                         "tp": args.world_size, "median_us": round(med[arm], 2), "runs_p50_us": [round(x, 2) for x in v]}
                        for arm, v in steps.items()],
            "traced_over_untraced": round(ratio, 4), "token_ids_equal": same_tokens}, indent=2))
        print(f"wrote {args.out}")
    return 0 if same_tokens else 1


if __name__ == "__main__":
    sys.exit(main())
