"""The emulator against the GPU: predicted vs measured step times of every committed H200 result.

Three groups of graph-replayed `dgx-emu bench decode` rows, each emulated shape-only on the
hgx-h200 node file at the same model, dtype, step, context, TP size and collectives backend:
  * old TP1: `h200-decode-<model>-<dtype>.json`, OLDER measurements (commit 5df43eb's kernels: no
    PDL, separate RoPE, attention merge, cuBLAS router + top-k, separate shared / routed GEMVs);
    the emulator plans the CURRENT kernels, so these rows are reported, not held to the targets;
  * new TP1: `h200x2-decode-*-tp1.json` (commit afb18b2's kernels) and `h200-decode-*-<commit>.json`
    (the commit the file names: 0f037de, 7a5ac81, db3640e);
  * TP2: `h200x2-decode-*-tp2.json` (afb18b2, or the commit the name carries before `-tp2`; two H200s
    over the fused symm collectives);
Each FP8 row is planned with the FP8 kernels its commit ran (kernels_as_measured: before 60be190 no
tensor cores, and the FP8 GEMV fits of h200-gemv-before-mma.json), and every row before f4c9fff with
the one-row BF16 GEMV line of that table (one weight row a program then); rows measured under a kernel
override (an `environment` in the file: A/B runs) are left out.
and one group of EAGLE-3 draft forwards:
  * draft: `h200-draft-step.json` (benchmarks/draft_step_bench.py at edd0140: ONE fused draft
    forward of the embedded model's shipped draft, bf16, batch 1, 512 cached keys, replayed from a
    CUDA graph: the catch-up of 4 rows with target features and a depth of 2 drafted rows, one
    row's logits each), planned by workers/draft_plan.py as the virtual clock and the spec walk plan it;
and one group of collectives (collective_rows): every graph-timed TP2 case of h200x2-collectives.json
and h200x2-moe-dispatch.json against the cost model's ops for that call. Its symm rows are the data
the node file's symm_* constants were FITTED on, so they are labelled calibration and aggregated
apart from the nccl rows, which are validation (their constants were not fitted on these data).
The targets (median |error| <= 10%, worst <= 25%) are over the current-kernel rows (new TP1 and
TP2); the draft rows are reported beside them ("whole table": every row). Routed experts per MoE layer are taken as min(tokens, experts) (the bench's random tokens
nearly always route to distinct experts). Each row is planned as the code it measured ran where the
code has since changed the step's prologue or pick (measured_code: did that commit have the
embedding and argmax kernels?), and carries the prediction split by op kind and the modeled launches. Writes results/emulator-validation-h200.json and prints the table with the
median and worst |error| of each group.

    python benchmarks/emulator_validation.py
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import re
import statistics
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, print_table  # noqa: E402
from cluster.hardware import node_spec  # noqa: E402
from launch.emulate_cli import _model_config  # noqa: E402
from workers.cost_model import Collective, CostModel  # noqa: E402
from workers.emulate import estimate_draft_step, estimate_step, shape_only_model  # noqa: E402
from workers.launch_plan import CodePaths, flatten, norm_collective  # noqa: E402


COMMIT = re.compile(r"-([0-9a-f]{7})(?:-tp\d)?$")  # a result file named after the commit it measured
MMA_DEFAULT_COMMIT = "60be190"  # FP8 linears on the tensor cores by default from this commit on
SHARED_APART_COMMIT = "fef4287"  # a big FP8 shared expert leaves the MoE pair at 2+ rows from here on
IDS_IN_PLACE_COMMIT = "90dee4e"  # a decode graph's argmax writes its token buffer: no feedback copies
WINNER_KERNEL_COMMIT = "1d91d52"  # several ranks: one kernel picks the winner of the gathered pairs
GATHER_SLOTS_COMMIT = "b6ac205"  # symm all_gather: kept zeroed slots and a view of the sum (2 launches, not 4)
BF16_ROWS_COMMIT = "f4c9fff"  # one-row BF16 GEMVs take 2-4 weight rows a program from here on
FP8_ROW_TILES_COMMIT = "28ad904"  # one-row FP8 GEMVs at K <= 4096 take 8-row tiles of 4 warps from here on
GROUPS = (("old TP1", lambda p: p.match("h200-decode-*.json") and not COMMIT.search(p.stem)),
          ("new TP1", lambda p: p.match("h200x2-decode-*-tp1.json") or (p.match("h200-decode-*.json")
                                                                         and COMMIT.search(p.stem))),
          ("TP2", lambda p: p.match("h200x2-decode-*-tp2.json")), ("draft", lambda p: False),  # draft: draft_rows
          ("collectives", lambda p: False))  # collectives: collective_rows
GROUP_COMMIT = {"old TP1": "5df43eb", "new TP1": "afb18b2", "TP2": "afb18b2"}  # unless the file names one
CURRENT = ("new TP1", "TP2")  # the groups that measured the kernels the emulator plans
ROOT = Path(__file__).resolve().parent.parent


def measured_code(commit: str) -> CodePaths:
    """The prologue and pick of the step `commit` ran: did that commit have the embedding and
    argmax kernels, and did its argmax write the graph's ids in place (git; without a repository:
    no)? The plan is then of the code that was measured."""
    def had(path: str) -> bool:
        return subprocess.run(["git", "cat-file", "-e", f"{commit}:{path}"], cwd=ROOT, capture_output=True).returncode == 0
    return CodePaths(step_head=had("model/kernels/embed_norm.py"), argmax=had("model/kernels/argmax.py"),
                     ids_in_place=has(commit, IDS_IN_PLACE_COMMIT), winner_kernel=has(commit, WINNER_KERNEL_COMMIT),
                     gather_slots_kept=has(commit, GATHER_SLOTS_COMMIT))


def has(commit: str, change: str) -> bool:
    """Does `commit` contain the commit `change` (git; without a repository: no)?"""
    return subprocess.run(["git", "merge-base", "--is-ancestor", change, commit], cwd=ROOT,
                          capture_output=True).returncode == 0


def ran_fp8_on_tensor_cores(commit: str) -> bool:
    """Did `commit` put FP8 linears on the tensor cores by default (MMA_DEFAULT_COMMIT or later)?"""
    return has(commit, MMA_DEFAULT_COMMIT)


@functools.lru_cache(maxsize=None)
def _older_fits(dtype: str) -> dict:
    """`dtype`'s GEMV fits of h200-gemv-before-mma.json read by rows, as the node file had them then."""
    from benchmarks.gemv_fit import RESULTS as TABLES_DIR, by_rows, fit_table
    return fit_table(TABLES_DIR / "h200-gemv-before-mma.json", (dtype,), by_rows)


