"""The emulator's per-launch constants, fitted from a kernel trace of graph-replayed decode steps.

Why not each kernel's own duration: the decode kernels launch with programmatic dependent launch
(PDL), so a kernel starts while the one before it finishes (a GEMV streams its weights meanwhile).
In the H200 trace of the medium step the attention kernel runs 10 us but the o_proj GEMV starts
1.1 us after it; a router kernel runs 5.5 us but costs the step 1.4 us. What a kernel costs the
step is the time from its start to the NEXT kernel's start (that includes the idle launch gap
where the next one starts after it ended; the step's last activity: its own duration), and those
advances sum to the step exactly. So each constant here is, per kernel kind, the mean over the
kind's launches in a step of the median advance (over the profiled replays) at that position:

    elementwise   torch's small elementwise ops (prologue and epilogue)
    gather        the embedding's index kernel;  row_reduce: the first RMSNorm's mean
    add_rmsnorm   the residual add + RMSNorm kernel (collectives/fused_norm.py)
    router        the MoE router kernel (GEMV + top-1 + sigmoid)
    copy          the graph's device-to-device copies (memcpy nodes)
    argmax_per_element   torch's one-block argmax: (advance - elementwise) / vocabulary
    attention     the fused attention kernel's fixed cost: its advance + the o_proj GEMV's after it
                  (which waits for it) - the o_proj GEMV's modeled time - its KV bytes' time

Also the symm MoE dispatch / combine kernels' latency + bytes / bandwidth, least squares over the
TP2 graph rows of h200x2-moe-dispatch.json. tests/test_launch_plan.py holds the node file's values
equal to what this derives.

    python benchmarks/kernel_fit.py [--trace benchmarks/results/profiles/h200-medium-bf16-0f037de-trace.json]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TRACE = Path(__file__).resolve().parent / "results" / "profiles" / "h200-medium-bf16-0f037de-trace.json"
# the current kernels' medium bf16 decode step (benchmarks/step_trace.py at e4987f8): fit_sublayers' trace
SUBLAYER_TRACE = TRACE.parent / "h200-medium-bf16-t1-e4987f8-trace.json"
DISPATCH = Path(__file__).resolve().parent / "results" / "h200x2-moe-dispatch.json"
CONTEXT = 512  # the traced step's keys per layer (dgx-emu bench decode's default)


def kind(name: str) -> str:
    """A traced kernel's kind, from its (truncated) name."""
    if name.startswith("_"):
        return name.strip("_").removesuffix("_kernel")  # gemv, pair, split, add_rmsnorm, router
    if "memcpy" in name:
        return "copy"
    if "native::Arg" in name:  # ReduceOp<..., ArgMaxOps<...>>, cut short
        return "argmax"
    if "MeanOps" in name:
        return "row_reduce"
    if "index_elementwise_kernel" in name:
        return "gather"
    return "elementwise"


def steps(kernels: list[dict]) -> list[list[dict]]:
    """The trace cut into its replays: the shortest period with which the kernel names repeat."""
    names = [k["name"] for k in kernels]
    n = len(names)
    period = next(p for p in range(1, n + 1) if n % p == 0 and names[p:] == names[:n - p])
    return [kernels[i:i + period] for i in range(0, n, period)]


def trace_kernels(trace: Path) -> list[dict]:
    """A trace's device activity in time order as step_trace.py writes it (start_us, dur_us, name):
    its own format, or a chrome trace of `dgx-emu bench decode --profile` (workers/step_profile.py),
    less the cache-length resets that profile makes between replays (outside the graph)."""
    data = json.loads(trace.read_text())
    if "kernels" in data:
        return data["kernels"]
    events = sorted((e for e in data["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy")
                     and not e["name"].startswith("Memcpy DtoD")), key=lambda e: e["ts"])
    return [{"start_us": e["ts"] - events[0]["ts"], "dur_us": e["dur"], "name": e["name"]} for e in events]


def advances(step: list[dict]) -> list[float]:
    """Start to the next start (the last activity: its own duration), microseconds."""
    return [b["start_us"] - a["start_us"] for a, b in zip(step, step[1:])] + [step[-1]["dur_us"]]


