"""Tensor parallelism on real GPUs (needs two): Ray GPU actors that see each other, TP2 greedy
output equal to TP1's, and `bench decode --tp 2` timing graph-replayed steps of a TP group.

Skipped without two CUDA devices; the CPU suite covers the same layouts on CPU actors.
"""
import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

PROMPT = "The DGX B200 node is"


def _generate(world: int, dtype: str, *extra: str) -> dict:
    run = subprocess.run([sys.executable, "-m", "launch", "generate", "--device", "cuda", "--world-size", str(world),
                          "--dtype", dtype, "--no-spec", "--prompt", PROMPT, "--max-new-tokens", "48",
                          "--ignore-eos", "--json", *extra], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_tp2_greedy_equals_tp1_on_the_embedded_model_in_fp32():
    one, two = _generate(1, "fp32"), _generate(2, "fp32")
    assert two["world_size"] == 2 and len(one["token_ids"]) == 48
    assert two["token_ids"] == one["token_ids"]
    replicated = _generate(2, "fp32", "--replicate-embedding")  # every rank holds the table: no all-reduce to embed
    assert replicated["token_ids"] == one["token_ids"]


def test_bench_decode_tp2_times_graph_steps_above_their_floor(tmp_path):
    out = tmp_path / "tp2.json"
    run = subprocess.run([sys.executable, "-m", "launch", "bench", "decode", "--model", "medium", "--tp", "2",
                          "--modes", "graph", "--steps", "decode", "--iters", "30", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["name"], r["tp"]) for r in rows] == [("decode-graph", 2)]
    assert rows[0]["median_us"] > rows[0]["floor_us"] > 0