@functools.lru_cache(maxsize=None)
def _older_fp8_m1() -> dict:
    """The one-row FP8 GEMV's fit before FP8_ROW_TILES_COMMIT (gemv_fit.OLDER_FP8_M1's tables)."""
    from benchmarks.gemv_fit import OLDER_FP8_M1, fit_rows, table_points
    return fit_rows([p for table in OLDER_FP8_M1 for p in table_points(table, "fp8_m1")])


_PAIR_FRACTIONS: dict[float, float] = {}  # older fp8_m1 fixed cost -> the one-row pair fraction fitted with it


@contextmanager
def kernels_as_measured(node, commit: str, dtype: str):
    """(`node`, planned) as the FP8 and one-row BF16 kernels `commit` ran. Before SHARED_APART_COMMIT the MoE's shared
    expert always ran in the pair (fast_path.SHARED_PASSES_BYTES as infinite). Before
    MMA_DEFAULT_COMMIT a dense FP8 linear took the CUDA-core GEMV at one row and the 16-row tl.dot
    (after the same pre-pass) above: linear_small_m.mma_default as `m > 1`, and the FP8 fits of
    h200-gemv-before-mma.json read by rows (benchmarks/gemv_fit.py), as the node file had them then.
    Before BF16_ROWS_COMMIT a one-row BF16 GEMV read one weight row a program: that table's bf16_m1 line
    (every row, any dtype: the LM head is BF16). Before FP8_ROW_TILES_COMMIT the one-row FP8 GEMV took 16-row
    tiles at every K: the fp8_m1 line of the tables that measured it (gemv_fit.OLDER_FP8_M1), and the one-row
    pair fraction fitted with that line's fixed cost (kernel_fit.fit_pair_m1), as the node files had them."""
    from model import fast_path
    from model.kernels import linear_small_m
    shipped = linear_small_m.mma_default, fast_path.SHARED_PASSES_BYTES
    measured = node
    if dtype == "fp8" and not has(commit, SHARED_APART_COMMIT):
        fast_path.SHARED_PASSES_BYTES = float("inf")
    older = {}
    if dtype == "fp8" and not ran_fp8_on_tensor_cores(commit):
        older.update(_older_fits("fp8"))
        linear_small_m.mma_default = lambda m, n, k: m > 1
    elif dtype == "fp8" and not has(commit, FP8_ROW_TILES_COMMIT):
        older["fp8_m1"] = _older_fp8_m1()
    if not has(commit, BF16_ROWS_COMMIT):  # every step has BF16 GEMVs: the LM head at least
        older["bf16_m1"] = _older_fits("bf16")["bf16_m1"]
    if older:
        from benchmarks.kernel_fit import fit_pair_m1
        from workers.node_spec import GemvFit
        measured = dataclasses.replace(node, gemv={**node.gemv, **{k: GemvFit(**v) for k, v in older.items()}})
        if "fp8_m1" in older:  # the pair's fraction was fitted against the one-row GEMV's fixed cost of its time
            fixed = measured.gemv["fp8_m1"].fixed_s
            if fixed not in _PAIR_FRACTIONS:  # one fit per older line, not one per row
                _PAIR_FRACTIONS[fixed] = fit_pair_m1(node=measured)
            measured = dataclasses.replace(measured, pair_fp8_m1_bandwidth_fraction=_PAIR_FRACTIONS[fixed])
    try:
        yield measured
    finally:
        linear_small_m.mma_default, fast_path.SHARED_PASSES_BYTES = shipped


