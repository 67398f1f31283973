"""The emulator against the GPU: predicted vs measured step times of every committed H200 result.

Three groups of graph-replayed `dgx-emu bench decode` rows, each emulated shape-only on the
hgx-h200 node file at the same model, dtype, step, context, TP size and collectives backend:
  * old TP1: `h200-decode-<model>-<dtype>.json`, OLDER measurements (commit 5df43eb's kernels: no
    PDL, separate RoPE, attention merge, cuBLAS router + top-k, separate shared / routed GEMVs);
    the emulator plans the CURRENT kernels, so these rows are reported, not held to the targets;
  * new TP1: `h200x2-decode-*-tp1.json` (commit afb18b2's kernels) and `h200-decode-*-<commit>.json`
    (the commit the file names, 0f037de: 79 launches a medium decode step);
  * TP2: `h200x2-decode-*-tp2.json` (afb18b2, two H200s over the fused symm collectives).
The targets (median |error| <= 10%, worst <= 25%) are over the current-kernel rows (new TP1 and
TP2). Routed experts per MoE layer are taken as min(tokens, experts) (the bench's random tokens
nearly always route to distinct experts). Each row is planned as the code it measured ran where the
code has since changed the step's prologue or pick (measured_code: did that commit have the
embedding and argmax kernels?), and carries the prediction split by op kind and the modeled launches. Writes results/emulator-validation-h200.json and prints the table with the
median and worst |error| of each group.

    python benchmarks/emulator_validation.py
"""
from __future__ import annotations

import datetime
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, print_table  # noqa: E402
from cluster.hardware import node_spec  # noqa: E402
from launch.emulate_cli import _model_config  # noqa: E402
from workers.emulate import estimate_step, shape_only_model  # noqa: E402
from workers.launch_plan import CodePaths  # noqa: E402


COMMIT = re.compile(r"-([0-9a-f]{7})$")  # a result file named after the commit it measured
GROUPS = (("old TP1", lambda p: p.match("h200-decode-*.json") and not COMMIT.search(p.stem)),
          ("new TP1", lambda p: p.match("h200x2-decode-*-tp1.json") or (p.match("h200-decode-*.json")
                                                                         and COMMIT.search(p.stem))),
          ("TP2", lambda p: p.match("h200x2-decode-*-tp2.json")))
GROUP_COMMIT = {"old TP1": "5df43eb", "new TP1": "afb18b2", "TP2": "afb18b2"}  # unless the file names one
CURRENT = ("new TP1", "TP2")  # the groups that measured the kernels the emulator plans
ROOT = Path(__file__).resolve().parent.parent


def measured_code(commit: str) -> CodePaths:
    """The prologue and pick of the step `commit` ran: did that commit have the embedding and
    argmax kernels (git; without a repository: no)? The plan is then of the code that was measured."""
    def had(path: str) -> bool:
        return subprocess.run(["git", "cat-file", "-e", f"{commit}:{path}"], cwd=ROOT, capture_output=True).returncode == 0
    return CodePaths(step_head=had("model/kernels/embed_norm.py"), argmax=had("model/kernels/argmax.py"))


def validate(node_name: str = "hgx-h200") -> list[dict]:
    node, rows = node_spec(node_name), []
    for group, member in GROUPS:
        for path in sorted(RESULTS.glob("h200*-decode-*.json")):
            if not member(path) or path.stem.endswith("-run1"):
                continue  # -run1: an earlier run of the same code; its graph rows agree with the kept ones
            data = json.loads(path.read_text())
            rows += [_row(group, path, data, r, node) for r in data["results"] if r["name"].endswith("-graph")]
    return rows


def _row(group: str, path: Path, data: dict, r: dict, node) -> dict:
    comm = "nccl" if r.get("comm") == "nccl" else "symm"  # "none" at TP1: no collective either way
    model = shape_only_model(_model_config(r["model"]), r["tp"], "tp", r["dtype"])
    named = COMMIT.search(path.stem)
    commit = named.group(1) if named else GROUP_COMMIT[group]
    paths = measured_code(commit)
    est = estimate_step(model, node, 1, r["tokens"], r["context"], comm=comm, paths=paths)
    return {"group": group, "case": f"{r['model']} {r['dtype']} {r['name'].split('-')[0]}", "tp": r["tp"],
            "comm": r.get("comm", "none"), "measured_in": f"{path.name} ({data['date']})",
            "measured_commit": commit, "planned_as": {"step_head_kernel": paths.step_head, "argmax_kernel": paths.argmax},
            "measured_us": r["median_us"], "predicted_us": round(est.seconds * 1e6, 1),
            "error": round(est.seconds * 1e6 / r["median_us"] - 1, 4),
            "predicted_split_us": {k: round(v * 1e6, 1) for k, v in est.by("kind").items()},
            "predicted_launches": sum(op.launches for op in est.ops)}


def errors_of(rows: list[dict]) -> dict:
    errors = [abs(r["error"]) for r in rows]
    return {"median_abs_error": round(statistics.median(errors), 4), "worst_abs_error": max(errors),
            "cases": len(errors)}


def group_errors(rows: list[dict]) -> dict:
    """group -> median and worst |error| (and the case count); "current kernels": new TP1 and TP2."""
    out = {group: errors_of([r for r in rows if r["group"] == group]) for group, _ in GROUPS
           if any(r["group"] == group for r in rows)}
    current = [r for r in rows if r["group"] in CURRENT]
    if current:
        out["current kernels"] = errors_of(current)
    return out


def main() -> None:
    rows = validate()
    print_table(["group", "case", "tp", "measured us", "predicted us", "error", "launches"],
                [[r["group"], r["case"], r["tp"], r["measured_us"], r["predicted_us"], f"{r['error']:+.1%}",
                  r["predicted_launches"]] for r in rows])
    groups = group_errors(rows)
    for group, g in groups.items():
        print(f"{group}: median |error| {g['median_abs_error']:.1%}, worst {g['worst_abs_error']:.1%} "
              f"over {g['cases']} cases")
    out = RESULTS / "emulator-validation-h200.json"
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=RESULTS).stdout.strip() or "unknown"
    out.write_text(json.dumps({"machine": "shape-only emulation vs NVIDIA H200 measurements",
                               "emulated_code": commit,
                               "date": datetime.date.today().isoformat(),
                               "command": "python benchmarks/emulator_validation.py",
                               "targets": "median |error| <= 10%, worst <= 25% over the current-kernel rows",
                               "groups": groups, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
