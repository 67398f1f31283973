"""Decode GEMV / small-M GEMM bandwidth on a GPU: model/kernels/linear_small_m.py against torch.

At 1..16 rows a Linear is a weight stream, so the figure of merit is bytes per second against what
the GPU can move at all. The script measures that ceiling first (a 2 GiB device-to-device copy,
bytes read + written), then for each case times `linear_small_m` and the torch baseline that the
model would otherwise run: F.linear for BF16, torch._scaled_mm with row-wise scales for FP8 (on an
already-quantized x: the baseline's activation quantization is NOT timed, ours is), and one matmul
per routed row for gathered experts (expert ids known on the host: no gather copy, no sync).

Every case is first checked against `reference_linear_small_m` (relative error: max |y - ref| /
max |ref|, printed). Timing: a few-microsecond kernel timed eagerly (triton.testing.do_bench) shows
the Python wrapper and launch (40-140 us per call here), not the GPU, so each case is timed as
the decode step runs it, from a CUDA graph: `calls` calls captured back to back, each taking the
next of several weight copies (or expert sets) so that more than 200 MB rotate through the 60 MB
L2; the median of 7 replays, per call. "eager us" is the wall time per call without a graph.
Bytes = weights (+ FP8 scales) + x + out.

    python benchmarks/gemv_bench.py --out gemv_h200.json     # the table, ~60 s on an H200
    python benchmarks/gemv_bench.py --sweep 60 --dtypes fp8  # tile configs on the key cases instead
    python benchmarks/gemv_bench.py --variants 300 --out v.json  # the GEMV variants (gemv_variants.py)
    python benchmarks/gemv_bench.py --pdl-ab --out t.json    # the table, ours also with PDL off

PDL (programmatic dependent launch, collectives/triton_support.py) is on by default where the GPU
has it; back-to-back calls in one graph then overlap one call's tail with the next one's first
weight loads, as in the decode step. --pdl-ab adds a column timed with it off.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import machine, print_table  # noqa: E402

FP8 = torch.float8_e4m3fn
DENSE = [(4096, 2048), (2048, 2048), (8192, 2048), (2048, 4096), (32768, 2048), (1792, 5120), (4096, 5120),
         (5120, 2048), (8192, 5120), (50512, 5120)]  # (N, K)
DENSE_DRAFT = [(384, 256), (256, 256), (1024, 256), (256, 512), (256, 768), (480, 256)]  # (N, K): the embedded
# model's EAGLE-3 draft: qkv, o_proj, gate_up, down, fc (3 features -> hidden), lm_head (0.13-0.5 MB bf16)
# (name, E, N, K, layout, rows, swiglu): "n" = HF (E, K, N) bf16 storage passed as w.transpose(1, 2)
EXPERTS = [("hf16", 16, 4096, 2048, "n", 1, False), ("hf128", 128, 2048, 5120, "n", 1, True),
           ("hf128", 128, 2048, 5120, "n", 4, True), ("out-major128", 128, 2048, 5120, "k", 1, True),
           ("out-major128", 128, 2048, 5120, "k", 4, True)]
ROTATE_BYTES = 200e6  # weights that rotate through one graph: > 3x the 60 MB L2
REPLAYS = 7


def graph_times(fn, calls: int, replays: int = REPLAYS) -> list[float]:
    """GPU microseconds per call of each of `replays` replays of one CUDA graph holding `calls` calls of fn
    (so neither Python nor launch latency counts, as in the decode step's graphs)."""
    fn()  # compile / warm up outside the graph
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # cuBLAS workspaces etc. on the capture stream
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return times


def bench(fn, calls: int) -> float:
    """Median GPU microseconds per call over REPLAYS graph replays (graph_times)."""
    return statistics.median(graph_times(fn, calls))


def eager_us(fn, calls: int = 100) -> float:
    """Wall microseconds per call back to back, synchronized at the end: max(host, GPU) time."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / calls


def copy_tb_s() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written, median of triton.testing.do_bench (eager:
    at 1 ms a copy, launch overhead does not count). Not from a graph: captured, torch's copy became
    a memcpy node that moved only 2.77 TB/s on an H200, against 4.27 TB/s eager."""
    from triton.testing import do_bench
    src = torch.empty(1 << 30, dtype=torch.int16, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    return 2 * src.nbytes / do_bench(lambda: dst.copy_(src), warmup=100, rep=300, return_mode="median") / 1e9


def fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.float().abs().amax(-1) / 448  # (..., N)
    return (w / scale[..., None]).to(FP8), scale


def scaled_mm(x_q, x_scale, w_q, w_scale):
    """torch._scaled_mm with row-wise scales, (M, K) fp8 x (N, K) fp8 -> (M, N) bf16. cuBLASLt
    refuses some shapes at M = 1 (e.g. N 2048, K 5120), so x's rows are zero-padded to 16."""
    m, pad = x_q.shape[0], (-x_q.shape[0]) % 16
    if pad:
        x_q = torch.cat([x_q, x_q.new_zeros(pad, x_q.shape[1])])
        x_scale = torch.cat([x_scale, x_scale.new_ones(pad, 1)])
    return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale[None], out_dtype=torch.bfloat16)[:m]


def cycler(items):
    it = itertools.cycle(items)
    return lambda: next(it)


def dense_case(m: int, n: int, k: int, dtype: str, swiglu: bool = False) -> dict:
    """Weights, our call and the torch call for one dense shape, rotating over weight copies; with
    swiglu, N holds gate and up (the output is N / 2 wide)."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    kw, elem = ({"swiglu": True} if swiglu else {}), 2
    if dtype == "fp8":
        w, w_scale = fp8_weight(w)
        kw, elem = {**kw, "weight_scale": w_scale, "act_quant": "token"}, 1
    copies = [w] + [w.clone() for _ in range(math.ceil(ROTATE_BYTES / w.nbytes) - 1)]
    nxt = cycler(copies)
    if dtype == "fp8":
        x_scale = x.float().abs().amax(-1, keepdim=True) / 448  # (M, 1)
        x_q = (x / x_scale).to(FP8)
        base = lambda: scaled_mm(x_q, x_scale, nxt(), w_scale)
    else:
        base = lambda: F.linear(x, nxt())
    n_out = n // 2 if swiglu else n
    return {"x": x, "w": w, "kw": kw, "rot": copies, "calls": max(len(copies), 20), "torch": base, "n_out": n_out,
            "bytes": n * k * elem + (4 * n if dtype == "fp8" else 0) + 2 * m * (k + n_out)}


def expert_case(e: int, n: int, k: int, layout: str, rows: int, swiglu: bool, dtype: str) -> dict:
    """Gathered experts: each call routes `rows` rows to distinct experts, the next set each call."""
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    stored = torch.randn((e, k, n) if layout == "n" else (e, n, k), device="cuda", dtype=torch.bfloat16)
    kw, elem = {"swiglu": swiglu}, 2
    if dtype == "fp8":  # FP8 experts are stored out-major (model/fp8_modules.py): K-contiguous
        stored, w_scale = fp8_weight(stored)
        kw, elem = {**kw, "weight_scale": w_scale, "act_quant": "token"}, 1
    w = stored.transpose(1, 2) if layout == "n" else stored  # (E, N, K) view
    sets = [[(s * rows + i) % e for i in range(rows)] for s in range(e // rows)]
    ids = [torch.tensor(s, device="cuda") for s in sets]
    nxt_ids, nxt_set = cycler(ids), cycler(sets)

    x_scale = x.float().abs().amax(-1, keepdim=True) / 448  # (M, 1): the baseline's x is pre-quantized
    x_q = (x / x_scale).to(FP8)

    def base():  # one matmul per routed row, ids on the host
        if dtype == "fp8":
            y = torch.cat([scaled_mm(x_q[i: i + 1], x_scale[i: i + 1], w[ex], w_scale[ex])
                           for i, ex in enumerate(nxt_set())])
        else:
            y = torch.cat([x[i: i + 1] @ stored[ex] if layout == "n" else F.linear(x[i: i + 1], stored[ex])
                           for i, ex in enumerate(nxt_set())])
        if swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        return y

    n_out = n // 2 if swiglu else n
    return {"x": x, "w": w, "kw": {**kw, "expert_ids": ids[0]}, "rot_ids": nxt_ids, "calls": len(sets), "torch": base,
            "n_out": n_out,
            "bytes": rows * (n * k * elem + (4 * n if dtype == "fp8" else 0)) + 2 * rows * (k + n_out)}


def ours(case: dict, config: dict | None = None):
    from model.kernels.linear_small_m import linear_small_m
    x, kw = case["x"], dict(case["kw"])
    if "rot" in case:
        nxt = cycler(case["rot"])
        return lambda: linear_small_m(x, nxt(), config=config, **kw)
    w, nxt_ids = case["w"], case["rot_ids"]
    return lambda: linear_small_m(x, w, config=config, **{**kw, "expert_ids": nxt_ids()})


def rel_error(case: dict) -> float:
    from model.kernels.linear_small_m import linear_small_m, reference_linear_small_m
    got = linear_small_m(case["x"], case["w"], **case["kw"]).float()
    ref = reference_linear_small_m(case["x"], case["w"], **case["kw"]).float()
    return float((got - ref).abs().max() / ref.abs().max())


def cases(args):
    for dtype in args.dtypes:
        if args.shapes == "draft":
            for n, k in DENSE_DRAFT:
                for m in args.ms:
                    yield {"kind": "dense draft", "dtype": dtype, "M": m, "N": n, "K": k}, lambda m=m, n=n, k=k, d=dtype: \
                        dense_case(m, n, k, d)
            continue
        for n, k in DENSE:
            for m in args.ms:
                yield {"kind": "dense", "dtype": dtype, "M": m, "N": n, "K": k}, lambda m=m, n=n, k=k, d=dtype: \
                    dense_case(m, n, k, d)
        for name, e, n, k, layout, rows, swiglu in EXPERTS:
            if dtype == "fp8" and layout == "n":
                continue  # FP8 experts are out-major
            info = {"kind": f"experts {name}", "dtype": dtype, "M": rows, "N": n, "K": k, "swiglu": swiglu}
            yield info, lambda a=(e, n, k, layout, rows, swiglu, dtype): expert_case(*a)


def _grid(bns, bks, warps, stages, max_elems):
    return [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns} for bn in bns for bk in bks
            for nw in warps for ns in stages if bn * bk <= max_elems]


# --sweep: tile configs per kernel path, each tried on the KEY cases of that path
SWEEPS = {"gemv k": _grid((1, 2, 4, 8, 16), (512, 1024, 2048, 4096), (4, 8), (1,), 16384)
          + _grid((4,), (512, 1024, 2048, 4096), (4, 8), (3,), 16384),
          "gemv n": _grid((4, 8, 16, 32), (128, 256, 512, 1024, 2048), (8,), (1, 3), 16384),
          "dot": _grid((16, 32, 64, 128), (64, 128, 256, 512), (4, 8), (4,), 32768)
          + [{**c, "gemv": True} for c in _grid((2, 4, 8, 16), (1024, 2048), (4,), (1,), 16384)]}
KEY = [("dense", "bf16", 1), ("dense", "fp8", 1), ("dense", "bf16", 16), ("dense", "fp8", 16), ("dense", "fp8", 4),
       ("experts hf16", "bf16", 1), ("experts hf128", "bf16", 1), ("experts out-major128", "fp8", 4)]


def sweep(info: dict, case: dict, seconds: float) -> list[dict]:
    """Times the configs of the case's kernel path for up to `seconds`; returns the best five."""
    gemv = info["M"] == 1 or "experts" in info["kind"]
    path = "dot" if not gemv else "gemv n" if case["w"].stride(-2) == 1 else "gemv k"
    timed, stop = [], time.perf_counter() + seconds
    configs = list(SWEEPS[path])
    random.Random(0).shuffle(configs)  # a sweep cut short by its time still samples every kind of tile
    for cfg in configs:
        if time.perf_counter() > stop:
            print(f"  sweep: time is up after {len(timed)} configs", flush=True)
            break
        try:
            timed.append({**cfg, "us": bench(ours(case, cfg), case["calls"])})
        except Exception as exc:  # noqa: BLE001 - a config the compiler refuses (e.g. shared memory)
            print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
    return sorted(timed, key=lambda t: t["us"])[:5]


def is_key(info: dict) -> bool:
    return ((info["kind"], info["dtype"], info["M"]) in KEY
            and (info["kind"] != "dense" or (info["N"], info["K"]) == (4096, 5120)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--ms", type=int, nargs="+", default=[1, 4, 16], help="dense row counts (default 1 4 16)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    p.add_argument("--sweep", type=float, default=0, metavar="SECONDS",
                   help="instead of the table: sweep tile configs on a few key cases for about SECONDS")
    p.add_argument("--variants", type=float, default=0, metavar="SECONDS",
                   help="instead of the table: time every GEMV variant of benchmarks/gemv_variants.py (at most "
                        "SECONDS), printing %% of copy bandwidth per variant")
    p.add_argument("--cases", default="decode", choices=["decode", "deep-k", "one-row", "bf16"],
                   help="--variants' case set: the medium / Maverick decode shapes, Maverick's deep-K FP8 GEMVs, "
                        "the one-row dense GEMVs of a decode step (FP8 on CUDA cores vs tensor cores, BF16), or the "
                        "one-row BF16 GEMVs at K = 2048 (medium's linears and LM head) by tile")
    p.add_argument("--pdl-ab", action="store_true", help="the table also times ours with PDL off")
    p.add_argument("--shapes", default="decode", choices=["decode", "draft"],
                   help="the table's shapes: the decode models' linears and experts, or the embedded EAGLE-3 "
                        "draft's small linears (0.13-0.5 MB)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gemv_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    copy = copy_tb_s()
    print(f"copy bandwidth: {copy:.2f} TB/s (2 GiB device-to-device, read + write)", flush=True)
    if args.variants:
        return _variants(args, copy)
    todo = [(info, make) for info, make in cases(args) if not args.sweep or is_key(info)]
    results, rows, swept = [], [], []
    for info, make in todo:
        case = make()
        err = rel_error(case)
        t_ours, t_torch = bench(ours(case), case["calls"]), bench(case["torch"], case["calls"])
        tb = [case["bytes"] / t / 1e6 for t in (t_ours, t_torch)]
        res = {**info, "bytes": case["bytes"], "ours_us": t_ours, "torch_us": t_torch, "ours_tb_s": tb[0],
               "torch_tb_s": tb[1], "ours_pct_copy": 100 * tb[0] / copy, "torch_pct_copy": 100 * tb[1] / copy,
               "ours_eager_us": eager_us(ours(case)), "rel_err": err}
        if args.pdl_ab:
            res["ours_no_pdl_us"] = _without_pdl(lambda: bench(ours(case), case["calls"]))
        results.append(res)
        rows.append([info["kind"] + (" swiglu" if info.get("swiglu") else ""), info["dtype"], info["M"],
                     f"{info['N']}x{info['K']}", f"{case['bytes'] / 1e6:.1f}", f"{t_ours:.1f}", f"{t_torch:.1f}",
                     f"{tb[0]:.2f}", f"{tb[1]:.2f}", f"{res['ours_pct_copy']:.0f}", f"{res['torch_pct_copy']:.0f}",
                     f"{res['ours_eager_us']:.0f}", f"{err:.1e}"])
        if args.pdl_ab:
            rows[-1].insert(6, f"{res['ours_no_pdl_us']:.1f}")
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
        if args.sweep:
            best = sweep(info, case, args.sweep / len(todo))
            swept.append({**info, "heuristic_us": t_ours, "best": best})
            print(f"  sweep best: {best[:3]}", flush=True)
        del case
        torch.cuda.empty_cache()
    print()
    print_table(["case", "dtype", "M", "NxK", "MB", "ours us"] + (["no-PDL us"] if args.pdl_ab else [])
                + ["torch us", "ours TB/s", "torch TB/s", "ours %copy", "torch %copy", "eager us", "rel err"], rows)
    if args.out:
        payload = {"machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "command": " ".join(sys.argv), "copy_tb_s": copy, "pdl": _pdl_state(), "results": results,
                   "sweep": swept}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")
    return 0


def _without_pdl(fn):
    from collectives import triton_support
    before, triton_support.PDL_ENABLED = triton_support.PDL_ENABLED, False
    try:
        return fn()
    finally:
        triton_support.PDL_ENABLED = before


def _variants(args, copy: float) -> int:
    """--variants: every GEMV variant of every case of gemv_variants.py, best first per case."""
    from benchmarks import gemv_variants
    records = gemv_variants.run(args.variants, copy, sys.modules[__name__], args.cases)
    if args.cases == "decode":
        records += gemv_variants.run_router(copy, sys.modules[__name__])
    best = gemv_variants.best(records)
    print("\nbest per case:")
    print_table(["case", "dtype", "M", "NxK", "best", "us", "%copy", "heuristic us", "heuristic %copy"],
                [[b["kind"], b["dtype"], b["M"], f"{b['N']}x{b['K']}", b["variant"], f"{b['us']:.2f}",
                  f"{b['pct_copy']:.0f}", f"{b.get('heuristic_us', float('nan')):.2f}",
                  f"{b.get('heuristic_pct_copy', float('nan')):.0f}"] for b in best])
    if args.out:
        payload = {"machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "command": " ".join(sys.argv), "copy_tb_s": copy, "pdl": _pdl_state(), "variants": records,
                   "best": best}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")
    return 0


def _pdl_state() -> bool:
    import torch as _torch
    from collectives import triton_support
    return triton_support.use_pdl(_torch.zeros(1, device="cuda"))


if __name__ == "__main__":
    sys.exit(main())