def validate(node_name: str = "hgx-h200") -> list[dict]:
    node, rows = node_spec(node_name), []
    for group, member in GROUPS:
        for path in sorted(RESULTS.glob("h200*-decode-*.json")):
            if not member(path) or path.stem.endswith("-run1"):
                continue  # -run1: an earlier run of the same code; its graph rows agree with the kept ones
            data = json.loads(path.read_text())
            if data.get("environment"):
                continue  # measured under a kernel override (an A/B run), not the code as it ships
            rows += [_row(group, path, data, r, node) for r in data["results"] if r["name"].endswith("-graph")]
    return rows + draft_rows(node) + collective_rows(node)


DRAFT_STEPS = {"catch_up": (4, True), "depth": (2, False)}  # draft_step_bench.py: new rows a forward, target features


def draft_rows(node) -> list[dict]:
    """The fused draft forwards of h200-draft-step.json against their plans (its torch-op rows
    time the reference path, which a GPU step of these sizes never takes)."""
    from model.config import load_model_config
    from model.eagle3_checkpoint import read_draft_config
    from model.embedded import default_draft_dir, default_model_dir
    path = RESULTS / "h200-draft-step.json"
    data = json.loads(path.read_text())
    cfg = load_model_config(default_model_dir())
    draft_cfg, rows = read_draft_config(default_draft_dir(), cfg), []
    for r in data["results"]:
        if r.get("kernels") != "triton":
            continue
        tokens, features = DRAFT_STEPS[r["step"]]
        est = estimate_draft_step(cfg, node, 1, 1, data["context"], tokens=tokens, features=features,
                                  draft_cfg=draft_cfg)
        rows.append({"group": "draft", "case": f"embedded draft {data['dtype']} {r['step']} ({tokens} rows)", "tp": 1,
                     "comm": "none", "measured_in": f"{path.name} (committed in 68b5c57)", "measured_commit": "edd0140",
                     "measured_us": r["median_us"], "predicted_us": round(est.seconds * 1e6, 1),
                     "error": round(est.seconds * 1e6 / r["median_us"] - 1, 4),
                     "predicted_split_us": {k: round(v * 1e6, 1) for k, v in est.by("kind").items()},
                     "predicted_launches": sum(op.launches for op in est.ops)})
    return rows


