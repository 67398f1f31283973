"""`dgx-emu emulate`: what a node would take for a decode step, shape-only (no weights, no GPU).

    dgx-emu emulate --model maverick --node dgx-b200 --tp 8 --dtype fp8 --batch 1 --context 1024 \\
        --draft-len 3 --acceptance-length 2.9 [--json]

Builds rank 0's model on the meta device and costs its step op by op on the node's measured or
sourced constants (workers/emulate.py, cluster/nodes/*.json). Prints the step time split by part of
the model and by kind of op, and tokens/s per user and per node. The same cost model gives a real
run a virtual clock per rank: `dgx-emu generate --emulate-node dgx-b200` (emulated_summary below).
"""
from __future__ import annotations

import json
from pathlib import Path

from cluster.node import UserError
from model.config import PRESETS, load_model_config, maverick, preset
from model.embedded import default_config

EXTRA_MODELS = {"maverick-slice": lambda: maverick(n_layers=4), "embedded": default_config}


def add_emulate_parser(sub) -> None:
    p = sub.add_parser("emulate", help="predict a node's decode speed from shapes alone (no weights, no GPU)")
    p.add_argument("--model", default="maverick",
                   help=f"a preset ({', '.join(sorted([*PRESETS, *EXTRA_MODELS]))}), a checkpoint directory or its config.json")
    p.add_argument("--node", default="dgx-b200", help="dgx-b200, hgx-h200, hgx-h100 (or b200/h200/h100) or a node JSON file")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks (default: every GPU of the node)")
    p.add_argument("--moe", default="tp", choices=["tp", "ep"])
    p.add_argument("--replicate-embedding", action="store_true",
                   help="every rank holds the whole embedding: the step starts without an all-reduce")
    p.add_argument("--dtype", default="fp8", choices=["bf16", "fp8"])
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--comm", default="symm", choices=["symm", "nccl"],
                   help="the node's collectives: symm, the fused one-shot AllReduce(+RMSNorm) of GPUs on one host "
                        "(the runtime's default; fitted at TP2, TP4/TP8 extrapolated), or nccl + a norm launch")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--context", type=int, default=1024, help="cached tokens each sequence attends to")
    p.add_argument("--draft-len", type=int, default=0, help="EAGLE-3 chain length (0: plain decoding)")
    p.add_argument("--acceptance-length", type=float, default=None,
                   help="tokens per verification step (1 + accepted drafts); needed with --draft-len")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.add_argument("--sweep", action="store_true",
                   help="project every layout (TP/EP), batch, draft length (0, 3), dtype and node instead; "
                        "writes a table (sweep.json) and a plot (sweep.png) into --out")
    p.add_argument("--out", default="emulate-sweep", help="--sweep: output directory")


def _model_config(name: str):
    if name in EXTRA_MODELS:
        return EXTRA_MODELS[name]()
    if name in PRESETS:
        return preset(name)
    if Path(name).exists():
        return load_model_config(name)
    raise UserError(f"--model {name}: neither a preset ({', '.join(sorted([*PRESETS, *EXTRA_MODELS]))}) nor a path")


def _check(args, gpus: int) -> int:
    tp = args.tp or gpus
    if not 1 <= tp <= gpus:
        raise UserError(f"--tp {tp}: the node has {gpus} GPUs")
    if args.batch < 1 or args.context < 1:
        raise UserError("--batch and --context must be >= 1")
    if args.draft_len < 0 or args.draft_len > 15:
        raise UserError(f"--draft-len must be in 0..15, got {args.draft_len}")
    if args.draft_len and (args.acceptance_length is None or not 1.0 <= args.acceptance_length <= args.draft_len + 1):
        raise UserError(f"--draft-len {args.draft_len} needs --acceptance-length in 1..{args.draft_len + 1}")
    if args.batch * (args.draft_len + 1) > 16:
        raise UserError("batch x (draft length + 1) must be <= 16 rows: the decode kernels' limit")
    return tp


