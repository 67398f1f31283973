"""`dgx-emu generate --dtype fp8` as a user runs it (`python -m launch`, world size 1, in-process):
it runs, and the memory it reports per rank is the FP8 layout's, computed here from the config:
one byte per FP8 weight plus float32 scales, about half the BF16 bytes. Bad FP8 flags are user
errors (exit 2, one line), refused before any model is read."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import tiny
from model.embedded import random_state_dict, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CFG = tiny(vocab_size=300)
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    path = tmp_path_factory.mktemp("fp8_cli")
    write_checkpoint(path, CFG, random_state_dict(CFG, seed=3, std=0.08))
    base = ["--model", str(path), "--prompt-ids", "5,6,7,8,9", "--max-new-tokens", str(NEW_TOKENS),
            "--world-size", "1", "--json"]
    argvs = {"bf16": ["--dtype", "bf16"], "fp8": ["--dtype", "fp8"],
             "per-tensor-kv": ["--dtype", "fp8", "--fp8-scheme", "per-tensor", "--kv-dtype", "fp8"],
             "block": ["--dtype", "fp8", "--fp8-scheme", "block"]}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = {k: subprocess.Popen([sys.executable, "-m", "launch", "generate", *base, *a], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k, a in argvs.items()}
    return {k: subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for k, p in procs.items()}


def _summary(res) -> dict:
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fp8_layout_bytes(static_inputs: bool, block: bool) -> tuple[int, int]:
    """(bytes of the FP8 model, bytes of the BF16 model) from the config alone: FP8 weights 1 byte,
    per-row float32 weight scales (per row and 128-column group for blocks), float32 static input
    scales; embeddings, LM head, router and norms stay BF16; fp32 buffers (RoPE, KV scales) alike."""
    c = CFG
    h, d, g = c.hidden_size, c.head_dim, (lambda k: -(-k // 128))
    fp8_weights = rows = inputs = 0

    def linear(n_out: int, n_in: int, count: int = 1) -> None:
        nonlocal fp8_weights, rows, inputs
        fp8_weights += count * n_out * n_in
        rows += count * n_out * (g(n_in) if block else 1)
        inputs += count if static_inputs else 0

    for layer in range(c.n_layers):
        linear((c.n_heads + 2 * c.n_kv_heads) * d, h)
        linear(h, c.n_heads * d)
        if c.is_moe(layer):
            linear(2 * c.intermediate_size, h, count=c.n_experts + 1)  # experts and the shared expert
            linear(h, c.intermediate_size, count=c.n_experts + 1)
        else:
            linear(2 * c.intermediate_size_mlp, h)
            linear(h, c.intermediate_size_mlp)
    high = c.n_params() - fp8_weights  # everything else, BF16 in both models
    buffers = 4 * (c.head_dim // 2) + 2 * 4 * c.n_layers  # inv_freq, k/v scales
    return fp8_weights + 4 * (rows + inputs) + 2 * high + buffers, 2 * c.n_params() + buffers


@pytest.mark.parametrize("name,static,block", [("fp8", False, False), ("per-tensor-kv", True, False),
                                               ("block", False, True)])
def test_fp8_weights_take_about_half_the_bf16_bytes(runs, name, static, block):
    got, bf16 = _summary(runs[name]), _summary(runs["bf16"])
    want_fp8, want_bf16 = _fp8_layout_bytes(static, block)
    assert bf16["ranks"][0]["weights_bytes"] == want_bf16
    assert got["ranks"][0]["weights_bytes"] == want_fp8
    assert 0.45 < want_fp8 / want_bf16 < 0.6
    assert got["dtype"] == "fp8" and 1 <= len(got["token_ids"]) <= NEW_TOKENS
    assert len(got["token_ids"]) == NEW_TOKENS or got["finish_reason"] == "eos"


def test_fp8_kv_cache_takes_half_the_bytes(runs):
    kv = _summary(runs["per-tensor-kv"])["memory_per_rank"][0]["kv_cache_bytes"]
    assert kv * 2 == _summary(runs["bf16"])["memory_per_rank"][0]["kv_cache_bytes"]
    assert _summary(runs["fp8"])["memory_per_rank"][0]["kv_cache_bytes"] == 2 * kv


@pytest.mark.parametrize("flags,words", [
    (["--dtype", "bf16", "--fp8-scheme", "block"], ["--fp8-scheme", "--dtype fp8"]),
    (["--dtype", "fp8", "--kv-dtype", "fp4"], ["--kv-dtype", "fp4"])])
def test_bad_fp8_flags_are_user_errors(capsys, tmp_path, flags, words):
    """Refused before any model is read (in-process: `main` is what `python -m launch` runs)."""
    from launch.cli import main

    assert main(["generate", "--model", str(tmp_path), "--prompt-ids", "5", "--world-size", "1", *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    for word in words:
        assert word in lines[0]