CALIBRATION, VALIDATION = "calibration (fitted on these data)", "validation"
BENCH_CALLS = {"ar_rmsnorm": "allreduce_add_rmsnorm", "all_reduce": "all_reduce", "all_gather": "all_gather",
               "dispatch": "dispatch", "combine": "combine", "nccl-padded": "all_to_all"}  # bench op -> call


def collective_rows(node) -> list[dict]:
    """Every graph-timed TP2 collective of h200x2-collectives.json and h200x2-moe-dispatch.json
    against the cost model's plan of that call on `node` (the walk's and the virtual clock's ops).
    The rows the node file's constants were fitted on are calibration (`fitted_on`), the others
    validation. Left out: eager rows (host launch included, the model prices graph replays), the
    forced symm-two-shot rows (no plan forces an algorithm; symm-auto's rows are the pick) and the
    other protocols' rows of an A/B run (flags-*: the kernel the backend no longer ships)."""
    rows = []
    for name, ops in (("h200x2-collectives.json", ("ar_rmsnorm", "all_reduce", "dispatch", "combine")),
                      ("h200x2-collectives-all-gather.json", ("all_gather",))):  # gathers: NCCL's as it ships now
        data = json.loads((RESULTS / name).read_text())
        for r in data["results"]:
            if r["mode"] == "graph" and r["op"] in ops and r["impl"] in ("symm", "symm-auto", "symm-one-shot", "nccl"):
                rows.append(_collective_row(node, r["op"], r["impl"], r["tokens"], r["tp"], r["hidden"],
                                            r["median_us"], f"{name} ({data['date']})"))  # not flags-*: an A/B
    data = json.loads((RESULTS / "h200x2-moe-dispatch.json").read_text())
    for r in data["results"]:
        if r["name"].endswith("-graph"):  # dispatch-symm-graph, combine-symm-graph, nccl-padded-graph
            op, impl = ("nccl-padded", "nccl") if r["name"] == "nccl-padded-graph" else r["name"].split("-")[:2]
            rows.append(_collective_row(node, op, impl, r["tokens"], r["tp"], data["hidden"], r["median_us"],
                                        "h200x2-moe-dispatch.json"))
    return rows


def fitted_on(op: str, impl: str, tokens: int, measured_in: str) -> bool:
    """Was the node file fitted on this TP2 collective row? The fused all-reduce rows of
    h200x2-collectives.json (symm_allreduce / symm_ar_rmsnorm), the symm dispatch / combine rows of
    h200x2-moe-dispatch.json (symm_dispatch / symm_combine), the NCCL all_reduce rows the TP2
    NCCL line came from (kernel_fit.fit_nccl_tp2) and NCCL's all_gather rows (fit_nccl_allgather_tp2).
    The symm all_gather and the collectives bench's own dispatch / combine rows are validation."""
    from benchmarks.kernel_fit import NCCL_FIT_TOKENS
    if measured_in.startswith("h200x2-moe-dispatch.json"):
        return impl == "symm"
    if impl == "nccl":
        return (op == "all_reduce" and tokens in NCCL_FIT_TOKENS) or op == "all_gather"
    return op in ("ar_rmsnorm", "all_reduce")


def _collective_row(node, op: str, impl: str, tokens: int, tp: int, hidden: int, measured_us: float,
                    measured_in: str) -> dict:
    comm = "nccl" if impl == "nccl" else "symm"
    cost, call = CostModel(node, tp, comm), BENCH_CALLS[op]
    message = tokens * hidden * 2 * (tp if op == "nccl-padded" else 1)  # bf16; padded: `tokens` rows per rank
    plan = (norm_collective(cost, op, "bench", message) if op == "ar_rmsnorm"
            else [Collective(call, op, "bench", message)])
    ops = flatten(cost, plan)
    predicted = sum(o.seconds for o in ops) * 1e6
    return {"group": "collectives", "case": f"{op} {impl} {tokens} tok", "tp": tp, "comm": comm,
            "role": CALIBRATION if fitted_on(op, impl, tokens, measured_in) else VALIDATION, "call": call, "message_bytes": message,
            "measured_in": measured_in, "measured_us": measured_us, "predicted_us": round(predicted, 2),
            "error": round(predicted / measured_us - 1, 4),
            "predicted_split_us": {o.name: round(o.seconds * 1e6, 2) for o in ops},
            "predicted_launches": sum(o.launches for o in ops)}


