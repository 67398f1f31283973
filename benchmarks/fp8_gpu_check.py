"""FP8 on a CUDA GPU: the tensor-core path checked against float64 and the CPU emulation, and timed.

  1. GEMM numerics: Fp8Linear on CUDA (one torch._scaled_mm, scales fused) for each scheme and
     shapes with unaligned K offsets, against a float64 reference of the same quantized operands.
     `bound_ratio_fp32` is the worst |gpu - f64| / (float32 accumulation bound); the check is
     against the same bound with ~14 accumulation bits (ratio <= 2^10), what Hopper's FP8 tensor
     cores keep (DeepSeek-V3 report, 3.3.2). The CPU emulation's ratio must be <= 1.
  2. Model: the tiny preset quantized at load, every scheme, BF16 or FP8 KV cache, float32 compute:
     the FP8 logits' relative error against the fp32 model, on CUDA and with the CPU emulation.
     They differ (a different summation flips the odd e4m3 rounding, and flips cascade in this
     random model), so the check is that CUDA's error is at most 1.25x the emulation's.
  3. GEMM speed at decode token counts on Maverick TP8 shard shapes: BF16 matmul; Fp8Linear
     forward as it runs by default (one-kernel activation quantization + FP8 GEMM: Triton up to 16
     rows, else cuBLAS), each scheme; the channel scheme on cuBLAS only, and with torch-op
     quantization (the path before the kernels); the bare torch._scaled_mm (row-wise scales, BF16
     out); and the
     HBM floors (weight bytes / 4.8 TB/s). Each timed two ways (CUDA events around 50 calls, median
     of 15): eager (Python dispatch and launches included) and replayed from a CUDA graph (GPU time).

    python benchmarks/fp8_gpu_check.py --out "$OUT"      # writes $OUT/fp8_gpu.json, exits 1 on a failed check
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import machine, median, print_table  # noqa: E402
from collectives.communicator import SingleRankCommunicator  # noqa: E402
from model.config import tiny  # noqa: E402
from model import fp8 as fp8_module  # noqa: E402
from model.embedded import random_state_dict, write_checkpoint  # noqa: E402
from model.fp8 import SCHEMES, Fp8Linear, quantize_activation, quantize_weight, to_groups  # noqa: E402
from model.parallel import layout  # noqa: E402
from workers.model_build import build_model  # noqa: E402

SHAPES = {"qkv 5120x896": (5120, 896), "o_proj 640x5120": (640, 5120), "expert fc13 5120x2048": (5120, 2048),
          "expert fc2 1024x5120": (1024, 5120), "dense fc13 5120x4096": (5120, 4096)}
HBM_BYTES_PER_S = 4.8e12  # H200; B200: 8e12


def make_linear(scheme_name: str, k: int, n: int, k_offset: int, seed: int) -> Fp8Linear:
    scheme = SCHEMES[scheme_name]
    layer = Fp8Linear(k, n, scheme, torch.float32, k_offset=k_offset)
    lead = k_offset % 128 if scheme.weight == "block" else 0
    w = torch.nn.functional.pad(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), (lead, 0))
    w_q, scale = quantize_weight(w, scheme.weight)
    layer.weight.data.copy_(w_q[:, lead:])
    layer.weight_scale.data.copy_(scale.repeat_interleave(128, 0)[:n] if scheme.weight == "block"
                                  else scale.reshape(-1).expand(n))
    if layer.input_scale is not None:
        layer.input_scale.data.fill_(0.02)
    return layer


def check_gemms() -> list[dict]:
    rows = []
    for name in SCHEMES:
        for m, k, n, off in [(1, 5120, 896, 0), (16, 640, 5120, 640), (33, 1024, 2048, 64), (128, 320, 256, 64)]:
            layer = make_linear(name, k, n, off, seed=m + k)
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
            x_q, x_scale = quantize_activation(x, layer.scheme, layer.input_scale, layer.k_offset)
            a, b = x_q.double(), layer.weight.double()
            if layer.weight_scale.dim() == 1:
                ref = (a @ b.t()) * x_scale.double() * layer.weight_scale.double()
                mag = (a.abs() @ b.abs().t()) * x_scale.double() * layer.weight_scale.double()
            else:
                ga, gb = to_groups(a, layer.k_offset), to_groups(b, layer.k_offset)
                sx, sw = x_scale.double().t()[:, :, None], layer.weight_scale.double().t()[:, None]
                ref = (torch.einsum("mgk,ngk->gmn", ga, gb) * sx * sw).sum(0)
                mag = (torch.einsum("mgk,ngk->gmn", ga.abs(), gb.abs()) * sx * sw).sum(0)
            bound = (k + 2 + layer.weight_scale.shape[-1]) * 2.0 ** -24 * mag + 1e-30
            gpu = layer.to("cuda")(x.cuda()).double().cpu()
            cpu = make_linear(name, k, n, off, seed=m + k)(x).double()
            rows.append({"scheme": name, "M": m, "K": k, "N": n, "k_offset": off,
                         "bound_ratio_fp32": float(((gpu - ref).abs() / bound).max()),
                         "rel_err_vs_f64": float((gpu - ref).norm() / ref.norm()),
                         "cpu_bound_ratio": float(((cpu - ref).abs() / bound).max())})
    return rows


def check_model() -> list[dict]:
    cfg = tiny(vocab_size=509)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), cfg, random_state_dict(cfg, seed=12, std=0.08))
        ids = torch.randint(0, cfg.vocab_size, (2, 70), generator=torch.Generator().manual_seed(5))
        def logits(device, dtype, scheme="auto", kv="auto"):
            run = SimpleNamespace(model_path=tmp, device=device, torch_dtype=torch.float32, dtype=dtype,
                                  fp8_scheme=scheme, kv_dtype=kv)
            model, _ = build_model(run, cfg, layout(cfg), SingleRankCommunicator())
            cache = model.new_cache(2, 70, torch.float8_e4m3fn if kv == "fp8" else None)
            return model(ids.to(device), cache).logits.double().cpu()

        exact = logits("cpu", "fp32")
        for scheme in ("per-tensor", "channel", "block"):
            for kv in ("auto", "fp8"):
                err = {d: float((logits(d, "fp8", scheme, kv) - exact).norm() / exact.norm()) for d in ("cpu", "cuda")}
                rows.append({"scheme": scheme, "kv": kv, "fp8_rel_err_cpu": err["cpu"],
                             "fp8_rel_err_cuda": err["cuda"]})
    return rows


def _time_eager_ms(fn, calls: int = 50, repeats: int = 15) -> float:
    """Per call, `calls` eager calls back to back between two events (median of repeats): what a
    Python loop pays, launch and dispatch included."""
    for _ in range(5):
        fn()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return median(samples)


def _time_graph_ms(fn, calls: int = 50, repeats: int = 15) -> float:
    """Per call, `calls` calls captured in one CUDA graph and replayed (median of repeats): the GPU
    time with launch overhead gone, as a captured decode step would see it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return median(samples)


