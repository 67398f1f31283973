"""The emulator's GEMV constants (cluster/nodes/*.json "calibration.gemv"), fitted from graph-timed
GEMV tables (benchmarks/gemv_bench.py --out).

Why a script: the cost model prices a decode linear as fixed_s + bytes / (bandwidth_fraction x the
measured copy bandwidth), one fit per dtype and row class (m1: one row; m16: 4 and 16 rows, the
verify steps), and those four pairs decide most of a modeled step. They must come from the kernels
as they ship, and anyone must be able to redo them:

    python benchmarks/gemv_fit.py [TABLE.json [--by-rows]]

prints the four fits of one table (FP8 rows classed by the kernel that ships, or by row count); without an argument, each dtype from the table of its shipped
kernels (TABLES): FP8 from benchmarks/results/h200-gemv.json (db3640e: the tensor cores at 2+ rows
and for one row from 16384 output rows), BF16 from h200-gemv-before-mma.json. The BF16 kernels did
not change between the two, and the H200 per-launch constants (benchmarks/kernel_fit.py) were
fitted against a step trace with the BF16 fit of that table, so its BF16 rows stay the BF16
calibration (the later table's BF16 rows differ by run-to-run noise, up to +31% on one row).
tests/test_launch_plan.py holds the node files equal to this fit. Least squares of time against
bytes over a table's dense rows; the fraction is relative to the copy bandwidth its run measured.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.kernels import linear_small_m as small_m  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TABLES = {"bf16": RESULTS / "h200-gemv-before-mma.json", "fp8": RESULTS / "h200-gemv.json"}


def by_rows(dtype: str, m: int, n: int, k: int) -> str:
    """The row class of a call by its row count: how every table before db3640e is read."""
    return "m1" if m == 1 else "m16"


def by_kernel(dtype: str, m: int, n: int, k: int) -> str:
    """The row class of a call as it ships: FP8 classes by kernel ("m16": the tensor cores, at 2+ rows
    or one row of 16384+ output rows, whose time barely moves with M; "m1": the CUDA-core GEMV, which
    the gathered experts take too: workers/cost_model.py prices them so)."""
    if dtype == "fp8":
        return "m16" if small_m.mma_default(m, n, k) else "m1"
    return by_rows(dtype, m, n, k)


def fit_table(table: Path, dtypes=("bf16", "fp8"), classify=by_kernel) -> dict[str, dict[str, float]]:
    """{"<dtype>_m1" | "<dtype>_m16": {"fixed_s", "bandwidth_fraction"}} of one table's dense rows,
    each row in the class `classify(dtype, M, N, K)` names."""
    data = json.loads(table.read_text())
    copy_bytes_per_s = data["copy_tb_s"] * 1e12
    out = {}
    for dtype in dtypes:
        for rows_class in ("m1", "m16"):
            rows = [r for r in data["results"] if r["kind"] == "dense" and r["dtype"] == dtype
                    and classify(dtype, r["M"], r["N"], r["K"]) == rows_class]
            if len(rows) < 2:
                raise ValueError(f"{table}: fewer than 2 dense {dtype} {rows_class} rows to fit")
            slope, intercept = np.polyfit([r["bytes"] for r in rows], [r["ours_us"] * 1e-6 for r in rows], 1)
            out[f"{dtype}_{rows_class}"] = {"fixed_s": float(intercept),
                                            "bandwidth_fraction": float(1.0 / (slope * copy_bytes_per_s))}
    return out


def fit() -> dict[str, dict[str, float]]:
    """The node files' four fits: each dtype from TABLES (the BF16 table read by rows, as it ran)."""
    return {k: v for dtype, table in TABLES.items()
            for k, v in fit_table(table, (dtype,), by_rows if dtype == "bf16" else by_kernel).items()}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    argv, flags = [a for a in argv if not a.startswith("--")], [a for a in argv if a.startswith("--")]
    if argv and not Path(argv[0]).is_file():
        print(f"gemv_fit: no such table: {argv[0]}", file=sys.stderr)
        return 2
    for name, values in (fit_table(Path(argv[0]), classify=by_rows if "--by-rows" in flags else by_kernel)
                         if argv else fit()).items():
        print(f"{name:9} fixed_s {values['fixed_s']:.3g}  bandwidth_fraction {values['bandwidth_fraction']:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
