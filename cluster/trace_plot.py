"""A picture of a step window: ranks as rows, compute above communication, waiting visible.

Each rank gets a lane: the upper half shows model stages (coloured by stage), the lower half
shows collectives, split into the time the rank waited for the last arrival (light, hatched)
and the transfer itself (dark). A rank that keeps others waiting stands out as the one whose
collectives have no waiting part while every other lane's do. A run with --emulate-node gets a
second panel below: the same lanes on the virtual clock of the emulated node.
"""
from __future__ import annotations

from pathlib import Path

from cluster.timeline import Trace, TraceError

STAGE_COLORS = {"embed": "#72B7B2", "attention": "#4C78A8", "moe": "#54A24B", "mlp": "#88D27A",
                "lm_head": "#B279A2", "sampling": "#9D9D9D", "draft": "#F58518", "verify": "#E45756"}
WAIT_COLOR, COMM_COLOR = "#F7C6C6", "#C0392B"


def _window(trace: Trace, steps: tuple[int, int] | None) -> tuple[int, int]:
    all_steps = sorted({s["s"] for rt in trace.ranks.values() for s in rt.steps})
    if not all_steps:
        raise TraceError("the trace holds no decode steps to plot")
    lo, hi = steps if steps else (all_steps[0], all_steps[min(len(all_steps) - 1, all_steps[0] + 2)])
    if not any(lo <= s <= hi for s in all_steps):
        raise TraceError(f"no steps in {lo}:{hi}; the trace has steps {all_steps[0]}..{all_steps[-1]}")
    return lo, hi


def _draw(ax, trace: Trace, lo: int, hi: int, title: str) -> set[str]:
    """One lane per rank for steps lo..hi; returns the stage names drawn."""
    window = [s for rt in trace.ranks.values() for s in rt.steps if lo <= s["s"] <= hi]
    t_start, t_end = min(s["t0"] for s in window), max(s["t1"] for s in window)
    scale, unit = (1e6, "ms") if t_end - t_start >= 1e6 else (1e3, "us")
    at = lambda t: (t - t_start) / scale  # noqa: E731
    inside = lambda r: r["t1"] >= t_start and r["t0"] <= t_end  # noqa: E731
    world, stages = trace.world_size, set()
    for inst in trace.instances():
        release = inst.last_arrival
        for rank, r in inst.per_rank.items():
            if not inside(r):
                continue
            y = world - 1 - rank
            wait_end = min(release, r["t1"])
            if wait_end > r["t0"]:
                ax.broken_barh([(at(r["t0"]), at(wait_end) - at(r["t0"]))], (y - 0.42, 0.4), facecolor=WAIT_COLOR,
                               hatch="///", edgecolor="#E08080", linewidth=0)
            ax.broken_barh([(at(wait_end), max(at(r["t1"]) - at(wait_end), 1e-3))], (y - 0.42, 0.4),
                           facecolor=COMM_COLOR)
    for rank, rt in trace.ranks.items():
        y = world - 1 - rank
        for s in rt.spans:
            if inside(s):
                stages.add(s["n"])
                ax.broken_barh([(at(s["t0"]), at(s["t1"]) - at(s["t0"]))], (y + 0.02, 0.4),
                               facecolor=STAGE_COLORS.get(s["n"], "#BBBBBB"))
        for s in rt.steps:
            if lo <= s["s"] <= hi:
                ax.axvline(at(s["t0"]), color="#DDDDDD", linewidth=0.6, zorder=0)
    ax.set_yticks(range(world), [f"rank {world - 1 - i}" for i in range(world)])
    ax.set_xlim(0, at(t_end))
    ax.set_xlabel(f"time ({unit}), aligned across ranks")
    ax.set_title(title, fontsize=10)
    return stages


def plot_timeline(trace: Trace, out: str | Path, steps: tuple[int, int] | None = None) -> Path:
    """The measured lanes; with a modeled timeline (--emulate-node), its lanes below, each panel
    on its own time axis (a CPU run's milliseconds against the node's microseconds)."""
    import matplotlib  # here, not at module level: every `dgx-emu` command imports this module (~1 s)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    lo, hi = _window(trace, steps)
    panels = [(trace, f"measured, steps {lo}..{hi}: compute (top half of each lane) and communication (bottom)")]
    if trace.modeled is not None:
        panels.append((trace.modeled, f"modeled on {trace.modeled.node} (virtual clock), steps {lo}..{hi}"))
    world = trace.world_size
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, len(panels) * (0.7 * world + 1.2) + 0.8), squeeze=False)
    stages: set[str] = set()
    for ax, (panel, title) in zip(axes[:, 0], panels):
        stages |= _draw(ax, panel, lo, hi, title)
    legend = [Patch(facecolor=c, label=n) for n, c in STAGE_COLORS.items() if n in stages]
    legend += [Patch(facecolor=WAIT_COLOR, hatch="///", edgecolor="#E08080", label="waiting for last rank"),
               Patch(facecolor=COMM_COLOR, label="collective (transfer)")]
    axes[-1, 0].legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=len(legend), fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out
