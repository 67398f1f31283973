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
from launch.run_args import add_runtime_args, node_settings
from launch.serve_cli import add_serve_parser, run_serve
from launch.spec_cli import add_train_draft_parser, check_spec, run_train_draft, spec_summary
from launch.bench_cli import add_bench_parser, run_bench
from launch.drill_cli import add_drill_parser, run_drill
from launch.emulate_cli import add_emulate_parser, emulated_summary, format_emulated, run_emulate
from launch.trace_cli import add_trace_parser, finish_trace_dir, run_trace
from model.sampling import SamplingParams
from model.tokenizer import StreamDecoder, Tokenizer
from workers.engine import Request


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own code for usage errors)
        raise UserError(f"{self.prog}: {message}")


def _parse_ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace(" ", "").split(",") if t != "")
    except ValueError:
        raise UserError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[], help="comma-separated token ids (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate all --max-new-tokens even past the end-of-sequence token (benchmarks)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last stdout line")
    add_runtime_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="dgx-emu", description="Eight Ray actors as the GPUs of a DGX B200 node.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    add_generate_args(sub.add_parser("generate", help="generate text from a Llama 4 model"))
    add_serve_parser(sub)
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


def _start_node(settings, replicas: int):
    if replicas != 1:  # N copies of the node, the prompts split over them (cluster/replica_batch.py)
        from cluster.replica_batch import ReplicaNodes
        return ReplicaNodes.start(settings.run, replicas, settings.build_kwargs)
    return build_node(settings.run, **settings.build_kwargs)


def run_generate(args) -> int:
    settings = node_settings(args)
    model_dir, draft_path, spec = settings.model_dir, settings.draft_path, settings.spec
    with _start_node(settings, args.replicas) as node:
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
        if args.command == "serve":
            return run_serve(args)
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
