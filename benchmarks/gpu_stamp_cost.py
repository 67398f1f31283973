"""What one GPU timestamp costs, where tracing takes them: the price of a device-time trace.

An eager decode step is a sequence of small kernels launched from Python, and the host is the
bottleneck (each launch costs more host time than its kernel takes on the GPU), so a timestamp
costs its host time. Inside a CUDA graph the host cost goes away and what a timestamp costs is
GPU time. Three ways to take one are priced:
  * a CUDA event (pooled, timing-enabled, recorded on a cached stream), turned into a time later
    by `elapsed_time` against a reference event;
  * a one-thread kernel that reads the GPU's %globaltimer (ns) into a fresh 1-element tensor
    (torch.cuda.jiterator), read back with one copy at the end;
  * nothing (the baseline).
Three settings:
  1. tight loop on an idle GPU (per call, what microbenchmarks quote);
  2. in a launch-bound eager sequence of N_OPS matmul+SiLU pairs with N_STAMPS timestamps
     (host time per timestamp, medians over reps with the modes interleaved);
  3. the same sequence captured as one CUDA graph (GPU time per timestamp; host time per replay).

    python benchmarks/gpu_stamp_cost.py [--reps 300]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import machine, print_table, save  # noqa: E402

N_OPS, N_STAMPS, HIDDEN = 200, 30, 1024
GLOBALTIMER = ('template <typename T> T globaltimer_ns(T x) { unsigned long long t; '
               'asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return static_cast<T>(t); }')


def per_call_us(fn, n: int = 20000) -> float:
    runs = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(runs)


class Workload:
    """N_OPS matmul+SiLU pairs at decode shapes, with N_STAMPS timestamps spread among them."""

    def __init__(self) -> None:
        self.weights = [torch.randn(HIDDEN, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.03 for _ in range(8)]
        self.x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
        self.stream = torch.cuda.current_stream()
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(N_STAMPS)]
        self.graph_events = [torch.cuda.Event(enable_timing=True, external=True) for _ in range(N_STAMPS)]
        self.timer = torch.cuda.jiterator._create_jit_fn(GLOBALTIMER)
        self.one = torch.zeros(1, dtype=torch.int64, device="cuda")
        self.stamps: list[torch.Tensor] = []

    def run(self, mode: str) -> torch.Tensor:
        y, every, k = self.x, N_OPS // N_STAMPS, 0
        events = self.graph_events if mode == "graph event" else self.events
        stream = torch.cuda.current_stream() if mode == "graph event" else self.stream  # captured: the side stream
        for i in range(N_OPS):
            y = torch.nn.functional.silu(y @ self.weights[i % 8])
            if i % every == 0 and k < N_STAMPS:
                if mode in ("event", "graph event"):
                    events[k].record(stream)
                elif mode == "globaltimer":
                    self.stamps.append(self.timer(self.one))
                k += 1
        return y


def eager(work: Workload, reps: int) -> dict:
    """Host ms per sequence for each mode (interleaved), and the cost of reading the stamps back."""
    modes = ("none", "event", "globaltimer")
    times = {m: [] for m in modes}
    for rep in range(reps + 10):
        for mode in modes[rep % 3:] + modes[:rep % 3]:
            work.stamps.clear()
            torch.cuda.synchronize()
            start = time.perf_counter()
            work.run(mode)
            torch.cuda.synchronize()
            if rep >= 10:
                times[mode].append((time.perf_counter() - start) * 1e6)
    base = statistics.median(times["none"])
    ref = torch.cuda.Event(enable_timing=True)
    ref.record()
    work.run("event")
    torch.cuda.synchronize()
    resolve = per_call_us(lambda: [ref.elapsed_time(e) for e in work.events], n=200) / N_STAMPS
    readback = per_call_us(lambda: torch.cat(work.stamps).tolist(), n=200) / N_STAMPS
    return {"sequence_us": {m: statistics.median(t) for m, t in times.items()},
            "stamp_us": {m: (statistics.median(times[m]) - base) / N_STAMPS for m in modes[1:]},
            "read_us": {"event": resolve, "globaltimer": readback}}


def graphed(work: Workload, reps: int) -> dict:
    """GPU us per replay and host us per replay() call, per mode."""
    out = {}
    for mode in ("none", "graph event", "globaltimer"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            work.run(mode)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            work.run(mode)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        gpu, host = [], []
        for rep in range(reps + 10):
            torch.cuda.synchronize()
            start.record()
            t0 = time.perf_counter()
            graph.replay()
            host.append((time.perf_counter() - t0) * 1e6)
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end) * 1e3)
        out[mode] = {"gpu_us": statistics.median(gpu[10:]), "host_replay_us": statistics.median(host[10:])}
    base = out["none"]["gpu_us"]
    for mode in ("graph event", "globaltimer"):
        out[mode]["stamp_gpu_us"] = (out[mode]["gpu_us"] - base) / N_STAMPS
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=300)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_stamp_cost.py needs a CUDA GPU")
    work = Workload()
    stream, pool, ref = work.stream, work.events, torch.cuda.Event(enable_timing=True)
    ref.record()
    for e in pool:
        e.record()
    torch.cuda.synchronize()
    it = iter(range(10 ** 9))
    tight = {"new Event + record()": per_call_us(lambda: torch.cuda.Event(enable_timing=True).record()),
             "pooled record(stream)": per_call_us(lambda: pool[next(it) % N_STAMPS].record(stream)),
             "torch.cuda.current_stream()": per_call_us(torch.cuda.current_stream),
             "elapsed_time": per_call_us(lambda: ref.elapsed_time(pool[next(it) % N_STAMPS])),
             "globaltimer kernel": per_call_us(lambda: work.timer(work.one)),
             "monotonic_ns": per_call_us(time.monotonic_ns)}
    result = {"machine": machine(), "command": " ".join(sys.argv), "n_ops": N_OPS, "n_stamps": N_STAMPS,
              "tight_loop_us": tight, "eager": eager(work, args.reps), "graph": graphed(work, args.reps)}
    print(f"machine: {result['machine']}")
    print_table(["tight loop, idle GPU", "us per call"], [[k, v] for k, v in tight.items()])
    e, g = result["eager"], result["graph"]
    print(f"\neager: {N_OPS} matmul+SiLU pairs, {N_STAMPS} stamps; the sequence alone "
          f"{e['sequence_us']['none']:.0f} us host ({e['sequence_us']['none'] / N_OPS / 2:.1f} us per launch)")
    print_table(["stamp", "host us per stamp, in the sequence", "us per stamp to read back"],
                [[m, e["stamp_us"][m], e["read_us"][m]] for m in ("event", "globaltimer")])
    print(f"\nCUDA graph of the same sequence: {g['none']['gpu_us']:.0f} us GPU per replay "
          f"({g['none']['gpu_us'] / N_OPS / 2:.2f} us per kernel)")
    print_table(["stamp", "GPU us per replay", "GPU us per stamp", "host us per replay()"],
                [[m, g[m]["gpu_us"], g[m].get("stamp_gpu_us", 0.0), g[m]["host_replay_us"]] for m in g])
    print("saved", save("gpu_stamp_cost_" + torch.cuda.get_device_name().split()[-1].lower(), result))


if __name__ == "__main__":
    main()
