"""Per-rank timelines: a traced 4-actor run with one rank made late on purpose, then checks on
what was recorded, the exported formats, HTA, the summary and bad trace directories."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from cluster.inprocess import InProcessNode
from cluster.ray_node import RayNode
from cluster.timeline import TraceError, read_rank_file, read_trace
from cluster.trace_export import chrome_trace
from cluster.trace_summary import summarize
from launch.trace_cli import finish_trace_dir, prepare_trace_dir
from model.config import tiny
from model.embedded import random_state_dict, write_checkpoint
from model.sampling import SamplingParams
from workers.engine import Request
from workers.run_config import RunConfig
from workers.tracing import StructureError

REPO = Path(__file__).resolve().parent.parent
WORLD, LATE_RANK = 4, 1


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("trace_ckpt")
    cfg = tiny(vocab_size=509)
    write_checkpoint(ckpt, cfg, random_state_dict(cfg, seed=4, std=0.08))
    return ckpt


@pytest.fixture(scope="module")
def traced(tmp_path_factory, tiny_ckpt):
    out = tmp_path_factory.mktemp("trace")
    prepare_trace_dir(str(out))
    run = RunConfig(str(tiny_ckpt), world_size=WORLD, moe_mode="ep", trace_dir=str(out), delay_rank=LATE_RANK,
                    delay_s=0.02)
    requests = [Request((0, 5, 9, 300), SamplingParams(max_new_tokens=6, stop_on_eos=False), "a"),
                Request((0, 7), SamplingParams(max_new_tokens=4, stop_on_eos=False), "b")]
    with RayNode(run) as node:
        node.load()
        node.generate(requests)
    finish_trace_dir(str(out))
    return out


def _raw(path: Path) -> list[dict]:
    """The header, then every record of one rank's file (the reader checks each batch's rows)."""
    rt = read_rank_file(path)
    return [rt.header, *rt.steps, *rt.spans, *rt.collectives]


UNEVEN = {"all_to_all", "moe_dispatch", "moe_combine"}


def test_every_collective_appears_on_every_rank_with_same_seq_and_bytes(traced):
    """Same op, dtype and bytes on every rank; for uneven all-to-alls, where each rank sends its
    own amount, what the group sent equals what it received."""
    seen = defaultdict(dict)
    ops = set()
    for rank in range(WORLD):
        records = _raw(traced / f"rank{rank}.msgpack")
        assert records[0]["type"] == "header" and records[0]["rank"] == rank
        for r in records[1:]:
            if r["k"] == "coll":
                seen[(tuple(r["g"]), r["q"])][rank] = r
                ops.add(r["op"])
    assert {"all_reduce", "allreduce_add_rmsnorm", "all_gather", "moe_dispatch", "moe_combine"} <= ops
    uneven = 0
    for key, per_rank in seen.items():
        assert sorted(per_rank) == list(key[0]), f"collective {key} missing on some rank"
        assert len({(r["op"], r["d"]) for r in per_rank.values()}) == 1, f"collective {key} differs: {per_rank}"
        if next(iter(per_rank.values()))["op"] in UNEVEN:
            uneven += len({r["b"] for r in per_rank.values()}) > 1
            assert sum(r["b"] for r in per_rank.values()) == sum(r["rb"] for r in per_rank.values()), key
        else:
            assert len({r["b"] for r in per_rank.values()}) == 1, f"collective {key} bytes differ: {per_rank}"
    assert uneven > 0  # the all-to-alls really were uneven
    spans = {r["n"] for r in _raw(traced / "rank0.msgpack")[1:] if r["k"] == "span"}
    assert {"attention", "moe", "mlp", "lm_head", "sampling"} <= spans


def _check_nesting(events: list[dict]) -> None:
    tracks = defaultdict(list)
    for e in events:
        if e["ph"] == "X":
            tracks[(e["pid"], e["tid"])].append(e)
    for track, slices in tracks.items():
        stack = []
        for e in sorted(slices, key=lambda e: (e["ts"], -e["dur"])):
            end = e["ts"] + e["dur"]
            while stack and stack[-1] <= e["ts"]:
                stack.pop()
            assert not stack or end <= stack[-1] + 1e-9, f"slice {e['name']} at {e['ts']} overlaps its parent on {track}"
            stack.append(end)


def test_merged_json_follows_the_format_rules(traced):
    doc = json.loads((traced / "timeline.json").read_text())
    events = doc["traceEvents"]
    for e in events:
        assert {"name", "ph", "pid"} <= e.keys()
        if e["ph"] == "X":
            assert {"cat", "ts", "dur", "tid", "args"} <= e.keys() and e["dur"] >= 0
        if e["ph"] == "X" and e["cat"] == "collective":
            assert {"bytes", "algorithm", "seq"} <= e["args"].keys()
    _check_nesting(events)
    names = {(e["pid"], e["args"]["name"]) for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {(r, "compute") for r in range(WORLD)} | {(r, "communication") for r in range(WORLD)} <= names
    flows = defaultdict(list)
    for e in events:
        if e["ph"] in ("s", "f"):
            flows[e["id"]].append(e)
    assert flows
    slices = [e for e in events if e["ph"] == "X" and e["cat"] == "collective"]
    for fid, pair in flows.items():
        assert sorted(e["ph"] for e in pair) == ["f", "s"], f"flow {fid} is not one s and one f"
        assert pair[0]["cat"] == pair[1]["cat"] and pair[0]["name"] == pair[1]["name"]
        for e in pair:
            assert e["ph"] == "s" or e.get("bp") == "e"
            assert any(s["pid"] == e["pid"] and s["tid"] == e["tid"] and s["ts"] <= e["ts"] <= s["ts"] + s["dur"]
                       for s in slices), f"flow {fid} endpoint is not inside a slice"


def test_hta_loads_the_per_rank_traces(traced):
    from hta.trace_analysis import TraceAnalysis
    analysis = TraceAnalysis(trace_dir=str(traced / "hta"))
    breakdown = analysis.get_temporal_breakdown(visualize=False)
    assert sorted(breakdown["rank"].tolist()) == list(range(WORLD))
    assert (breakdown["compute_time(us)"] > 0).all()
    overlap = analysis.get_comm_comp_overlap(visualize=False)
    assert sorted(overlap["rank"].tolist()) == list(range(WORLD))


def test_the_late_rank_is_the_straggler(traced):
    summary = summarize(read_trace(traced))
    assert summary["straggler"] == LATE_RANK
    counts = summary["last_arrival_counts"]
    assert counts[str(LATE_RANK)] > 0.5 * sum(counts.values())  # last at most collectives, despite load noise
    late = summary["ranks"][LATE_RANK]
    assert late["waiting"] < min(r["waiting"] for r in summary["ranks"] if r["rank"] != LATE_RANK)
    for op in ("allreduce_add_rmsnorm", "all_reduce"):
        assert summary["collectives"][op]["skew_us"]["p50"] > 10000  # the 20 ms delay shows as skew
    assert sum(r["compute"] + r["communication"] + r["waiting"] + r["other"] for r in summary["ranks"]) == \
        pytest.approx(WORLD)


def test_cli_summary_json_and_plot(traced, tmp_path):
    out = subprocess.run([sys.executable, "-m", "launch", "trace", "summary", str(traced), "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["straggler"] == LATE_RANK
    png = tmp_path / "t.png"
    out = subprocess.run([sys.executable, "-m", "launch", "trace", "plot", str(traced), "-o", str(png),
                          "--steps", "1:2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_trace_directories_are_refused(traced, tmp_path):
    with pytest.raises(TraceError, match="does not exist"):
        read_trace(tmp_path / "nope")
    with pytest.raises(TraceError, match="no rank"):
        read_trace(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in traced.glob("rank*.msgpack"):
        (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(TraceError, match="clock.json is missing"):
        read_trace(broken)
    assert read_trace(broken, assume_same_clock=True).world_size == WORLD
    (broken / "clock.json").write_text((traced / "clock.json").read_text())
    data = (broken / "rank2.msgpack").read_bytes()
    (broken / "rank2.msgpack").write_bytes(data[:-3])  # cut inside the last record
    with pytest.raises(TraceError, match="rank2.msgpack"):
        read_trace(broken)
    (broken / "rank2.msgpack").unlink()
    with pytest.raises(TraceError, match=r"lacks the traces of rank\(s\) \[2\]"):
        read_trace(broken)
    (broken / "rank2.msgpack").write_bytes(b"\x00garbage")
    with pytest.raises(TraceError):
        read_trace(broken)
    out = subprocess.run([sys.executable, "-m", "launch", "trace", "summary", str(broken)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error:") and "Traceback" not in out.stderr


def test_chrome_trace_carries_clock_offsets(traced):
    doc = chrome_trace(read_trace(traced))
    assert set(doc["metadata"]["clock_offsets"]) == {str(r) for r in range(WORLD)}


def test_paused_tracing_records_nothing_and_changes_no_token(tiny_ckpt, tmp_path):
    """set_tracing(False) puts the untraced path back (no stage wrapper, no communicator wrapper
    on the call path, no recorder); resuming records again; the tokens never change."""
    requests = [Request((0, 5, 9), SamplingParams(max_new_tokens=5, stop_on_eos=False))]
    with InProcessNode(RunConfig(str(tiny_ckpt), world_size=1)) as plain:
        plain.load()
        expected = plain.generate(requests)[0][0].token_ids
    node = InProcessNode(RunConfig(str(tiny_ckpt), world_size=1, trace_dir=str(tmp_path / "trace")))
    node.load()
    node.set_tracing(False)
    layer0, tracer = node.worker.model.layers[0], node.worker.tracer  # its wrapper marks attention and MLP
    assert "forward" not in vars(layer0)
    assert all(getattr(tracer, name).__self__ is tracer.inner for name in tracer.TRACED)  # the inner's own methods
    assert node.generate(requests)[0][0].token_ids == expected
    node.set_tracing(True)
    assert "forward" in vars(layer0)
    assert not any(getattr(getattr(tracer, name), "__self__", None) is tracer.inner for name in tracer.TRACED)
    assert node.generate(requests)[0][0].token_ids == expected
    node.shutdown()
    rank0 = read_trace(tmp_path / "trace").ranks[0]
    assert len(rank0.steps) == 5  # the traced call's steps only
    assert {s["n"] for s in rank0.spans} >= {"attention", "moe", "mlp", "lm_head", "sampling"}
    assert len({c["q"] for c in rank0.collectives}) == len(rank0.collectives) > 0


def test_layer_stages_are_cut_at_the_layers_collectives(tiny_ckpt, tmp_path):
    """A decoder layer's attention ends where its first collective starts and starts where the
    previous layer's last collective ended; its feed-forward runs from the first collective's end
    to the start of the layer's last collective. Without traced
    collectives the stages cannot be cut, and that is an error, not a silent trace."""
    node = InProcessNode(RunConfig(str(tiny_ckpt), world_size=1, trace_dir=str(tmp_path / "trace")))
    node.load()
    requests = [Request((0, 5, 9), SamplingParams(max_new_tokens=3, stop_on_eos=False))]
    node.generate(requests)
    node.worker.tracer.set_enabled(False)  # stages still marked, collectives no longer recorded
    with pytest.raises(StructureError, match="decoder layer 0 made 0 traced collective"):
        node.generate(requests)
    node.worker.tracer.set_enabled(True)
    node.shutdown()
    rank0 = read_trace(tmp_path / "trace").ranks[0]
    by_layer = defaultdict(list)
    for c in rank0.collectives:
        by_layer[c["s"], c["l"]].append(c)
    checked = 0
    for span in rank0.spans:
        colls = by_layer.get((span["s"], span["l"]))
        if span["n"] == "attention":
            assert span["t0"] <= span["t1"] == colls[0]["t0"]
            if span["l"] > 0:  # a layer starts where the previous layer's last collective ended
                assert span["t0"] == by_layer[span["s"], span["l"] - 1][-1]["t1"]
            else:  # the first layer takes its own timestamp, after the embedding's all-reduce
                assert span["t0"] >= by_layer[span["s"], -1][0]["t1"]
            checked += 1
        elif span["n"] in ("mlp", "moe"):
            assert (span["t0"], span["t1"]) == (colls[0]["t1"], colls[-1]["t0"])
            checked += 1
    assert checked == 2 * tiny().n_layers * 3  # two stages per layer, three steps
