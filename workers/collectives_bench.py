"""Latency of a TP step's collectives on GPUs: the fused symmetric-memory kernel next to NCCL.

One process per GPU (cluster/procs.run_world, backend "symm"); every rank runs the same cases:
  ar_rmsnorm  allreduce_add_rmsnorm of (tokens, hidden): symm-auto (what the backend picks),
              symm-one-shot, symm-two-shot, and nccl (NCCL all_reduce + the one-GPU norm kernel);
  all_reduce  the plain sum: symm-auto / symm-one-shot / symm-two-shot / nccl;
  all_gather  of (tokens, hidden) per rank: symm (the backend's all_gather: one fused all-reduce of
              zero-padded slots where they fit the kernel, else NCCL) and nccl;
  dispatch,   the MoE expert-parallel exchange of `tokens` routed rows per rank (top-1 to a random
  combine     rank's expert): symm (Communicator.dispatch_static / combine_static: the kernels of
              collectives/moe_all_to_all.py, counts on the device, up to their max_rows; above it
              the backend falls back to NCCL) and nccl (the same calls over NCCL: two all_to_alls
              with the counts on the host, so eager only: not capturable).
Each case is timed two ways, both with CUDA events around `ops` back-to-back calls (the time per
call is the span / ops), `samples` times, median and p90 over samples:
  graph  the `ops` calls captured in one CUDA graph and replayed (what a captured decode step
         pays); before each sample the GPU sleeps ~1 ms while the host enqueues the rest, then a
         small fused all-reduce lines the ranks up, so host skew between ranks is not timed;
  eager  the calls launched from Python one by one (host overhead included).
The one-shot vs two-shot rows say where collectives.symm_layout.TWO_SHOT_MIN_BYTES belongs.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from collectives.communicator import Communicator, add_rmsnorm

TOKENS = (1, 4, 16, 128)
HIDDEN = 5120
EPS = 1e-5
SLEEP_CYCLES = 2_000_000  # ~1 ms at H200 clocks: the host enqueues a whole sample meanwhile
SYMM_IMPLS = ("symm-auto", "symm-one-shot", "symm-two-shot")


@dataclass(frozen=True)
class Case:
    op: str  # ar_rmsnorm | all_reduce | all_gather | dispatch | combine
    impl: str  # nccl | symm | symm-auto | symm-one-shot | symm-two-shot
    tokens: int


OPS = ("ar_rmsnorm", "all_reduce", "all_gather", "dispatch", "combine")


def cases(comm: Communicator, tokens: tuple[int, ...], ops: tuple[str, ...] = OPS) -> list[Case]:
    fused = SYMM_IMPLS if hasattr(comm, "fused") else ()
    symm = ("symm",) if hasattr(comm, "fused") else ()
    return [Case(op, impl, t) for t in tokens
            for op, impls in (("ar_rmsnorm", fused + ("nccl",)), ("all_reduce", fused + ("nccl",)),
                              ("all_gather", symm + ("nccl",)), ("dispatch", symm + ("nccl",)),
                              ("combine", symm + ("nccl",)))
            if op in ops for impl in impls]


def capturable(comm: Communicator, case: Case) -> bool:
    """NCCL's dispatch / combine read the routed counts on the host, and so does the symm backend's
    above the rows its kernels take (it falls back to them): those cannot be captured."""
    if case.op not in ("dispatch", "combine"):
        return True
    return case.impl == "symm" and case.tokens <= comm.moe.layout.max_rows


def _call(comm: Communicator, case: Case, dtype: torch.dtype):
    """A no-argument function running one call of the case on fresh (per-rank) inputs."""
    gen = torch.Generator(comm.device).manual_seed(comm.rank)
    partial = torch.randn(case.tokens, HIDDEN, generator=gen, device=comm.device).to(dtype)
    residual = torch.randn(case.tokens, HIDDEN, generator=gen, device=comm.device).to(dtype)
    weight = torch.ones(HIDDEN, dtype=dtype, device=comm.device)
    nccl = getattr(comm, "nccl", comm)
    algorithm = None if case.impl == "symm-auto" else case.impl.removeprefix("symm-")
    if case.op == "ar_rmsnorm":
        if case.impl == "nccl":
            return lambda: add_rmsnorm(nccl.all_reduce(partial), residual, weight, EPS)
        return lambda: comm.fused.allreduce_add_rmsnorm(partial, residual, weight, EPS, None, algorithm)
    if case.op == "all_reduce":
        return (lambda: nccl.all_reduce(partial)) if case.impl == "nccl" else (lambda: comm.fused.all_reduce(partial, algorithm))
    if case.op == "all_gather":
        return (lambda: nccl.all_gather(partial)) if case.impl == "nccl" else (lambda: comm.all_gather(partial))
    return _moe_call(comm if case.impl == "symm" else nccl, case, partial, gen)


def _moe_call(comm: Communicator, case: Case, rows: torch.Tensor, gen: torch.Generator):
    """dispatch / combine of `rows` (tokens, H), each to a random rank's expert (top-1)."""
    world = comm.world_size
    dest = torch.randint(0, world, (case.tokens,), generator=gen, device=rows.device)
    expert_ids = torch.randint(0, 16 * world, (case.tokens,), generator=gen, device=rows.device)
    if case.op == "dispatch":
        return lambda: comm.dispatch_static(rows, dest, expert_ids)
    received, received_ids = comm.dispatch_static(rows, dest, expert_ids)  # (world * tokens, H) slots
    return lambda: comm.combine_static(received, received_ids, dest)


