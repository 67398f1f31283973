"""What the virtual clock costs a real run: decode steps with and without --emulate-node.

Without --emulate-node there is nothing to measure: no clock, no wrapper on the model or the
communicator exists (tests/test_virtual_clock.py checks that the objects are the untouched ones).
With it, each module call builds its plan (workers/cost_model.py) and each collective adds one
16-byte all-gather of the modeled times. Three workers share one process (and, at world 2, one
communicator per rank, called in lockstep): two without the clock, one with it. Each round runs
one generate call on each, in rotating order; the overhead is the median over rounds of the
paired ratio (clock / plain) of the median step's wall time and of the call's CPU time (which
other work on a shared host inflates less), beside the same statistics for the two plain workers
(an A/A comparison: the method's noise floor).

    python benchmarks/virtual_clock_overhead.py [--world 1|2] [--rounds 15] [--tokens 16]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import machine, median, percentile, print_table, save  # noqa: E402
from cluster.hardware import emulated_node  # noqa: E402
from cluster.procs import run_world  # noqa: E402
from collectives.communicator import SingleRankCommunicator  # noqa: E402
from model.embedded import ensure_default_model  # noqa: E402
from model.sampling import SamplingParams  # noqa: E402
from workers.engine import Request  # noqa: E402
from workers.run_config import RunConfig  # noqa: E402
from workers.worker import Worker  # noqa: E402

NODE = "dgx-b200"
NAMES = ("plain", "plain2", "clock")


def measure(comm, model_path: str, rounds: int, tokens: int) -> dict[str, torch.Tensor]:
    """One rank: the three workers, `rounds` rounds; returns per-round median step seconds."""
    torch.set_num_threads(1)
    workers = {}
    for name in NAMES:
        run = RunConfig(model_path, world_size=comm.world_size, comm="shm",
                        emulate_node=NODE if name == "clock" else None)
        workers[name] = Worker(comm.rank, run, comm, node=emulated_node(run.emulate_node))
        workers[name].load()
    request = [Request((0, 300, 301, 302, 303), SamplingParams(max_new_tokens=tokens, stop_on_eos=False))]
    for worker in workers.values():
        worker.generate(request)  # warm-up
    steps = {name: [] for name in NAMES}
    cpu = {name: [] for name in NAMES}
    for i in range(rounds):
        for name in NAMES[i % 3:] + NAMES[:i % 3]:  # each worker in each place
            start = time.process_time()
            steps[name].append(median(workers[name].generate(request)[1].step_s))
            cpu[name].append(time.process_time() - start)
    out = {name: torch.tensor(values, dtype=torch.float64) for name, values in steps.items()}
    return out | {f"{name}_cpu": torch.tensor(values, dtype=torch.float64) for name, values in cpu.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=1, choices=(1, 2))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--tokens", type=int, default=16)
    args = p.parse_args()
    model = str(ensure_default_model())
    if args.world == 1:
        steps = measure(SingleRankCommunicator(), model, args.rounds, args.tokens)
    else:
        steps = run_world(args.world, measure, model, args.rounds, args.tokens, backend="shm")
    row = {"world": args.world, "rounds": args.rounds, "tokens": args.tokens}
    table = []
    for what, suffix in (("wall, median step", ""), ("CPU time per call", "_cpu")):
        clock, plain, plain2 = (steps[n + suffix].tolist() for n in ("clock", "plain", "plain2"))
        ratios = [c / p for c, p in zip(clock, plain)]
        null = [q / p for q, p in zip(plain2, plain)]
        row[what] = {"plain_ms": median(plain) * 1e3, "clock_ms": median(clock) * 1e3, "overhead": median(ratios) - 1,
                     "overhead_iqr": [percentile(ratios, 0.25) - 1, percentile(ratios, 0.75) - 1],
                     "a_a_noise": median(null) - 1}
        r = row[what]
        table.append([args.world, what, f"{r['plain_ms']:.2f}", f"{r['clock_ms']:.2f}", f"{r['overhead']:+.1%}",
                      f"{r['overhead_iqr'][0]:+.1%}..{r['overhead_iqr'][1]:+.1%}", f"{r['a_a_noise']:+.1%}"])
    print_table(["world", "time", "plain ms", "clock ms", "overhead", "IQR", "A/A noise"], table)
    save(f"virtual-clock-overhead-cpu-world{args.world}",
         {"machine": machine(), "model": "embedded (default)", "node": NODE, "result": row,
          "command": f"python benchmarks/virtual_clock_overhead.py --world {args.world} --rounds {args.rounds} "
                     f"--tokens {args.tokens}"})


if __name__ == "__main__":
    main()
