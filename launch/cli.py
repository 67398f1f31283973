"""`dgx-emu` command line. Parses, builds configs, starts the node, streams and prints.

User errors (bad flags, bad paths, bad checkpoints, impossible layouts) exit with code 2 and one
readable line on stderr; nothing the user typed produces a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cluster.node import USER_ERRORS, UserError, build_node
from cluster.faults import NodeStartError, RankFailure
from cluster.interrupts import install_interrupt_handler
from cluster.timeline import TraceError
from launch.spec_cli import (add_spec_args, add_train_draft_parser, check_spec, run_train_draft, spec_settings,
                             spec_summary)
from launch.bench_cli import add_bench_parser, run_bench
from launch.drill_cli import add_drill_parser, run_drill
from launch.emulate_cli import add_emulate_parser, emulated_summary, format_emulated, run_emulate
from launch.trace_cli import add_trace_parser, finish_trace_dir, prepare_trace_dir, run_trace
from model.embedded import ensure_default_model
from model.sampling import SamplingParams
from model.tokenizer import StreamDecoder, Tokenizer
from workers.engine import Request
from workers.run_config import RunConfig


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own code for usage errors)
        raise UserError(f"{self.prog}: {message}")


def _parse_ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace(" ", "").split(",") if t != "")
    except ValueError:
        raise UserError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (HF Llama 4); default: the embedded model")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[], help="comma-separated token ids (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate all --max-new-tokens even past the end-of-sequence token (benchmarks)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp8"],
                   help="fp8: FP8 (e4m3) GEMMs, BF16 around them; an FP8 checkpoint loads as is, "
                        "a BF16/FP32 one is quantized at load")
    p.add_argument("--fp8-scheme", default="auto", choices=["auto", "per-tensor", "channel", "block"],
                   help="FP8 scales: per-tensor (static), channel (per-token activations) or block (128x128); "
                        "auto: the checkpoint's, else channel")
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "fp8"],
                   help="KV cache: the compute dtype (auto) or FP8 with per-tensor scales")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-size", type=int, default=8, help="virtual GPUs, one Ray actor each (1: in-process)")
    p.add_argument("--moe", default="tp", choices=["tp", "ep"], help="MoE layout: tensor or expert parallel")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"],
                   help="decode-step kernels: fused Triton kernels or the torch reference ops (auto: triton on cuda)")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                   help="replay decode steps from CUDA graphs (auto: where possible on cuda; on: error if not)")
    p.add_argument("--comm", default=None, choices=["shm", "gloo", "nccl", "symm"],
                   help="data-plane backend (default: shm on cpu; on cuda symm for ranks on one host, nccl across hosts)")
    p.add_argument("--hardware", default="b200", choices=["b200", "h200", "h100"],
                   help="the GPU each rank stands for")
    p.add_argument("--threads-per-rank", type=int, default=1, help="torch threads in each rank")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    p.add_argument("--placement", default="STRICT_PACK", choices=["STRICT_PACK", "PACK", "SPREAD"],
                   help="placement-group strategy for the ranks")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard (local Ray only)")
    p.add_argument("--trace", metavar="DIR", default=None,
                   help="record per-rank communication timelines into DIR (see `dgx-emu trace`)")
    p.add_argument("--emulate-node", metavar="NODE", default=None,
                   help="give each rank a virtual clock of NODE (dgx-b200, hgx-h200, hgx-h100 or a node JSON file): "
                        "--json reports the modeled step time and tokens/s beside the measured ones, --trace "
                        "writes the modeled timeline beside the measured one (steps run eagerly)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="after a rank failure, restart the node and rerun the batch up to N times")
    p.add_argument("--collective-timeout", type=float, default=120.0,
                   help="seconds a rank waits in a collective before naming the ranks that never came")
    p.add_argument("--inject-delay", metavar="RANK:SECONDS", default=None,
                   help="fault injection: RANK arrives SECONDS late at every collective")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last stdout line")
    add_spec_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="dgx-emu", description="Eight Ray actors as the GPUs of a DGX B200 node.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    add_generate_args(sub.add_parser("generate", help="generate text from a Llama 4 model"))
    add_trace_parser(sub)
    add_train_draft_parser(sub)
    add_drill_parser(sub)
    add_bench_parser(sub)
    add_emulate_parser(sub)
    return parser


def _requests(args, model_dir: Path, cfg) -> tuple[list[Request], Tokenizer | None]:
    tok_file = model_dir / "tokenizer.json"
    tokenizer = Tokenizer.from_file(tok_file) if tok_file.is_file() else None
    prompts = [_parse_ids(t) for t in args.prompt_ids]
    if args.prompt and tokenizer is None:
        raise UserError(f"{model_dir} has no tokenizer.json: pass token ids with --prompt-ids")
    for text in args.prompt:
        ids = tokenizer.encode(text)
        if cfg.bos_token_id is not None and (not ids or ids[0] != cfg.bos_token_id):
            ids = [cfg.bos_token_id] + ids
        prompts.append(tuple(ids))
    if not prompts:
        raise UserError("give a prompt: --prompt TEXT or --prompt-ids 1,2,3")
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, max_new_tokens=args.max_new_tokens, stop_on_eos=not args.ignore_eos)
    return [Request(p, params, str(i)) for i, p in enumerate(prompts)], tokenizer


def _delay(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        rank, seconds = text.split(":")
        return {"delay_rank": int(rank), "delay_s": float(seconds)}
    except ValueError:
        raise UserError(f"--inject-delay must look like RANK:SECONDS, got {text!r}") from None


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _load_progress(per_rank: list[tuple[int, int]]) -> None:
    cells = " ".join(f"{done}/{total}" for done, total in per_rank)
    sys.stderr.write(f"\rloading tensors per rank: {cells}")
    sys.stderr.flush()


def _report_load(reports: list[dict], world: int) -> None:
    slowest = max(r["load_s"] for r in reports)
    per_rank = max(r["weights_bytes"] for r in reports) / 2**20
    end = "\n" if sys.stderr.isatty() else ""
    print(f"{end}loaded {world} rank(s) in {slowest:.1f} s, {per_rank:.1f} MiB of weights per rank",
          file=sys.stderr)


def _printable(text: str) -> str:
    """Control characters a random model emits would drive the terminal; show them escaped."""
    return "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" for c in text)


def default_comm(device: str, world_size: int, ray_address: str | None) -> str:
    """shm for CPU actors; on GPUs the fused peer-memory collectives (symm) when the node starts
    on this host, NCCL when it joins a cluster (its ranks may span hosts)."""
    if device != "cuda":
        return "shm"
    return "symm" if world_size > 1 and ray_address is None else "nccl"


def run_generate(args) -> int:
    model_dir = Path(args.model) if args.model else ensure_default_model()
    comm = args.comm or default_comm(args.device, args.world_size, args.ray_address)
    draft_path, spec = spec_settings(args, model_given=args.model is not None)
    if args.trace:
        prepare_trace_dir(args.trace)
    run = RunConfig(model_path=str(model_dir), dtype=args.dtype, device=args.device, world_size=args.world_size,
                    moe_mode=args.moe, comm=comm, threads_per_rank=args.threads_per_rank,
                    hardware=args.hardware, trace_dir=args.trace, fp8_scheme=args.fp8_scheme,
                    kv_dtype=args.kv_dtype, draft_path=draft_path, kernels=args.kernels,
                    cuda_graphs=args.cuda_graphs, emulate_node=args.emulate_node, **_delay(args.inject_delay))
    with build_node(run, address=args.ray_address, placement=args.placement, dashboard=args.dashboard,
                    max_restarts=args.max_restarts) as node:
        requests, tokenizer = _requests(args, model_dir, node.model_cfg)
        node.validate(requests)
        check_spec(spec, draft_path, model_dir, node.model_cfg)
        load_reports = node.load(_load_progress if sys.stderr.isatty() else None)
        _report_load(load_reports, args.world_size)
        decoder = StreamDecoder(tokenizer) if tokenizer is not None and len(requests) == 1 else None

        def on_tokens(step: int, new: list[list[int]]) -> None:
            if decoder:
                sys.stdout.write(_printable(decoder.push(new[0])))
                sys.stdout.flush()

        start = time.perf_counter()
        completions, stats, info = node.generate(requests, on_tokens, spec=spec)
        wall = time.perf_counter() - start
    if decoder:
        sys.stdout.write(_printable(decoder.flush()) + "\n")
    texts = [tokenizer.decode(c.token_ids) if tokenizer else None for c in completions]
    if not decoder:
        for c, text in zip(completions, texts):
            print(_printable(text) if text is not None else ",".join(map(str, c.token_ids)))
    decode_tokens = sum(max(0, len(c.token_ids) - 1) for c in completions)
    decode_s = sum(stats.step_s)
    summary = {
        "text": texts[0], "token_ids": completions[0].token_ids, "new_tokens": len(completions[0].token_ids),
        "finish_reason": completions[0].finish_reason,
        "tokens_per_s": decode_tokens / decode_s if decode_s > 0 else None,
        "ttft_s": stats.ttft_s, "e2e_s": wall, "world_size": args.world_size,
        "layout": {"tp": args.world_size, "moe": args.moe}, "dtype": args.dtype, "fp8_scheme": args.fp8_scheme,
        "kv_dtype": args.kv_dtype, "device": args.device,
        "step_latency_s": {"p50": _percentile(stats.step_s, 0.5), "p90": _percentile(stats.step_s, 0.9)},
        "hardware": args.hardware,
        "ranks": [{k: r.get(k) for k in ("rank", "device", "stands_for", "weights_bytes", "hbm_fraction", "load_s")}
                  for r in load_reports],
        "completions": [{"request_id": c.request_id, "text": t, "token_ids": c.token_ids,
                         "finish_reason": c.finish_reason} for c, t in zip(completions, texts)],
        **spec_summary(completions, stats, spec, draft_path),
        **info,
    }
    if stats.modeled:
        summary["emulated"] = emulated_summary(stats, completions)
    if args.trace:
        traced = finish_trace_dir(args.trace)
        summary["trace"] = {"dir": traced["dir"], "merged": traced["merged"],
                            "straggler": traced["summary"]["straggler"]}
        print(f"trace: {traced['dir']} (dgx-emu trace summary {traced['dir']})", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    else:
        p50 = summary["step_latency_s"]["p50"]
        tps = summary["tokens_per_s"]
        accepted = summary.get("acceptance_length")
        spec_note = f"{spec.describe()} acceptance length {accepted:.2f}, " if accepted else ""
        print(f"[{summary['new_tokens']} tokens, {spec_note}ttft {stats.ttft_s * 1e3:.1f} ms, "
              f"{'%.1f tok/s' % tps if tps else 'n/a'}, step p50 "
              f"{'%.2f ms' % (p50 * 1e3) if p50 else 'n/a'}, world {args.world_size}]", file=sys.stderr)
        if "emulated" in summary:
            print(format_emulated(summary["emulated"]), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "generate":
            return run_generate(args)
        if args.command == "trace":
            return run_trace(args)
        if args.command == "train-draft":
            return run_train_draft(args)
        if args.command == "drill":
            return run_drill(args)
        if args.command == "bench":
            return run_bench(args)
        if args.command == "emulate":
            return run_emulate(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (RankFailure, TimeoutError, NodeStartError) as e:  # the node failed, not the user: exit 1, one line
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main_entry() -> None:
    install_interrupt_handler()
    sys.exit(main())
