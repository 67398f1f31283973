"""Picking the next token from vocab-parallel logits.

Each rank holds logits for its own slice of the vocabulary. Greedy decoding never gathers them:
every rank sends its (max, argmax) pair, one small all-gather, and all ranks pick the same
winner (ties go to the lowest token id, as `torch.argmax` over the full vocabulary would).
Sampling needs the whole distribution, so it all-gathers the logits; every rank then draws
with the same seeded generator and gets the same token, so ranks stay in lockstep.

Two samplers draw from the same distribution (temperature, then top-k, then top-p, as
`filter_logits` defines it):
  * `next_tokens` / `sample_row`: on the CPU with CPU generators, one row at a time. CPU actors
    use it, and speculative decoding's rejection sampling does.
  * `DeviceSampler`: every row at once on the logits' device, from one `torch.Generator` per row
    on that device, with no host sync, so a CUDA graph can capture it (workers/cuda_graphs.py).
    A draw is the exponential race argmax(p / E), E ~ Exp(1) i.i.d., which picks token i with
    probability p_i (Gumbel-max in another form); greedy rows (temperature 0) take the argmax.
What holds for the device sampler, and why:
  * The same seeds give the same tokens, run after run, on the same GPU kind and torch version:
    a CUDA generator is Philox (seed, offset), and each draw advances every row's offset by the
    same amount.
  * A captured step draws what the same step run eagerly draws. Torch's graph-safe RNG
    (`CUDAGraph.register_generator_state`, the "CUDA Graph-safe RNG states" note in
    CUDAGeneratorImpl) makes a replay read the generator's current seed and offset and advance
    the offset by the total the capture recorded, so eager and replayed draws interleave as one
    sequence. This is how torch's Philox bookkeeping works, not a documented promise of equal
    bits; tests/test_spec_cuda_graphs.py checks it on the GPU.
  * Device draws differ from CPU draws for the same seed (different generators), so a run's
    tokens depend on where it samples: on CUDA the engine always samples on the device (graphs
    on or off give the same tokens); CPU actors keep the CPU sampler.
  * Ranks draw alike: every rank holds the same seeds and the same gathered logits.
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


def distributed_argmax(local_logits: torch.Tensor, vocab_start: int, comm: Communicator, *,
                       kernel: bool | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """local_logits: (B, V_r) this rank's slice. Returns the global argmax ids (B,), equal on all ranks.
    kernel: the local part (argmax + vocab_start, or the (max, id) pair) as ONE launch of
    model/kernels/argmax.py, which picks exactly what torch.argmax picks; default: on CUDA tensors
    it takes (a decode step's tail: torch's argmax is one 512-thread block over the whole row, and
    the offset another launch). True also runs it under Triton's interpreter (tests); False: torch.
    out: an int64 (B,) tensor the ids are written into (and returned): on the kernels their own
    store (one rank: the argmax kernel's; several: the winner kernel's, after the all-gather of
    the pairs), so a graph's token buffer needs no copy; on torch's ops one copy."""
    from model.kernels import argmax as argmax_kernel
    if kernel is None:
        kernel = local_logits.is_cuda and argmax_kernel.available(local_logits)
    if comm.world_size == 1 and kernel:
        return argmax_kernel.argmax(local_logits, offset=vocab_start, out=out)
    if kernel:  # each rank's (max, id) pair, their all-gather, the winner: two launches and the gather
        pairs = comm.all_gather(argmax_kernel.max_argmax(local_logits, offset=vocab_start)[None], dim=0)  # (world, B, 2)
        return argmax_kernel.pick_winner(pairs.contiguous(), out=out)
    ids = _argmax_ids(local_logits, vocab_start, comm)
    return ids if out is None else out.copy_(ids)


def _argmax_ids(local_logits: torch.Tensor, vocab_start: int, comm: Communicator) -> torch.Tensor:
    """distributed_argmax's ids on torch's ops: torch's argmax at one rank; else the local (max, id)
    pair, its all-gather and the first rank holding the max."""
    if comm.world_size == 1:
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


def filter_logits_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor) -> torch.Tensor:
    """`filter_logits` for a batch whose rows have their own settings, with no host sync.
    logits: (B, V) full vocabulary; temperature (B,) (0 is read as 1: greedy rows never sample),
    top_k (B,) (0: off), top_p (B,) (1: off). Returns new float32 logits (B, V)."""
    vocab = logits.shape[-1]
    scaled = logits.float() / torch.where(temperature > 0, temperature, 1.0)[:, None]  # (B, V)
    ranked, order = scaled.sort(dim=-1, descending=True)  # (B, V) each
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)  # (B,)
    kth = ranked.gather(1, (k - 1)[:, None])  # (B, 1) the k-th largest; ties with it stay
    ranked = ranked.masked_fill(ranked < kth, float("-inf"))
    probs = torch.softmax(ranked, dim=-1)  # (B, V) in ranked order
    drop_ranked = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p < 1.0)[:, None]  # keep the first over p
    drop = torch.zeros_like(drop_ranked).scatter(-1, order, drop_ranked)  # (B, V) in vocabulary order
    return scaled.masked_fill((scaled < kth) | drop, float("-inf"))


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                generators: list[torch.Generator]) -> torch.Tensor:
    """logits: (B, V) full vocabulary. One token per row (B,): the argmax where temperature is 0,
    else a draw from softmax(filter_logits_rows(...)) with that row's generator. Every row draws
    its noise either way, so a row's draws never depend on the other rows' settings."""
    probs = torch.softmax(filter_logits_rows(logits, temperature, top_k, top_p), dim=-1)  # (B, V)
    noise = torch.empty_like(probs)
    for row, generator in enumerate(generators):
        noise[row].exponential_(generator=generator)
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # an Exp(1) draw of 0 would make 0 / 0
    drawn = (probs / noise).argmax(dim=-1)  # (B,) the exponential race
    return torch.where(temperature > 0, drawn, logits.argmax(dim=-1))


class DeviceSampler:
    """A batch's sampling settings as device tensors and one generator per row on the device, set
    per batch by `reset` (host side, outside any capture) and read by `pick` (capturable)."""

    def __init__(self, batch: int, vocab_start: int, vocab_size: int, comm: Communicator,
                 device: torch.device | str) -> None:
        self.vocab_start, self.vocab_size, self.comm = vocab_start, vocab_size, comm
        self.temperature = torch.zeros(batch, device=device)  # (B,) 0: greedy
        self.top_k = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) 0: off
        self.top_p = torch.ones(batch, device=device)  # (B,) 1: off
        self.generators = [torch.Generator(device=device) for _ in range(batch)]

    def reset(self, params: list[SamplingParams]) -> None:
        """This batch's settings; each row's generator restarts from its seed (None: 0, as the
        CPU sampler's)."""
        if len(params) != len(self.generators):
            raise ValueError(f"{len(params)} rows of settings for a sampler of {len(self.generators)}")
        self.temperature.copy_(torch.tensor([p.temperature for p in params]))
        self.top_k.copy_(torch.tensor([p.top_k for p in params]))
        self.top_p.copy_(torch.tensor([p.top_p for p in params]))
        for generator, p in zip(self.generators, params):
            generator.manual_seed(p.seed if p.seed is not None else 0)

    def pick(self, local_logits: torch.Tensor, sampling: bool, out: torch.Tensor | None = None) -> torch.Tensor:
        """local_logits: (B, V_r) this rank's slice. sampling False: the distributed argmax (no
        gather, no draw); True: gathers the vocabulary and draws every row. Returns ids (B,), in
        `out` (int64 (B,)) when given: a graph's token buffer, written by the argmax kernel itself
        where it can (distributed_argmax)."""
        if not sampling:
            return distributed_argmax(local_logits, self.vocab_start, self.comm, out=out)
        full = self.comm.all_gather(local_logits, dim=-1)[:, : self.vocab_size]  # (B, V)
        ids = sample_rows(full, self.temperature, self.top_k, self.top_p, self.generators)
        return ids if out is None else out.copy_(ids)
