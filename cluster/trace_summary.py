"""What a trace says, in numbers: per-collective latency and bandwidth, arrival skew, the
straggler, and how each rank's time splits into compute, communication and waiting.

Definitions (times aligned across ranks):
  * latency of a collective on a rank: its end minus its start; an instance's latency is the
    mean over its ranks. Bus bandwidth follows nccl-tests: bytes / latency * factor, with factor
    2(n-1)/n for all-reduce and (n-1)/n for all-gather and all-to-all.
  * skew of an instance: latest arrival minus earliest. The rank that arrived last is the one
    everyone waited for; the rank that is last most often is the straggler.
  * per rank: waiting = own arrival to last arrival; communication = last arrival to own end;
    compute = time inside model stages not spent in a collective; other = the rest of the step
    time (Python, scheduling, the driver).

A trace with a modeled timeline (--emulate-node) is summarized twice by the same definitions, and
the text puts the modeled numbers beside the measured ones: per collective its modeled mean and
total, per rank its modeled step time and shares (on the virtual clock, "other" is ~0: every
modeled nanosecond is an op).
"""
from __future__ import annotations

from collections import Counter

from cluster.timeline import Trace

BUS_FACTORS = {"all_reduce": 2.0, "allreduce_add_rmsnorm": 2.0}  # times (n-1)/n; others 1 x (n-1)/n


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(round(q * (len(s) - 1))))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": s[-1]}


