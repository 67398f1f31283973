"""The shape-only emulator: node files, the op walk, the projection and the `emulate` command.

The walk must read exactly the bytes the real step reads (the GPU bench's floor counts them from a
real model: both must agree on the same model), stay within its validation bounds against the
committed H200 measurements, and refuse bad input with exit code 2.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cluster.hardware import node_spec
from model.config import ConfigError, maverick, preset
from workers.cost_model import CostModel
from workers.emulate import estimate_step, module_bytes, project, shape_only_model
from workers.step_bench import step_bytes


@pytest.mark.parametrize("name", ["dgx-b200", "hgx-h200", "hgx-h100", "b200"])
def test_node_files_load_with_sources(name):
    node = node_spec(name)
    assert node.gpus_per_node == 8 and node.copy_bytes_per_s < node.gpu.hbm_bytes_per_s
    for key in ("gpu", "gemv", "kernel_s", "copy_fraction", "allreduce_latency_s"):
        assert node.sources.get(key), f"{name}: no source for {key}"


def test_a_users_node_file_is_read_and_checked(tmp_path):
    raw = json.loads((node_spec.__globals__["NODES_DIR"] / "hgx-h200.json").read_text())
    raw["gpu"]["hbm_bytes_per_s"] = 2 * raw["gpu"]["hbm_bytes_per_s"]
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(raw))
    assert node_spec(str(mine)).copy_bytes_per_s == pytest.approx(2 * node_spec("h200").copy_bytes_per_s)
    del raw["calibration"]["gemv"]
    mine.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="gemv"):
        node_spec(str(mine))


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_walk_reads_the_bytes_of_the_real_step(dtype):
    """Weight and KV bytes of the shape-only walk == the floor bytes that `bench decode` counts
    (workers/step_bench.py, its own code) for the same model, minus the norms, which the walk
    folds into the collective's kernel."""
    cfg = preset("medium")
    meta = shape_only_model(cfg, 1, "tp", dtype)
    est = estimate_step(meta, node_spec("h200"), 1, 1, 512, distinct_experts=1)
    walked = sum(op.bytes for op in est.ops if op.kind != "collective")
    counted = step_bytes(meta, 512, [1] * len(cfg.moe_layers), 2)
    norms = sum(layer.input_layernorm.weight.numel() + layer.post_attention_layernorm.weight.numel()
                for layer in meta.layers) * 2 + cfg.hidden_size * 2
    assert walked == counted - norms


def test_projection_speeds_up_with_speculation_and_a_faster_node():
    cfg = maverick(n_layers=16)  # with 4 layers and fused collectives, 3 draft steps cost more than 1.9 tokens save
    model = shape_only_model(cfg, 8, "tp", "fp8")
    plain = project(cfg, node_spec("h200"), 8, "tp", "fp8", 1, 1024, model=model)
    spec = project(cfg, node_spec("h200"), 8, "tp", "fp8", 1, 1024, draft_len=3, acceptance_length=2.9, model=model)
    b200 = project(cfg, node_spec("b200"), 8, "tp", "fp8", 1, 1024, model=model)
    assert spec.step_s > plain.step_s and spec.tokens_per_s_per_user > plain.tokens_per_s_per_user
    assert b200.step_s < plain.step_s
    assert sum(plain.breakdown["by_kind"].values()) == pytest.approx(plain.step_s)
    two_replicas = project(cfg, node_spec("h200"), 4, "tp", "fp8", 2, 1024)
    assert two_replicas.tokens_per_s_per_node == pytest.approx(two_replicas.tokens_per_s_per_user * 4)


