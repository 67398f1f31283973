"""`dgx-emu trace ...`: summarize, plot and export the per-rank timelines of a traced run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from cluster.timeline import TraceError, read_trace
from collectives.trace import MODELED_DIR
from cluster.trace_export import export
from cluster.trace_plot import plot_timeline
from cluster.trace_summary import format_summary, summarize

TRACE_FILES = ("clock.json", "timeline.json", "timeline.png")


def add_trace_parser(sub) -> None:
    trace = sub.add_parser("trace", help="inspect per-rank communication timelines (from generate --trace)")
    tsub = trace.add_subparsers(dest="trace_command", required=True, parser_class=type(trace))
    summary = tsub.add_parser("summary", help="latency, bandwidth, skew, straggler, time shares per rank "
                                              "(measured, and modeled beside it after --emulate-node)")
    plot = tsub.add_parser("plot", help="draw the per-rank timeline of a step window as a PNG "
                                        "(a modeled panel below after --emulate-node)")
    exp = tsub.add_parser("export", help="write the merged Chrome/Perfetto JSON and per-rank HTA traces")
    for p in (summary, plot, exp):
        p.add_argument("dir", help="trace directory written by `generate --trace`")
        p.add_argument("--assume-same-clock", action="store_true",
                       help="merge ranks even without clock.json (only if all ranks shared one clock)")
    summary.add_argument("--json", action="store_true", help="print the summary as JSON")
    plot.add_argument("-o", "--output", required=True, help="PNG file to write")
    plot.add_argument("--steps", default=None, help="step window A:B (default: the first three steps)")


def parse_steps(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise TraceError(f"--steps must look like A:B (two integers), got {text!r}") from None
    if lo > hi or lo < 0:
        raise TraceError(f"--steps {text}: need 0 <= A <= B")
    return lo, hi


def run_trace(args) -> int:
    trace = read_trace(args.dir, args.assume_same_clock)
    if args.trace_command == "summary":
        s = summarize(trace)
        print(json.dumps(s) if args.json else format_summary(s))
    elif args.trace_command == "plot":
        print(plot_timeline(trace, args.output, parse_steps(args.steps)))
    else:
        paths = export(trace, args.dir)
        print(f"{paths['merged']} (open in https://ui.perfetto.dev), {paths['hta']}/rank*.json (HTA)")
    return 0


def prepare_trace_dir(directory: str) -> None:
    """Clears what an earlier traced run left in `directory` (only files this tool writes)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for f in list(path.glob("rank*.msgpack")) + [path / n for n in TRACE_FILES]:
        f.unlink(missing_ok=True)
    shutil.rmtree(path / "hta", ignore_errors=True)
    shutil.rmtree(path / MODELED_DIR, ignore_errors=True)


def finish_trace_dir(directory: str) -> dict:
    """After a traced run: the merged and HTA exports and a picture of the first steps."""
    trace = read_trace(directory)
    paths = export(trace, directory)
    steps = sorted({s["s"] for rt in trace.ranks.values() for s in rt.steps})
    if steps:
        plot_timeline(trace, Path(directory) / "timeline.png", (steps[min(1, len(steps) - 1)],
                                                                steps[min(3, len(steps) - 1)]))
    return {"dir": str(directory), "merged": str(paths["merged"]), "summary": summarize(trace)}