def _aligner(comm: Communicator):
    """A tiny all-reduce: on return of its kernel every rank's GPU is at the same point."""
    small = torch.zeros(8, device=comm.device)
    return (lambda: comm.fused.all_reduce(small, "one-shot")) if hasattr(comm, "fused") else (lambda: comm.all_reduce(small))


def time_case(comm: Communicator, run, mode: str, ops: int, samples: int) -> list[float]:
    """Microseconds per call, one value per sample (see the module docstring)."""
    nccl, align = getattr(comm, "nccl", comm), _aligner(comm)
    device = comm.device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # compile, tune and set up NCCL outside any capture
        for _ in range(3):
            run()
            align()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    if hasattr(comm, "fused") and comm.fused.missing_ranks():  # fail now, not after every sample timed out
        raise RuntimeError(f"rank {comm.rank}: the fused kernel timed out waiting for ranks {comm.fused.missing_ranks()}")
    if mode == "graph":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(ops):
                run()
        launch = graph.replay
    else:
        def launch():
            for _ in range(ops):
                run()
    per_call = []
    for _ in range(samples):
        nccl.barrier()
        if mode == "graph":
            torch.cuda._sleep(SLEEP_CYCLES)
        align()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) * 1e3 / ops)
    return per_call


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure(comm: Communicator, settings: dict, log=print) -> list[dict]:
    """settings: tokens (tuple), modes (graph/eager), ops, samples, dtype (name). Rows for every case."""
    dtype = getattr(torch, settings.get("dtype", "bfloat16"))
    rows = []
    for case in cases(comm, tuple(settings.get("tokens", TOKENS)), tuple(settings.get("collectives", OPS))):
        run = _call(comm, case, dtype)
        for mode in [m for m in settings.get("modes", ("graph", "eager")) if m == "eager" or capturable(comm, case)]:
            times = time_case(comm, run, mode, settings.get("ops", 20), settings.get("samples", 100))
            rows.append({"name": f"{case.op} {case.impl} {mode}", "op": case.op, "impl": case.impl, "mode": mode,
                         "tokens": case.tokens, "tp": comm.world_size, "hidden": HIDDEN, "dtype": str(dtype)[6:],
                         "median_us": round(statistics.median(times), 2), "p90_us": round(percentile(times, 0.9), 2)})
            log(f"  {rows[-1]['name']:<32} {case.tokens:>4} tok: {rows[-1]['median_us']:8.2f} us")
        torch.cuda.synchronize(comm.device)
    comm.barrier()  # the symm backend raises here if a fused wait timed out
    return rows


def bench_rank(comm: Communicator, settings: dict) -> None:
    """One process of the benchmark (cluster/procs.run_world): rank 0 writes the rows as JSON to
    settings["rows_path"]. The max over ranks of each median is what a step waits for."""
    import json
    rows = measure(comm, settings, log=print if comm.rank == 0 else (lambda _: None))
    mine = torch.tensor([[r["median_us"], r["p90_us"]] for r in rows], device=comm.device)  # (n_rows, 2)
    worst = getattr(comm, "nccl", comm).all_gather(mine[None], dim=0).amax(dim=0).tolist()  # over ranks
    for row, (median_us, p90_us) in zip(rows, worst):
        row["median_us"], row["p90_us"] = round(median_us, 2), round(p90_us, 2)
    if comm.rank == 0:
        with open(settings["rows_path"], "w") as f:
            json.dump(rows, f)


def protocol_rows(rows: list[dict], variant: str, first: bool) -> list[dict]:
    """One variant's run ("protocol[@programs]") as rows of the joint table: each fused row says
    its variant; the first run's keep their symm-* names, a later run's are named <variant>-*, and
    NCCL's rows come from the first run only."""
    kept = []
    for row in rows:
        if row["impl"] == "nccl" and not first:
            continue
        if row["impl"] != "nccl":
            row["variant"] = variant
            if not first:  # symm-one-shot -> <variant>-one-shot, symm (a gather, dispatch, combine) -> <variant>
                row["impl"] = variant + row["impl"].removeprefix("symm")
                row["name"] = f"{row['op']} {row['impl']} {row['mode']}"
        kept.append(row)
    return kept


def two_shot_from(rows: list[dict], op: str = "ar_rmsnorm", mode: str = "graph") -> int | None:
    """The fewest tokens at which two-shot beat one-shot (None: never) in these rows."""
    by = {(r["impl"], r["tokens"]): r["median_us"] for r in rows if r["op"] == op and r["mode"] == mode}
    wins = sorted(t for (impl, t) in by if impl == "symm-two-shot" and by[impl, t] < by.get(("symm-one-shot", t), 0))
    return wins[0] if wins else None


def table(rows: list[dict]) -> str:
    """Rows side by side: per (op, mode, tokens) the median of each implementation and NCCL / fused."""
    seen = list(dict.fromkeys(r["impl"] for r in rows))  # the fused variants in their runs' order, NCCL last
    impls = [i for i in seen if i != "nccl"] + ["nccl"] * ("nccl" in seen)
    keys = sorted({(r["op"], r["mode"], r["tokens"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    med = {(r["op"], r["mode"], r["tokens"], r["impl"]): r for r in rows}
    lines = [f"{'op':<11} {'mode':<6} {'tok':>4} " + " ".join(f"{i:>14}" for i in impls) + "   (median us / p90 us)"]
    for op, mode, tokens in keys:
        cells = [med.get((op, mode, tokens, i)) for i in impls]
        lines.append(f"{op:<11} {mode:<6} {tokens:>4} " + " ".join(
            f"{c['median_us']:>6.1f} /{c['p90_us']:>6.1f}" if c else f"{'-':>14}" for c in cells))
    return "\n".join(lines)
