"""Training an EAGLE-3 draft for a target: `dgx-emu train-draft --target PATH --out PATH`.

The recipe follows EAGLE-3 (anchors.md section 5), at whatever scale the device allows:
  1. data     the target answers prompts itself (its own responses, regenerated, so the draft
              learns the distribution it will be verified against);
  2. vocab    the draft vocabulary is the `draft_vocab` most frequent response tokens (d2t/t2d);
  3. train    training-time test: the draft is unrolled `ttt_steps` (>= 3) steps, step i > 0
              reading its own previous pre-norm output as the feature while the tokens stay ground
              truth; loss = soft cross-entropy against the target's distribution restricted to the
              draft vocabulary, on response tokens whose target argmax the draft vocab holds,
              step i weighted 0.8^i;
  4. estimate the held-out acceptance length is MEASURED: the trained draft decodes unseen prompts
              speculatively (chain of 3, greedy) next to plain decoding, whose output it must equal;
  5. save     SafeAILab layout, plus the layer ids (output convention) and a fingerprint of the
              target's weights in config.json.
Everything runs at world size 1: on CPU at toy scale, and unchanged on one GPU (`--device cuda`).
The target is only ever run forward (inference mode); its embedding is shared and frozen.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from collectives.communicator import SingleRankCommunicator
from model.checkpoint import load_shard
from model.config import ConfigError, load_model_config
from model.eagle3 import Eagle3Config, Eagle3Draft, SharedTargetParts, draft_layout
from model.eagle3_checkpoint import checkpoint_tensors, save_draft, target_fingerprint
from model.llama4 import Llama4
from model.parallel import layout
from model.sampling import SamplingParams
from model.spec import SpecConfig, resolve_layer_ids
from model.tokenizer import Tokenizer
from workers.engine import Engine, Request
from workers.run_config import DTYPES

STEP_WEIGHT = 0.8


@dataclass(frozen=True)
class TrainConfig:
    target: str
    out: str
    layer_ids: tuple[int, ...] | None = None  # None: the reference rule
    layer_convention: str = "output"
    draft_vocab: int = 32000
    intermediate_size: int | None = None  # None: the target's dense MLP width
    n_prompts: int = 512
    heldout_prompts: int = 16
    prompt_len: tuple[int, int] = (4, 24)
    prompt_text: str | None = None  # a text file: prompts are cut from it (None: random tokens)
    response_len: int = 64
    data_temperature: float = 0.0
    ttt_steps: int = 3
    epochs: int = 6
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    threads: int = 1  # torch intra-op threads

    def __post_init__(self) -> None:
        if self.ttt_steps < 1:
            raise ConfigError(f"ttt_steps must be >= 1, got {self.ttt_steps}")
        for name in ("draft_vocab", "n_prompts", "heldout_prompts", "response_len", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.prompt_len[0] <= self.prompt_len[1]:
            raise ConfigError(f"prompt_len must be (min, max) with 1 <= min <= max, got {self.prompt_len}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


def load_target(path: str, device: str, dtype: torch.dtype) -> Llama4:
    cfg = load_model_config(path)
    with torch.device(device):
        model = Llama4(cfg, layout(cfg), SingleRankCommunicator()).to(dtype)
    load_shard(model, path)
    return model.eval().requires_grad_(False)


def make_prompts(n: int, vocab: int, lengths: tuple[int, int], generator: torch.Generator) -> list[tuple[int, ...]]:
    """Random token prompts, for a target that has no text to be prompted with (a random one)."""
    sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=generator).tolist()
    return [tuple(torch.randint(0, vocab, (s,), generator=generator).tolist()) for s in sizes]


def text_prompts(ids: list[int], n: int, lengths: tuple[int, int], generator: torch.Generator,
                 bos: int | None) -> list[tuple[int, ...]]:
    """n prompts cut from a tokenized text at random places, each `lengths` tokens long (after BOS)."""
    if len(ids) <= lengths[1]:
        raise ConfigError(f"the prompt text has {len(ids)} tokens, prompts of up to {lengths[1]} need more")
    sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=generator).tolist()
    starts = torch.randint(0, len(ids) - lengths[1], (n,), generator=generator).tolist()
    return [tuple(([bos] if bos is not None else []) + ids[s: s + size]) for s, size in zip(starts, sizes)]


def split_text(ids: list[int]) -> tuple[list[int], list[int]]:
    """A prompt text's tokens: the first 80% for training prompts, the rest held out."""
    cut = len(ids) * 4 // 5
    return ids[:cut], ids[cut:]