def trace_commit(trace: Path) -> str | None:
    """The commit a trace's file name carries (`...-<commit>[-chrome]-trace.json`, or `...-<commit>-tpN`), if any."""
    from benchmarks.emulator_validation import COMMIT
    named = re.search(r"-([0-9a-f]{7})(?:-chrome)?-trace$", trace.stem) or COMMIT.search(trace.stem.removesuffix("-trace"))
    return named.group(1) if named else None


def fit_sublayers(trace: Path = SUBLAYER_TRACE) -> dict[str, float]:
    """add_rmsnorm and attention (seconds) from whole sub-layers of a trace of the current kernels, not
    from single advances: under PDL a norm kernel's advance absorbs the tail of the GEMV before it (in the
    e4987f8 trace 3.4 us a norm, against 1.8 when the GEMVs were slower), which an isolated GEMV's fit
    already counts. Taking the GEMV fits as they are:
      add_rmsnorm = mean over the dense MLP sub-layers of (FC13 + FC2 + norm advances) - the modeled FC13 and FC2;
      attention   = mean over the attention sub-layers of (QKV + attention + o_proj + norm advances)
                    - the modeled QKV and o_proj - the KV bytes at the attention bandwidth - add_rmsnorm."""
    from cluster.hardware import node_spec
    from model.config import preset
    from workers.emulate import shape_only_model
    node = node_spec("hgx-h200")
    rows = compare(trace, "medium", "bf16", 1)  # (plan op, kernel, advance us, modeled us, floor us) a launch
    attn = shape_only_model(preset("medium"), 1, "tp", "bf16").layers[0].self_attn  # the traced model's
    kv = 2 * CONTEXT * attn.n_kv_heads_per_rank * attn.head_dim * 2  # K and V bytes, bf16
    kv_us = kv / (node.attention_bandwidth_fraction * node.copy_bytes_per_s) * 1e6
    mlp, attention = [], []
    for i, (name, *_rest) in enumerate(rows):
        if name == "fc13 + swiglu":
            fc13, fc2, norm = rows[i:i + 3]
            mlp.append(fc13[2] + fc2[2] + norm[2] - fc13[3] - fc2[3])
        elif name == "qkv_proj":
            qkv, attn, o_proj, norm = rows[i:i + 4]
            if (attn[0], o_proj[0]) != ("attention", "o_proj"):
                raise ValueError(f"unexpected launches after qkv_proj: {attn[0]}, {o_proj[0]}")
            attention.append(qkv[2] + attn[2] + o_proj[2] + norm[2] - qkv[3] - o_proj[3] - kv_us)
    norm_us = statistics.mean(mlp)
    return {"add_rmsnorm": norm_us * 1e-6, "attention": (statistics.mean(attention) - norm_us) * 1e-6}


def fit(trace: Path = TRACE) -> dict[str, float]:
    """The per-launch constants (seconds; argmax_per_element: seconds per logit): the kinds the
    current step no longer launches (elementwise, gather, row_reduce, copy, torch's argmax) and the
    router from the older trace (`trace`); add_rmsnorm and attention from fit_sublayers."""
    from cluster.hardware import node_spec
    from model.config import preset
    from workers.emulate import shape_only_model

    replays = steps(json.loads(trace.read_text())["kernels"])
    per_position = [statistics.median(col) for col in zip(*(advances(s) for s in replays))]
    by_kind = defaultdict(list)
    for k, adv in zip((kind(k["name"]) for k in replays[0]), per_position):
        by_kind[k].append(adv)
    mean = {k: statistics.mean(v) * 1e-6 for k, v in by_kind.items()}
    model = shape_only_model(preset("medium"), 1, "tp", "bf16")  # the traced model
    node, vocab = node_spec("hgx-h200"), model.shard.vocab_per_rank
    return {"elementwise": mean["elementwise"], "gather": mean["gather"], "row_reduce": mean["row_reduce"],
            "router": mean["router"] - model.layers[1].feed_forward.router.weight.nbytes / node.copy_bytes_per_s,
            "copy": mean["copy"], "argmax_per_element": (mean["argmax"] - mean["elementwise"]) / vocab,
            **fit_sublayers()}


PAIR_TRACES = {tokens: TRACE.parent / f"h200-maverick-slice-fp8-t{tokens}-db3640e-trace.json" for tokens in (1, 4)}
PAIR_TRACES_TP = {1: TRACE.parent / "h200x2-maverick-slice-fp8-tp1-4bacff0-chrome-trace.json",
                  2: TRACE.parent / "h200x2-maverick-slice-fp8-tp2-4bacff0-chrome-trace.json"}  # one token each
