"""The emulator's GEMV constants (cluster/nodes/hgx-h200.json "calibration.gemv"), fitted from a
graph-timed GEMV table (benchmarks/gemv_bench.py --out, benchmarks/results/h200-gemv.json).

Why a script: the cost model prices a decode linear as fixed_s + bytes / (bandwidth_fraction x the
measured copy bandwidth), one fit per dtype and row class (m1: one row; m16: 4 and 16 rows, the
verify steps), and those four pairs decide most of a modeled step. They must come from the kernels
as they ship (linear_small_m's defaults: since the FP8 tensor-core path became the default at 2+
rows, the m16 FP8 rows are that path's), and anyone must be able to redo them:

    python benchmarks/gemv_fit.py [benchmarks/results/h200-gemv.json]

prints the four fits as the node file holds them; tests/test_launch_plan.py holds the node file
equal to the fit of the committed table. Least squares of time against bytes over the table's dense
rows; the fraction is relative to the copy bandwidth the same run measured.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

TABLE = Path(__file__).resolve().parent / "results" / "h200-gemv.json"


def fit(table: Path = TABLE) -> dict[str, dict[str, float]]:
    """{"bf16_m1" | "bf16_m16" | "fp8_m1" | "fp8_m16": {"fixed_s", "bandwidth_fraction"}}."""
    data = json.loads(table.read_text())
    copy_bytes_per_s = data["copy_tb_s"] * 1e12
    out = {}
    for dtype in ("bf16", "fp8"):
        for rows_class in ("m1", "m16"):
            rows = [r for r in data["results"]
                    if r["kind"] == "dense" and r["dtype"] == dtype and (r["M"] == 1) == (rows_class == "m1")]
            if len(rows) < 2:
                raise ValueError(f"{table}: fewer than 2 dense {dtype} {rows_class} rows to fit")
            slope, intercept = np.polyfit([r["bytes"] for r in rows], [r["ours_us"] * 1e-6 for r in rows], 1)
            out[f"{dtype}_{rows_class}"] = {"fixed_s": float(intercept),
                                            "bandwidth_fraction": float(1.0 / (slope * copy_bytes_per_s))}
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    table = Path(argv[0]) if argv else TABLE
    if not table.is_file():
        print(f"gemv_fit: no such table: {table}", file=sys.stderr)
        return 2
    for name, values in fit(table).items():
        print(f"{name:9} fixed_s {values['fixed_s']:.3g}  bandwidth_fraction {values['bandwidth_fraction']:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
