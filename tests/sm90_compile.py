"""Compiles the decode kernels for an H100/H200 (sm90) on a machine without a GPU, and reports
where programmatic-dependent-launch instructions and global loads sit in each kernel's PTX.

Why: Triton's interpreter (how the CPU tests run the kernels) never traces the `PDL` branches, so
without this a typo in them would first show on a lent GPU. Triton compiles for a named target
without a device when its driver is replaced by a stand-in that names the target; kernels are then
compiled (`warmup`) and never launched: outputs are garbage, only the binaries matter.

Run as a script (it must start with TRITON_INTERPRET unset): prints one JSON line per compiled
kernel with its name, launch_pdl, the counts of griddepcontrol.wait / .launch_dependents, and
the number of global loads issued before the wait. `sm90_compile.py variants` compiles the GEMV
variants of the benchmark sweep instead of the decode path's kernels.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

FP8 = torch.float8_e4m3fn


class _Sm90Driver:
    """Just enough of Triton's driver for compiling: the target, device 0, stream 0."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _install() -> list:
    """Compile-only launches against the stand-in driver; returns the list compiled kernels go to."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction
    driver.set_active(_Sm90Driver())
    compiled, original = [], JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, bool(kwargs.get("launch_pdl", False)), kernel))
        return kernel
    JITFunction.run = run
    return compiled


def _summary(name: str, pdl: bool, kernel) -> dict:
    lines = kernel.asm["ptx"].splitlines()
    waits = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
    loads_before = sum("ld.global" in line for line in lines[:waits[0]]) if waits else 0
    return {"kernel": name, "launch_pdl": pdl, "waits": len(waits),
            "launch_dependents": sum("griddepcontrol.launch_dependents" in line for line in lines),
            "loads_before_wait": loads_before,
            "wgmma_e4m3": sum("wgmma.mma_async" in line and "e4m3.e4m3" in line for line in lines),
            "mma_e4m3": sum("mma.sync" in line and "e4m3.e4m3" in line for line in lines),
            "cvt_e4m3": sum("cvt." in line and "e4m3" in line for line in lines)}


def _decode_kernels() -> None:
    """Every decode kernel of the fused path once, at medium's shapes (bf16 and FP8)."""
    from collectives import triton_support
    from model.kernels import decode_attention, linear_small_m as lsm, qkv_rope
    triton_support.use_pdl = lambda x: True  # CPU tensors stand in for CUDA ones
    lsm.available = qkv_rope.available = lambda x: True
    x1, x4 = torch.randn(1, 2048, dtype=torch.bfloat16), torch.randn(4, 2048, dtype=torch.bfloat16)
    w = torch.randn(4096, 2048, dtype=torch.bfloat16)
    experts = torch.randn(4, 4096, 2048, dtype=torch.bfloat16)
    wq, ws = w.to(FP8), torch.ones(4096)
    lsm.linear_small_m(x1, w)
    lsm.linear_small_m(x1, experts, expert_ids=torch.zeros(1, dtype=torch.int32), row_scale=torch.ones(1),
                       swiglu=True)
    lsm.linear_small_m(x1, wq, weight_scale=ws, act_quant="token")
    lsm.linear_small_m(x4, w)  # tl.dot on 16-row tiles
    lsm.linear_small_m(x4, wq, weight_scale=ws, act_quant="token", swiglu=True)  # pre-pass + the tensor cores
    heads, kv_heads, dim, slots = 16, 8, 128, 1024
    qkv = torch.randn(1, 1, (heads + 2 * kv_heads) * dim, dtype=torch.bfloat16)
    k_cache = torch.zeros(1, kv_heads, slots, dim, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    pos, start = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    q = qkv_rope.qkv_rope_cache(qkv, pos, start, k_cache, v_cache, n_heads=heads, n_kv_heads=kv_heads,
                                head_dim=dim, inv_freq=torch.ones(dim // 2), use_rope=True, use_qk_norm=False,
                                eps=1e-5, temperature=(8192.0, 0.1))
    decode_attention.decode_attention(q, k_cache, v_cache, start, pos, scale=dim ** -0.5, chunk_size=8192)
    decode_attention.decode_attention(q, k_cache, v_cache, start, pos, scale=dim ** -0.5, fused_merge=False)
    decode_attention.rope_decode_attention(qkv, pos, start, k_cache, v_cache, n_heads=heads, n_kv_heads=kv_heads,
                                           head_dim=dim, inv_freq=torch.ones(dim // 2), use_rope=True,
                                           use_qk_norm=True, eps=1e-5, temperature=(8192.0, 0.1),
                                           scale=dim ** -0.5, chunk_size=8192)
    _moe_kernels(x1)
    from collectives import fused_norm
    fused_norm.available = lambda x: True
    fused_norm.add_rmsnorm(x1, x1, torch.ones(2048, dtype=torch.bfloat16), 1e-5)
    fused_norm.add_rmsnorm(x1, None, torch.ones(2048, dtype=torch.bfloat16), 1e-5)  # no residual
    _head_and_pick_kernels()


def _head_and_pick_kernels() -> None:
    """The step's head (embedding + first RMSNorm + positions and lengths) and its greedy pick (the
    argmax, then its (max, id) pair), at medium's widths."""
    from model.kernels import argmax, embed_norm
    embed_norm.available = lambda token_ids, weight: True
    argmax.available = lambda logits: True
    weight, norm_weight = torch.randn(32768, 2048, dtype=torch.bfloat16), torch.ones(2048, dtype=torch.bfloat16)
    one = torch.ones(1, dtype=torch.long)
    embed_norm.embed_norm(one[:, None], weight, norm_weight=norm_weight, lengths=one.clone(), n_new=one)
    logits = torch.randn(1, 32768, dtype=torch.bfloat16)
    argmax.argmax(logits)
    argmax.max_argmax(logits)


def _moe_kernels(x1: torch.Tensor) -> None:
    """Router (one expert block per row, then several: the atomic reduction) and the MoE pairs."""
    from model.kernels import moe_decode
    moe_decode._scratch = lambda device: (torch.zeros(16, dtype=torch.int64), torch.zeros(16, dtype=torch.int32))
    moe_decode.route_top1(x1, torch.randn(16, 2048, dtype=torch.bfloat16))
    ids, scores = moe_decode.route_top1(x1, torch.randn(128, 2048, dtype=torch.bfloat16), block_e=4)
    for fp8 in (False, True):
        shared = {"weight": torch.randn(4096, 2048, dtype=torch.bfloat16)}
        routed = {"weight": torch.randn(16, 4096, 2048, dtype=torch.bfloat16)}
        shared_down = {"weight": torch.randn(2048, 2048, dtype=torch.bfloat16)}
        routed_down = {"weight": torch.randn(16, 2048, 2048, dtype=torch.bfloat16)}
        if fp8:
            for args in (shared, routed, shared_down, routed_down):
                args.update(weight=args["weight"].to(FP8), weight_scale=torch.ones(args["weight"].shape[:-1]),
                            act_quant="token", out_dtype=torch.bfloat16)
        h_s, h_r = moe_decode.dual_gate_up(x1, shared, routed, ids, scores)
        moe_decode.dual_down(h_s, h_r, shared_down, routed_down, ids)


def _variant_kernels() -> None:
    """The GEMV variants benchmarks/gemv_bench.py --variants sweeps (FP8 conversions, split-K, fp16 dots)."""
    from collectives import triton_support
    from model.kernels import linear_small_m as lsm
    triton_support.use_pdl = lambda x: True
    lsm.available = lambda x: True
    lsm._counters = lambda device, n: torch.zeros(n, dtype=torch.int32)
    x1, x4 = torch.randn(1, 2048, dtype=torch.bfloat16), torch.randn(4, 2048, dtype=torch.bfloat16)
    wq, ws = torch.randn(4096, 2048).to(FP8), torch.ones(4096)
    experts, experts_scale = torch.randn(4, 4096, 2048).to(FP8), torch.ones(4, 4096)
    for cfg in ({"CVT": "bits"}, {"CVT": "words"}, {"SPLIT_K": 2}, {"CVT": "words", "SPLIT_K": 4, "num_stages": 2},
                {"PREQUANT": True}, {"PREQUANT": True, "CVT": "bits"}):
        lsm.linear_small_m(x1, wq, weight_scale=ws, act_quant="token", config=cfg)
        lsm.linear_small_m(x1, experts, expert_ids=torch.zeros(1, dtype=torch.int32), weight_scale=experts_scale,
                           act_quant="token", swiglu=True, config=cfg)
    lsm.linear_small_m(x4, wq, weight_scale=ws, act_quant="token", config={"DOT_F16": True})
    for x, cfg in ((x1, {"MMA": True}), (x4, {"MMA": True, "SPLIT_K": 1, "BLOCK_N": 128})):  # FP8 tensor cores
        lsm.linear_small_m(x, wq, weight_scale=ws, act_quant="token", swiglu=x is x4, config=cfg)
    from model.kernels import moe_decode
    ids, scores = torch.zeros(1, dtype=torch.int32), torch.ones(1, dtype=torch.bfloat16)
    fp8 = dict(act_quant="token", out_dtype=torch.bfloat16)
    shared = {"weight": wq, "weight_scale": ws, **fp8}
    routed = {"weight": experts, "weight_scale": experts_scale, **fp8}
    down_s = {"weight": torch.randn(2048, 2048).to(FP8), "weight_scale": torch.ones(2048), **fp8}
    down_r = {"weight": torch.randn(4, 2048, 2048).to(FP8), "weight_scale": torch.ones(4, 2048), **fp8}
    for cvt in ("bits", "words"):
        h_s, h_r = moe_decode.dual_gate_up(x1, shared, routed, ids, scores, config={"CVT": cvt})
        moe_decode.dual_down(h_s, h_r, down_s, down_r, ids, config={"CVT": cvt})


def main() -> int:
    try:
        compiled = _install()
    except (ImportError, AttributeError, TypeError) as exc:  # another Triton's internals: nothing compiled
        print(f"SETUP-FAILED: {type(exc).__name__}: {exc}")
        return 3
    if sys.argv[1:] == ["variants"]:
        _variant_kernels()
    else:
        _decode_kernels()
    for name, pdl, kernel in compiled:
        print(json.dumps(_summary(name, pdl, kernel)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
