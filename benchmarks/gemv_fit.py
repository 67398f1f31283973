"""The emulator's GEMV constants (cluster/nodes/*.json "calibration.gemv"), fitted from graph-timed
GEMV tables (benchmarks/gemv_bench.py --out).

Why a script: the cost model prices a decode linear as fixed_s + bytes / (bandwidth_fraction x the
measured copy bandwidth), one fit per dtype and row class (m1: one row; m16: 4 and 16 rows, the
verify steps), and those four pairs decide most of a modeled step; two more (bf16_small_m1 / _m16)
price the latency-bound GEMVs of small weights (the EAGLE-3 draft's), where their line is lower. They must come from the kernels
as they ship, and anyone must be able to redo them:

    python benchmarks/gemv_fit.py [TABLE.json [--by-rows]]

prints the fits of one table (FP8 rows classed by the kernel that ships, or by row count);
without an argument, each fit over the rows of the kernel that ships for it (TABLES): the FP8
tensor cores (2+ rows, or one row from 16384 output rows) from benchmarks/results/h200-gemv.json
(db3640e), the FP8 CUDA-core GEMV from h200-gemv-9bade8a.json (its 8-row tiles at K <= 4096 since 28ad904:
fixed 2.22 us, 0.740 x copy bandwidth, where the two tables before, which both ran the older 16-row tiles,
gave 3.49 us, 0.781; the same table's BF16 one-row line is within 4% of the f4c9fff one), BF16 from
h200-gemv-before-mma.json for 4 and 16 rows (those kernels did not change, and the H200 per-launch
constants of benchmarks/kernel_fit.py were fitted against a step trace with that table's BF16 fit), and
one row from h200-gemv-bf16-rows-f4c9fff.json: from f4c9fff a one-row BF16 GEMV takes 2-4 weight rows a
program (fixed 1.72 us, 1.104 x copy bandwidth; one row a program had 2.80 us, 1.072; the emulator's
validation plans rows measured before f4c9fff with that older line).
tests/test_launch_plan.py holds the node files equal to this fit. Least squares of time against
bytes over the rows; each row's fraction is of the copy bandwidth its own run measured.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.kernels import linear_small_m as small_m  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BEFORE_MMA, LATEST = RESULTS / "h200-gemv-before-mma.json", RESULTS / "h200-gemv.json"
DRAFT = RESULTS / "h200-gemv-draft.json"  # gemv_bench.py --shapes draft: 0.13-0.5 MB linears, BF16, M = 1, 2, 4
BF16_ROWS = RESULTS / "h200-gemv-bf16-rows-f4c9fff.json"  # one-row BF16 GEMVs at 2-4 weight rows a program
# per fit, the tables whose rows measured the kernel that ships for it (read by_kernel): BF16 from the
# table the step-trace constants were fitted with; the FP8 CUDA-core GEMV (one row, below 16384 output
# rows) from the table of its current tiles; the tensor cores only in the latest of the two before
ONE_ROW_FP8 = RESULTS / "h200-gemv-9bade8a.json"  # the CUDA-core FP8 GEMV since 28ad904 (8-row tiles at K <= 4096)
TABLES = {"bf16_m1": (BF16_ROWS,), "bf16_m16": (BEFORE_MMA,), "fp8_m1": (ONE_ROW_FP8,),
          "fp8_m16": (LATEST,), "bf16_small_m1": (DRAFT,), "bf16_small_m16": (DRAFT,)}
# the one-row FP8 fit before 28ad904 (16-row tiles of 8 warps at every K): both older tables, which ran that kernel
# unchanged; benchmarks/emulator_validation.py plans the rows measured before 28ad904 with it
OLDER_FP8_M1 = (BEFORE_MMA, LATEST)
# the small-weight fits: the latency-bound regime of a GEMV under ~2 MB (the EAGLE-3 draft's linears),
# whose time the big-weight line's intercept (fitted on 8-520 MB) over-states 2-3x; the cost model
# takes the lower of the two lines (workers/cost_model.py CostModel.gemv)


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


def fit_rows(points: list[tuple[float, float]]) -> dict[str, float]:
    """Least squares of seconds = fixed + (bytes / copy bytes per s) / fraction over
    (bytes / copy bandwidth of the row's run, seconds) points."""
    if len(points) < 2:
        raise ValueError("fewer than 2 rows to fit")
    slope, intercept = np.polyfit([x for x, _ in points], [t for _, t in points], 1)
    return {"fixed_s": float(intercept), "bandwidth_fraction": float(1.0 / slope)}


def table_points(table: Path, name: str, classify=by_kernel) -> list[tuple[float, float]]:
    """The dense rows of `table` in class `name` ("<dtype>_m1" / "_m16", or "<dtype>_small_m1" /
    "_small_m16": the rows of a --shapes draft table) as fit_rows points."""
    data = json.loads(table.read_text())
    dtype, *small, rows_class = name.split("_")
    kind = "dense draft" if small else "dense"
    return [(r["bytes"] / (data["copy_tb_s"] * 1e12), r["ours_us"] * 1e-6) for r in data["results"]
            if r["kind"] == kind and r["dtype"] == dtype and classify(dtype, r["M"], r["N"], r["K"]) == rows_class]


def fit_table(table: Path, dtypes=("bf16", "fp8"), classify=by_kernel) -> dict[str, dict[str, float]]:
    """{"<dtype>_m1" | "<dtype>_m16": {"fixed_s", "bandwidth_fraction"}} of one table's dense rows,
    each row in the class `classify(dtype, M, N, K)` names."""
    return {f"{d}_{c}": fit_rows(table_points(table, f"{d}_{c}", classify)) for d in dtypes for c in ("m1", "m16")}


def fit() -> dict[str, dict[str, float]]:
    """The node files' six fits, each over TABLES[name]'s rows of the kernel that ships for it."""
    return {name: fit_rows([p for table in tables for p in table_points(table, name)])
            for name, tables in TABLES.items()}


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
