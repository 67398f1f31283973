"""`dgx-emu serve` through the official `openai` client: completions and chat, streaming and not,
stop strings, seeds, usage, metrics, concurrent streams, and one run of the real command at world 2.

The module's server runs the embedded model at world size 1 (in-process ranks, fp32, plain
decoding) in a uvicorn thread; the reference it is checked against is the same model's plain
engine (`node.generate`, the path `dgx-emu generate` takes), run on its own node.
"""
from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from cluster.node import build_node
from launch.serve_text import TextStream
from model.embedded import ensure_default_model
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer
from tests.serve_server import serving, wait_for
from workers.engine import Request
from workers.run_config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The assert statement", "A list is", "def main():", "Exceptions are raised", "The for loop",
           "import numpy as np", "Dictionaries map", "class Point:"]


@pytest.fixture(scope="module")
def server():
    with serving("--max-batch", "8") as s:
        yield s


@pytest.fixture(scope="module")
def reference():
    """Greedy continuations from the plain engine: reference(prompt_ids, n) -> token ids."""
    node = build_node(RunConfig(model_path=str(ensure_default_model()), world_size=1))
    node.load()
    cache = {}

    def greedy(prompt_ids: list[int], n: int) -> list[int]:
        key = (tuple(prompt_ids), n)
        if key not in cache:
            params = SamplingParams(max_new_tokens=n, stop_on_eos=False)
            completions, _, _ = node.generate([Request(tuple(prompt_ids), params, "ref")])
            cache[key] = completions[0].token_ids
        return cache[key]
    yield greedy
    node.shutdown()


def _ids(server, text: str) -> list[int]:
    """How the server turns a completion prompt into ids: BOS, then the text's bytes."""
    return [server.served.bos_token_id] + server.served.tokenizer.encode(text)


def test_models_health_and_metrics(server):
    client = server.client()
    models = client.models.list().data
    assert [m.id for m in models] == [server.served.name] == ["default-v3"]
    assert client.models.retrieve("default-v3").id == "default-v3"
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    client.completions.create(model="default-v3", prompt="x", max_tokens=3, temperature=0)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in ("dgx_emu_queue_length", "dgx_emu_running_requests", "dgx_emu_time_to_first_token_seconds_count",
                 "dgx_emu_inter_token_latency_seconds_bucket", "dgx_emu_tokens_per_second",
                 "dgx_emu_generated_tokens_total", 'dgx_emu_scheduler_ttft_seconds{quantile="0.5"}'):
        assert name in text, name


