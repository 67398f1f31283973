"""Picking the next token from vocab-parallel logits.

Each rank holds logits for its own slice of the vocabulary. Greedy decoding never gathers them:
every rank sends its (max, argmax) pair, one small all-gather, and all ranks pick the same
winner (ties go to the lowest token id, as `torch.argmax` over the full vocabulary would).
Sampling needs the whole distribution, so it all-gathers the logits; every rank then draws
with the same seeded generator and gets the same token, so ranks stay in lockstep.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from collectives.communicator import Communicator


class SamplingError(ValueError):
    """Invalid sampling parameters (the message names the parameter)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None
    max_new_tokens: int = 32
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and self.temperature < float("inf")):
            raise SamplingError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def distributed_argmax(local_logits: torch.Tensor, vocab_start: int, comm: Communicator) -> torch.Tensor:
    """local_logits: (B, V_r) this rank's slice. Returns the global argmax ids (B,), equal on all ranks."""
    if comm.world_size == 1:  # one launch instead of a dozen (a decode step's tail on a GPU)
        return local_logits.argmax(dim=-1) + vocab_start
    local_max, local_idx = local_logits.float().max(dim=-1)  # (B,)
    pair = torch.stack((local_max, (local_idx + vocab_start).float()), dim=-1)  # ids < 2^24: exact in fp32
    pairs = comm.all_gather(pair[None], dim=0)  # (world, B, 2)
    values, ids = pairs[..., 0], pairs[..., 1]
    best_rank = (values == values.max(dim=0).values).int().argmax(dim=0)  # first rank holding the max
    return ids.gather(0, best_rank[None]).squeeze(0).long()


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) on full-vocabulary logits (..., V), each row on its
    own. Returns new logits."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keep the first over p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def sample_row(full_logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Draws on the CPU with a CPU generator, so every rank (and every device kind) draws alike."""
    probs = torch.softmax(filter_logits(full_logits.cpu(), params), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def next_tokens(local_logits: torch.Tensor, vocab_start: int, vocab_size: int, comm: Communicator,
                params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """local_logits: (B, V_r). Greedy rows use the distributed argmax; others gather and sample."""
    tokens = distributed_argmax(local_logits, vocab_start, comm)
    sampled = [b for b, p in enumerate(params) if not p.greedy]
    if sampled:
        full = comm.all_gather(local_logits[sampled], dim=-1)[:, :vocab_size]  # (B_s, V)
        for row, b in enumerate(sampled):
            tokens[b] = sample_row(full[row], params[b], generators[b])
    return tokens
