"""What tracing costs: the same decode with tracing on and paused, alternated on one node.

Separate launches of the 8-actor node differ by more than the effect measured here (the 2-core
host's scheduling noise is +-20% between launches), and even two identical nodes in one process
differ by a few percent (memory placement of each instance). So one world-size-1 node, started
with a trace directory, alternates --rounds generate calls with tracing on and paused
(`Worker.set_tracing`: paused, the model's stage wrappers are removed, the communicator's calls
go straight through and the engine holds a NullRecorder: the untraced path). The ratio of the
median step times is the overhead. The host's speed drifts by more than the effect within
seconds, so each round pairs two adjacent calls (one on, one paused, in alternating order) and
the headline is the median over rounds of the paired ratio, with its interquartile range. Each
round also makes a second untraced call, and the same statistic over the two untraced calls (an
A/A comparison) shows what the method reads when there is nothing to find: its noise floor. At
world size 1 the process's CPU time per call is compared too: preemption by other work on the
host inflates wall time but not CPU time. Medians skip the steps that flush a batch to the
file (one in ~50); the overhead of the mean step time, flushes included, is reported too.
On a GPU (--device cuda) times are CUDA events, as in a traced GPU run.
A rank of the 8-actor node records the same collectives and stages per step as this one (only
their sizes differ) while its steps are longer, so its relative overhead is at most this one's.
Also reported: the cost of one recorded collective and one recorded stage, timed in isolation,
and the records per step.

    python benchmarks/trace_overhead.py [--world 1|8] [--rounds 60] [--tokens 32] [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import machine, median, print_table, save  # noqa: E402
from benchmarks.decode_bench import build_random_checkpoint  # noqa: E402
from cluster.inprocess import InProcessNode  # noqa: E402
from cluster.node import build_node  # noqa: E402
from cluster.timeline import read_trace  # noqa: E402
from collectives.communicator import SingleRankCommunicator  # noqa: E402
from collectives.trace import TraceRecorder, TracingCommunicator  # noqa: E402
from model.embedded import ensure_default_model  # noqa: E402
from model.sampling import SamplingParams  # noqa: E402
from workers.engine import Request  # noqa: E402
from workers.run_config import RunConfig  # noqa: E402


def per_record_cost(directory: str, device: str, n: int = 5000) -> dict:
    """Microseconds per traced collective (wrapper + record, over a world-1 all-reduce, which
    returns its input) and per stage (two timestamps and a record)."""
    recorder = TraceRecorder(directory, 0, 1, "none", device)
    plain, traced = SingleRankCommunicator(), TracingCommunicator(SingleRankCommunicator(), recorder)
    x = torch.randn(1, 256, device=device)

    def loop(fn) -> float:
        recorder.step_begin(0, [])
        start = time.perf_counter()
        for _ in range(n):
            fn()
        recorder.step_end(0)  # GPU: the events become times here, and the pool is reused
        return (time.perf_counter() - start) / n * 1e6

    extra, stage = [], []
    for _ in range(7):  # interleaved, medians: the two loops see the same machine state
        extra.append(loop(lambda: traced.all_reduce(x)) - loop(lambda: plain.all_reduce(x)))
        stage.append(loop(lambda: recorder.span_between("attention", recorder.now(), recorder.now())))
    costs = {"collective_us": median(extra), "stage_us": median(stage)}
    recorder.close()
    return costs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--world", type=int, default=1, help="ranks (8: the Ray node, one actor per rank)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--random-preset", default=None,
                   help="trace a random model of this preset (e.g. medium) instead of the embedded default")
    p.add_argument("--dtype", default=None, help="default: fp32 on the CPU, bf16 on a GPU")
    p.add_argument("--tag", default=None, help="results file tag (default: the device)")
    args = p.parse_args()
    tag = args.tag or args.device + (f"_{args.random_preset}" if args.random_preset else "")
    torch.set_num_threads(1)
    host = machine()
    model = build_random_checkpoint(args.random_preset) if args.random_preset else str(ensure_default_model())
    request = [Request((0, 300, 301, 302, 303), SamplingParams(max_new_tokens=args.tokens, stop_on_eos=False))]
    with tempfile.TemporaryDirectory() as trace_dir, tempfile.TemporaryDirectory() as scratch:
        gpu = args.device == "cuda"
        run = RunConfig(model, world_size=args.world, trace_dir=trace_dir, device=args.device,
                        comm="nccl" if gpu else "shm", dtype=args.dtype or ("bf16" if gpu else "fp32"))
        node = InProcessNode(run) if args.world == 1 else build_node(run)
        node.load()
        node.generate(request)  # warm-up
        steps: dict[str, list[float]] = {"on": [], "off": [], "off2": []}
        ratios, null_ratios, cpu_ratios, mean_ratios = [], [], [], []
        orders = [("off", "on", "off2"), ("on", "off2", "off"), ("off2", "off", "on")]  # each state in each place
        for i in range(args.rounds):
            got, cpu = {}, {}
            for state in orders[i % 3]:
                node.set_tracing(state == "on")
                cpu_start = time.process_time()
                got[state] = node.generate(request)[1].step_s
                cpu[state] = time.process_time() - cpu_start
                steps[state] += got[state]
            ratios.append(median(got["on"]) / median(got["off"]))
            null_ratios.append(median(got["off2"]) / median(got["off"]))
            mean_ratios.append(statistics.fmean(got["on"]) / statistics.fmean(got["off"]))
            cpu_ratios.append(cpu["on"] / cpu["off"])
            if (i + 1) % 10 == 0:
                print(f"round {i + 1}/{args.rounds}: paired overhead so far {(median(ratios) - 1) * 100:+.2f}%",
                      file=sys.stderr)
        node.set_tracing(True)
        node.shutdown()
        trace = read_trace(trace_dir)
        n_steps = len(trace.ranks[0].steps)
        records_per_step = (len(trace.ranks[0].collectives), len(trace.ranks[0].spans))
        costs = per_record_cost(scratch, args.device)
    untraced, traced = median(steps["off"]), median(steps["on"])
    quartiles, null_quartiles = statistics.quantiles(ratios, n=4), statistics.quantiles(null_ratios, n=4)
    result = {"machine": host, "command": " ".join(sys.argv), "rounds": args.rounds, "steps_each": len(steps["on"]),
              "untraced_step_ms": untraced * 1e3, "traced_step_ms": traced * 1e3,
              "overhead_pct": (median(ratios) - 1) * 100,
              "overhead_iqr_pct": [(quartiles[0] - 1) * 100, (quartiles[2] - 1) * 100],
              "overhead_of_pooled_medians_pct": (traced / untraced - 1) * 100,
              "overhead_of_means_pct": (median(mean_ratios) - 1) * 100,  # flushes included
              "null_pct": (median(null_ratios) - 1) * 100,  # untraced vs untraced: the method's noise floor
              "null_iqr_pct": [(null_quartiles[0] - 1) * 100, (null_quartiles[2] - 1) * 100],
              "device": args.device, "dtype": run.dtype, "model": args.random_preset or "embedded default",
              # world 1 only: this process's CPU time per generate call (preemption by other work is not in it)
              "cpu_overhead_pct": (median(cpu_ratios) - 1) * 100 if args.world == 1 else None,
              "collectives_per_step": records_per_step[0] / n_steps, "stages_per_step": records_per_step[1] / n_steps,
              **costs}
    result["records_cost_pct_of_step"] = (result["collectives_per_step"] * costs["collective_us"]
                                          + result["stages_per_step"] * costs["stage_us"]) / (untraced * 1e6) * 100
    print(f"machine: {host}")
    print_table(["world", "device", "untraced step ms (p50)", "traced step ms (p50)", "overhead % (paired median)",
                 "IQR of paired %", "A/A null % (IQR)", "overhead of means %", "pooled medians %",
                 "CPU-time overhead %", "steps each"],
                [[args.world, args.device, result["untraced_step_ms"], result["traced_step_ms"], result["overhead_pct"],
                  "{:+.2f} .. {:+.2f}".format(*result["overhead_iqr_pct"]),
                  "{:+.2f} ({:+.2f} .. {:+.2f})".format(result["null_pct"], *result["null_iqr_pct"]),
                  result["overhead_of_means_pct"], result["overhead_of_pooled_medians_pct"],
                  "-" if result["cpu_overhead_pct"] is None else result["cpu_overhead_pct"], result["steps_each"]]])
    print()
    print_table(["per step", "count", "us each", "% of untraced step"],
                [["collectives", result["collectives_per_step"], costs["collective_us"],
                  result["collectives_per_step"] * costs["collective_us"] / (untraced * 1e4)],
                 ["stages", result["stages_per_step"], costs["stage_us"],
                  result["stages_per_step"] * costs["stage_us"] / (untraced * 1e4)]])
    print("saved", save(f"trace_overhead_{tag}_world{args.world}", result))


if __name__ == "__main__":
    main()
