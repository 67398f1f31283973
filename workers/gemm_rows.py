"""Which decode row counts keep a row's bits on THIS CPU: what the batch engine's batch invariance
on CPU actors takes, asked of the CPU it runs on.

Why: an fp32 GEMM library picks its kernel by shape, and a row computed among M rows may round
differently for another M. On this project's AMD EPYC VM (MKL, AVX2) every M >= 4 gives a row the
same bits, so the engine's decode forwards took max(busy rows + 1, 4) rows. On the lent GPU host's
Intel CPU (MKL, AVX-512) rows of M >= 11 differed from those of M = 4, and at two world-2 shapes
so did M = 6..10 (benchmarks/cpu_gemm_rows.py; benchmarks/results/cpu-gemm-rows-*.json): there a
request's logits changed with its batch. So, once per engine, the model's own GEMMs (every linear
at its weights, one expert's two matrices, the LM head) are run at every row count the engine may
use, with one row at every position:
  * VARIABLE: every count from MIN_ROWS up gives the row the same bits (the fast choice: a
    forward's rows follow the busy slots);
  * FIXED: otherwise every decode forward takes all the engine's rows, and expert groups are
    padded to that count too (one shape per GEMM; measured here at +20-45% of a one-row step).
Ranks decide together (any rank FIXED makes all FIXED): their forwards must agree in rows.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.ffn import Experts

VARIABLE, FIXED = "variable", "fixed"


def model_gemms(model) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor], int]]:
    """(name, f(x) -> y on (M, width) rows, width) of each distinct GEMM a decode forward runs."""
    gemms, seen = [], set()

    def add(name, weight, fn, width):
        key = (name.split(".")[-1], tuple(weight.shape), tuple(weight.stride()), weight.dtype)
        if key not in seen:
            seen.add(key)
            gemms.append((name, fn, width))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            add(name, module.weight, lambda x, w=module.weight: F.linear(x, w), module.in_features)
        elif isinstance(module, Experts):
            gate_up, down = module.gate_up_proj[0], module.down_proj[0]  # (H, 2I), (I, H) logical
            add(name + ".gate_up_proj", gate_up, lambda x, w=gate_up: x @ w, gate_up.shape[0])
            add(name + ".down_proj", down, lambda x, w=down: x @ w, down.shape[0])
    head = model.lm_head_weight()
    add("lm_head", head, lambda x, w=head: x @ w.t(), head.shape[1])
    return gemms


def row_keeps_bits(fn: Callable[[torch.Tensor], torch.Tensor], width: int, counts, dtype: torch.dtype,
                   device: torch.device) -> bool:
    """One row's fn output, at every position of every count in `counts` (a sequence) among other
    rows, equal in bits to that row first among counts[0] rows."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(max(counts), width, generator=gen).to(device, dtype)
    want = fn(x[:counts[0]])[0]
    for m in counts:
        for position in range(m):
            rows = x[:m].clone()
            rows[[0, position]] = rows[[position, 0]]  # the probed row x[0] at `position`
            if not torch.equal(fn(rows)[position], want):
                return False
    return True


@torch.inference_mode()
def decode_rows_policy(model, min_rows: int, n_rows: int) -> str:
    """VARIABLE if every GEMM keeps a row's bits for all counts min_rows..n_rows, else FIXED; the
    ranks' answers combined (one all-reduce where the model has several ranks)."""
    dtype, device = model.embed_tokens.weight.dtype, model.embed_tokens.weight.device
    fixed = not all(row_keeps_bits(fn, width, range(min_rows, n_rows + 1), dtype, device)
                    for _, fn, width in model_gemms(model))
    if model.comm.world_size > 1:
        fixed = bool(model.comm.all_reduce(torch.tensor([float(fixed)], device=device)).item() > 0)
    return FIXED if fixed else VARIABLE


def pad_expert_groups(model, rows: int) -> None:
    """Every Experts module of `model` pads its per-expert GEMMs to `rows` rows (model/ffn.py)."""
    for module in model.modules():
        if isinstance(module, Experts):
            module.gemm_rows = rows