def test_predictions_stay_near_the_h200_measurements():
    """The committed validation cases (benchmarks/emulator_validation.py). The current-kernel rows
    (new TP1: afb18b2 / 0f037de / 7a5ac81 / db3640e / bdd3aa7; TP2: afb18b2 / db3640e / bdd3aa7 over
    the symm collectives) meet the issue's targets, over all of them and in each group: median
    |error| <= 10% and worst <= 25%. The old TP1 rows
    measured an older kernel set (no PDL, 101 launches a medium step) than the one the launch plan
    mirrors, so they are reported, not held to the targets: their medium rows are all slower than
    the current plan predicts. The EAGLE-3 draft forwards (h200-draft-step.json) are reported beside
    them: their small GEMVs fall outside the GEMV fit's range (the validation file's notes). The TP2
    collectives are rows too: the symm ones and the NCCL all-reduce rows at 1-128 tokens are calibration
    (the node file's symm constants and TP2 NCCL latency and rate were fitted on them), the other nccl ones
    validation; each kind has its own aggregate, calibration kept apart."""
    sys.path.insert(0, str(node_spec.__globals__["NODES_DIR"].parent.parent))
    from benchmarks.emulator_validation import CALIBRATION, CURRENT, VALIDATION, group_errors, validate
    rows = validate()
    assert {r["group"] for r in rows} == {"old TP1", "new TP1", "TP2", "draft", "collectives"} and len(rows) >= 60
    collectives = [r for r in rows if r["group"] == "collectives"]  # TP2: symm fitted on them, nccl not
    fit_nccl = {(f"all_reduce nccl {t} tok") for t in (1, 4, 16, 128)}  # the TP2 NCCL line's rows (kernel_fit)
    fit_nccl |= {f"all_gather nccl {t} tok" for t in (1, 4, 16, 32, 64, 128)}  # and NCCL all_gather's line's
    fused = lambda r: r["comm"] == "symm" and r["call"] in ("all_reduce", "allreduce_add_rmsnorm")  # noqa: E731
    moe_fit = lambda r: r["measured_in"].startswith("h200x2-moe-dispatch.json") and r["comm"] == "symm"  # noqa: E731
    assert all(r["tp"] == 2 and r["role"] == (CALIBRATION if fused(r) or moe_fit(r) or r["case"] in fit_nccl
                                              else VALIDATION) for r in collectives)
    fitted = [r for r in collectives if "one-shot" in r["case"] or moe_fit(r)]
    # the fit reproduces its own data: 2 symm ops x 6 token counts, dispatch and combine x 4
    assert len(fitted) == 20 and all(abs(r["error"]) < 0.15 for r in fitted)
    # the symm all-gather (copy + fused sum; at 128 tokens its slots outgrow the kernel and NCCL gathers)
    # and the bench's own dispatch / combine are validation: within 12%
    gathered = [r for r in collectives if r["comm"] == "symm" and r["role"] == VALIDATION]
    assert len(gathered) == 16 and all(abs(r["error"]) < 0.12 for r in gathered)
    draft = {r["case"].split()[3]: r for r in rows if r["group"] == "draft"}  # reported beside, not held to targets
    assert sorted(draft) == ["catch_up", "depth"] and draft["catch_up"]["predicted_launches"] == 11
    assert draft["catch_up"]["predicted_us"] > draft["depth"]["predicted_us"] > 0  # the catch-up adds the fc GEMV
    groups = group_errors(rows)
    # the issue's targets over the current-kernel rows and over each of their groups (TP2's median was
    # 10.7% until the one-row FP8 pair got its own fit, node pair_fp8_m1_bandwidth_fraction)
    for group in (*CURRENT, "current kernels"):
        assert groups[group]["median_abs_error"] <= 0.10, groups
        assert groups[group]["worst_abs_error"] <= 0.25, groups
    # the NCCL lines' own rows: all-reduce, 2 parameters over 4 sizes whose 1- and 4-token rows measured 5%
    # apart the wrong way round (8.89 vs 8.42 us) and whose 16-token row sits on the flat part (8.57 us) of a
    # curve that then climbs to 17.36 us: the line with the smallest worst error misses by 7.2%; all-gather's
    # by 7.6% (kernel_fit)
    assert all(abs(r["error"]) < 0.08 for r in collectives if r["case"] in fit_nccl)
    # every row of the table, validation and calibration, meets the targets
    assert groups["whole table"]["median_abs_error"] <= 0.10 and groups["whole table"]["worst_abs_error"] <= 0.25
    assert groups["current kernels"]["cases"] == sum(r["group"] in CURRENT for r in rows) >= 12
    validated, calibrated = (groups[f"collectives {role}"]["cases"] for role in (VALIDATION, CALIBRATION))
    assert validated + calibrated == len(collectives)
    assert groups["whole table, validation rows only"]["cases"] == len(rows) - calibrated
    assert all(r["error"] < 0 for r in rows if r["group"] == "old TP1" and r["case"].startswith("medium"))