def run_emulate(args) -> int:
    from cluster.hardware import node_spec
    from model.parallel import layout
    from workers.emulate import project, shape_only_model
    if args.sweep:
        return _run_sweep(args)
    node = node_spec(args.node)
    tp = _check(args, node.gpus_per_node)
    cfg = _model_config(args.model)
    try:
        layout(cfg, tp, 0, args.moe, args.replicate_embedding)
    except ValueError as e:
        raise UserError(f"{args.model} does not split {tp} ways: {e}") from None
    model = shape_only_model(cfg, tp, args.moe, args.dtype, args.replicate_embedding)
    p = project(cfg, node, tp, args.moe, args.dtype, args.batch, args.context, args.draft_len,
                args.acceptance_length or 1.0, kv_element_bytes=1 if args.kv_dtype == "fp8" else 2, model=model,
                comm=args.comm)
    mode = f"EAGLE-3 chain {args.draft_len}, acceptance {args.acceptance_length}" if args.draft_len else "plain decoding"
    embedding = ", embedding on every rank" if args.replicate_embedding and tp > 1 else ""
    print(f"{cfg.name or args.model} on {node.name}: TP{tp}, MoE {args.moe}{embedding}, {args.dtype}, batch {args.batch}, "
          f"context {args.context}, {mode}, {args.comm} collectives")
    print(f"step {p.step_s * 1e6:.0f} us ({p.breakdown['ops']} kernels and collectives per rank)")
    for title, parts in (("by part", p.breakdown["by_part"]), ("by kind", p.breakdown["by_kind"])):
        print(f"  {title}: " + ", ".join(f"{k} {v * 1e6:.0f} us ({v / p.step_s:.0%})" for k, v in
                                         sorted(parts.items(), key=lambda kv: -kv[1])))
    print(f"{p.tokens_per_s_per_user:.0f} tokens/s per user, {p.tokens_per_s_per_node:.0f} per node "
          f"({p.replicas} replica(s) x batch {p.batch})")
    if args.json:
        print(json.dumps({"model": args.model, "node": node.name, "tp": tp, "moe": args.moe, "dtype": args.dtype, "comm": args.comm,
                          "batch": args.batch, "context": args.context, "draft_len": args.draft_len,
                          "acceptance_length": args.acceptance_length, "step_time_s": p.step_s,
                          "tokens_per_s_per_user": p.tokens_per_s_per_user,
                          "tokens_per_s_per_node": p.tokens_per_s_per_node,
                          "breakdown": {"by_part_s": p.breakdown["by_part"], "by_kind_s": p.breakdown["by_kind"],
                                        "ops": p.breakdown["ops"]}}))
    return 0


def emulated_summary(stats, completions) -> dict:
    """`generate --emulate-node`: the virtual clock's times beside the measured ones. Per user: the
    longest row's tokens after its first over the decode steps (each row's rate when rows run
    to the same budget); the step time is the median decode step."""
    modeled = stats.modeled
    decoded = max(max(0, len(c.token_ids) - 1) for c in completions)

    def per_user(steps: list[float]) -> float | None:
        return decoded / sum(steps) if steps and sum(steps) > 0 else None

    def median(steps: list[float]) -> float | None:
        return sorted(steps)[(len(steps) - 1) // 2] if steps else None
    return {"node": modeled["node"],
            "ttft_s": {"measured": stats.ttft_s, "modeled": modeled["ttft_s"]},
            "step_time_s": {"measured": median(stats.step_s), "modeled": median(modeled["step_s"])},
            "tokens_per_s_per_user": {"measured": per_user(stats.step_s), "modeled": per_user(modeled["step_s"])}}


def format_emulated(e: dict) -> str:
    ms = lambda v: f"{v * 1e3:.3f} ms" if v is not None else "n/a"  # noqa: E731
    rate = lambda v: f"{v:.1f}" if v is not None else "n/a"  # noqa: E731
    return (f"[modeled on {e['node']}: step {ms(e['step_time_s']['modeled'])} (measured "
            f"{ms(e['step_time_s']['measured'])}), ttft {ms(e['ttft_s']['modeled'])}, "
            f"{rate(e['tokens_per_s_per_user']['modeled'])} tok/s per user (measured "
            f"{rate(e['tokens_per_s_per_user']['measured'])})]")


def _run_sweep(args) -> int:
    import sys

    from launch.emulate_sweep import print_best, sweep, write_sweep
    acceptance = args.acceptance_length if args.acceptance_length is not None else 2.9
    if not 1.0 <= acceptance <= 4.0 or args.context < 1:
        raise UserError("--sweep needs --acceptance-length in 1..4 (for its chain of 3) and --context >= 1")
    cfg = _model_config(args.model)
    rows = sweep(cfg, args.context, acceptance, 1 if args.kv_dtype == "fp8" else 2,
                 progress=lambda msg: print(msg, file=sys.stderr))
    if not rows:
        raise UserError(f"{args.model} splits into none of the node's layouts")
    title = f"{cfg.name or args.model}, context {args.context}, EAGLE-3 acceptance {acceptance} (emulated)"
    write_sweep(rows, Path(args.out), title)
    print_best(rows)
    print(f"wrote {Path(args.out) / 'sweep.json'} and {Path(args.out) / 'sweep.png'}")
    if args.json:
        print(json.dumps({"configurations": len(rows), "fit": sum(r["fits"] for r in rows), "dir": args.out}))
    return 0