# one-row pair fit: the one-token TP1 traces; the TP2 trace and the 4-token one stay out of sample
PAIR_M1_FIT_TRACES = ((PAIR_TRACES[1], 1), (PAIR_TRACES_TP[1], 1))


def _traced_pairs(trace: Path, node, tp: int) -> list[float]:
    """Seconds of each MoE layer's two pair launches in a one-rank-view trace: the FC13 pair's advance
    + the FC2 pair's + the norm's after them (under PDL it waits for the FC2 pair) less the norm's
    own cost (add_rmsnorm's constant; at TP2 the fused all-reduce's latency)."""
    replays = steps(trace_kernels(trace))
    per_position = [statistics.median(col) for col in zip(*(advances(s) for s in replays))]
    names = [k["name"] for k in replays[0]]
    norm = node.kernel_s["add_rmsnorm"] if tp == 1 else node.symm["allreduce_add_rmsnorm"].latency_s
    out = []
    for i in (i for i, name in enumerate(names) if name == "_pair_kernel" and names[i + 1] == "_pair_kernel"):
        assert names[i + 2] in ("_add_rmsnorm_kernel", "_fused_allreduce_kernel"), names[i:i + 3]
        out.append(sum(per_position[i:i + 3]) * 1e-6 - norm)
    return out


def _pair_block(tp: int):
    from launch.emulate_cli import _model_config
    from workers.emulate import shape_only_model
    model = shape_only_model(_model_config("maverick-slice"), tp, "tp", "fp8")
    return next(layer.feed_forward for layer in model.layers if layer.is_moe)


def pair_layers(traces: dict[int, Path] = PAIR_TRACES, tp: int = 1, node_name: str = "hgx-h200"
                ) -> list[tuple[int, float, float]]:
    """(tokens, traced seconds, modeled seconds) of each MoE layer's two FP8 pair launches
    (model/kernels/moe_decode.py) in maverick-slice step traces (`traces`: tokens -> trace, at `tp`
    ranks); modeled: the launch plan's two pair ops (workers/cost_model.py `pair`)."""
    from cluster.hardware import node_spec
    from workers.cost_model import CostModel
    from workers.launch_plan import pair_ops
    node = node_spec(node_name)
    cost, block = CostModel(node, tp, "symm"), _pair_block(tp)
    return [(tokens, traced, sum(op.seconds for op in pair_ops(cost, block, tokens, tokens)))
            for tokens, trace in traces.items() for traced in _traced_pairs(trace, node, tp)]


def fit_pair_m1(node_name: str = "hgx-h200", node=None) -> float:
    """The one-row FP8 pair's bandwidth fraction (node calibration `pair_fp8_m1_bandwidth_fraction`):
    each one-token TP1 MoE layer's traced pair time = 2 x the CUDA-core GEMV fit's fixed cost + its
    shared and routed weight bytes / (fraction x copy bandwidth); the median over the layers of
    PAIR_M1_FIT_TRACES. (The fp8_m1 GEMV fit, 0.74, is of dense weights; the gathered pair streams
    slower.) `node`: the node spec to fit with (default: `node_name`'s file), e.g. with an older fp8_m1."""
    from cluster.hardware import node_spec
    from workers.cost_model import CostModel
    from workers.launch_plan import pair_ops
    node = node_spec(node_name) if node is None else node
    nbytes = sum(op.bytes for op in pair_ops(CostModel(node, 1), _pair_block(1), 1, 1))  # shared + one routed expert
    fixed = 2 * node.gemv["fp8_m1"].fixed_s
    fractions = [nbytes / ((traced - fixed) * node.copy_bytes_per_s)
                 for trace, tp in PAIR_M1_FIT_TRACES for traced in _traced_pairs(trace, node, tp)]
    return statistics.median(fractions)


COLLECTIVES = DISPATCH.parent / "h200x2-collectives.json"
NCCL_FIT_TOKENS = (1, 4, 16, 128)


