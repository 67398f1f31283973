"""The virtual clock of real runs (generate --emulate-node): it sees the ops the shape-only walk
sees, a collective ends at the last modeled arrival plus the transfer on every rank, the trace
carries a modeled set of tracks that the trace tools read, and bad settings are refused.

One 2-rank session (local processes joined by gloo, no Ray) serves the world-2 checks: a traced,
emulated generate of two equal-length prompts on the `tiny` model, then a clock exercise in which
rank 1 is made later in virtual time on purpose.
"""
from __future__ import annotations

import json

import pytest
import torch

from cluster.hardware import node_spec
from cluster.procs import run_world
from cluster.timeline import read_trace
from cluster.trace_export import MODELED_PID, chrome_trace
from cluster.trace_plot import plot_timeline
from cluster.trace_summary import format_summary, summarize
from collectives.clocked import ClockedCommunicator
from collectives.communicator import SingleRankCommunicator
from launch.cli import main
from model.config import tiny
from model.embedded import random_state_dict, write_checkpoint
from tests.virtual_clock_session import LATE_S, NEW_TOKENS, NODE, session_rank
from model.sampling import SamplingParams
from workers.cost_model import Collective, Op
from workers.engine import Request
from workers.run_config import RunConfig
from workers.virtual_clock import ClockError, VirtualClock
from workers.worker import Worker


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("clock_ckpt")
    cfg = tiny(vocab_size=509)
    write_checkpoint(path, cfg, random_state_dict(cfg, seed=4, std=0.08))
    return path


@pytest.fixture(scope="module")
def session(ckpt, tmp_path_factory):
    trace_dir = tmp_path_factory.mktemp("clock_trace")
    out = run_world(2, session_rank, str(ckpt), str(trace_dir))
    return out, trace_dir


def test_real_run_clock_equals_the_shape_only_walk(session):
    out, _ = session
    assert len(out["real_steps"]) == NEW_TOKENS and int(out["ops"]) > 0
    assert torch.allclose(out["real_steps"], out["walk_steps"], rtol=1e-12, atol=0)
    assert out["real_steps"][0] > out["real_steps"][1]  # the prefill reads more than a decode step


def test_expert_parallel_run_clocks_its_all_to_alls_and_the_experts_it_computed(session):
    out, _ = session
    layers = int(out["ep_moe_layers"])
    assert out["ep_all_to_alls"].tolist() == [[layers, layers]] * NEW_TOKENS  # a dispatch and a combine per MoE layer
    read = out["ep_experts_read"]
    assert len(read) == layers * NEW_TOKENS and int(read.max()) <= int(out["ep_experts_per_rank"])
    assert (out["ep_steps"] > 0).all()


def test_a_collective_ends_at_the_last_arrival_plus_the_transfer_on_every_rank(session):
    exercise = session[0]["exercise"]  # (rank, call, [arrival, transfer, end, result ok])
    assert exercise.shape == (2, 4, 4)  # all-reduce, all-to-all; settled at once, then at a step's end
    for call in range(4):
        arrivals, transfers, ends = exercise[:, call, 0], exercise[:, call, 1], exercise[:, call, 2]
        expected = arrivals.max() + transfers.max()
        assert torch.allclose(ends, expected.expand(2), rtol=1e-12, atol=0), (call, exercise[:, call])
    for call in (0, 2):  # rank 1 came late to each all-reduce; rank 0 waited for it
        assert exercise[1, call, 0] - exercise[0, call, 0] == pytest.approx(LATE_S)
    for call in (1, 3):  # rank 1 sends more rows: its transfer bounds the all-to-all
        assert exercise[0, call, 1] < exercise[1, call, 1]
    assert exercise[:, :, 3].eq(1).all()  # the real collectives still returned what they return