def _overlap_ns(spans: list[tuple[int, int]], others: list[tuple[int, int]]) -> int:
    """Total overlap between two lists of disjoint intervals."""
    spans, others = sorted(spans), sorted(others)
    i = j = total = 0
    while i < len(spans) and j < len(others):
        lo, hi = max(spans[i][0], others[j][0]), min(spans[i][1], others[j][1])
        total += max(0, hi - lo)
        if spans[i][1] < others[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize(trace: Trace) -> dict:
    instances = trace.instances()
    ops: dict[str, dict] = {}
    skews: list[float] = []
    last = Counter()
    wait = Counter()
    comm = Counter()
    for inst in instances:
        n = len(inst.group)
        latency = sum(r["t1"] - r["t0"] for r in inst.per_rank.values()) / len(inst.per_rank)
        row = ops.setdefault(inst.op, {"count": 0, "total_ms": 0.0, "bytes": 0, "busbw": [], "skew_us": [],
                                       "algorithms": set()})
        row["count"] += 1
        row["total_ms"] += latency / 1e6
        row["bytes"] += inst.nbytes
        row["algorithms"].add(inst.algorithm)
        if n > 1 and latency > 0:
            row["busbw"].append(inst.nbytes / latency * BUS_FACTORS.get(inst.op, 1.0) * (n - 1) / n)  # bytes/ns = GB/s
        if n > 1:
            skews.append(inst.skew_ns / 1e3)
            row["skew_us"].append(inst.skew_ns / 1e3)
            last[inst.last_rank] += 1
        release = inst.last_arrival
        for rank, r in inst.per_rank.items():
            wait[rank] += release - r["t0"]
            comm[rank] += max(0, r["t1"] - release)
    per_op = {op: {"count": row["count"], "total_ms": row["total_ms"], "mean_us": row["total_ms"] * 1e3 / row["count"],
                   "bytes": row["bytes"], "busbw_GBps_p50": _percentiles(row["busbw"])["p50"],
                   "skew_us": _percentiles(row["skew_us"]), "algorithms": sorted(row["algorithms"])}
              for op, row in sorted(ops.items())}
    per_rank = []
    for rank, rt in sorted(trace.ranks.items()):
        total = sum(s["t1"] - s["t0"] for s in rt.steps)
        spans = [(s["t0"], s["t1"]) for s in rt.spans]
        colls = [(c["t0"], c["t1"]) for c in rt.collectives]
        compute = sum(b - a for a, b in spans) - _overlap_ns(spans, colls)
        other = total - compute - wait[rank] - comm[rank]
        share = (lambda x: x / total) if total else (lambda x: None)
        per_rank.append({"rank": rank, "step_ms": total / 1e6, "compute": share(compute), "communication":
                         share(comm[rank]), "waiting": share(wait[rank]), "other": share(other),
                         "last_arrivals": last[rank]})
    straggler = max(last, key=lambda r: (last[r], -r)) if last else None
    summary = {"world_size": trace.world_size, "steps": max((len(rt.steps) for rt in trace.ranks.values()), default=0),
               "collectives": per_op, "skew_us": _percentiles(skews), "straggler": straggler,
               "last_arrival_counts": {str(r): last[r] for r in sorted(last)}, "ranks": per_rank,
               "clock": {str(r): o for r, o in sorted(trace.offsets.items())}}
    if trace.modeled is not None:
        summary["modeled"] = {"node": trace.modeled.node, **summarize(trace.modeled)}
    return summary


def _fmt(v) -> str:
    return f"{v:.3g}" if v is not None else "-"


def _pct(v) -> str:
    return f"{100 * v:.1f}%" if v is not None else "-"


def format_summary(s: dict) -> str:
    modeled = s.get("modeled")
    lines = [f"world size {s['world_size']}, {s['steps']} steps"
             + (f"; modeled on {modeled['node']} (virtual clock, {modeled['steps']} steps)" if modeled else "")]
    m_ops = modeled["collectives"] if modeled else {}
    lines.append(f"{'collective':<24}{'count':>7}{'total ms':>11}{'mean us':>10}{'MB':>10}{'busbw GB/s':>12}"
                 f"{'skew p50 us':>13}{'skew p90 us':>13}" + (f"{'model us':>10}{'model ms':>10}" if modeled else "")
                 + "  algorithm")
    for op, r in s["collectives"].items():
        sk, m = r["skew_us"], m_ops.get(op)
        model = (f"{_fmt(m['mean_us'] if m else None):>10}{_fmt(m['total_ms'] if m else None):>10}" if modeled else "")
        lines.append(f"{op:<24}{r['count']:>7}{r['total_ms']:>11.2f}{r['mean_us']:>10.1f}{r['bytes'] / 1e6:>10.3f}"
                     f"{_fmt(r['busbw_GBps_p50']):>12}{_fmt(sk['p50']):>13}{_fmt(sk['p90']):>13}{model}"
                     f"  {','.join(r['algorithms'])}")
    sk = s["skew_us"]
    if sk["p50"] is not None:
        lines.append(f"arrival skew (us): p50 {sk['p50']:.1f}  p90 {sk['p90']:.1f}  p99 {sk['p99']:.1f}  "
                     f"max {sk['max']:.1f}")
        counts = ", ".join(f"r{r}:{n}" for r, n in s["last_arrival_counts"].items())
        lines.append(f"straggler: rank {s['straggler']} (last to arrive: {counts})")
    head = f"{'rank':<6}{'step ms':>10}{'compute':>10}{'comm':>8}{'waiting':>9}{'other':>8}"
    lines.append(head + (f" | {'model ms':>9}{'compute':>9}{'comm':>8}{'waiting':>9}" if modeled else ""))
    m_ranks = {r["rank"]: r for r in modeled["ranks"]} if modeled else {}
    for r in s["ranks"]:
        line = (f"{r['rank']:<6}{r['step_ms']:>10.2f}{_pct(r['compute']):>10}{_pct(r['communication']):>8}"
                f"{_pct(r['waiting']):>9}{_pct(r['other']):>8}")
        m = m_ranks.get(r["rank"])
        if m:
            line += (f" | {m['step_ms']:>9.3f}{_pct(m['compute']):>9}{_pct(m['communication']):>8}"
                     f"{_pct(m['waiting']):>9}")
        lines.append(line)
    return "\n".join(lines)
