"""The emulator against the GPU: predicted vs measured step times of every committed H200 result.

For each `benchmarks/results/h200-decode-*.json` (dgx-emu bench decode, graph-replayed steps) the
same model, dtype, step and context is emulated shape-only on the hgx-h200 node file and the error
is reported. Routed experts per MoE layer are taken as min(tokens, experts) (the bench's random
tokens nearly always route to distinct experts). Writes results/emulator-validation-h200.json.

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


def validate(node_name: str = "hgx-h200") -> list[dict]:
    node, rows = node_spec(node_name), []
    for path in sorted(RESULTS.glob("h200-decode-*.json")):
        if path.stem.endswith("-run1"):
            continue  # an earlier run of the same code; its graph rows agree with the kept ones
        data = json.loads(path.read_text())
        for r in data["results"]:
            if not r["name"].endswith("-graph"):
                continue
            model = shape_only_model(_model_config(r["model"]), r["tp"], "tp", r["dtype"])
            est = estimate_step(model, node, 1, r["tokens"], r["context"])
            parts = est.by("kind")
            rows.append({"case": f"{r['model']} {r['dtype']} {r['name'].split('-')[0]}", "tp": r["tp"],
                         "measured_in": f"{path.name} ({data['date']})",
                         "measured_us": r["median_us"], "predicted_us": round(est.seconds * 1e6, 1),
                         "error": round(est.seconds * 1e6 / r["median_us"] - 1, 4),
                         "predicted_split_us": {k: round(v * 1e6, 1) for k, v in parts.items()}})
    return rows


def main() -> None:
    rows = validate()
    errors = [abs(r["error"]) for r in rows]
    print_table(["case", "tp", "measured us", "predicted us", "error"],
                [[r["case"], r["tp"], r["measured_us"], r["predicted_us"], f"{r['error']:+.1%}"] for r in rows])
    print(f"median |error| {statistics.median(errors):.1%}, worst {max(errors):.1%} over {len(rows)} cases")
    out = RESULTS / "emulator-validation-h200.json"
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=RESULTS).stdout.strip() or "unknown"
    out.write_text(json.dumps({"machine": "shape-only emulation vs NVIDIA H200 measurements",
                               "emulated_code": commit,
                               "date": datetime.date.today().isoformat(),
                               "command": "python benchmarks/emulator_validation.py",
                               "median_abs_error": statistics.median(errors), "worst_abs_error": max(errors),
                               "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
