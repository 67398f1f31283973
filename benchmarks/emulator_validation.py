"""The emulator against the GPU: predicted vs measured step times of every committed H200 result.

Three groups of graph-replayed `dgx-emu bench decode` rows, each emulated shape-only on the
hgx-h200 node file at the same model, dtype, step, context, TP size and collectives backend:
  * old TP1: `h200-decode-*.json`, OLDER measurements (commit 5df43eb's kernels);
  * new TP1: `h200x2-decode-*-tp1.json` (commit afb18b2's kernels, 76 launches a step);
  * TP2: `h200x2-decode-*-tp2.json` (afb18b2, two H200s over the fused symm collectives).
Routed experts per MoE layer are taken as min(tokens, experts) (the bench's random tokens nearly
always route to distinct experts). Writes results/emulator-validation-h200.json and prints the
table with the median and worst |error| of each group.

    python benchmarks/emulator_validation.py
"""
from __future__ import annotations

import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, print_table  # noqa: E402
from cluster.hardware import node_spec  # noqa: E402
from launch.emulate_cli import _model_config  # noqa: E402
from workers.emulate import estimate_step, shape_only_model  # noqa: E402


GROUPS = (("old TP1", "h200-decode-*.json"), ("new TP1", "h200x2-decode-*-tp1.json"),
          ("TP2", "h200x2-decode-*-tp2.json"))


def validate(node_name: str = "hgx-h200") -> list[dict]:
    node, rows = node_spec(node_name), []
    for group, pattern in GROUPS:
        for path in sorted(RESULTS.glob(pattern)):
            if path.stem.endswith("-run1"):
                continue  # an earlier run of the same code; its graph rows agree with the kept ones
            data = json.loads(path.read_text())
            rows += [_row(group, path, data, r, node) for r in data["results"] if r["name"].endswith("-graph")]
    return rows


def _row(group: str, path: Path, data: dict, r: dict, node) -> dict:
    comm = "nccl" if r.get("comm") == "nccl" else "symm"  # "none" at TP1: no collective either way
    model = shape_only_model(_model_config(r["model"]), r["tp"], "tp", r["dtype"])
    est = estimate_step(model, node, 1, r["tokens"], r["context"], comm=comm)
    return {"group": group, "case": f"{r['model']} {r['dtype']} {r['name'].split('-')[0]}", "tp": r["tp"],
            "comm": r.get("comm", "none"), "measured_in": f"{path.name} ({data['date']})",
            "measured_us": r["median_us"], "predicted_us": round(est.seconds * 1e6, 1),
            "error": round(est.seconds * 1e6 / r["median_us"] - 1, 4),
            "predicted_split_us": {k: round(v * 1e6, 1) for k, v in est.by("kind").items()},
            "predicted_ops": len(est.ops)}


def group_errors(rows: list[dict]) -> dict:
    """group -> median and worst |error| (and the case count)."""
    out = {}
    for group, _ in GROUPS:
        errors = [abs(r["error"]) for r in rows if r["group"] == group]
        if errors:
            out[group] = {"median_abs_error": statistics.median(errors), "worst_abs_error": max(errors),
                          "cases": len(errors)}
    return out


def main() -> None:
    rows = validate()
    errors = [abs(r["error"]) for r in rows]
    print_table(["group", "case", "tp", "measured us", "predicted us", "error", "ops"],
                [[r["group"], r["case"], r["tp"], r["measured_us"], r["predicted_us"], f"{r['error']:+.1%}",
                  r["predicted_ops"]] for r in rows])
    groups = group_errors(rows)
    for group, g in groups.items():
        print(f"{group}: median |error| {g['median_abs_error']:.1%}, worst {g['worst_abs_error']:.1%} "
              f"over {g['cases']} cases")
    print(f"all: median |error| {statistics.median(errors):.1%}, worst {max(errors):.1%} over {len(rows)} cases")
    out = RESULTS / "emulator-validation-h200.json"
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=RESULTS).stdout.strip() or "unknown"
    out.write_text(json.dumps({"machine": "shape-only emulation vs NVIDIA H200 measurements",
                               "emulated_code": commit,
                               "date": datetime.date.today().isoformat(),
                               "command": "python benchmarks/emulator_validation.py",
                               "median_abs_error": statistics.median(errors), "worst_abs_error": max(errors),
                               "groups": groups, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
