"""Training the embedded default model: `python -m workers.train_target corpus|train ...`.

The embedded default is a 4-layer Llama 4 (model/embedded.py) small enough for eight CPU actors
on a laptop. Random weights write noise, which makes the default run, FP8's accuracy targets
(perplexity, greedy agreement) and speculative decoding's acceptance meaningless; so it is trained,
once, with this module, and the result ships in model/assets/.

  corpus  collects English technical prose that every Python install (plus numpy and torch) has
          on disk: the Python reference topics (pydoc_data) and the docstrings of the standard
          library, numpy and torch (PSF / BSD licensed). Every 50th document is held out.
  train   next-byte prediction on that corpus with the runtime's own model code (model/llama4.py
          at world size 1, autograd through the same forward the runtime serves), AdamW with
          warm-up and cosine decay, a Switch-style load-balancing loss on the MoE routers, for a
          wall-clock budget; the step with the best held-out loss is written as a Hugging Face
          checkpoint (bf16) with tokenizer.json, training.json (the run's record) and heldout.txt.

Documents are byte-level tokens framed by <|begin_of_text|> and <|end_of_text|>, packed into
fixed windows. The schedule's length is set from the measured speed of the first steps, so the
same command fits a laptop or a GPU.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from collectives.communicator import SingleRankCommunicator
from model.checkpoint import export_state_dict
from model.config import ModelConfig
from model.embedded import default_config, write_checkpoint
from model.llama4 import Llama4
from model.parallel import layout
from model.tokenizer import byte_level_tokenizer

HELDOUT_EVERY = 50
MIN_DOC_CHARS = 200
AUX_LOSS_WEIGHT = 0.01


def _docstrings(root: Path) -> list[str]:
    docs = []
    for file in sorted(root.rglob("*.py")):
        if any(part in ("test", "tests", "site-packages", "idlelib") for part in file.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOC_CHARS and doc.isascii():
                    docs.append(doc)
    return docs


def build_corpus(out: Path) -> dict:
    """Writes {"train": [...], "heldout": [...]} documents as JSON; returns counts."""
    import numpy
    import pydoc_data.topics

    docs = [t for _, t in sorted(pydoc_data.topics.topics.items()) if t.isascii()]
    for root in (Path(sysconfig.get_paths()["stdlib"]), Path(numpy.__file__).parent, Path(torch.__file__).parent):
        docs += _docstrings(root)
    docs = list(dict.fromkeys(docs))  # exact duplicates (inherited docstrings) once
    heldout = docs[::HELDOUT_EVERY]
    train = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY]
    out.write_text(json.dumps({"train": train, "heldout": heldout}))
    return {"documents": len(docs), "train_chars": sum(map(len, train)), "heldout_chars": sum(map(len, heldout))}


def token_stream(docs: list[str], cfg: ModelConfig) -> torch.Tensor:
    """Every document as <bos> bytes <eos>, concatenated: (N,) int64."""
    tok, eos = byte_level_tokenizer(), cfg.eos_token_ids[0]
    ids = []
    for doc in docs:
        ids += tok.encode(doc, add_bos=cfg.bos_token_id) + [eos]
    return torch.tensor(ids, dtype=torch.long)


def init_weights(model: Llama4, seed: int) -> None:
    """GPT-2 style: normal(0.02), residual-output projections scaled by 1/sqrt(2 * layers), norms 1."""
    gen = torch.Generator().manual_seed(seed)
    out_std = 0.02 / math.sqrt(2 * model.cfg.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                std = out_std if ("o_proj" in name or "down_proj" in name) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)


class RouterBalance:
    """Switch-Transformer load balance over every MoE router: n_experts * sum_e f_e * P_e, where f_e
    is the share of tokens whose top choice is e and P_e the mean softmax probability of e."""

    def __init__(self, model: Llama4) -> None:
        self.losses: list[torch.Tensor] = []
        self.hooks = [layer.feed_forward.router.register_forward_hook(self._hook)
                      for layer in model.layers if layer.is_moe]

    def _hook(self, module, args, logits) -> None:
        probs = logits.float().softmax(-1)  # (N, E)
        chosen = F.one_hot(logits.argmax(-1), probs.shape[-1]).float().mean(0)
        self.losses.append(probs.shape[-1] * (chosen * probs.mean(0)).sum())

    def take(self) -> torch.Tensor:
        loss = torch.stack(self.losses).mean() if self.losses else torch.zeros(())
        self.losses = []
        return loss


def lm_loss(model: Llama4, batch: torch.Tensor) -> torch.Tensor:
    """batch: (B, T+1) token ids; mean next-token cross-entropy over the T predictions."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    cache = model.new_cache(inputs.shape[0], inputs.shape[1])
    logits = Llama4.forward.__wrapped__(model, inputs, cache).logits  # the served forward, outside inference mode
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def windows(stream: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - length - 1, (n,), generator=gen)
    return torch.stack([stream[s: s + length + 1] for s in starts.tolist()])  # (n, length + 1)


