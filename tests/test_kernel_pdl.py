"""Programmatic dependent launch (PDL) of the decode kernels: collectives/triton_support.py's switch
and every kernel's wait / launch-dependents, on CPU where it can be checked, the rest on a GPU.

On CPU: PDL is off in the interpreter and for CPU tensors; DGX_EMU_PDL is read and checked; every
kernel compiles for sm90 with PDL on (tests/sm90_compile.py, no GPU needed), with exactly one
griddepcontrol.wait and one launch_dependents each, and the dense GEMVs issue their first weight
loads before the wait while a gathered GEMV (whose expert ids the kernel before wrote) loads
nothing before it; the attention splits load their first block's committed keys early. On a GPU: the same results, bit for bit, with PDL on and off, eager and from a
CUDA graph, for a chain of dependent kernels (each reads what the one before wrote).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from collectives import triton_support  # noqa: E402

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parent.parent


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DGX_EMU_PDL"}
    return {**env, **extra}


def test_pdl_is_off_on_cpu_tensors():
    assert triton_support.use_pdl(torch.zeros(1)) is False
    assert triton_support.pdl_kwargs(torch.zeros(1)) == {"PDL": False}


@pytest.mark.parametrize("value,enabled", [("0", False), ("off", False), ("1", True), ("ON", True), (None, True)])
def test_env_switch(value, enabled):
    env = _env() if value is None else _env(DGX_EMU_PDL=value)
    run = subprocess.run([sys.executable, "-c", "from collectives import triton_support as t; print(t.PDL_ENABLED)"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(enabled)


def test_env_switch_refuses_other_values():
    run = subprocess.run([sys.executable, "-c", "import collectives.triton_support"], cwd=ROOT,
                         env=_env(DGX_EMU_PDL="maybe"), capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "DGX_EMU_PDL must be 0 or 1" in run.stderr


def test_kernels_compile_for_sm90_with_pdl():
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "sm90_compile.py")], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
    if run.returncode == 3 and "SETUP-FAILED" in run.stdout:
        pytest.skip(f"this Triton cannot compile without a GPU here: {run.stdout.strip()}")
    assert run.returncode == 0, run.stderr[-3000:]
    kernels = [json.loads(line) for line in run.stdout.splitlines()]
    names = {k["kernel"] for k in kernels}
    assert names == {"_gemv_kernel", "_quantize_kernel", "_dot_kernel", "_fp8_mma_kernel", "_qkv_rope_cache_kernel",
                     "_split_kernel", "_merge_kernel", "_router_kernel", "_pair_kernel", "_add_rmsnorm_kernel",
                     "_embed_norm_kernel", "_argmax_kernel"}, names
    pairs = [k for k in kernels if k["kernel"] == "_pair_kernel"]  # FC13 pair, FC2 pair; bf16, then FP8
    for k in kernels:
        # the FC13 pair's shared and routed programs take different branches, each with its wait; so do the
        # FP8 FC2 pair's at one row (its sum split: moe_decode.SPLIT_SUM "auto")
        waits = 2 if k in pairs[0::2] or k is pairs[3] else 1
        assert k["launch_pdl"] and k["waits"] == waits and k["launch_dependents"] == waits, k
    dense_gemv, gathered_gemv, fp8_gemv = [k for k in kernels if k["kernel"] == "_gemv_kernel"]
    assert dense_gemv["loads_before_wait"] >= 1 and fp8_gemv["loads_before_wait"] >= 1
    assert gathered_gemv["loads_before_wait"] == 0  # its weight address needs the ids written just before
    assert next(k for k in kernels if k["kernel"] == "_dot_kernel")["loads_before_wait"] >= 1
    assert all(k["loads_before_wait"] >= 1 for k in kernels if k["kernel"] in ("_router_kernel", "_pair_kernel"))
    # the attention splits load `start` and their first block's committed keys and values before the wait
    assert all(k["loads_before_wait"] >= 3 for k in kernels if k["kernel"] == "_split_kernel")


def _chain(gen_seed: int = 0):
    """A decode-like chain on the GPU: FP8 GEMV -> RoPE + cache write -> attention -> gathered SwiGLU
    experts (ids and scores computed by a torch op) -> GEMV; each kernel reads the one before."""
    from model.kernels import decode_attention, linear_small_m as lsm, qkv_rope
    gen = torch.Generator("cuda").manual_seed(gen_seed)
    heads, kv_heads, dim, hidden, slots = 8, 4, 64, 512, 256
    x = torch.randn(1, hidden, device="cuda", generator=gen, dtype=torch.bfloat16)
    w_qkv = torch.randn((heads + 2 * kv_heads) * dim, hidden, device="cuda", generator=gen)
    w_scale = w_qkv.abs().amax(-1) / 448
    w_qkv = (w_qkv / w_scale[:, None]).to(torch.float8_e4m3fn)
    experts = torch.randn(4, 2 * hidden, heads * dim, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.05
    w_down = torch.randn(hidden, hidden, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.05
    k_cache = torch.randn(1, kv_heads, slots, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    v_cache = torch.randn(1, kv_heads, slots, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    start = torch.tensor([100], device="cuda")

    def step():
        qkv = lsm.linear_small_m(x, w_qkv, weight_scale=w_scale, act_quant="token", out_dtype=torch.bfloat16)
        q = qkv_rope.qkv_rope_cache(qkv.view(1, 1, -1), start[:, None], start, k_cache, v_cache, n_heads=heads,
                                    n_kv_heads=kv_heads, head_dim=dim, inv_freq=torch.ones(dim // 2, device="cuda"),
                                    use_rope=True, use_qk_norm=True, eps=1e-5, temperature=None)
        attn = decode_attention.decode_attention(q, k_cache, v_cache, start, start[:, None], scale=dim ** -0.5)
        flat = attn.reshape(1, -1)
        ids = flat.float().sum(-1).abs().long() % 4  # (1,) from the kernel just before
        hidden_act = lsm.linear_small_m(flat, experts, expert_ids=ids, row_scale=torch.sigmoid(flat[:, 0].float()),
                                        swiglu=True)
        return lsm.linear_small_m(hidden_act, w_down)
    return step


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_same_bits_with_and_without_pdl(monkeypatch):
    results = {}
    for enabled in (False, True):
        monkeypatch.setattr(triton_support, "PDL_ENABLED", enabled)
        step = _chain()
        eager = step()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                captured = step()
        torch.cuda.current_stream().wait_stream(stream)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        results[enabled] = (eager.clone(), captured.clone())
    assert triton_support.use_pdl(torch.zeros(1, device="cuda")) == (torch.cuda.get_device_capability()[0] >= 9)
    for off, on in zip(results[False], results[True]):
        assert torch.equal(off, on)
    assert torch.equal(results[True][0], results[True][1])  # graph replay == eager


def test_gemv_variants_compile_for_sm90():
    """The variants benchmarks/gemv_bench.py --variants sweeps (FP8 conversions, split-K, pre-pass
    quantization, fp16 dots, FP8 on the tensor cores) compile for sm90, each with its one wait and
    trigger; the tensor-core kernel's PTX multiplies e4m3 by e4m3 (wgmma / mma) and converts none."""
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "sm90_compile.py"), "variants"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
    if run.returncode == 3 and "SETUP-FAILED" in run.stdout:
        pytest.skip(f"this Triton cannot compile without a GPU here: {run.stdout.strip()}")
    assert run.returncode == 0, run.stderr[-3000:]
    kernels = [json.loads(line) for line in run.stdout.splitlines()]
    assert sum(k["kernel"] == "_gemv_kernel" for k in kernels) == 12
    mma = [k for k in kernels if k["kernel"] == "_fp8_mma_kernel"]  # 64-row tiles, split K; 128-row, SwiGLU
    assert len(mma) == 2 and all(k["wgmma_e4m3"] > 0 and k["cvt_e4m3"] == 0 for k in mma), mma  # nothing converted
    pairs = [k for k in kernels if k["kernel"] == "_pair_kernel"]  # FC13, FC2; 'bits', then 'words'
    assert len(pairs) == 4 and [k["waits"] for k in pairs] == [2, 2, 2, 2]  # one-row FP8 FC2: the split sum
    assert all(k["waits"] == 1 and k["launch_dependents"] == 1 for k in kernels if k not in pairs), kernels
