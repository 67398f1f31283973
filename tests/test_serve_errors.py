"""Every error `dgx-emu serve` answers, as a client sees it: status, OpenAI error JSON, the reason.

The module's server has an API key, one batch slot and a queue of one, so that a full queue (429)
and a slot freed by a client that left can be produced on purpose. The node-down case (503) gets
its own server, whose scheduler is closed under it. Command-line mistakes exit with code 2 and one
line, before any rank starts.
"""
from __future__ import annotations

import json
import socket

import httpx
import openai
import pytest

from launch.cli import main
from tests.serve_server import serving, wait_for

KEY = "test-key"
MODEL = "default-v3"


@pytest.fixture(scope="module")
def server():
    with serving("--max-batch", "1", "--max-queue", "1", api_key=KEY) as s:
        yield s


def _post(server, path: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=30)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_api_key_missing_or_wrong_is_401(server):
    error = _error(_post(server, "/v1/completions", {"model": MODEL, "prompt": "a"}, key=None), 401)
    assert error["code"] == "invalid_api_key" and "missing API key" in error["message"]
    with pytest.raises(openai.AuthenticationError) as caught:
        server.client(api_key="wrong").completions.create(model=MODEL, prompt="a", max_tokens=2)
    assert caught.value.status_code == 401 and "incorrect API key" in caught.value.message
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # probes need no key
    assert server.client().models.list().data[0].id == MODEL


def test_malformed_json_is_400(server):
    error = _error(_post(server, "/v1/completions", b'{"model": "default-v3", "prompt": '), 400)
    assert error["code"] == "invalid_json" and "not valid JSON" in error["message"]
    error = _error(_post(server, "/v1/chat/completions", b"[1, 2]"), 400)
    assert "must be a JSON object" in error["message"]