@torch.no_grad()
def heldout_loss(model: Llama4, batches: list[torch.Tensor]) -> float:
    model.eval()
    loss = sum(float(lm_loss(model, b)) for b in batches) / len(batches)
    model.train()
    return loss


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args) -> dict:
    cfg, device = default_config(), torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    corpus = json.loads(Path(args.corpus).read_text())
    train_stream, heldout_stream = token_stream(corpus["train"], cfg), token_stream(corpus["heldout"], cfg)
    gen = torch.Generator().manual_seed(args.seed)
    heldout = [windows(heldout_stream, args.batch, args.seq, gen).to(device) for _ in range(args.eval_batches)]
    model = Llama4(cfg, layout(cfg), SingleRankCommunicator())
    init_weights(model, args.seed)
    model.to(device).train()
    balance = RouterBalance(model)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    total, step, start, log = args.max_steps, 0, time.perf_counter(), []
    best = (float("inf"), -1, None)
    while step < total:
        lr = lr_at(step, total, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = windows(train_stream, args.batch, args.seq, gen).to(device)
        loss = lm_loss(model, batch)
        aux = balance.take()
        (loss + AUX_LOSS_WEIGHT * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step == args.calibrate_steps:  # fit the schedule to the time budget from the measured speed
            per_step = (time.perf_counter() - start) / step
            total = min(args.max_steps, max(step + 1, int(args.budget_s / per_step)))
            print(f"{per_step * 1e3:.1f} ms/step -> {total} steps in {args.budget_s:.0f} s", file=sys.stderr)
        if step % args.eval_every == 0 or step == total:
            val = heldout_loss(model, heldout)
            balance.take()  # the held-out forward's router losses: not trained on
            log.append({"step": step, "train_loss": loss.item(), "aux_loss": aux.item(), "heldout_loss": val,
                        "lr": lr, "seconds": time.perf_counter() - start})
            print(f"step {step}/{total} train {loss.item():.3f} heldout {val:.3f} ({val / math.log(2):.3f} bits/byte)"
                  f" aux {aux.item():.3f} {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            if val < best[0]:
                best = (val, step, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[2])
    return save(model.cpu(), cfg, Path(args.out), corpus, {
        "steps": total, "best_step": best[1], "heldout_loss": best[0], "heldout_bits_per_byte": best[0] / math.log(2),
        "seconds": time.perf_counter() - start, "device": torch.cuda.get_device_name() if device.type == "cuda"
        else "cpu", "batch": args.batch, "seq": args.seq, "peak_lr": args.lr, "seed": args.seed, "log": log})


def save(model: Llama4, cfg: ModelConfig, out: Path, corpus: dict, record: dict) -> dict:
    tensors = {k: v.to(torch.bfloat16) for k, v in export_state_dict(model).items()}
    write_checkpoint(out, cfg, tensors)
    byte_level_tokenizer().inner.save(str(out / "tokenizer.json"))
    (out / "training.json").write_text(json.dumps(record, indent=1))
    text, size = [], 0
    for doc in corpus["heldout"]:  # the first held-out documents, ~64 KB, for perplexity and FP8 accuracy
        text.append(doc)
        size += len(doc)
        if size > 64_000:
            break
    (out / "heldout.txt").write_text("\n\n".join(text))
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("corpus", help="collect the training corpus into a JSON file")
    c.add_argument("--out", required=True)
    t = sub.add_parser("train", help="train the embedded default model on a corpus")
    t.add_argument("--corpus", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--budget-s", type=float, default=420.0, help="wall-clock training budget")
    t.add_argument("--max-steps", type=int, default=20000)
    t.add_argument("--calibrate-steps", type=int, default=30)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--seq", type=int, default=512)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--eval-every", type=int, default=200)
    t.add_argument("--eval-batches", type=int, default=4)
    t.add_argument("--seed", type=int, default=20261129)
    args = parser.parse_args(argv)
    if args.command == "corpus":
        print(json.dumps(build_corpus(Path(args.out))))
    else:
        record = train(args)
        print(json.dumps({k: v for k, v in record.items() if k != "log"}))


if __name__ == "__main__":
    main()
