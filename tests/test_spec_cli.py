"""`dgx-emu generate` decodes with EAGLE-3 out of the box (the embedded model's shipped draft),
reports acceptance in --json, and `--no-spec` / `--tree` give the same tokens; bad speculative
input exits with code 2 and a line naming the fault. Run as a user runs it (`python -m launch`
in a subprocess, all processes started together)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.embedded import default_draft_dir

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300
BASE = ["generate", "--prompt", "The DGX B200 node", "--max-new-tokens", "12", "--world-size", "1", "--json"]
RUNS = {
    "spec": BASE,
    "nospec": BASE + ["--no-spec"],
    "tree": BASE + ["--tree", "--tree-top-k", "3", "--tree-depth", "3", "--tree-tokens", "6"],
    "bad_draft": BASE + ["--draft", "/nonexistent/draft"],
    "bad_layers": BASE + ["--draft-layers", "0,1,9"],
    "train_no_target": ["train-draft", "--out", "/tmp/never-written"],
}


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = {key: subprocess.Popen([sys.executable, "-m", "launch", *argv], cwd=ROOT, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for key, argv in RUNS.items()}
    done = {}
    for key, p in procs.items():
        try:
            out, err = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        done[key] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return done


def _summary(res: subprocess.CompletedProcess) -> dict:
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_generate_uses_the_shipped_draft_by_default(runs):
    summary = _summary(runs["spec"])
    assert summary["spec"]["config"] == "chain(3)" and summary["spec"]["draft"] == str(default_draft_dir())
    assert summary["acceptance_length"] >= 1.0
    assert len(summary["acceptance_per_position"]) == 3
    assert summary["new_tokens"] == 12 and summary["spec_per_request"][0]["verify_steps"] >= 1
    assert "warning" not in runs["spec"].stderr  # the draft's fingerprint matches the shipped default model


def test_no_spec_and_tree_give_the_same_tokens(runs):
    spec, plain, tree = (_summary(runs[k]) for k in ("spec", "nospec", "tree"))
    assert plain["spec"] is None and "acceptance_length" not in plain
    assert tree["spec"]["config"] == "tree(top_k=3, depth=3, tokens=6)"
    assert spec["token_ids"] == plain["token_ids"] == tree["token_ids"]


@pytest.mark.parametrize("key,words", [("bad_draft", "/nonexistent/draft does not exist"),
                                       ("bad_layers", "outside the target's 4 layers"),
                                       ("train_no_target", "--target PATH")])
def test_bad_speculative_input_exits_2(runs, key, words):
    res = runs[key]
    assert res.returncode == 2, res.stderr
    assert words in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