def fit_nccl_tp2(path: Path = COLLECTIVES) -> tuple[float, float]:
    """NCCL's all-reduce inside a CUDA graph at TP2 as (latency s, bytes/s) (node calibration
    allreduce_latency_s_by_ranks["2"], allreduce_bytes_per_s_by_ranks["2"]): the line through the
    graph-timed NCCL all_reduce rows at NCCL_FIT_TOKENS with the smallest worst relative error
    (`_minimax_line`, as the symm fits), time = latency + (n - 1) x message / bytes_per_s with n = 2.
    NCCL moves ~1/3 of NVLink's datasheet one-way rate at 1.3 MB. The ar_rmsnorm, all_gather and
    padded all_to_all NCCL rows are not fitted on (validation)."""
    latency, rate, _ = _graph_rows_line(path, "all_reduce", "nccl", NCCL_FIT_TOKENS)
    return latency, rate


ALL_GATHER = COLLECTIVES.parent / "h200x2-collectives-all-gather.json"


def fit_nccl_allgather_tp2(path: Path = ALL_GATHER) -> tuple[float, float, float]:
    """NCCL's all_gather (one all_gather_into_tensor) inside a CUDA graph at TP2 as (latency s, bytes/s,
    worst relative error) (node calibration allgather_by_ranks["2"]): the smallest-worst-error line
    through its graph rows at every token count, time = latency + (n - 1) x one rank's message /
    bytes_per_s with n = 2. Its latency is ~2 us over NCCL's all-reduce's."""
    return _graph_rows_line(path, "all_gather", "nccl")


SYMM_FIT_OPS = {"all_reduce": "symm_allreduce", "ar_rmsnorm": "symm_ar_rmsnorm"}  # bench op -> node constant


def fit_symm_tp2(op: str, path: Path = COLLECTIVES) -> tuple[float, float, float]:
    """The symm backend's fused kernel at TP2 (node calibration symm_allreduce / symm_ar_rmsnorm) as
    (latency s, bytes/s, worst relative error): the line time = latency + message / bytes_per_s
    through the graph-timed symm-one-shot rows of `op` (every token count measured) with the
    smallest WORST relative error, which is what the validation judges (a least-squares line put
    the Lamport kernel's 1-token AllReduce+RMSNorm row 6% off)."""
    return _graph_rows_line(path, op, "symm-one-shot")


def _graph_rows_line(path: Path, op: str, impl: str, tokens: tuple[int, ...] | None = None) -> tuple[float, float, float]:
    """_minimax_line through the TP2 graph rows of one (op, impl) of a bench collectives file (at
    `tokens` only, when given; each of them must be there): message bf16 bytes -> seconds."""
    rows = [r for r in json.loads(path.read_text())["results"] if r["op"] == op and r["impl"] == impl
            and r["mode"] == "graph" and (tokens is None or r["tokens"] in tokens)]
    assert len(rows) >= 2 and all(r["tp"] == 2 for r in rows) and (tokens is None or len(rows) == len(tokens))
    return _minimax_line([r["tokens"] * r["hidden"] * 2 for r in rows], [r["median_us"] * 1e-6 for r in rows])


