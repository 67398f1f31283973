"""Decode attention's launch plan on a GPU: split count and key-block size against the default plan.

A decode step's attention (model/kernels/decode_attention.py, RoPE + KV write + split-KV attention +
the merge in ONE launch) reads little: a 512-key context of 8 KV heads is 2 MB in bf16, half a
microsecond of HBM time, yet the kernel took ~10 us per layer in the medium step's trace. It is
latency-bound, so the split count (programs per KV head) and the key block per loop iteration decide
its time more than bandwidth does. This script times the fused kernel as the step runs it (from a CUDA
graph, `CALLS` calls back to back, each on its own layer's cache so the L2 does not hold them) for
each (shape, context, new tokens) over a grid of (n_splits, block_s), checks every plan against the
reference op, and prints the default plan's time, the best plan and the floor (KV bytes / copy
bandwidth measured in the same run).

    python benchmarks/attention_bench.py --out attention_h200.json     # ~1 min on an H200
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import machine, print_table  # noqa: E402
from benchmarks.gemv_bench import bench, copy_tb_s  # noqa: E402

SHAPES = {"medium": (16, 8, 128), "maverick-tp1": (40, 8, 128), "maverick-tp2": (20, 4, 128)}  # Hq, Hkv, D
CONTEXTS = (512, 2048, 8192)
SPLITS = (None, 4, 8, 16, 32, 64)
BLOCKS = (None, 16, 32, 64)
CALLS = 16  # layers' caches rotated through one graph


def cases(shape: str, context: int, n_new: int):
    """Inputs for CALLS calls of the fused kernel: (qkv, positions, start, k_cache, v_cache) each."""
    n_heads, n_kv_heads, head_dim = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(context + n_new)
    start = torch.full((1,), context - n_new, dtype=torch.long, device="cuda")
    positions = start[:, None] + torch.arange(n_new, device="cuda")
    out = []
    for _ in range(CALLS):
        qkv = torch.randn(1, n_new, (n_heads + 2 * n_kv_heads) * head_dim, generator=gen, device="cuda").bfloat16()
        caches = [torch.randn(1, n_kv_heads, context, head_dim, generator=gen, device="cuda").bfloat16() for _ in "kv"]
        out.append((qkv, positions, start, *caches))
    return out


@functools.lru_cache(maxsize=None)
def _inv_freq(head_dim: int) -> torch.Tensor:
    """Made once: inside the timed graph it would add its own kernels to every call."""
    return 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim))


def run(qkv, positions, start, k_cache, v_cache, shape: str, n_splits, block_s, launch=None, temperature=True):
    from model.kernels.decode_attention import rope_decode_attention
    n_heads, n_kv_heads, head_dim = SHAPES[shape]
    return rope_decode_attention(qkv, positions, start, k_cache, v_cache, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                 head_dim=head_dim, inv_freq=_inv_freq(head_dim), use_rope=True, use_qk_norm=False,
                                 eps=1e-5, temperature=(8192.0, 0.1) if temperature else None,
                                 scale=head_dim ** -0.5, n_splits=n_splits, block_s=block_s, launch=launch)


# --variants: what the fused kernel's time is made of, at context 512 (the decode benchmarks' context)
VARIANTS = [("default", {}), ("merge unroll 1", {"launch": {"MERGE_UNROLL": 1}}),
            ("merge unroll 2", {"launch": {"MERGE_UNROLL": 2}}), ("merge unroll 16", {"launch": {"MERGE_UNROLL": 16}}),
            ("warps 4", {"launch": {"num_warps": 4}}),
            ("warps 2", {"launch": {"num_warps": 2}}), ("stages 1", {"launch": {"num_stages": 1}}),
            ("no temperature", {"temperature": False}), ("splits 4", {"n_splits": 4}), ("splits 16", {"n_splits": 16}),
            ("splits 4 unroll 4", {"n_splits": 4, "launch": {"MERGE_UNROLL": 4}})]


def variants(shapes: list[str], tokens: list[int], names: list[str] | None = None) -> list[dict]:
    """Each VARIANTS entry (or those named) timed per shape at context 512, against the default."""
    results = []
    for shape in shapes:
        for n_new in tokens:
            inputs = cases(shape, 512, n_new)
            want = run(*[t.clone() for t in inputs[0]], shape, None, None).float()
            for name, knobs in [(n, k) for n, k in VARIANTS if names is None or n == "default" or n in names]:
                kw = dict(n_splits=knobs.get("n_splits"), block_s=None, launch=knobs.get("launch"),
                          temperature=knobs.get("temperature", True))
                got = run(*[t.clone() for t in inputs[0]], shape, **kw).float()
                if knobs.get("temperature", True) and not torch.allclose(got, want, rtol=2e-2, atol=2e-2):
                    raise AssertionError(f"{shape} T {n_new}: variant {name} differs by {(got - want).abs().max():.3g}")
                it = iter(range(1 << 30))
                us = bench(lambda: run(*inputs[next(it) % CALLS], shape, **kw), CALLS)
                results.append({"shape": shape, "context": 512, "tokens": n_new, "variant": name, "us": us})
                print(f"  {shape} T {n_new} {name}: {us:.2f} us", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--tokens", default="1,4")
    parser.add_argument("--variants", action="store_true", help="time VARIANTS of the default plan at context 512")
    parser.add_argument("--only", help="with --variants: these variants (comma-separated names) and the default")
    args = parser.parse_args()
    bandwidth = copy_tb_s()
    print(f"copy bandwidth {bandwidth:.2f} TB/s; {torch.cuda.get_device_name()}")
    if args.variants:
        results = variants(args.shapes.split(","), [int(t) for t in args.tokens.split(",")],
                           args.only.split(",") if args.only else None)
        base = {(r["shape"], r["tokens"]): r["us"] for r in results if r["variant"] == "default"}
        print_table(["shape", "tok", "variant", "us", "/ default"],
                    [[r["shape"], r["tokens"], r["variant"], round(r["us"], 2), round(r["us"] / base[(r["shape"], r["tokens"])], 3)]
                     for r in results])
        if args.out:
            args.out.write_text(json.dumps({"machine": machine(), "copy_tb_s": bandwidth, "command":
                                            "python " + " ".join(sys.argv), "results": results}, indent=1))
        return
    rows, results = [], []
    for shape in args.shapes.split(","):
        for context in CONTEXTS:
            for n_new in map(int, args.tokens.split(",")):
                inputs = cases(shape, context, n_new)
                kv_bytes = 2 * inputs[0][3].nbytes
                floor = kv_bytes / (bandwidth * 1e12 / 2) * 1e6  # copy bandwidth counts read + write
                want = run(*[t.clone() for t in inputs[0]], shape, None, None).float()
                timed = {}
                for n_splits in SPLITS:
                    for block_s in BLOCKS:
                        try:
                            got = run(*[t.clone() for t in inputs[0]], shape, n_splits, block_s).float()
                        except ValueError:
                            continue  # a plan this shape refuses
                        if not torch.allclose(got, want, rtol=2e-2, atol=2e-2):
                            raise AssertionError(f"{shape} ctx {context} T {n_new}: plan {n_splits}/{block_s} "
                                                 f"differs from the default plan by {(got - want).abs().max():.3g}")
                        it = iter(range(1 << 30))
                        timed[(n_splits, block_s)] = bench(lambda: run(*inputs[next(it) % CALLS], shape, n_splits,
                                                                       block_s), CALLS)
                default = timed[(None, None)]
                (best_splits, best_block), best = min(timed.items(), key=lambda kv: kv[1])
                rows.append([shape, context, n_new, round(default, 2), round(best, 2), f"{best_splits}/{best_block}",
                             round(floor, 2), round(default / floor, 1)])
                results.append({"shape": shape, "context": context, "tokens": n_new, "default_us": default,
                                "best_us": best, "best_plan": [best_splits, best_block], "floor_us": floor,
                                "all_us": {f"{s}/{b}": t for (s, b), t in timed.items()}})
                print(f"  {shape} ctx {context} T {n_new}: default {default:.2f} us, best {best:.2f} "
                      f"({best_splits}/{best_block})", flush=True)
    print_table(["shape", "context", "tok", "default us", "best us", "best splits/block", "floor us", "x floor"], rows)
    if args.out:
        args.out.write_text(json.dumps({"machine": machine(), "copy_tb_s": bandwidth, "results": results}, indent=1))


if __name__ == "__main__":
    main()