def prompts_for(cfg: TrainConfig, tcfg, generator: torch.Generator) -> tuple[list, list]:
    """(training prompts, held-out prompts). From a text: training prompts from its first 80%,
    held-out ones from the rest, so that the acceptance estimate reads text the draft never saw."""
    if cfg.prompt_text is None:
        prompts = make_prompts(cfg.n_prompts + cfg.heldout_prompts, tcfg.vocab_size, cfg.prompt_len, generator)
        return prompts[: cfg.n_prompts], prompts[cfg.n_prompts:]
    tokenizer = Tokenizer.from_file(Path(cfg.target) / "tokenizer.json")
    train_ids, heldout_ids = split_text(tokenizer.encode(Path(cfg.prompt_text).read_text()))
    return (text_prompts(train_ids, cfg.n_prompts, cfg.prompt_len, generator, tcfg.bos_token_id),
            text_prompts(heldout_ids, cfg.heldout_prompts, cfg.prompt_len, generator, tcfg.bos_token_id))


def regenerate(target: Llama4, prompts: list[tuple[int, ...]], n_tokens: int, temperature: float,
               seed: int, batch: int = 64) -> list[list[int]]:
    """prompt + the target's own response, for every prompt."""
    engine, out = Engine(target), []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        requests = [Request(p, SamplingParams(temperature=temperature, seed=seed + i + j, max_new_tokens=n_tokens,
                                              stop_on_eos=False)) for j, p in enumerate(chunk)]
        done, _ = engine.generate(requests)
        out += [list(p) + c.token_ids for p, c in zip(chunk, done)]
    return out


def draft_vocabulary(sequences: list[list[int]], prompt_lens: list[int], size: int, vocab: int) -> torch.Tensor:
    """The `size` most frequent response tokens (ties: lower id), sorted ascending: (Vd,) target ids."""
    counts = torch.zeros(vocab, dtype=torch.long)
    for seq, n in zip(sequences, prompt_lens):
        counts += torch.bincount(torch.tensor(seq[n:], dtype=torch.long), minlength=vocab)
    order = sorted(range(vocab), key=lambda t: (-int(counts[t]), t))[:size]
    return torch.tensor(sorted(order), dtype=torch.long)


def build_draft(target: Llama4, cfg: TrainConfig, layer_ids: tuple[int, ...], vocab_ids: torch.Tensor) -> Eagle3Draft:
    t = target.cfg
    dcfg = Eagle3Config(hidden_size=t.hidden_size, n_heads=t.n_heads, n_kv_heads=t.n_kv_heads, head_dim=t.head_dim,
                        intermediate_size=cfg.intermediate_size or t.intermediate_size_mlp, vocab_size=t.vocab_size,
                        draft_vocab_size=len(vocab_ids), target_hidden_size=t.hidden_size, n_aux=len(layer_ids),
                        rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta, rope_scaling=t.rope_scaling,
                        max_position_embeddings=t.max_position_embeddings, layer_ids=layer_ids)
    weight = target.embed_tokens.weight
    with torch.device(weight.device):
        draft = Eagle3Draft(dcfg, draft_layout(dcfg, 1, 0), target.comm, SharedTargetParts(target.embed_tokens))
    draft.to(weight.dtype)
    draft.set_draft_vocab(vocab_ids.to(weight.device))
    return draft


