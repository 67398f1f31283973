"""The persistent GEMV chain (benchmarks/persistent_chain.py) against torch's chain of the same GEMVs
(linear_small_m's reference per phase), both tile engines, BF16 and FP8 weights.

On CPU (Triton's interpreter runs programs one after another, so each phase is its own launch) this
checks the phases' math and tiling: every intermediate vector and the logits. On a GPU the one-launch
form runs with its grid barriers, and must give the same bits as the phase-per-launch form, with no
barrier timing out. The interpreter rounds float32 -> bf16 / e4m3 by truncation, so CPU tolerances
are loose where a GPU's are tight."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from collectives.triton_support import tl, triton  # noqa: E402
from model.kernels import gemv_math as gm  # noqa: E402
from benchmarks.persistent_chain import FP8, GemvChain, chain_weights, interpreter_e4m3, reference_phases  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SMALL = dict(n_layers=2, hidden=64, qkv=128, inter=64, vocab=256)
SMALL_TILES = {"BLOCK_K": 32}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("dtype,lm_dtype", [(torch.bfloat16, None), (FP8, None), (FP8, torch.bfloat16)],
                         ids=["bf16", "fp8", "fp8-bf16-lm"])
@pytest.mark.parametrize("engine", ["fma", "dot"])
def test_chain_phases_match_torch(engine, dtype, lm_dtype):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs each run, reported on failure
    x = torch.randn(SMALL["hidden"], generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    weights = chain_weights(**SMALL, dtype=dtype, device=DEVICE, seed=seed, lm_dtype=lm_dtype, x=x)
    chain = GemvChain(weights, engine=engine, tiles=SMALL_TILES, programs=3)
    chain.run(x, barrier=False)
    want = reference_phases(weights, chain.inputs(), interpreter=not CUDA)
    tol = 1e-2
    names = [f"layer {i // 4} {('qkv', 'o', 'act', 'out')[i % 4]}" for i in range(len(want) - 1)] + ["logits"]
    for name, got, ref in zip(names, chain.outputs(), want):
        assert torch.isfinite(got).all() and got.float().pow(2).mean() > 1e-4, f"{name}: not finite or ~0 (seed {seed})"
        assert _rel_err(got, ref) < tol, f"{name}: rel err {_rel_err(got, ref):.3g} (seed {seed}, {engine})"
    # a mutation the check must catch: the last layer's FC2 row of the largest output negated
    row = weights["down"][-1, int(want[-2].abs().argmax())]
    bits = row.view(torch.uint8 if row.dtype == FP8 else torch.int16)
    bits ^= 0x80 if row.dtype == FP8 else -0x8000  # the sign bit
    chain.run(x, barrier=False)
    assert _rel_err(chain.x_buf[-1], want[-2]) > tol


@pytest.mark.skipif(not CUDA, reason="grid barriers need every program resident at once: a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("engine", ["fma", "dot"])
def test_one_launch_with_barriers_equals_phase_launches(engine, dtype):
    shape = dict(n_layers=4, hidden=2048, qkv=4096, inter=2048, vocab=8192)
    x = torch.randn(shape["hidden"], device=DEVICE)
    weights = chain_weights(**shape, dtype=dtype, device=DEVICE, seed=3, x=x)
    chain = GemvChain(weights, engine=engine)
    chain.run(x, barrier=False)
    per_phase = [t.clone() for t in chain.outputs()]
    for _ in range(3):  # repeated: the counter is re-zeroed each run, stale lines would show
        chain.run(x, barrier=True)
        torch.cuda.synchronize()
        chain.check_barriers()
        for a, b in zip(per_phase, chain.outputs()):
            assert torch.equal(a, b)


@pytest.mark.skipif(CUDA, reason="the interpreter's rounding, which the CPU references emulate")
def test_interpreter_e4m3_is_the_interpreters_rounding():
    @triton.jit
    def quantize_kernel(x_ptr, out_ptr, scale_ptr, N: tl.constexpr):
        ks = tl.arange(0, N)
        x = tl.load(x_ptr + ks).to(tl.float32)
        xs, div = gm.dynamic_scale(tl.max(tl.abs(x), axis=0))
        tl.store(out_ptr + ks, gm.quantize(x, div))
        tl.store(scale_ptr, xs)

    x = torch.randn(4096).to(torch.bfloat16)
    got, scale = torch.empty(4096), torch.empty(1)
    quantize_kernel[(1,)](x, got, scale, N=4096)
    want = interpreter_e4m3(x.float(), scale[0]).float()
    normal = (x.float() / scale[0]).abs() >= 2.0 ** -6  # subnormals are not emulated
    assert normal.float().mean() > 0.99 and torch.equal(got[normal], want[normal])
    from collectives.communicator import quantize_fp8
    assert not torch.equal(got, quantize_fp8(x.float(), scale[0]).float())  # the emulation is needed