def _with_flags(layer, **flags):
    """`layer`'s forward with model/fp8.py's switches set as given (e.g. FUSED_QUANT=False)."""
    def call(x):
        saved = {name: getattr(fp8_module, name) for name in flags}
        for name, value in flags.items():
            setattr(fp8_module, name, value)
        try:
            return layer(x)
        finally:
            for name, value in saved.items():
                setattr(fp8_module, name, value)
    return call


def time_gemms() -> list[dict]:
    """Per shape and token count: BF16 matmul; Fp8Linear per scheme as it runs by default
    (one-kernel quantization; Triton GEMM up to 16 rows, else cuBLAS); Fp8Linear channel on cuBLAS
    only (SMALL_M_TRITON=0), and with torch-op quantization (the path before the kernels); the bare
    torch._scaled_mm; each eager and in a CUDA graph."""
    rows = []
    for shape, (k, n) in SHAPES.items():
        w_bf16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        layers = {name: make_linear(name, k, n, 0, seed=1).to("cuda") for name in SCHEMES}
        for name in layers:
            layers[name].out_dtype = torch.bfloat16
        for m in (1, 4, 16, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            lin = layers["channel"]
            x_q, x_scale = quantize_activation(x, lin.scheme)
            candidates = {"bf16": lambda: x @ w_bf16.t(),
                          **{f"fp8_{name}": (lambda layer=layer: layer(x)) for name, layer in layers.items()},
                          "fp8_channel_cublas": lambda: _with_flags(lin, SMALL_M_TRITON=0)(x),
                          "fp8_channel_torch_quant": lambda: _with_flags(lin, FUSED_QUANT=False)(x),
                          "scaled_mm_only": lambda: torch._scaled_mm(
                              x_q, lin.weight.t(), scale_a=x_scale, scale_b=lin.weight_scale[None],
                              out_dtype=torch.bfloat16)}
            row = {"shape": shape, "M": m, "hbm_floor_bf16_ms": 2 * n * k / HBM_BYTES_PER_S * 1e3,
                   "hbm_floor_fp8_ms": n * k / HBM_BYTES_PER_S * 1e3}
            for name, fn in candidates.items():
                row[f"{name}_eager_ms"] = _time_eager_ms(fn)
                row[f"{name}_graph_ms"] = _time_graph_ms(fn)
            rows.append(row)
            print(f"{shape} M={m}: bf16 graph {row['bf16_graph_ms'] * 1e3:.1f} us, fp8 channel graph "
                  f"{row['fp8_channel_graph_ms'] * 1e3:.1f} us; eager {row['bf16_eager_ms'] * 1e3:.1f} / "
                  f"{row['fp8_channel_eager_ms'] * 1e3:.1f} us", file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".", help="directory for fp8_gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU", file=sys.stderr)
        return 2
    start = time.perf_counter()
    result = {"machine": machine(), "device": torch.cuda.get_device_name(0)}
    result["gemm_numerics"] = check_gemms()
    result["model"] = check_model()
    result["gemm_speed"] = time_gemms()
    ok = (all(r["bound_ratio_fp32"] <= 2 ** 10 and r["cpu_bound_ratio"] <= 1 for r in result["gemm_numerics"])
          and all(r["fp8_rel_err_cuda"] <= 1.25 * r["fp8_rel_err_cpu"] for r in result["model"]))
    result["ok"], result["seconds"] = ok, time.perf_counter() - start
    print_table(["scheme", "M", "K", "N", "k_offset", "gpu/fp32 bound", "gpu rel err", "cpu/fp32 bound"],
                [[r["scheme"], r["M"], r["K"], r["N"], r["k_offset"], r["bound_ratio_fp32"],
                  f"{r['rel_err_vs_f64']:.2e}", r["cpu_bound_ratio"]] for r in result["gemm_numerics"]])
    print_table(["scheme", "kv", "FP8 logits rel err (cpu)", "(cuda)"],
                [[r["scheme"], r["kv"], r["fp8_rel_err_cpu"], r["fp8_rel_err_cuda"]] for r in result["model"]])
    names = (["bf16"] + [f"fp8_{s}" for s in SCHEMES]
             + ["fp8_channel_cublas", "fp8_channel_torch_quant", "scaled_mm_only"])
    for mode in ("graph", "eager"):
        keys = [f"{n}_{mode}_ms" for n in names]
        print(f"GEMM time per call, microseconds, {mode} (median of 15 x 50 calls)")
        print_table(["shape", "M"] + names + ["HBM floor bf16", "HBM floor fp8"],
                    [[r["shape"], r["M"]] + [round(r[k] * 1e3, 2) for k in keys]
                     + [round(r["hbm_floor_bf16_ms"] * 1e3, 2), round(r["hbm_floor_fp8_ms"] * 1e3, 2)]
                     for r in result["gemm_speed"]])
    out = Path(args.out) / "fp8_gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}; checks {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