def target_pass(target: Llama4, tokens: torch.Tensor, lengths: torch.Tensor, layer_ids: tuple[int, ...]):
    """tokens: (B, T) right-padded. Returns features (B, T, n_aux*H) and logits (B, T, V), outside
    inference mode so autograd may read them."""
    unique = tuple(sorted(set(layer_ids)))
    cache = target.new_cache(tokens.shape[0], tokens.shape[1])
    out = target(tokens, cache, n_new=lengths, aux_layers=unique)
    features = torch.cat([out.aux_hidden[unique.index(i)] for i in layer_ids], dim=-1)
    return features.clone(), out.logits.clone()


def ttt_loss(draft: Eagle3Draft, target: Llama4, tokens: torch.Tensor, lengths: torch.Tensor,
             prompt_lens: torch.Tensor, layer_ids: tuple[int, ...], steps: int):
    """One batch of training-time test. tokens: (B, T) prompt + response. Returns the weighted loss
    and, per step, the top-1 agreement with the target on the rows that count."""
    batch, n = tokens.shape
    features, target_logits = target_pass(target, tokens, lengths, layer_ids)
    vocab_ids = draft.to_target_ids(torch.arange(draft.cfg.draft_vocab_size, device=tokens.device))
    draft_in = torch.nn.functional.pad(tokens[:, 1:], (0, 1))  # (B, T): row t reads x_{t+1}
    step_logits = draft.unrolled(draft_in, features, steps)
    rows = torch.arange(n, device=tokens.device)
    total, accuracy = 0.0, []
    for i, logits in enumerate(step_logits):
        source = (rows + 1 + i).clamp(max=n - 1)  # target row whose distribution step i's row t learns
        predicted = rows[None] + 2 + i  # (1, T) index of the predicted token
        teacher = target_logits[:, source]  # (B, T, V)
        valid = (predicted < lengths[:, None]) & (predicted >= prompt_lens[:, None])
        valid &= draft.t2d[teacher.argmax(-1)]
        p = torch.softmax(teacher[..., vocab_ids].float(), dim=-1)  # (B, T, Vd)
        log_q = torch.log_softmax(logits.float(), dim=-1)
        per_row = -(p * log_q).sum(-1)  # (B, T)
        count = valid.sum().clamp(min=1)
        total = total + STEP_WEIGHT ** i * (per_row * valid).sum() / count
        hits = (log_q.argmax(-1) == p.argmax(-1)) & valid
        accuracy.append(float(hits.sum()) / float(count))
    return total, accuracy


def heldout_acceptance(target: Llama4, draft: Eagle3Draft, prompts: list[tuple[int, ...]], n_tokens: int) -> dict:
    """Acceptance length of a chain of 3 on unseen prompts, measured by decoding, and the fraction of
    prompts whose output equals plain greedy decoding (exactly 1 in fp32 on CPU; lower precision
    can flip near-tied argmaxes between a 1-row and a k-row forward)."""
    engine = Engine(target, draft=draft.eval())
    params = SamplingParams(max_new_tokens=n_tokens, stop_on_eos=False)
    requests = [Request(p, params, str(i)) for i, p in enumerate(prompts)]
    plain, _ = engine.generate(requests)
    spec, _ = engine.generate(requests, spec=SpecConfig(draft_len=3))
    same = sum(a.token_ids == b.token_ids for a, b in zip(plain, spec)) / len(spec)  # 1 in fp32 on CPU
    lengths = [c.spec["acceptance_length"] for c in spec]
    per_position = [sum(c.spec["acceptance_per_position"][i] for c in spec) / len(spec) for i in range(3)]
    return {"acceptance_length": sum(lengths) / len(lengths), "acceptance_per_position": per_position,
            "same_as_greedy": same}


