"""Does this CPU's fp32 GEMM give a row the same bits whatever the row count? The batch engine's
batch invariance on CPU actors rests on it (workers/batch_engine.py MIN_ROWS, model/ffn.py
MIN_GEMM_ROWS: measured on this project's AMD EPYC VM with MKL, a row's bits are the same for every
count from 4 up). Other CPUs pick other kernels by shape (the lent GPU host's Intel CPU: rows change from 11 rows
up), so this table shows it where it runs, at the embedded model's linear shapes (world sizes 1
and 2); the batch engine asks the same question of its own GEMMs at start (workers/gemm_rows.py).

    python benchmarks/cpu_gemm_rows.py [--max-rows 16] [--out FILE.json]

Prints, per weight shape, the row counts at which a row (at any position) differs from that row
computed in a MIN_ROWS-row GEMM (only counts below MIN_ROWS listed: invariant from MIN_ROWS up),
and writes the same as JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import load_model_config  # noqa: E402
from model.embedded import default_model_dir  # noqa: E402
from workers.batch_engine import MIN_ROWS  # noqa: E402
from workers.gemm_rows import row_keeps_bits  # noqa: E402


def linear_shapes(world: int) -> dict[str, tuple[int, int]]:
    """(out, in) of the embedded model's linears on one rank of `world` (column-parallel split out,
    row-parallel split in)."""
    cfg = load_model_config(default_model_dir())
    h, d = cfg.hidden_size, cfg.head_dim
    return {"qkv_proj": ((cfg.n_heads + 2 * cfg.n_kv_heads) * d // world, h),
            "o_proj": (h, cfg.n_heads * d // world),
            "mlp fc13": (2 * cfg.intermediate_size_mlp // world, h),
            "mlp fc2": (h, cfg.intermediate_size_mlp // world),
            "expert fc13": (2 * cfg.intermediate_size // world, h),
            "expert fc2": (h, cfg.intermediate_size // world),
            "lm head": (cfg.vocab_size // world, h)}


def differing_counts(out_features: int, in_features: int, max_rows: int, gen: torch.Generator) -> list[int]:
    """Row counts M in 1..max_rows where one row's x @ W^T, at any of the M positions among other
    rows, differs in bits from that row first in a MIN_ROWS-row GEMM (workers/gemm_rows.py's probe)."""
    w = torch.randn(out_features, in_features, generator=gen)
    cpu = torch.device("cpu")
    return [m for m in range(1, max_rows + 1)
            if not row_keeps_bits(lambda x: F.linear(x, w), in_features, [MIN_ROWS, m], torch.float32, cpu)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-rows", type=int, default=16)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.max_rows < MIN_ROWS:
        p.error(f"--max-rows must be >= {MIN_ROWS}")
    torch.set_num_threads(1)  # as every rank runs (cluster/procs.py)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for world in (1, 2):
        for name, (n, k) in linear_shapes(world).items():
            bad = differing_counts(n, k, args.max_rows, gen)
            rows.append({"world": world, "linear": name, "out": n, "in": k, "differs_at": bad})
            above = [m for m in bad if m >= MIN_ROWS]
            print(f"world {world} {name:12} {n:6}x{k:<5} differs at M={bad}{'  <- breaks invariance' if above else ''}")
    cpu = platform.processor() or platform.machine()
    report = {"cpu": cpu, "torch": torch.__version__, "min_rows": MIN_ROWS, "max_rows": args.max_rows,
              "blas": "mkl" if torch.backends.mkl.is_available() else "other", "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
