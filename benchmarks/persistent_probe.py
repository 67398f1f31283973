"""Does a persistent decode kernel pay on this GPU? The decode step's weight stream, as one kernel.

The medium decode step reads ~740 MB (BF16) or ~440 MB (FP8 layers, BF16 LM head) of weights in 25
GEMVs, one kernel each under PDL. On an H200 the FP8 step is 0.95x the BF16 one for a floor ratio of
0.6 (#14's target: 0.7), because each GEMV kernel costs ~1-3 us beyond its bytes. This times the same
weight stream chained through one vector (per layer QKV -> o_proj -> FC13 + SwiGLU -> FC2, then the
LM head; benchmarks/persistent_chain.py) four ways, in one process, against the floor:
  * lsm:      one linear_small_m launch per GEMV (the decode step's kernels, PDL, tuned tiles);
  * phases:   the persistent kernel's phases as one launch each (no PDL: what barriers replace);
  * persist:  one launch, grid barriers between phases (+ the counter's memset);
  * barriers: the persistent kernel's barriers alone, to cost one.
Every variant's outputs are checked against torch phase by phase, and the persistent launch against
the phase launches bit for bit, before it is timed. Times are CUDA-graph replays (events, medians).

    python benchmarks/persistent_probe.py --out results.json [--dtypes bf16,fp8] [--quick]
        [--no-persistent] [--lsm-variants 'BLOCK_N=8,num_warps=4;PREQUANT=1'] [--given-fp8] [--static-fp8]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import machine, print_table  # noqa: E402

MEDIUM = dict(n_layers=8, hidden=2048, qkv=4096, inter=4096, vocab=32768)
# (engine, tiles, warps): the tile engines and shapes tried; BN_* rows of W per tile, BLOCK_K its depth
CONFIGS = [
    ("fma", {}, 8),
    ("fma", {"BN_QKV": 32, "BN_UP": 32, "BN_LM": 32, "BLOCK_K": 256}, 8),
    ("fma", {"BN_QKV": 8, "BN_O": 8, "BN_UP": 8, "BN_DOWN": 8, "BN_LM": 8, "BLOCK_K": 1024}, 8),
    ("dot", {}, 4),
    ("dot", {}, 8),
    ("dot", {"BN_QKV": 32, "BN_UP": 32, "BN_LM": 32, "BLOCK_K": 256}, 8),
    ("dot", {"BLOCK_K": 256}, 4),
]


def graph_us(fn, calls: int, replays: int) -> tuple[float, float]:
    """(median, p90) GPU microseconds per call from CUDA-graph replays (gemv_bench.graph_times)."""
    from benchmarks.gemv_bench import graph_times
    times = sorted(graph_times(fn, calls, replays))
    return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30))


def lsm_chain(w: dict, x_buf, given: dict | None = None, static_scale: torch.Tensor | None = None):
    """The chain as linear_small_m launches (the decode path's GEMV kernels) from x_buf[0]; returns logits.
    given: {K: (x_q, scales)} handed to every FP8 GEMV of depth K as x_fp8 (fixed inputs, not the chain's
    values: the GEMVs' cost were their activations quantized by the producers, an upper bound).
    static_scale: a float32 scalar, every FP8 GEMV's static activation scale (the per-tensor scheme: x
    quantized in the kernel without an amax pass)."""
    from model.kernels.linear_small_m import linear_small_m
    hidden = w["o"].shape[-1]

    def lin(v, name, layer, swiglu=False, out_dtype=None):
        weight = w[name] if layer is None else w[name][layer]
        scale = w["s_" + name] if layer is None else w["s_" + name][layer]
        kw = {"weight_scale": scale, "act_quant": "token" if static_scale is None else static_scale} \
            if weight.dtype == torch.float8_e4m3fn else {}
        if kw and given is not None:
            kw["x_fp8"] = given[v.shape[-1]]
        return linear_small_m(v, weight, swiglu=swiglu, out_dtype=out_dtype, **kw)

    def run():
        h = x_buf[0:1]
        for layer in range(w["qkv"].shape[0]):
            qkv = lin(h, "qkv", layer)
            o = lin(qkv[:, :hidden], "o", layer)
            act = lin(o, "up", layer, swiglu=True)
            h = lin(act, "down", layer)
        return lin(h, "lm", None, out_dtype=torch.float32)
    return run


def torch_chain(w: dict, x: torch.Tensor, P) -> torch.Tensor:
    """The chain's logits in torch, each phase on the one before's torch output (rounded as the kernels')."""
    hidden, n_layers = w["o"].shape[-1], w["qkv"].shape[0]
    v = x.to(torch.bfloat16)
    for phase in range(P.PHASES_PER_LAYER * n_layers + 1):
        v = P.reference_phase(w, phase, v)
        if phase % P.PHASES_PER_LAYER == 0 and phase < P.PHASES_PER_LAYER * n_layers:
            v = v[:hidden]  # o_proj reads the QKV output's first `hidden` values
    return v


def weight_bytes(w: dict) -> int:
    return sum(t.numel() * t.element_size() for t in w.values())


def probe(dtype_name: str, copy_tb_s: float, configs, calls: int, replays: int, rows: list,
          lsm_variants: list[str], given_fp8: bool = False, static_fp8: bool = False) -> None:
    from benchmarks import persistent_chain as P
    dtype = P.FP8 if dtype_name == "fp8" else torch.bfloat16
    x = torch.randn(MEDIUM["hidden"], device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    w = P.chain_weights(**MEDIUM, dtype=dtype, device="cuda", seed=1, lm_dtype=torch.bfloat16, x=x)
    floor = weight_bytes(w) / (copy_tb_s * 1e6)  # us
    base = {"dtype": dtype_name, "floor_us": round(floor, 2), "bytes": weight_bytes(w)}

    def add(name, med, p90, **extra):
        rows.append({**base, "name": name, "median_us": round(med, 2), "p90_us": round(p90, 2),
                     "x_floor": round(med / floor, 3), **extra})
        print(f"  {dtype_name} {name}: {med:.1f} us ({med / floor:.2f}x floor) {extra}", flush=True)

    chain = P.GemvChain(w)
    chain.run(x, barrier=False)
    torch_logits = torch_chain(w, x, P)
    run = lsm_chain(w, chain.x_buf)
    from model.kernels import linear_small_m as lsm
    overrides = lsm.ENV_OVERRIDES[P.FP8]  # what linear_small_m reads at every call
    saved = dict(overrides)
    try:
        for variant in lsm_variants if dtype == P.FP8 else [""]:
            overrides.clear()
            overrides.update(lsm.parse_overrides(variant, "--lsm-variants"))
            logits = run()
            add("lsm " + (variant or "default"), *graph_us(run, calls, replays),
                rel_err_logits=round(rel_err(logits[0], torch_logits), 5))
    finally:
        overrides.clear()
        overrides.update(saved)
    if given_fp8 and dtype == P.FP8:
        from model.kernels.fp8_mma import prequantize
        given = {k: prequantize(torch.randn(1, k, device="cuda").to(torch.bfloat16), None, "token")
                 for k in (MEDIUM["hidden"], MEDIUM["inter"])}
        add("lsm x_fp8 given (upper bound)", *graph_us(lsm_chain(w, chain.x_buf, given), calls, replays))
    if static_fp8 and dtype == P.FP8:  # timing only: one scale for every GEMV (values saturate where they exceed it)
        static = torch.tensor(1.0 / 64, device="cuda")
        add("lsm static x scale (per-tensor)", *graph_us(lsm_chain(w, chain.x_buf, static_scale=static), calls,
                                                         replays))
    for engine, tiles, warps in configs:
        label = f"{engine} w{warps} " + (",".join(f"{k}={v}" for k, v in tiles.items()) or "default")
        try:
            chain = P.GemvChain(w, engine=engine, tiles=tiles, num_warps=warps)
            chain.run(x, barrier=False)
            want = P.reference_phases(w, chain.inputs())
            err = max(rel_err(g, r) for g, r in zip(chain.outputs(), want))
            per_phase = [t.clone() for t in chain.outputs()]
            chain.run(x, barrier=True)
            torch.cuda.synchronize()
            chain.check_barriers()
            same = all(torch.equal(a, b) for a, b in zip(per_phase, chain.outputs()))
            def launch():
                chain.counter.zero_()
                chain._launch(0, chain.phases, True)
            add("persist " + label, *graph_us(launch, calls, replays), max_rel_err=round(err, 5), same_bits=same)
            phases = lambda: [chain._launch(p, p + 1, False) for p in range(chain.phases)]  # noqa: E731
            add("phases " + label, *graph_us(phases, calls, replays))
            chain.check_barriers()
        except Exception as exc:  # a config that does not compile or fit is reported, not fatal
            print(f"  {dtype_name} {label}: FAILED {type(exc).__name__}: {str(exc)[-300:]}", flush=True)
            rows.append({**base, "name": "persist " + label, "error": f"{type(exc).__name__}: {str(exc)[-300:]}"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--dtypes", default="bf16,fp8")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--replays", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="the first config of each engine only")
    p.add_argument("--no-persistent", action="store_true", help="time the linear_small_m chain only")
    p.add_argument("--lsm-variants", default="", help="';'-separated DGX_EMU_GEMV_FP8 overrides for the FP8 "
                   "linear_small_m chain, e.g. 'BLOCK_N=8,num_warps=4;CVT=words' (the default is always timed first)")
    p.add_argument("--given-fp8", action="store_true", help="also time the FP8 chain with every GEMV handed its "
                   "activation already quantized (x_fp8; fixed inputs): what producer-side quantization could save")
    p.add_argument("--static-fp8", action="store_true", help="also time the FP8 chain with a static activation "
                   "scale (the per-tensor scheme's in-kernel quantization: no amax pass)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("persistent_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    from benchmarks.gemv_bench import copy_tb_s
    from benchmarks import persistent_chain as P
    copy = copy_tb_s()
    print(f"copy bandwidth {copy:.3f} TB/s", flush=True)
    rows: list = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    counter, err = torch.zeros(1, dtype=torch.int32, device="cuda"), torch.zeros(1, dtype=torch.int32, device="cuda")
    for n in (0, 33):
        med, p90 = graph_us(lambda: P.barriers(counter, err, n, sms), 20, 15)
        rows.append({"name": f"barriers {n}", "median_us": round(med, 2), "p90_us": round(p90, 2), "programs": sms})
        print(f"  {n} barriers (+ memset, launch): {med:.2f} us", flush=True)
    if int(err.item()):
        raise RuntimeError("a grid barrier timed out")
    configs = CONFIGS if not args.quick else [c for i, c in enumerate(CONFIGS) if c[0] not in
                                              {e for e, _, _ in CONFIGS[:i]}]
    variants = [""] + [v.strip() for v in args.lsm_variants.split(";") if v.strip()]
    for name in args.dtypes.split(","):
        probe(name, copy, [] if args.no_persistent else configs, args.calls, args.replays, rows, variants,
              args.given_fp8, args.static_fp8)
    print_table(["dtype", "name", "median us", "x floor"],
                [[r.get("dtype", ""), r["name"], r.get("median_us", "-"), r.get("x_floor", "-")] for r in rows])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    payload = {"machine": torch.cuda.get_device_name(0), "host": machine(), "date": time.strftime("%Y-%m-%d"),
               "commit": commit, "command": "python benchmarks/persistent_probe.py " + " ".join(argv or sys.argv[1:]),
               "copy_bandwidth_tb_s": round(copy, 3), "shape": MEDIUM, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