class ProgressBar:
    """One self-rewriting stderr line (a plain line per update when stderr is not a terminal)."""

    def __init__(self, total: int, width: int = 30, stream=sys.stderr) -> None:
        self.total, self.width, self.stream, self.start = total, width, stream, time.perf_counter()
        self.tty = stream.isatty()
        self.last_plain = -1

    def update(self, done: int, text: str) -> None:
        filled = self.width * done // self.total
        elapsed = time.perf_counter() - self.start
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {text} {elapsed:.0f}s"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == self.total else ""))
        elif done == self.total or (10 * done) // self.total != self.last_plain:
            self.last_plain = (10 * done) // self.total
            self.stream.write(line + "\n")
        self.stream.flush()


def train_draft(cfg: TrainConfig, log=print) -> dict:
    """The whole recipe; writes the draft to cfg.out and returns a report."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dtype = DTYPES[cfg.dtype]
    target = load_target(cfg.target, cfg.device, dtype)
    tcfg = target.cfg
    layer_ids = resolve_layer_ids(SpecConfig(layer_ids=cfg.layer_ids, layer_convention=cfg.layer_convention),
                                  tcfg.n_layers, None)
    train_prompts, heldout = prompts_for(cfg, tcfg, gen)
    log(f"regenerating {cfg.n_prompts} responses of {cfg.response_len} tokens with the target ...")
    sequences = regenerate(target, train_prompts, cfg.response_len, cfg.data_temperature, cfg.seed)
    prompt_lens = [len(p) for p in train_prompts]
    vocab_ids = draft_vocabulary(sequences, prompt_lens, min(cfg.draft_vocab, tcfg.vocab_size), tcfg.vocab_size)
    draft = build_draft(target, cfg, layer_ids, vocab_ids)
    params = [p for p in draft.parameters() if p.requires_grad]
    batches = math.ceil(len(sequences) / cfg.batch_size)
    total_steps = cfg.epochs * batches
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    log(f"training a {sum(p.numel() for p in params) / 1e6:.2f} M-parameter draft (layers {list(layer_ids)}, "
        f"draft vocab {len(vocab_ids)}) for {total_steps} steps, training-time test of {cfg.ttt_steps} steps")
    bar, step, history = ProgressBar(total_steps), 0, []
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(sequences), generator=gen).tolist()
        for i in range(batches):
            picked = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            tokens, lengths, starts = _pad([sequences[j] for j in picked], [prompt_lens[j] for j in picked], cfg.device)
            loss, accuracy = ttt_loss(draft.train(), target, tokens, lengths, starts, layer_ids, cfg.ttt_steps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            optimizer.step()
            schedule.step()
            step += 1
            history.append({"step": step, "loss": loss.item(), "accuracy": accuracy})
            top1 = "/".join(f"{a:.2f}" for a in accuracy)
            bar.update(step, f"epoch {epoch + 1} loss {loss.item():.3f} top-1 {top1}")
    estimate = heldout_acceptance(target, draft, heldout, cfg.response_len)
    log(f"held-out acceptance length (chain of 3, greedy, {len(heldout)} unseen prompts): "
        f"{estimate['acceptance_length']:.2f}")
    report = {"target_fingerprint": target_fingerprint(cfg.target), "trained_by": "dgx-emu train-draft",
              "recipe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()
                         if k not in ("target", "out", "threads", "prompt_text")},
              "prompt_text": Path(cfg.prompt_text).name if cfg.prompt_text else None,
              "heldout": estimate, "initial_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
              "final_accuracy": history[-1]["accuracy"]}
    save_draft(cfg.out, draft.cfg, checkpoint_tensors(draft), extra={"dgx_emu": report})
    return report


def _pad(sequences: list[list[int]], prompt_lens: list[int], device: str):
    lengths = torch.tensor([len(s) for s in sequences], device=device)
    tokens = torch.zeros(len(sequences), int(lengths.max()), dtype=torch.long, device=device)
    for b, s in enumerate(sequences):
        tokens[b, : len(s)] = torch.tensor(s)
    return tokens, lengths, torch.tensor(prompt_lens, device=device)


def default_out(target: str) -> Path:
    return Path(target) / "eagle3"