def test_completion_equals_plain_engine_streaming_or_not(server, reference):
    client, prompt, n = server.client(), PROMPTS[0], 24
    want_ids = reference(_ids(server, prompt), n)
    want = server.served.tokenizer.decode(want_ids)
    whole = client.completions.create(model="default-v3", prompt=prompt, max_tokens=n, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.choices[0].text == want and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(_ids(server, prompt)), n)
    chunks = list(client.completions.create(model="default-v3", prompt=prompt, max_tokens=n, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    by_ids = client.completions.create(model="default-v3", prompt=_ids(server, prompt), max_tokens=n,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == want


def test_chat_streaming_or_not(server, reference):
    client = server.client()
    messages = [{"role": "system", "content": "You document Python."}, {"role": "user", "content": "What is a list?"}]
    rendered = server.served.chat_template.render(messages)
    assert rendered.startswith("<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou document Python.<|eot|>")
    assert rendered.endswith("<|header_start|>assistant<|header_end|>\n\n")
    prompt_ids = server.served.tokenizer.encode(rendered)
    want = server.served.tokenizer.decode(reference(prompt_ids, 16))
    whole = client.chat.completions.create(model="default-v3", messages=messages, max_tokens=16, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == want
    assert whole.usage.prompt_tokens == len(prompt_ids) and whole.usage.completion_tokens == 16
    chunks = list(client.chat.completions.create(model="default-v3", messages=messages, max_tokens=16,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text_and_ends_the_request(server, reference, stream):
    client, prompt, n = server.client(), PROMPTS[1], 48
    full = server.served.tokenizer.decode(reference(_ids(server, prompt), n))
    stop = full[6:9]  # spans tokens (one byte each), somewhere early in the text
    want = full[:full.find(stop)]
    kwargs = dict(model="default-v3", prompt=prompt, max_tokens=n, temperature=0, stop=[stop, "never-appears"],
                  extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish, used = [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage
    else:
        whole = client.completions.create(**kwargs)
        text, finish, used = whole.choices[0].text, whole.choices[0].finish_reason, whole.usage
    assert (text, finish) == (want, "stop")
    assert used.completion_tokens < n  # the request ended early, not after decoding all max_tokens
    server.wait_idle()


def test_seeded_sampling_repeats_and_unseeded_varies(server):
    client = server.client()
    kwargs = dict(model="default-v3", prompt=PROMPTS[2], max_tokens=24, temperature=1.0, top_p=0.95,
                  extra_body={"ignore_eos": True})
    a, b = (client.completions.create(seed=11, **kwargs).choices[0].text for _ in range(2))
    assert a == b
    unseeded = {client.completions.create(**kwargs).choices[0].text for _ in range(3)}
    assert len(unseeded) > 1  # 24 tokens at temperature 1: three equal draws would be a fixed seed


def test_concurrent_streams_each_equal_to_their_solo_run(server, reference):
    """A bounded load test: 8 streams at once, each equal to its prompt's greedy reference."""
    n = 12

    async def one(client, prompt):
        stream = await client.completions.create(model="default-v3", prompt=prompt, max_tokens=n, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream])

    async def all_at_once():
        client = server.async_client()
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in PROMPTS)), timeout=120)
        finally:
            await client.close()

    before = server.scheduler.metrics()["completed"]
    texts = asyncio.run(all_at_once())
    tokenizer = server.served.tokenizer
    assert texts == [tokenizer.decode(reference(_ids(server, p), n)) for p in PROMPTS]
    assert server.wait_idle()["completed"] >= before + len(PROMPTS)


def test_text_stream_cuts_at_stop_strings_across_any_split():
    """TextStream against str.find on the whole text, for random texts (multi-byte characters
    included), stop strings and token groupings."""
    tokenizer = Tokenizer.from_file(ensure_default_model() / "tokenizer.json")
    rng = random.Random(0)
    alphabet = "ab é€\n"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
        ids, stream, out, i = tokenizer.encode(text), TextStream(tokenizer, stops), "", 0
        while i < len(ids) and not stream.stopped:
            step = rng.randint(1, 4)
            out, i = out + stream.push(ids[i:i + step]), i + step
        if not stream.stopped:
            out += stream.flush()
        cut = min([text.find(s) for s in stops if s in text], default=len(text))
        assert out == text[:cut], (text, stops, out)


def test_serve_command_at_world_2(tmp_path):
    """The real command: world 2 (Ray actors), the ready line with the port it picked, a chat
    stream and a completion equal to world 1's, then SIGTERM closes it cleanly."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    err_file = tmp_path / "stderr.txt"
    with open(err_file, "w") as err_sink:
        proc = subprocess.Popen([sys.executable, "-m", "launch", "serve", "--world-size", "2", "--port", "0",
                                 "--no-spec", "--max-batch", "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=err_sink, text=True)
    try:
        line = _ready_line(proc, err_file, timeout_s=240)
        url = line.split(" at ")[1].split("/v1")[0]
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        import openai
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        with serving() as world1:
            for kwargs in ({"prompt": PROMPTS[3]}, {"prompt": PROMPTS[4], "stream": True}):
                got = client.completions.create(model="default-v3", max_tokens=12, temperature=0,
                                                extra_body={"ignore_eos": True}, **kwargs)
                want = world1.client().completions.create(model="default-v3", max_tokens=12, temperature=0,
                                                          extra_body={"ignore_eos": True}, prompt=kwargs["prompt"])
                text = "".join(c.choices[0].text for c in got) if kwargs.get("stream") else got.choices[0].text
                assert text == want.choices[0].text
            chat = client.chat.completions.create(model="default-v3", max_tokens=8, stream=True,
                                                  messages=[{"role": "user", "content": "hi"}])
            assert [c.choices[0].finish_reason for c in chat][-1] in ("length", "stop")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        err = err_file.read_text()
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


def _ready_line(proc: subprocess.Popen, err_file: Path, timeout_s: float) -> str:
    """The 'serving ... at http://...' line (stdout is read in a thread: readline has no timeout)."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    wait_for(lambda: lines or proc.poll() is not None, timeout_s, "the server's ready line")
    assert lines and lines[0].startswith("serving "), err_file.read_text()
    return lines[0].strip()
