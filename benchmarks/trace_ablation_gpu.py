"""Where tracing's cost on a GPU goes: the same traced decode with one part of the GPU clock
changed at a time, on one world-1 node (the method of trace_overhead.py: each round runs every
variant once, in shuffled order; the headline is the median over rounds of each variant's
median step time relative to the untraced call of its round).

  untraced, untraced again   the A/A pair: the method's noise floor
  traced                     as shipped: CUDA-event timestamps, resolved at each step's end
  host clock                 the same records with CLOCK_MONOTONIC times: the recording's Python
  events twice               every timestamp records two events: the marginal cost of a record
  no resolution              events recorded but never waited on or resolved

    python benchmarks/trace_ablation_gpu.py [--rounds 80] [--random-preset medium]
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import machine, median, print_table, save  # noqa: E402
from benchmarks.decode_bench import build_random_checkpoint  # noqa: E402
from cluster.inprocess import InProcessNode  # noqa: E402
from model.embedded import ensure_default_model  # noqa: E402
from model.sampling import SamplingParams  # noqa: E402
from workers.engine import Request  # noqa: E402
from workers.run_config import RunConfig  # noqa: E402

VARIANTS = ("untraced", "untraced again", "traced", "host clock", "events twice", "no resolution")


class Variants:
    """Switches one traced world-1 worker between the variants (between generate calls)."""

    def __init__(self, worker) -> None:
        self.worker, self.recorder = worker, worker.recorder
        self.clock, self.resolve = self.recorder.cuda_clock, self.recorder._resolve_events

    def _twice(self):
        self.clock.now()
        return self.clock.now()

    def _discard(self) -> None:
        rec = self.recorder
        del rec.coll_rows[:], rec.span_rows[:]
        rec.steps, rec.unresolved, self.clock.used = [], (0, 0, 0), 0

    def apply(self, variant: str) -> None:
        rec = self.recorder
        rec.flush()  # what the previous variant recorded, resolved by its own clock
        rec.cuda_clock = None if variant == "host clock" else self.clock
        rec.now = {"host clock": time.monotonic_ns, "events twice": self._twice}.get(variant, self.clock.now)
        rec._resolve_events = self._discard if variant == "no resolution" else self.resolve
        self.worker.set_tracing(not variant.startswith("untraced"))  # rebuilds the wrappers with rec.now


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=80)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--random-preset", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("trace_ablation_gpu.py needs a CUDA GPU")
    model = build_random_checkpoint(args.random_preset) if args.random_preset else str(ensure_default_model())
    request = [Request((0, 300, 301, 302, 303), SamplingParams(max_new_tokens=args.tokens, stop_on_eos=False))]
    ratios = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as trace_dir:
        node = InProcessNode(RunConfig(model, world_size=1, trace_dir=trace_dir, device="cuda", comm="nccl",
                                       dtype="bf16"))
        node.load()
        variants = Variants(node.worker)
        node.generate(request)  # warm-up
        shuffle = random.Random(0)
        for i in range(args.rounds):
            order, step_s = list(VARIANTS), {}
            shuffle.shuffle(order)
            for variant in order:
                variants.apply(variant)
                step_s[variant] = median(node.generate(request)[1].step_s)
            for variant in VARIANTS:
                ratios[variant].append(step_s[variant] / step_s["untraced"])
            if (i + 1) % 20 == 0:
                print(f"round {i + 1}/{args.rounds}", file=sys.stderr)
        variants.apply("traced")
        node.shutdown()
    result = {"machine": machine(), "command": " ".join(sys.argv), "rounds": args.rounds,
              "model": args.random_preset or "embedded default",
              "overhead_pct": {v: (median(r) - 1) * 100 for v, r in ratios.items()}}
    print(f"machine: {result['machine']}")
    print_table(["variant", "step time vs untraced, % (median of paired)"],
                [[v, pct] for v, pct in result["overhead_pct"].items()])
    tag = "h200" + (f"_{args.random_preset}" if args.random_preset else "")
    print("saved", save(f"trace_ablation_{tag}", result))


if __name__ == "__main__":
    main()
