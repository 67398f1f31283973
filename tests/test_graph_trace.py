"""Traced graph steps: GPU stamps become the rows a host-traced step has (stamp_rows on CPU), and
on a GPU a traced run keeps replaying graphs, with the same tokens as an untraced run and a
trace whose collectives and stages come from the stamps."""
import itertools
import json
import subprocess
import sys

import pytest
import torch

from workers.graph_trace import StampError, stamp_rows

OP = ("allreduce_add_rmsnorm", 1024, torch.bfloat16)


def _stamps(n_layers: int, arrived: bool) -> list:
    stamps, t = [(("step", "begin"), 100)], 100
    for _ in range(2 * n_layers):
        for kind in ("begin", "arrived", "end") if arrived else ("begin", "end"):
            t += 7
            stamps.append(((kind, *OP), t))
    return stamps + [(("step", "end"), t + 5)]


@pytest.mark.parametrize("arrived", [False, True])
def test_stamps_become_collectives_and_stage_spans(arrived):
    seq = itertools.count(11).__next__
    coll, spans, (t0, t1) = stamp_rows(_stamps(2, arrived), ["moe", "mlp"], [0, 1], seq, step=3, offset_ns=1000)
    step = 7 * (3 if arrived else 2)  # ns from one call's begin to the next's
    rows = [coll[i:i + 10] for i in range(0, len(coll), 10)]
    assert [r[2] for r in rows] == [11, 12, 13, 14]  # the group's sequence numbers
    assert [r[5] for r in rows] == [0, 0, 1, 1] and all(r[6] == 3 and r[0] == OP[0] and r[3] == 1024 for r in rows)
    assert rows[0][7] == 1107 and rows[0][8] == 1107 + step - 7
    named = [spans[i:i + 5] for i in range(0, len(spans), 5)]
    assert [(s[0], s[1]) for s in named] == [("attention", 0), ("moe", 0), ("attention", 1), ("mlp", 1), ("lm_head", -1)]
    assert named[0][3] == t0 == 1100 and named[-1][4] == t1 and all(s[3] <= s[4] for s in named)
    assert all(named[i][4] == rows[i][7] for i in range(4))  # a stage ends where its call starts


@pytest.mark.parametrize("embedding,gather", [(True, False), (True, True), (False, True)])
def test_several_ranks_stamp_the_embedding_all_reduce_and_the_pick_all_gather(embedding, gather):
    """At several ranks the step's first fused call is the embedding's all-reduce (none where every
    rank holds the table) and (symm) its last the greedy pick's all-gather: collective rows of layer
    -1 around the layers' rows, as a host-traced step has them; attention starts where the embedding's
    call ends, the LM head ends where the pick's gather starts."""
    stamps = _stamps(2, True)  # 4 layer calls
    t = stamps[-1][1]
    first = [((kind, *OP), 100 + k) for k, kind in enumerate(("begin", "arrived", "end"))]
    last = [((kind, "all_reduce", 64, torch.float32), t + 12 + k) for k, kind in enumerate(("begin", "arrived", "end"))]
    stamps = [stamps[0]] + (first if embedding else []) + [(label, time + 10) for label, time in stamps[1:-1]] \
        + (last if gather else []) + [(("step", "end"), t + 20)]
    coll, spans, (t0, t1) = stamp_rows(stamps, ["moe", "mlp"], [0, 1], itertools.count().__next__, 3, 0)
    rows = [coll[i:i + 10] for i in range(0, len(coll), 10)]
    assert [r[5] for r in rows] == [-1] * embedding + [0, 0, 1, 1] + [-1] * gather
    assert [r[2] for r in rows] == list(range(len(rows)))
    named = [spans[i:i + 5] for i in range(0, len(spans), 5)]
    layer_rows = rows[embedding:]
    assert named[0][:2] == ["attention", 0] and named[0][4] == layer_rows[0][7]  # ends where layer 0's call starts
    if embedding:
        assert named[0][3] == rows[0][8]  # from the embedding call's end
    assert named[-1][:2] == ["lm_head", -1] and named[-1][4] == (rows[-1][7] if gather else t1)
    assert t0 == stamps[0][1] and all(s[3] <= s[4] for s in named)


def test_stamps_of_the_wrong_shape_are_refused():
    with pytest.raises(StampError, match="two per layer"):
        stamp_rows(_stamps(3, False), ["moe"], [0], itertools.count().__next__, 0, 0)
    with pytest.raises(StampError, match="two per layer"):
        stamp_rows(_stamps(1, False), ["moe", "mlp"], [0], itertools.count().__next__, 0, 0)
    with pytest.raises(StampError, match="begin and end"):
        stamp_rows(_stamps(1, False)[1:], ["moe"], [0], itertools.count().__next__, 0, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="graph replay needs a GPU")
@pytest.mark.parametrize("world", [1, 2])
def test_traced_gpu_run_replays_graphs_with_the_untraced_tokens(tmp_path, world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")

    def generate(*extra):
        run = subprocess.run([sys.executable, "-m", "launch", "generate", "--device", "cuda", "--world-size", str(world),
                              "--dtype", "bf16", "--no-spec", "--prompt", "The DGX B200 node is", "--max-new-tokens",
                              "40", "--ignore-eos", "--json", *extra], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        return json.loads(run.stdout.strip().splitlines()[-1])
    plain, traced = generate(), generate("--trace", str(tmp_path / "t"))
    assert traced["token_ids"] == plain["token_ids"]
    from cluster.timeline import read_trace
    trace = read_trace(tmp_path / "t")
    steps = [s for s in trace.ranks[0].steps if s.get("graph")]
    assert len(steps) >= 30  # the decode steps replayed graphs
    colls = [c for c in trace.ranks[0].collectives if c["s"] == steps[5]["s"]]
    assert colls and all(steps[5]["t0"] <= c["t0"] <= c["t1"] <= steps[5]["t1"] for c in colls)
    assert len(trace.ranks) == world