BAD_COMPLETIONS = [  # (fields over a valid request, param named, words of the message)
    ({"temperature": -0.5}, "temperature", "greater than or equal to 0"),
    ({"temperature": "hot"}, "temperature", "valid number"),
    ({"top_p": 0.0}, "top_p", "greater than 0"),
    ({"top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"max_tokens": "8"}, "max_tokens", "valid integer"),
    ({"max_tokens": True}, "max_tokens", "valid integer"),
    ({"n": 2}, "n", "n=2 is not supported"),
    ({"logprobs": 3}, "logprobs", "not supported"),
    ({"frobnicate": 1}, "frobnicate", "Unrecognized request argument supplied: frobnicate"),
    ({"stop": [""]}, "stop", "stop strings must not be empty"),
    ({"stream": "yes"}, "stream", "valid boolean"),
    ({"model": "gpt-4o"}, "model", "The model 'gpt-4o' does not exist"),
    ({"prompt": ["one", "two"]}, "prompt", "holds 2 prompts"),
    ({"prompt": "x" * 5000}, "prompt", "maximum context length is 4096 tokens"),
    ({"max_tokens": 4090}, "max_tokens", "maximum context length is 4096 tokens"),
    ({"prompt": [0, 99999]}, None, "token id 99999 is outside the vocabulary"),
]


@pytest.mark.parametrize("fields, param, words", BAD_COMPLETIONS, ids=[p or w[:20] for _, p, w in BAD_COMPLETIONS])
def test_bad_completion_requests_are_400(server, fields, param, words):
    body = {"model": MODEL, "prompt": "The assert statement", "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as caught:  # through the client, as users send them
        server.client().completions.create(**{k: body[k] for k in ("model", "prompt")},
                                           extra_body={k: v for k, v in body.items() if k not in ("model", "prompt")})
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"


BAD_CHATS = [
    ({"messages": []}, "messages", "at least 1 item"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "'system', 'developer', 'user'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages",
     "text"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "greater than or equal to 1"),
]


@pytest.mark.parametrize("fields, param, words", BAD_CHATS, ids=[w[:20] for _, _, w in BAD_CHATS])
def test_bad_chat_requests_are_400(server, fields, param, words):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    error = _error(_post(server, "/v1/chat/completions", body), 400)
    assert error["param"] == param and words in error["message"], error


def test_unknown_route_is_404_in_openai_format(server):
    error = _error(httpx.get(f"{server.url}/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                             timeout=10), 404)
    assert "/v1/embeddings" in error["message"]


def test_full_queue_is_429_and_clients_that_leave_free_their_slots(server):
    """One slot, a queue of one: a third request is refused with 429; closing the first two
    streams frees the slot and the queue at once (scheduler metrics), and a new request runs."""
    client = server.client()
    long = dict(model=MODEL, prompt="The assert statement", max_tokens=3000, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
    running = client.completions.create(**long)
    next(iter(running))  # a token arrived: it holds the slot
    queued = client.completions.create(**long)  # headers came back: it was submitted, and waits
    metrics = wait_for(lambda: (m := server.scheduler.metrics())["queue_length"] == 1 and m, 10, "the queue")
    assert metrics["running"] == 1
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model=MODEL, prompt="a", max_tokens=2)
    error = caught.value.body
    assert caught.value.status_code == 429 and error["code"] == "queue_full" and "max_queue 1" in error["message"]
    assert caught.value.response.headers["retry-after"] == "1"
    queued.close()
    running.close()
    server.wait_idle(timeout_s=10)
    again = client.completions.create(model=MODEL, prompt="a", max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.usage.completion_tokens == 3


def test_non_streaming_client_that_leaves_frees_its_slot(server):
    before = server.scheduler.metrics()["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=1.0,
                   json={"model": MODEL, "prompt": "a", "max_tokens": 3000, "ignore_eos": True})
    assert server.wait_idle(timeout_s=10)["cancelled"] == before + 1


def test_node_down_is_503_before_and_during_a_stream():
    with serving("--max-batch", "2") as s:
        client = s.client()
        stream = client.completions.create(model=MODEL, prompt="a", max_tokens=3000, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks)
        s.scheduler.close()  # the node goes away under a running request
        with pytest.raises(openai.APIError) as caught:
            for _ in chunks:
                pass
        assert "the node failed while serving this request" in caught.value.message
        with pytest.raises(openai.InternalServerError) as caught:
            client.completions.create(model=MODEL, prompt="a", max_tokens=2)
        error = caught.value.body
        assert caught.value.status_code == 503 and error["code"] == "node_unavailable"
        assert "the node is closed" in error["message"]
        health = httpx.get(f"{s.url}/health", timeout=10)
        assert health.status_code == 503 and "closed" in health.json()["error"]["message"]


def test_command_line_mistakes_exit_2_with_one_line(capsys):
    """launch.cli.main as `dgx-emu` runs it (in this process: the start-up is the same, minus imports)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (["--port", str(port)], f"cannot listen on 127.0.0.1:{port}: Address already in use"),
            (["--model", "/no/such/dir", "--port", "0"], "/no/such/dir"),
            (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
            (["--spec-max-batch", "0"], "--spec-max-batch must be >= 1, got 0"),
            (["--spec-max-batch", "4", "--no-spec", "--port", "0"], "--spec-max-batch switches speculative decoding off"),
            (["--colour", "red"], "unrecognized arguments: --colour red"),
            (["--port", "70000"], "--port must be in 0..65535, got 70000"),
            (["--host", "no-such-host.invalid", "--port", "0"], "--host no-such-host.invalid:"),
        ]
        for argv, words in cases:
            assert main(["serve", "--world-size", "1", *argv]) == 2, argv
            out, err = capsys.readouterr()
            lines = err.strip().splitlines()
            assert out == "" and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (argv, err)


def test_a_request_that_waits_too_long_fails_with_503_and_leaves_the_queue():
    """--queue-timeout bounds the wait for a first token (here: stuck behind a long request)."""
    with serving("--max-batch", "1", "--queue-timeout", "1") as s:
        client = s.client()
        running = client.completions.create(model=MODEL, prompt="a", max_tokens=3000, stream=True,
                                            extra_body={"ignore_eos": True})
        next(iter(running))
        with pytest.raises(openai.InternalServerError) as caught:
            client.completions.create(model=MODEL, prompt="b", max_tokens=2)
        assert caught.value.status_code == 503 and caught.value.body["code"] == "node_timeout"
        assert "no token for 1 s" in caught.value.body["message"]
        assert wait_for(lambda: s.scheduler.metrics()["queue_length"] == 0, 10, "the queue to empty")
        running.close()
        s.wait_idle()