def test_fused_collective_is_one_op_fitted_to_the_tp2_measurements():
    """symm: allreduce_add_rmsnorm is ONE op whose TP2 time is within 7% of every measured
    symm-one-shot graph row (two runs of the same kernel measured the 64-token row 6.10 and 6.68 us,
    h200x2-collectives-programs.json's lamport@128 and h200x2-collectives.json: 9% apart, so no line
    holds one run's every row within 5%); nccl: the collective plus the add+RMSNorm launch; TP8
    extrapolated above TP2 (the (n - 1) term)."""
    from workers.cost_model import Collective, CostModel
    node = node_spec("h200")
    rows = json.loads((node_spec.__globals__["NODES_DIR"].parent.parent / "benchmarks" / "results" /
                       "h200x2-collectives.json").read_text())["results"]
    call_of = {"ar_rmsnorm": "allreduce_add_rmsnorm", "all_reduce": "all_reduce"}
    measured = [r for r in rows if r["impl"] == "symm-one-shot" and r["mode"] == "graph"]
    assert len(measured) == 12  # all_reduce and ar_rmsnorm at 1, 4, 16, 32, 64, 128 tokens
    for r in measured:
        message = r["tokens"] * r["hidden"] * 2
        (op,) = CostModel(node, 2, "symm").collective(Collective(call_of[r["op"]], "x", "attention", message))
        assert op.seconds * 1e6 == pytest.approx(r["median_us"], rel=0.07), r
        tp8 = CostModel(node, 8, "symm").collective(Collective(call_of[r["op"]], "x", "attention", message))[0]
        assert tp8.seconds > op.seconds
    meta = shape_only_model(preset("medium"), 2, "tp", "bf16")
    symm = estimate_step(meta, node, 1, 1, 512, comm="symm")
    nccl = estimate_step(meta, node, 1, 1, 512, comm="nccl")
    norms = lambda est: [op for op in est.ops if op.name.endswith("add+rmsnorm")]  # noqa: E731
    assert not norms(symm) and len(norms(nccl)) == 2 * len(meta.layers)
    assert symm.seconds < nccl.seconds
    with pytest.raises(ValueError, match="comm must be one of"):
        CostModel(node, 2, "mpi")


