"""`dgx-emu bench collectives`: a TP step's collectives on this host's GPUs, fused kernel next to NCCL.

    dgx-emu bench collectives --tp 2 [--tokens 1,4,16,128] [--modes graph,eager] [--out FILE.json]

One process per GPU (cluster/procs.run_world) joined by the symm backend, which also holds the
NCCL group, so the fused kernels and NCCL are timed in the same run, on the same buffers' shapes
(workers/collectives_bench.py says what each row times). Prints one table, the slowest rank's
median and p90 per call, and where two-shot starts to beat one-shot.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

from cluster.node import UserError


def add_collectives_parser(bsub) -> None:
    p = bsub.add_parser("collectives", help="fused AllReduce+RMSNorm, all-reduce, all-gather: symm kernels vs NCCL")
    p.add_argument("--tp", type=int, default=2, help="GPUs of this host, one process each")
    p.add_argument("--tokens", default="1,4,16,128", help="comma-separated rows per call (hidden 5120, bf16)")
    p.add_argument("--modes", default="graph,eager", help="graph (replayed CUDA graph) and/or eager")
    p.add_argument("--samples", type=int, default=100, help="timed samples per case")
    p.add_argument("--ops", type=int, default=20, help="back-to-back calls per sample")
    p.add_argument("--collectives", default="ar_rmsnorm,all_reduce,all_gather,dispatch,combine",
                   help="comma-separated collectives to time (default: all of them)")
    p.add_argument("--protocols", default="lamport",
                   help="comma-separated variants of the fused kernel to time, one run each: lamport or flags, "
                        "optionally @PROGRAMS (programs per launch), e.g. lamport,lamport@128,flags")
    p.add_argument("--out", default=None, help="write the results as JSON here")


def _settings(args) -> dict:
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t]
    except ValueError:
        raise UserError(f"--tokens must be comma-separated integers, got {args.tokens!r}") from None
    modes = [m for m in args.modes.split(",") if m]
    if not tokens or min(tokens) < 1 or not modes or set(modes) - {"graph", "eager"}:
        raise UserError("--tokens must be integers >= 1 and --modes graph and/or eager")
    if args.samples < 5 or args.ops < 1:
        raise UserError("--samples must be >= 5 and --ops >= 1")
    from collectives.symm_layout import PROTOCOLS
    protocols = [p for p in args.protocols.split(",") if p]
    named = [p.split("@") for p in protocols]
    if (not protocols or len(set(protocols)) < len(protocols) or any(n[0] not in PROTOCOLS for n in named)
            or any(len(n) > 2 or (len(n) == 2 and not (n[1].isdigit() and int(n[1]) >= 1)) for n in named)):
        raise UserError(f"--protocols must name variants of {', '.join(PROTOCOLS)} (optionally @PROGRAMS) once each, "
                        f"got {args.protocols!r}")
    from workers.collectives_bench import OPS
    ops = [o for o in args.collectives.split(",") if o]
    if not ops or set(ops) - set(OPS):
        raise UserError(f"--collectives must name some of {', '.join(OPS)}, got {args.collectives!r}")
    return {"tokens": tokens, "modes": modes, "samples": args.samples, "ops": args.ops, "dtype": "bfloat16",
            "protocols": protocols, "collectives": ops}


@contextlib.contextmanager
def _environment(**values):
    """os.environ with `values` set (None: unset) while inside (the ranks are spawned processes:
    they inherit it)."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def run_collectives(args) -> int:
    import torch

    from cluster.procs import run_world
    from collectives.symm_layout import TWO_SHOT_MIN_BYTES
    from workers.collectives_bench import HIDDEN, bench_rank, protocol_rows, table, two_shot_from
    settings = _settings(args)
    if not torch.cuda.is_available() or torch.cuda.device_count() < max(args.tp, 2):
        raise UserError(f"bench collectives needs --tp >= 2 GPUs of one host; this one has {torch.cuda.device_count()}")
    rows = []
    for variant in settings["protocols"]:  # one world each: the variant is the backend's ($DGX_EMU_SYMM_*)
        protocol, _, programs = variant.partition("@")
        with tempfile.TemporaryDirectory() as scratch, _environment(DGX_EMU_SYMM_PROTOCOL=protocol,
                                                                    DGX_EMU_SYMM_PROGRAMS=programs or None):
            settings["rows_path"] = str(Path(scratch) / "rows.json")
            run_world(args.tp, bench_rank, settings, timeout_s=900.0, backend="symm", device="cuda")
            rows += protocol_rows(json.loads(Path(settings["rows_path"]).read_text()), variant, first=not rows)
    machine = f"{args.tp} x {torch.cuda.get_device_name()}"
    print(f"machine: {machine}; {args.samples} samples of {args.ops} calls; slowest rank's median / p90")
    print(table(rows))
    won = two_shot_from(rows)
    print(f"two-shot beat one-shot (ar_rmsnorm, graph) from {won} tokens" if won else
          "two-shot never beat one-shot (ar_rmsnorm, graph)",
          f"(TWO_SHOT_MIN_BYTES now {TWO_SHOT_MIN_BYTES} = {TWO_SHOT_MIN_BYTES // (2 * HIDDEN)} bf16 tokens of {HIDDEN})")
    if args.out:
        payload = {"machine": machine, "date": datetime.date.today().isoformat(),
                   "command": "dgx-emu " + " ".join(shlex.quote(a) for a in sys.argv[1:]), "results": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2))
    return 0
