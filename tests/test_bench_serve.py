"""`dgx-emu bench serve` against a running server: a small bounded run, its JSON and table, its
prompts, and the mistakes it refuses (exit code 2, one line)."""
from __future__ import annotations

import json

import pytest

from launch.bench_serve import heldout_prompts
from launch.cli import main
from model.embedded import heldout_text
from tests.serve_server import serving


@pytest.fixture(scope="module")
def server():
    with serving("--max-batch", "4", api_key="bench-key") as s:
        yield s


def test_bench_reports_every_level(server, tmp_path, capsys):
    out = tmp_path / "bench.json"
    before = server.scheduler.metrics()["completed"]
    assert main(["bench", "serve", "--url", server.url, "--api-key", "bench-key", "--concurrency", "1,3",
                 "--requests", "3", "--max-tokens", "6", "--prompt-chars", "40", "--duration-s", "120",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"] == "default-v3" and [r["concurrency"] for r in report["levels"]] == [1, 3]
    for row in report["levels"]:
        assert (row["requests"], row["ok"], row["unfinished"], row["errors"]) == (3, 3, 0, {})
        assert row["tokens"] == 3 * 6 and not row["timed_out"]  # ignore_eos: every request decodes max_tokens
        assert 0 < row["ttft_s"]["p50"] <= row["ttft_s"]["p99"] < row["wall_s"]
        assert 0 < row["itl_s"]["p50"] <= row["itl_s"]["p99"]
        assert row["tokens_per_s_per_user"]["median"] > 0
        assert row["tokens_per_s_per_node"] == pytest.approx(row["tokens"] / row["wall_s"])
    assert server.scheduler.metrics()["completed"] == before + 1 + 2 * 3  # the warm-up, then the levels
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:3] == ["conc", "ok/req", "TTFT"]
    assert [line.split()[:2] for line in table[2:4]] == [["1", "3/3"], ["3", "3/3"]]


def test_prompts_are_fixed_distinct_passages_of_the_heldout_text():
    prompts = heldout_prompts(20, 64)
    assert prompts == heldout_prompts(20, 64) and len(set(prompts)) == 20
    flat = " ".join(heldout_text().split())
    assert all(32 <= len(p) <= 64 and p in flat and sum(c.isalpha() for c in p) >= len(p) // 2 for p in prompts)


@pytest.mark.parametrize("argv, words", [
    (["--concurrency", "1,0"], "--concurrency needs client counts >= 1"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--url", "http://127.0.0.1:9"], "cannot reach http://127.0.0.1:9"),
    ([], "/v1/models answered HTTP 401: missing API key"),  # the server wants a key; none is sent
])
def test_bench_mistakes_exit_2_with_one_line(server, capsys, argv, words):
    assert main(["bench", "serve", "--url", server.url, "--api-key", "", "--requests", "1", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
