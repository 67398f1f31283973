"""`dgx-emu drill`: break a CPU node on purpose and print how it failed (see cluster/drills.py)."""
from __future__ import annotations

import json
from pathlib import Path

from cluster.drills import drill
from model.embedded import ensure_default_model
from workers.run_config import RunConfig

FAULTS = ("kill-decode", "kill-in-collective", "hang", "kill-decode+restart")


def add_drill_parser(sub) -> None:
    p = sub.add_parser("drill", help="inject faults into a CPU node and report detection and cleanup")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=2, help="the rank to break")
    p.add_argument("--collective-timeout", type=float, default=2.0)
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, from {FAULTS}")
    p.add_argument("--json", action="store_true")


def run_drill(args) -> int:
    from cluster.node import UserError
    faults = [f for f in args.faults.split(",") if f]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise UserError(f"unknown fault(s) {unknown}; choose from {FAULTS}")
    if not 0 <= args.rank < args.world_size:
        raise UserError(f"--rank {args.rank} is outside 0..{args.world_size - 1}")
    model = args.model or str(ensure_default_model())
    if not Path(model).exists():
        raise UserError(f"model path {model} does not exist")
    run = RunConfig(model, world_size=args.world_size, collective_timeout_s=args.collective_timeout)
    reports = []
    for fault in faults:
        restart = fault.endswith("+restart")
        report = drill(run, fault.removesuffix("+restart"), rank=args.rank, max_restarts=1 if restart else 0)
        report["fault"] = fault
        report.pop("tokens", None)
        reports.append(report)
        left = sum(len(v) for v in report["leftovers"].values())
        detect = report.get("detected_after_s")
        print(f"{fault:<22} rank {args.rank}  detected {f'{detect:.2f} s' if detect is not None else '-':>8}  "
              f"{report['outcome']:<9}  left behind: {left}  {report.get('error', '')[:90]}")
    if args.json:
        print(json.dumps(reports))
    return 0