def _row(group: str, path: Path, data: dict, r: dict, node) -> dict:
    comm = "nccl" if r.get("comm") == "nccl" else "symm"  # "none" at TP1: no collective either way
    scheme = r.get("fp8_scheme", "channel") if r["dtype"] == "fp8" else "channel"
    model = shape_only_model(_model_config(r["model"]), r["tp"], "tp", r["dtype"], fp8_scheme=scheme)
    named = COMMIT.search(path.stem)
    commit = named.group(1) if named else GROUP_COMMIT[group]
    paths = measured_code(commit)
    with kernels_as_measured(node, commit, r["dtype"]) as measured_node:
        est = estimate_step(model, measured_node, 1, r["tokens"], r["context"], comm=comm, paths=paths)
    dtype = r["dtype"] + ("" if scheme == "channel" else f" {scheme}")
    return {"group": group, "case": f"{r['model']} {dtype} {r['name'].split('-')[0]}", "tp": r["tp"],
            "comm": r.get("comm", "none"), "measured_in": f"{path.name} ({data['date']})",
            "measured_commit": commit, "planned_as": {"step_head_kernel": paths.step_head, "argmax_kernel": paths.argmax,
                                                      "fp8_tensor_cores": ran_fp8_on_tensor_cores(commit),
                                                      "shared_expert_apart": has(commit, SHARED_APART_COMMIT)},
            "measured_us": r["median_us"], "predicted_us": round(est.seconds * 1e6, 1),
            "error": round(est.seconds * 1e6 / r["median_us"] - 1, 4),
            "predicted_split_us": {k: round(v * 1e6, 1) for k, v in est.by("kind").items()},
            "predicted_launches": sum(op.launches for op in est.ops)}


NOTES = {"draft": "the draft's 2-4-row GEMVs (0.13-0.5 MB of weights) are costed by the small-weight GEMV fits "
                  "(node gemv bf16_small_m1 / _m16, from h200-gemv-draft.json: 1.2-2.8 us a call, where the "
                  "big-weight fit's intercept alone is 5.29 us; they were +48% / +51% before); the forwards "
                  "stay ~13% under their measurement (edd0140, an older draft path than the plan's)",
         "TP2": "the rows measured before the Lamport kernel (commit 4a169b2; the flag kernel took 5.5 us per "
                "one-token AllReduce+RMSNorm where Lamport takes 3.9) are planned with today's symm constants: "
                "their 9 fused calls a maverick-slice step are priced ~14 us (2%) below the code they measured",
         "collectives": "TP2 only (the only TP size with committed collective measurements). Calibration "
                        "(fitted_on): the symm all_reduce / ar_rmsnorm rows of h200x2-collectives.json (the node "
                        "file's symm_allreduce / symm_ar_rmsnorm: the lines with the smallest worst error through "
                        "the symm-one-shot graph rows, the Lamport kernel at 128 programs, 1-128 tokens, commit "
                        "7761eb5, within 6.2%; the same kernel's 64-token AllReduce+RMSNorm measured 6.10 and "
                        "6.68 us in two runs), the symm dispatch / combine rows of h200x2-moe-dispatch.json "
                        "(symm_dispatch / symm_combine, least squares) and the NCCL all_reduce rows at 1 / 4 / "
                        "16 / 128 tokens (allreduce_latency_s_by_ranks 8.19 us, allreduce_bytes_per_s_by_ranks "
                        "165 GB/s: the smallest-worst-error line; NCCL is flat to 16 tokens, then climbs, so it "
                        "misses by up to 7.2%), and NCCL's all_gather rows of h200x2-collectives-all-gather.json "
                        "(one all_gather_into_tensor since 5a950ae; allgather_by_ranks 9.35 us + one rank's "
                        "message / 90 GB/s, within 7.6%). Validation: the symm all_gather of that file (own slot "
                        "copy + the fused sum; above GatherBySum.KEPT_BYTES the slots are zeroed each call, one "
                        "more launch; at 128 tokens the slots outgrow the kernel's capacity and NCCL gathers) "
                        "within 6.2%; the collectives bench's own dispatch / combine rows within 11.4%; NCCL "
                        "ar_rmsnorm within 7.3%; the padded all_to_all 17-21% low at 1-16 tokens and 12% at 128: "
                        "it is costed with NCCL's all-reduce latency (8.2 us) where NCCL's all_to_all takes "
                        "~10 us at small sizes (no all_to_all line is fitted). The list-form all_gather the "
                        "collectives file timed before 5a950ae (each rank's block copied out, then torch.cat) is "
                        "no longer the code; with the datasheet rate the 128-token rows were "
                        "31-58% low; with anchors.md's TP4 20 us latency every row was +77..+140%. Left out: eager "
                        "rows (host launches included; the model prices graph replays), the forced symm-two-shot "
                        "rows (no plan forces an algorithm), the nccl-eager EP dispatch / combine (uncapturable, "
                        "host-synchronised: 138-329 us, far above any graph-replay model), and h200x2-probe.json "
                        "(tp_probe.py, before the fused collective: torch's symmetric-memory kernel and NCCL "
                        "timed without the rank alignment of the later bench; superseded). nccl-padded is the "
                        "capturable NCCL all_to_all_single of `tokens` rows to every rank, costed as the "
                        "virtual clock costs an all_to_all of that tensor (message = tp x tokens rows)."}


