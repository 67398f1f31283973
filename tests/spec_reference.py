"""Shared pieces of the speculative-decoding tests: the embedded default target rebuilt in a test
directory (the same deterministic weights the shipped toy draft was trained against), the shipped
draft, random drafts written in both published layouts, seeded prompts, and result tensors."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from collectives.communicator import SingleRankCommunicator
from model.checkpoint import load_shard
from model.config import load_model_config
from model.eagle3 import Eagle3Config, Eagle3Draft, SharedTargetParts, draft_layout
from model.eagle3_checkpoint import checkpoint_tensors, load_draft, save_draft
from model.embedded import default_draft_dir, ensure_default_model, heldout_text
from model.llama4 import Llama4
from model.parallel import layout
from model.tokenizer import Tokenizer
from workers.train_draft import split_text


@contextmanager
def torch_threads(n: int):
    """Runs with n intra-op threads. On a shared 2-core machine, a second thread makes each small
    op wait for a busy core (a softmax of 24 numbers: 3.5 us with one thread, ~7 ms with two)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def one_thread():
    with torch_threads(1):
        yield


def default_target() -> Path:
    """The embedded default model (the shipped trained checkpoint)."""
    return ensure_default_model()


def shipped_draft() -> Path:
    path = default_draft_dir()
    assert path is not None, "the embedded default's draft is missing: run `dgx-emu train-draft --embedded`"
    return path


def load_pair(comm, target_path, draft_path, moe: str = "tp") -> tuple[Llama4, Eagle3Draft]:
    """This rank's target and draft shards."""
    cfg = load_model_config(target_path)
    model = Llama4(cfg, layout(cfg, comm.world_size, comm.rank, moe), comm).eval()
    load_shard(model, target_path)
    draft, _ = load_draft(draft_path, model)
    return model, draft


def random_prompts(n: int, vocab: int, seed: int, lengths=(2, 24)) -> list[tuple[int, ...]]:
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=gen).tolist()
    return [tuple(torch.randint(3, vocab, (s,), generator=gen).tolist()) for s in sizes]


def heldout_prompts(n: int, seed: int, length: int = 32) -> list[tuple[int, ...]]:
    """n prompts of BOS + `length` tokens cut from the last fifth of the default model's held-out
    text: the part the shipped draft's training never read (workers/train_draft.split_text)."""
    tokenizer = Tokenizer.from_file(default_target() / "tokenizer.json")
    _, tail = split_text(tokenizer.encode(heldout_text()))
    starts = torch.randint(0, len(tail) - length, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    bos = load_model_config(default_target()).bos_token_id
    return [tuple([bos] + tail[s: s + length]) for s in starts]


def token_table(completions, width: int) -> torch.Tensor:
    """(B, width) token ids, -1 past each completion's end (ends differ with EOS and budgets)."""
    return torch.tensor([c.token_ids + [-1] * (width - len(c.token_ids)) for c in completions])


def random_draft(target_cfg, seed: int, draft_vocab: int, std: float = 0.05, **overrides) -> Eagle3Draft:
    """An unsharded draft with normal(0, std) weights for a target config (norms 1)."""
    cfg = Eagle3Config(**{**dict(hidden_size=target_cfg.hidden_size, n_heads=target_cfg.n_heads,
                                 n_kv_heads=target_cfg.n_kv_heads, head_dim=target_cfg.head_dim,
                                 intermediate_size=2 * target_cfg.hidden_size, vocab_size=target_cfg.vocab_size,
                                 draft_vocab_size=draft_vocab, target_hidden_size=target_cfg.hidden_size),
                          **overrides})
    embed = Llama4(target_cfg, layout(target_cfg), SingleRankCommunicator()).embed_tokens
    draft = Eagle3Draft(cfg, draft_layout(cfg, 1, 0), SingleRankCommunicator(), SharedTargetParts(embed))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=gen) * std)
    ids = torch.randperm(target_cfg.vocab_size, generator=gen)[:draft_vocab].sort().values
    draft.set_draft_vocab(ids)
    return draft


def write_modelopt(path: Path, draft: Eagle3Draft, layer_ids, lm_head: bool) -> None:
    """A ModelOpt-style export: layers.0.*, eagle_config.eagle_aux_hidden_state_layer_ids, and (when
    lm_head is False) no lm_head / d2t / t2d at all."""
    tensors = checkpoint_tensors(draft, layer_prefix="layers.0.")
    if not lm_head:
        for name in ("lm_head.weight", "d2t", "t2d"):
            tensors.pop(name)
    save_draft(path, draft.cfg, tensors, dtype=torch.float32)
    raw = json.loads((path / "config.json").read_text())
    for key in ("draft_vocab_size", "target_hidden_size", "eagle_aux_hidden_state_layer_ids"):
        raw.pop(key, None)
    raw["architectures"] = ["LlamaForCausalLMEagle3"]
    raw["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(layer_ids), "use_aux_hidden_state": True}
    if lm_head:
        raw["draft_vocab_size"] = draft.cfg.draft_vocab_size
    (path / "config.json").write_text(json.dumps(raw))
