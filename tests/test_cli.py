"""The `dgx-emu generate` command line, run as a user runs it: `python -m launch` in a subprocess
from the repository root. Runs use --world-size 1 (in-process, no Ray) to stay fast; the processes
of each group start together, so their start-up (importing torch) overlaps.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.embedded import ensure_default_model
from model.tokenizer import byte_level_tokenizer
from tests.hf_reference import CONFIGS, hf_greedy, make_hf_checkpoint, random_ids

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    """(transformers model, checkpoint dir without tokenizer.json)."""
    hf, path = make_hf_checkpoint(tmp_path_factory.mktemp("hf_ckpt"), CONFIGS["moe_every_layer"], seed=31)
    assert not (path / "tokenizer.json").exists()
    return hf, path


def _run_all(argvs: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Starts `python -m launch generate ARGS` for every entry at once; waits for all."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = {key: subprocess.Popen([sys.executable, "-m", "launch", "generate", *argv], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for key, argv in argvs.items()}
    done = {}
    for key, p in procs.items():
        try:
            out, err = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            pytest.fail(f"{key}: dgx-emu did not finish in {TIMEOUT_S} s\n{err}")
        done[key] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return done


def _summary(res: subprocess.CompletedProcess) -> dict:
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def _ids_arg(ids) -> str:
    return ",".join(str(int(t)) for t in ids)


# ---------------------------------------------------------------------------------------------
# The embedded default model: --json, seeded sampling
# ---------------------------------------------------------------------------------------------

PROMPT = ["--prompt", "The DGX B200 node", "--max-new-tokens", "10", "--world-size", "1", "--json"]


@pytest.fixture(scope="module")
def default_runs():
    sampled = PROMPT + ["--temperature", "0.8"]
    return _run_all({"greedy": PROMPT, "seed3a": sampled + ["--seed", "3"], "seed3b": sampled + ["--seed", "3"],
                     "seed4": sampled + ["--seed", "4"]})


def test_json_summary_of_the_embedded_default(default_runs):
    summary = _summary(default_runs["greedy"])
    for key in ("text", "token_ids", "new_tokens", "tokens_per_s", "ttft_s"):
        assert key in summary, key
    ids = summary["token_ids"]
    assert isinstance(ids, list) and ids and all(isinstance(t, int) and 0 <= t < 512 for t in ids)
    assert summary["new_tokens"] == len(ids) <= 10
    assert isinstance(summary["text"], str)
    assert summary["text"] == byte_level_tokenizer().decode(ids)
    assert summary["ttft_s"] > 0
    if len(ids) > 1:
        assert summary["tokens_per_s"] > 0
    # the default model is the shipped trained checkpoint
    shipped = ensure_default_model()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training.json"):
        assert (shipped / name).is_file(), name


def test_json_output_equals_the_library(default_runs):
    """The CLI's greedy tokens are the engine's, run in-process on the same checkpoint and prompt."""
    from model.sampling import SamplingParams
    from tests.hf_reference import load_ours
    from workers.engine import Engine, Request

    model = load_ours(ensure_default_model())
    tok = byte_level_tokenizer()
    prompt = tok.encode("The DGX B200 node")
    if model.cfg.bos_token_id is not None:
        prompt = [model.cfg.bos_token_id] + prompt
    done, _ = Engine(model).generate([Request(tuple(prompt), SamplingParams(max_new_tokens=10))])
    assert _summary(default_runs["greedy"])["token_ids"] == done[0].token_ids


def test_seeded_sampling_is_reproducible(default_runs):
    a, b = _summary(default_runs["seed3a"]), _summary(default_runs["seed3b"])
    assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"]
    assert len(a["token_ids"]) >= 2
    # and the seed matters: another seed, or greedy decoding, gives another sequence
    assert _summary(default_runs["seed4"])["token_ids"] != a["token_ids"]
    assert _summary(default_runs["greedy"])["token_ids"] != a["token_ids"]


# ---------------------------------------------------------------------------------------------
# An HF-saved checkpoint without tokenizer: --prompt-ids
# ---------------------------------------------------------------------------------------------

def test_prompt_ids_match_transformers_generate(hf_ckpt):
    hf, path = hf_ckpt
    prompts = [random_ids(20, 256, seed=32).tolist(), random_ids(7, 256, seed=33).tolist()]
    n_new = 24
    res = _run_all({"ids": ["--model", str(path), "--prompt-ids", _ids_arg(prompts[0]), "--prompt-ids",
                            _ids_arg(prompts[1]), "--max-new-tokens", str(n_new), "--world-size", "1",
                            "--json"]})["ids"]
    summary = _summary(res)
    eos = hf.config.eos_token_id  # the CLI stops on EOS: so does transformers, given the same id
    for i, prompt in enumerate(prompts):
        want = hf_greedy(hf, prompt, n_new, eos_token_id=eos)
        got = summary["completions"][i]["token_ids"]
        assert got == want, f"prompt {i}"
        assert summary["completions"][i]["text"] is None
    assert len(set(summary["token_ids"])) >= 5  # not a degenerate comparison
    assert summary["text"] is None and summary["new_tokens"] == len(summary["token_ids"])
    # without a tokenizer, each completion is printed as comma-separated ids
    lines = res.stdout.strip().splitlines()
    assert lines[0] == _ids_arg(summary["completions"][0]["token_ids"])


# ---------------------------------------------------------------------------------------------
# User errors: exit code 2, one "error:" line on stderr, no traceback
# ---------------------------------------------------------------------------------------------

ERROR_CASES = {
    # name: (argv builder given the HF checkpoint dir, words the message must contain)
    "unknown-flag": (lambda p: ["--prompt-ids", "3", "--no-such-flag", "--world-size", "1"], ["--no-such-flag"]),
    "missing-model": (lambda p: ["--model", str(p.parent / "nope"), "--prompt-ids", "3", "--world-size", "1"],
                      ["nope"]),
    "id-out-of-range": (lambda p: ["--model", str(p), "--prompt-ids", "3,4,256", "--world-size", "1"], ["256"]),
    "top-p-2": (lambda p: ["--model", str(p), "--prompt-ids", "3,4", "--top-p", "2", "--world-size", "1"],
                ["top_p"]),
    "prompt-without-tokenizer": (lambda p: ["--model", str(p), "--prompt", "hello", "--world-size", "1"],
                                 ["tokenizer.json"]),
    "ids-not-integers": (lambda p: ["--model", str(p), "--prompt-ids", "3,x", "--world-size", "1"], ["3,x"]),
    "no-prompt": (lambda p: ["--model", str(p), "--world-size", "1"], ["prompt"]),
}


@pytest.fixture(scope="module")
def error_runs(hf_ckpt):
    _, path = hf_ckpt
    return _run_all({name: build(path) for name, (build, _) in ERROR_CASES.items()})


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_user_error(error_runs, case):
    res = error_runs[case]
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error:")
    for word in ERROR_CASES[case][1]:
        assert word in lines[0], (word, lines[0])