def _minimax_line(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """(intercept, 1 / slope, worst relative error) of the line y = a + x * slope (slope > 0) with
    the smallest max_i |line(x_i) / y_i - 1|. For a fixed intercept the smallest feasible error is
    found by bisection (the feasible slopes are an intersection of intervals); that error is convex
    in the intercept (a linear program's value), so a ternary search finds the best intercept."""
    def slope_range(a: float, err: float) -> tuple[float, float]:
        lows = [(y * (1 - err) - a) / x for x, y in zip(xs, ys)]
        highs = [(y * (1 + err) - a) / x for x, y in zip(xs, ys)]
        return max(max(lows), 0.0), min(highs)

    def best_error(a: float) -> float:
        low, high = 0.0, 1.0 + a / min(ys)
        for _ in range(60):
            mid = (low + high) / 2
            lo, hi = slope_range(a, mid)
            low, high = (low, mid) if lo <= hi else (mid, high)
        return high
    left, right = 0.0, 2 * min(ys)  # a line above the smallest row may still fit best (it can be over-predicted)
    for _ in range(100):
        m1, m2 = left + (right - left) / 3, right - (right - left) / 3
        left, right = (left, m2) if best_error(m1) <= best_error(m2) else (m1, right)
    a = (left + right) / 2
    lo, hi = slope_range(a, best_error(a))
    slope = (lo + hi) / 2
    return a, 1.0 / slope, max(abs((a + x * slope) / y - 1) for x, y in zip(xs, ys))


def fit_dispatch(path: Path = DISPATCH) -> dict[str, tuple[float, float]]:
    """call -> (latency s, bytes/s) of the symm dispatch / combine graph rows (message: one rank's rows)."""
    data = json.loads(path.read_text())
    out = {}
    for call in ("dispatch", "combine"):
        rows = [r for r in data["results"] if r["name"] == f"{call}-symm-graph"]
        xs = [r["tokens"] * data["hidden"] * 2 for r in rows]  # bf16 rows
        ys = [r["median_us"] * 1e-6 for r in rows]
        slope, intercept = statistics.linear_regression(xs, ys)
        out[call] = (intercept, 1.0 / slope)
    return out


def compare(trace: Path = TRACE, model_name: str = "medium", dtype: str = "bf16", tokens: int = 1,
            context: int = CONTEXT, node_name: str = "hgx-h200", tp: int = 1) -> list[tuple[str, str, float, float]]:
    """The trace's launches beside the emulator's plan of the same step, one to one: (plan op,
    traced kernel, measured advance us, modeled us, HBM floor us of its bytes at the node's copy
    bandwidth), an op of n launches split evenly. The plan is
    of the commit the trace names in its file name (launch_plan.CodePaths via the validation's
    measured_code), at `tp` ranks over the symm collectives (rank 0's trace). Raises if the launch
    counts differ."""
    from benchmarks.emulator_validation import kernels_as_measured, measured_code
    from cluster.hardware import node_spec
    from launch.emulate_cli import _model_config
    from workers.emulate import estimate_step, shape_only_model

    replays = steps(trace_kernels(trace))
    measured = [statistics.median(col) for col in zip(*(advances(s) for s in replays))]
    commit = trace_commit(trace)
    paths = measured_code(commit) if commit else None
    model = shape_only_model(_model_config(model_name), tp, "tp", dtype)
    with kernels_as_measured(node_spec(node_name), commit or "HEAD", dtype) as node:
        est = estimate_step(model, node, 1, tokens, context, **({"comm": "symm"} if tp > 1 else {}),
                            **({"paths": paths} if paths else {}))
        copy = node.copy_bytes_per_s
    planned = [(op.name, op.seconds / op.launches, op.bytes / op.launches / copy) for op in est.ops
               for _ in range(op.launches)]
    if len(planned) != len(measured):
        raise ValueError(f"the plan has {len(planned)} launches, the trace {len(measured)} a replay")
    return [(name, kernel["name"][:40], adv, seconds * 1e6, floor * 1e6)
            for (name, seconds, floor), kernel, adv in zip(planned, replays[0], measured)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--tp", type=int, default=1, help="--compare: the trace's tensor-parallel size (symm collectives)")
    p.add_argument("--compare", nargs=3, metavar=("MODEL", "DTYPE", "TOKENS"),
                   help="instead: the trace's launches beside the plan of that step, summed per plan op")
    args = p.parse_args(argv)
    if args.compare:
        model_name, dtype, tokens = args.compare
        totals: dict[str, list[float]] = {}
        for name, _, adv, modeled, floor in compare(args.trace, model_name, dtype, int(tokens), tp=args.tp):
            row = totals.setdefault(name, [0, 0.0, 0.0, 0.0])
            for i, value in enumerate((1, adv, modeled, floor)):
                row[i] += value
        totals["step"] = [sum(r[i] for r in totals.values()) for i in range(4)]
        print(f"{'plan op':40s} {'launches':>8s} {'traced us':>10s} {'modeled us':>10s} {'floor us':>9s} {'x floor':>8s}")
        for name, (n, adv, modeled, floor) in totals.items():
            ratio = f"{adv / floor:8.2f}" if floor >= 0.05 else f"{'-':>8s}"
            print(f"{name:40s} {int(n):8d} {adv:10.1f} {modeled:10.1f} {floor:9.1f} {ratio}")
        return 0
    for name, value in fit(args.trace).items():
        print(f"{name:20s} {value:.4g}")
    for call, (latency, bandwidth) in fit_dispatch().items():
        print(f"symm_{call}: latency {latency:.4g} s, {bandwidth:.4g} B/s")
    for op, constant in SYMM_FIT_OPS.items():
        latency, bandwidth, worst = fit_symm_tp2(op)
        print(f"{constant}: latency {latency:.4g} s, {bandwidth:.4g} B/s (worst row {worst:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