def test_emulate_command_json_and_errors():
    cmd = [sys.executable, "-m", "launch", "emulate", "--model", "maverick", "--node", "dgx-b200", "--tp", "8",
           "--dtype", "fp8", "--context", "1024", "--draft-len", "3", "--acceptance-length", "2.9", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("tokens_per_s_per_user", "tokens_per_s_per_node", "step_time_s", "breakdown"):
        assert key in result
    assert result["tokens_per_s_per_user"] == pytest.approx(2.9 / result["step_time_s"])
    for bad, message in ((["--tp", "16"], "the node has 8 GPUs"), (["--draft-len", "3"], "acceptance-length"),
                         (["--model", "medium", "--tp", "3"], "does not split"), (["--node", "nowhere"], "unknown node")):
        run = subprocess.run([sys.executable, "-m", "launch", "emulate", *bad], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr


def test_replicated_embedding_drops_the_embedding_all_reduce_from_the_plan():
    """--replicate-embedding (every rank holds the table): the step plan has no embedding collective,
    so it is one call and its time shorter; nothing else changes."""
    node = node_spec("dgx-b200")
    steps = {}
    for replicated in (False, True):
        model = shape_only_model(maverick(n_layers=4), 8, "tp", "fp8", replicate_embedding=replicated)
        ops = estimate_step(model, node, 1, 1, 1024).ops
        steps[replicated] = (sum(op.seconds for op in ops), [op for op in ops if op.part == "embed"])
    (split, split_embed), (whole, whole_embed) = steps[False], steps[True]
    assert [op.kind for op in split_embed] == ["kernel", "collective"] and [op.kind for op in whole_embed] == ["kernel"]
    assert whole == pytest.approx(split - split_embed[1].seconds)


def test_meta_model_has_no_storage():
    meta = shape_only_model(maverick(), 8, "tp", "fp8")
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert meta.layers[1].feed_forward.experts.gate_up_proj.dtype == torch.float8_e4m3fn


def test_expert_parallel_adds_all_to_alls_and_reads_whole_experts():
    cfg = maverick(n_layers=4)
    node = node_spec("b200")
    tp_layout = estimate_step(shape_only_model(cfg, 8, "tp", "fp8"), node, 1, 1, 512)
    ep_layout = estimate_step(shape_only_model(cfg, 8, "ep", "fp8"), node, 1, 1, 512)
    assert not [op for op in tp_layout.ops if op.name in ("dispatch", "combine")]
    assert len([op for op in ep_layout.ops if op.name in ("dispatch", "combine")]) == 2 * len(cfg.moe_layers)
    whole = [op.bytes for op in ep_layout.ops if op.name.startswith("routed gate_up_proj")]
    pairs = [op.bytes for op in tp_layout.ops if op.name.startswith("shared + routed gate_up_proj")]
    shared = module_bytes(shape_only_model(cfg, 8, "tp", "fp8").layers[1].feed_forward.shared_expert.gate_up_proj)
    assert len(whole) == len(pairs) == len(cfg.moe_layers)
    assert whole[0] == 8 * (pairs[0] - shared)  # one whole expert against an eighth of one (beside the shared one)


def test_sweep_writes_its_table_and_plot(tmp_path):
    from launch.emulate_sweep import sweep, write_sweep
    rows = sweep(preset("medium"), 512, 2.5)
    assert {r["node"] for r in rows} == {"DGX B200", "HGX H200", "HGX H100"}
    assert {(r["moe"], r["dtype"]) for r in rows} == {("tp", "bf16"), ("tp", "fp8"), ("ep", "bf16"), ("ep", "fp8")}
    assert all(r["batch"] * (r["draft_len"] + 1) <= 16 and r["fits"] for r in rows)
    write_sweep(rows, tmp_path, "medium")
    assert json.loads((tmp_path / "sweep.json").read_text()) == rows
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    big = project(maverick(), node_spec("h100"), 1, "tp", "bf16", 1, 1024)
    assert big.breakdown["memory_per_rank_bytes"] > node_spec("h100").gpu.hbm_bytes  # 800 GB: marked, not fitted


def test_cost_memo_charges_a_new_module_its_own_bytes_when_it_reuses_a_dead_ones_id():
    """The clock makes a new GPU twin whenever tracing is switched; a module made after another one
    died often gets its id. Each new module must be charged its own bytes, not the dead one's."""
    cost = CostModel(node_spec("dgx-b200"), 1)
    for width in range(8, 8 + 64):
        linear = torch.nn.Linear(width, 16, bias=False, device="meta")
        op = cost.linear("q_proj", "attention", linear, 1)
        assert op.bytes == module_bytes(linear) == width * 16 * 4
        del linear
    assert len(cost._module_memos) == 0  # a dead module's ops are dropped with it