def test_trace_has_measured_and_modeled_tracks(session, tmp_path):
    _, trace_dir = session
    trace = read_trace(trace_dir, assume_same_clock=True)
    modeled = trace.modeled
    assert modeled is not None and modeled.node == "DGX B200" and sorted(modeled.ranks) == [0, 1]
    measured_calls = [(c["op"], c["q"]) for c in trace.ranks[0].collectives]
    assert [(c["op"], c["q"]) for c in modeled.ranks[0].collectives] == measured_calls  # one modeled row per real call
    for inst in modeled.instances():
        ends = {r["t1"] for r in inst.per_rank.values()}
        assert len(ends) == 1 and min(ends) > inst.last_arrival, inst  # ends together, after a modeled transfer
    assert {s["n"] for s in modeled.ranks[0].spans} >= {"embed", "attention", "mlp", "moe", "lm_head"}
    doc = chrome_trace(trace)
    names = {(e["pid"], e["args"]["name"]) for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {(MODELED_PID + r, "communication") for r in (0, 1)} <= names and {(0, "compute"), (1, "compute")} <= names
    modeled_slices = [e for e in doc["traceEvents"] if e["ph"] == "X" and e["pid"] >= MODELED_PID]
    first_measured = min(s["t0"] for rt in trace.ranks.values() for s in rt.steps) / 1e3
    assert min(e["ts"] for e in modeled_slices) == pytest.approx(first_measured, abs=1e-3)  # aligned at step 0
    summary = summarize(trace)
    assert summary["modeled"]["node"] == "DGX B200" and summary["modeled"]["steps"] == NEW_TOKENS
    text = format_summary(summary)
    assert "modeled on DGX B200" in text and "model us" in text and "model ms" in text
    png = plot_timeline(trace, tmp_path / "both.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_plan_the_run_does_not_follow_is_an_error():
    clock = VirtualClock(node_spec(NODE), 0, 1)
    comm = ClockedCommunicator(SingleRankCommunicator(), SingleRankCommunicator(), clock)
    clock.follow([Op("gemv", "gemv", "attention", 1e-6), Collective("all_gather", "argmax all-gather", "head", 8)])
    with pytest.raises(ClockError, match="all_gather .* where the run calls all_reduce"):
        comm.all_reduce(torch.ones(3))
    clock.follow([Collective("all_reduce", "embedding all-reduce", "embed", 12)])
    with pytest.raises(ClockError, match="never made that call"):
        clock.step_end(1)


def test_no_clock_means_no_wrapper_and_pausing_tracing_keeps_the_clock(ckpt, tmp_path):
    """Without --emulate-node the worker's communicator and modules are the untouched ones (the
    clock costs nothing); with it and tracing, pausing and resuming tracing re-lays the trace's
    marks without dropping the clock's, and the clock keeps counting every step."""
    raw = SingleRankCommunicator()
    plain = Worker(0, RunConfig(str(ckpt), world_size=1), raw)
    plain.load()
    shadowed = lambda w: ["forward" in m.__dict__ or "route" in m.__dict__ for m in w.model.modules()]  # noqa: E731
    assert plain.clock is None and plain.comm is raw and not any(shadowed(plain))
    run = RunConfig(str(ckpt), world_size=1, emulate_node=NODE, trace_dir=str(tmp_path / "trace"))
    clocked = Worker(0, run, SingleRankCommunicator(), node=node_spec(NODE))
    clocked.load()
    request = [Request((0, 5, 9), SamplingParams(max_new_tokens=3, stop_on_eos=False))]
    first = clocked.generate(request)[1].modeled
    for on in (False, True):
        clocked.set_tracing(on)
        again = clocked.generate(request)[1].modeled
        assert again["step_s"] == pytest.approx(first["step_s"], rel=1e-12) and again["ttft_s"] > 0
    clocked.close()


def test_generate_json_and_trace_commands_report_both(ckpt, tmp_path, capsys):
    trace_dir = tmp_path / "trace"
    args = ["generate", "--model", str(ckpt), "--world-size", "1", "--prompt-ids", "0,5,9", "--max-new-tokens", "3",
            "--emulate-node", NODE, "--trace", str(trace_dir), "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    emulated = result["emulated"]
    assert emulated["node"] == "DGX B200"
    for key in ("ttft_s", "step_time_s", "tokens_per_s_per_user"):
        assert emulated[key]["measured"] > 0 and emulated[key]["modeled"] > 0
    # per user: tokens over the summed steps; step time: the median step (steps differ by their context)
    assert emulated["tokens_per_s_per_user"]["modeled"] == pytest.approx(1 / emulated["step_time_s"]["modeled"], rel=1e-4)
    assert (trace_dir / "modeled" / "rank0.msgpack").is_file()
    assert main(["trace", "summary", str(trace_dir)]) == 0
    assert "modeled on DGX B200" in capsys.readouterr().out
    assert main(["trace", "plot", str(trace_dir), "-o", str(tmp_path / "t.png")]) == 0


def test_bad_emulate_node_values_exit_2_with_one_line(ckpt, tmp_path, capsys):
    broken = tmp_path / "node.json"
    broken.write_text("{}")
    for value, message in (("nowhere", "unknown node 'nowhere'"), (str(broken), "missing or malformed")):
        assert main(["generate", "--model", str(ckpt), "--world-size", "1", "--prompt-ids", "1,2",
                     "--emulate-node", value]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(ValueError, match="runs steps eagerly"):
        RunConfig(str(ckpt), device="cuda", comm="nccl", world_size=1, cuda_graphs="on", emulate_node=NODE)
    assert node_spec(NODE).name == "DGX B200"
    # the node comes from above (cluster/hardware.py): a worker or clock left to resolve it is refused
    run = RunConfig(str(ckpt), world_size=1, emulate_node=NODE)
    with pytest.raises(ValueError, match="exactly when emulating"):
        Worker(0, run, SingleRankCommunicator())
    with pytest.raises(ValueError, match="exactly when emulating"):
        Worker(0, RunConfig(str(ckpt), world_size=1), SingleRankCommunicator(), node=node_spec(NODE))
    with pytest.raises(TypeError, match="needs a NodeSpec"):
        VirtualClock(NODE, 0, 1)
