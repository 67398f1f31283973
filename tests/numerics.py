"""Shared test helpers for comparing kernels with their references: ulp distances, and NaN-poisoned
GEMV outputs (an element a kernel forgets to write then fails the comparison)."""
import torch

MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}


def ulps(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|actual - expected| in units of the last place of expected's dtype (bf16 / fp16)."""
    _, exponent = torch.frexp(expected.float())
    ulp = torch.ldexp(torch.ones_like(expected, dtype=torch.float32), exponent - 1 - MANTISSA_BITS[expected.dtype])
    return (actual.float() - expected.float()).abs() / ulp


def assert_within_2_ulps(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32: rtol 1e-6; bf16 / fp16: at most 2 ulps anywhere."""
    if expected.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
        return
    err = ulps(actual, expected)
    assert bool((err <= 2).all()), f"more than 2 ulps off: {err.max().item()}"


def poison_gemv_outputs(monkeypatch) -> None:
    """model.kernels.linear_small_m allocates its outputs as NaN for the rest of the test."""
    from model.kernels import linear_small_m

    def alloc(m, n, dtype, device):
        return torch.full((m, n), float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(linear_small_m, "_alloc_out", alloc)


def randn_on(device, gen: torch.Generator, *shape, dtype=torch.float32) -> torch.Tensor:
    """Normal values drawn on the CPU from `gen` (same numbers on any device), cast, then moved."""
    return torch.randn(*shape, generator=gen).to(dtype).to(device)
