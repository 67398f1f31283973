"""The EAGLE-3 parts of the command line: speculative-decoding flags of `dgx-emu generate`, their
summary fields, and the `dgx-emu train-draft` subcommand.

Speculative decoding is on whenever a draft is available: `--draft PATH`, or, for the embedded
default model, the draft trained against it and shipped with it (model/assets/). `--no-spec` turns it off.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model.config import ConfigError
from model.eagle3_checkpoint import fingerprint_warning, read_draft_config
from model.embedded import default_draft_dir, default_model_dir, ensure_default_model
from model.spec import CONVENTIONS, SpecConfig, resolve_layer_ids


def _ids(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(t) for t in text.replace(" ", "").split(",") if t != "")
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, got {text!r}") from None


def add_spec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (EAGLE-3)")
    g.add_argument("--draft", metavar="PATH", default=None,
                   help="EAGLE-3 draft checkpoint (SafeAILab or ModelOpt layout); default: the embedded "
                        "model's shipped draft when --model is not given")
    g.add_argument("--no-spec", action="store_true", help="plain decoding even when a draft is available")
    g.add_argument("--draft-len", type=int, default=3, help="chain: draft tokens per verification step")
    g.add_argument("--tree", action="store_true", help="EAGLE-2 dynamic tree instead of a chain")
    g.add_argument("--tree-top-k", type=int, default=4, help="tree: children kept per node and nodes per depth")
    g.add_argument("--tree-depth", type=int, default=5, help="tree: draft steps")
    g.add_argument("--tree-tokens", type=int, default=8, help="tree: nodes verified per step (root not counted)")
    g.add_argument("--draft-layers", metavar="IDS", default=None,
                   help="target layers the draft reads, e.g. 1,23,44 (default: the draft's, else the reference rule)")
    g.add_argument("--draft-layer-convention", default="output", choices=list(CONVENTIONS),
                   help="how --draft-layers counts: a layer's output (TensorRT-LLM) or its input (SafeAILab)")


def spec_settings(args, model_given: bool) -> tuple[str | None, SpecConfig | None]:
    """(draft path to load, SpecConfig for the batch); (None, None) for plain decoding."""
    draft = args.draft or (None if model_given else default_draft_dir())
    if args.no_spec or draft is None:
        return None, None
    spec = SpecConfig(draft_len=args.draft_len, tree=args.tree, top_k=args.tree_top_k, depth=args.tree_depth,
                      tree_tokens=args.tree_tokens, layer_ids=_ids(args.draft_layers, "--draft-layers"),
                      layer_convention=args.draft_layer_convention)
    return str(draft), spec


def check_spec(spec: SpecConfig | None, draft: str | None, model_dir: Path, model_cfg) -> None:
    """Before any rank works: the layer ids must fit target and draft (errors name them), and a
    draft trained against other target weights gets a warning."""
    if spec is None or draft is None:
        return
    draft_cfg = read_draft_config(draft, model_cfg)
    ids = resolve_layer_ids(spec, model_cfg.n_layers, draft_cfg.layer_ids)
    if len(ids) != draft_cfg.n_aux:
        raise ConfigError(f"--draft-layers names {len(ids)} layers, the draft's fc reads {draft_cfg.n_aux}")
    warning = fingerprint_warning(draft, model_dir)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def spec_summary(completions, stats, spec: SpecConfig | None, draft: str | None) -> dict:
    """The --json fields: acceptance_length / acceptance_per_position of the first request, and per request."""
    if spec is None:
        return {"spec": None}
    first = completions[0].spec
    return {"spec": {"draft": draft, **stats.spec}, "acceptance_length": first.get("acceptance_length"),
            "acceptance_per_position": first.get("acceptance_per_position"),
            "draft_s": first.get("draft_s"), "verify_s": first.get("verify_s"),
            "spec_per_request": [{"request_id": c.request_id, **c.spec} for c in completions]}


# ---------------------------------------------------------------------------------------------
# dgx-emu train-draft
# ---------------------------------------------------------------------------------------------

# The recipe the shipped draft of the embedded default model was trained with (`--embedded`).
# Its prompts are cut from the target's held-out text; --device is the caller's (it was trained on one H200).
EMBEDDED_RECIPE = {"layer_ids": (1, 2, 3), "layer_convention": "output", "draft_vocab": 480, "n_prompts": 4096,
                   "heldout_prompts": 32, "epochs": 10, "response_len": 64, "batch_size": 32, "lr": 3e-3, "seed": 0,
                   "intermediate_size": None, "ttt_steps": 3, "data_temperature": 0.0, "dtype": "fp32",
                   "prompt_len": (16, 64), "prompt_text": str(default_model_dir() / "heldout.txt")}


def add_train_draft_parser(sub) -> None:
    p = sub.add_parser("train-draft", help="train an EAGLE-3 draft for a target (training-time test)")
    p.add_argument("--target", help="target checkpoint directory, or 'default' for the embedded model")
    p.add_argument("--out", help="output directory (SafeAILab layout)")
    p.add_argument("--embedded", action="store_true",
                   help="regenerate the embedded model's shipped draft: its target, recipe and location")
    p.add_argument("--layer-ids", default=None, help="target layers to read (default: the reference rule)")
    p.add_argument("--layer-convention", default="output", choices=list(CONVENTIONS))
    p.add_argument("--draft-vocab", type=int, default=32000, help="reduced draft vocabulary (most frequent tokens)")
    p.add_argument("--intermediate-size", type=int, default=None, help="draft MLP width (default: the target's)")
    p.add_argument("--prompts", type=int, default=512, dest="n_prompts", help="training prompts")
    p.add_argument("--prompt-text", metavar="FILE", default=None,
                   help="cut the prompts from this text (default: random token ids, for random targets)")
    p.add_argument("--heldout", type=int, default=16, dest="heldout_prompts", help="held-out prompts")
    p.add_argument("--response-len", type=int, default=64, help="tokens the target regenerates per prompt")
    p.add_argument("--data-temperature", type=float, default=0.0, help="0: greedy responses")
    p.add_argument("--ttt-steps", type=int, default=3, help="training-time-test unroll (>= 3 recommended)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy small CPU)")
    p.add_argument("--json", action="store_true", help="print the training report as JSON")


def run_train_draft(args) -> int:
    from workers.train_draft import TrainConfig, train_draft  # torch-heavy: only when training
    settings = {k: getattr(args, k) for k in ("layer_convention", "draft_vocab", "intermediate_size", "n_prompts",
                                              "heldout_prompts", "response_len", "data_temperature", "ttt_steps",
                                              "prompt_text", "epochs", "batch_size", "lr", "seed", "device", "dtype",
                                              "threads")}
    settings["layer_ids"] = _ids(args.layer_ids, "--layer-ids")
    if args.embedded:
        settings.update(EMBEDDED_RECIPE)
        target, out = "default", args.out or str(default_draft_dir(must_exist=False))
    else:
        if not args.target or not args.out:
            raise ConfigError("train-draft needs --target PATH and --out PATH (or --embedded)")
        target, out = args.target, args.out
    target = str(ensure_default_model()) if target == "default" else target
    if not Path(target).is_dir():
        raise ConfigError(f"--target {target} is not a checkpoint directory")
    if settings["prompt_text"] is not None and not Path(settings["prompt_text"]).is_file():
        raise ConfigError(f"--prompt-text {settings['prompt_text']} is not a file")
    report = train_draft(TrainConfig(target=target, out=out, **settings), log=lambda m: print(m, file=sys.stderr))
    print(f"wrote {out}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
    return 0