def errors_of(rows: list[dict]) -> dict:
    errors = [abs(r["error"]) for r in rows]
    return {"median_abs_error": round(statistics.median(errors), 4), "worst_abs_error": max(errors),
            "cases": len(errors)}


def group_errors(rows: list[dict]) -> dict:
    """group -> median and worst |error| (and the case count); "current kernels": new TP1 and TP2;
    the collectives by role, their calibration rows (fitted on these data) apart from validation."""
    out = {group: errors_of([r for r in rows if r["group"] == group]) for group, _ in GROUPS
           if group != "collectives" and any(r["group"] == group for r in rows)}
    current = [r for r in rows if r["group"] in CURRENT]
    if current:
        out["current kernels"] = errors_of(current)
    for role in (VALIDATION, CALIBRATION):
        collectives = [r for r in rows if r["group"] == "collectives" and r["role"] == role]
        if collectives:
            out[f"collectives {role}"] = errors_of(collectives)
    if rows:
        out["whole table"] = errors_of(rows)
        out["whole table, validation rows only"] = errors_of([r for r in rows if r.get("role") != CALIBRATION])
    return out


def main() -> None:
    rows = validate()
    print_table(["group", "case", "tp", "measured us", "predicted us", "error", "launches", "role"],
                [[r["group"], r["case"], r["tp"], r["measured_us"], r["predicted_us"], f"{r['error']:+.1%}",
                  r["predicted_launches"], r.get("role", VALIDATION)] for r in rows])
    groups = group_errors(rows)
    for group, g in groups.items():
        print(f"{group}: median |error| {g['median_abs_error']:.1%}, worst {g['worst_abs_error']:.1%} "
              f"over {g['cases']} cases")
    out = RESULTS / "emulator-validation-h200.json"
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=RESULTS).stdout.strip() or "unknown"
    out.write_text(json.dumps({"machine": "shape-only emulation vs NVIDIA H200 measurements",
                               "emulated_code": commit,
                               "date": datetime.date.today().isoformat(),
                               "command": "python benchmarks/emulator_validation.py",
                               "targets": "median |error| <= 10%, worst <= 25% over the current-kernel rows "
                                          "(collectives: their own aggregates, calibration rows apart)",
                               "groups": groups, "notes": NOTES, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
