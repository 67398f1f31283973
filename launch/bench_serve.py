"""`dgx-emu bench serve`: load a running `dgx-emu serve` and report what its users see.

    dgx-emu bench serve --url http://127.0.0.1:8000 --concurrency 1,4,16 --requests 32 [--max-tokens 64] [--out F.json]

For each concurrency level C, C clients send streaming completions back to back until the
level's --requests are done (or its --duration-s is up: then the requests in flight are
cancelled and counted as unfinished). Every request decodes exactly --max-tokens tokens
(ignore_eos, greedy), so levels compare like for like. Measured per request, on this side of the
socket: time to first token (request sent -> first text chunk), inter-token latency (gaps between
streamed chunks; a chunk carries one token, or several when speculative decoding accepts drafts
or a multi-byte character spans tokens), tokens/s per user ((tokens - 1) / (last chunk - first
chunk)); per level: tokens/s per node (all tokens / the level's wall time).

Prompts are passages of the embedded model's held-out text (model/assets/default-*/heldout.txt:
documents of its corpus it never trained on), cut to --prompt-chars at a word boundary, in a
fixed order, so runs compare. (The shipped EAGLE-3 draft's training prompts were cut from the same
file, so speculative acceptance on these prompts may read optimistic.)

Requests go through httpx (streaming, server-sent events); the `openai` client is a test-only
dependency. Every wait is bounded: connect and per-chunk timeouts, and --duration-s per level.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.node import UserError
from model.embedded import heldout_text


def add_bench_serve_parser(bsub) -> None:
    p = bsub.add_parser("serve", help="load a running `dgx-emu serve`: TTFT, inter-token latency, tokens/s")
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts, one level each")
    p.add_argument("--requests", type=int, default=32, help="requests per level (at least the concurrency)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens every request decodes")
    p.add_argument("--prompt-chars", type=int, default=128, help="prompt length in characters (held-out text)")
    p.add_argument("--model", default=None, help="model id to request (default: the server's first)")
    p.add_argument("--api-key", default=os.environ.get("DGX_EMU_API_KEY"), help="bearer key, if the server wants one")
    p.add_argument("--duration-s", type=float, default=300.0, help="time cap per level")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds to wait for any one chunk")
    p.add_argument("--out", default=None, help="write the results as JSON here")


def heldout_prompts(count: int, chars: int) -> list[str]:
    """`count` distinct passages of the held-out text, each cut to at most `chars` at a space."""
    paragraphs = [" ".join(p.split()) for p in heldout_text().split("\n\n")]
    cut = [p[:chars].rsplit(" ", 1)[0] if len(p) > chars else p for p in paragraphs]
    prose = [p for p in cut if len(p) >= chars // 2 and sum(c.isalpha() for c in p) >= len(p) // 2]  # no rulers
    if not prose:
        raise UserError(f"--prompt-chars {chars}: the held-out text has no passage that long")
    return [prose[i % len(prose)] for i in range(count)]


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    tokens: int = 0
    decode_s: float | None = None  # first chunk -> last chunk
    error: str | None = None


def _levels(text: str) -> list[int]:
    try:
        levels = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--concurrency must be comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise UserError(f"--concurrency needs client counts >= 1, got {text!r}")
    return levels


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _one(client, url: str, body: dict) -> RequestResult:
    sent = time.perf_counter()
    chunks: list[float] = []
    tokens = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            return RequestResult(False, error=f"HTTP {response.status_code}: {_message(text)}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            event = json.loads(line[len("data: "):])
            if "error" in event:
                return RequestResult(False, error=f"in stream: {event['error'].get('message')}")
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event.get("choices") and event["choices"][0].get("text"):
                chunks.append(time.perf_counter())
    if not chunks or tokens is None:
        return RequestResult(False, error="the stream ended without text or usage")
    return RequestResult(True, chunks[0] - sent, [b - a for a, b in zip(chunks, chunks[1:])], tokens,
                         chunks[-1] - chunks[0])


def _message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]


async def _level(client, url: str, bodies: list[dict], concurrency: int, duration_s: float) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    results: list[RequestResult] = []

    async def worker() -> None:
        while not queue.empty():
            body = queue.get_nowait()
            try:
                results.append(await _one(client, url, body))
            except Exception as e:  # timeouts, refused connections: counted, the level goes on
                results.append(RequestResult(False, error=f"{type(e).__name__}: {e}"))

    start = time.perf_counter()
    workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    done, pending = await asyncio.wait(workers, timeout=duration_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - start
    return _summary(results, concurrency, len(bodies), wall, timed_out=bool(pending))


def _summary(results: list[RequestResult], concurrency: int, asked: int, wall_s: float, timed_out: bool) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok]
    itl = [gap for r in ok for gap in r.itl_s]
    per_user = [(r.tokens - 1) / r.decode_s for r in ok if r.tokens > 1 and r.decode_s > 0]
    tokens = sum(r.tokens for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {"concurrency": concurrency, "requests": asked, "ok": len(ok), "unfinished": asked - len(results),
            "errors": errors, "timed_out": timed_out, "wall_s": wall_s, "tokens": tokens,
            "ttft_s": {"p50": _percentile(ttft, 0.5), "p99": _percentile(ttft, 0.99)},
            "itl_s": {"p50": _percentile(itl, 0.5), "p99": _percentile(itl, 0.99)},
            "tokens_per_s_per_user": {"median": statistics.median(per_user) if per_user else None,
                                      "min": min(per_user) if per_user else None},
            "tokens_per_s_per_node": tokens / wall_s if wall_s > 0 else None}


async def _bench(args, levels: list[int]) -> dict:
    import httpx

    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    limits = httpx.Limits(max_connections=max(levels) + 1, max_keepalive_connections=max(levels) + 1)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
        model = args.model or await _first_model(client, url)
        prompts = heldout_prompts(max(args.requests, max(levels)), args.prompt_chars)

        def body(prompt: str, max_tokens: int) -> dict:
            return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}

        warm = await _one(client, url, body(prompts[0], 4))  # not counted: first-request costs, and a check
        if not warm.ok:
            raise UserError(f"the server at {url} refused a warm-up request: {warm.error}")
        rows = []
        for c in levels:
            bodies = [body(p, args.max_tokens) for p in prompts[:max(args.requests, c)]]
            rows.append(await _level(client, url, bodies, c, args.duration_s))
            print(f"concurrency {c}: {rows[-1]['ok']}/{rows[-1]['requests']} ok in {rows[-1]['wall_s']:.1f} s",
                  file=sys.stderr)
    return {"url": url, "model": model, "max_tokens": args.max_tokens, "prompt_chars": args.prompt_chars,
            "levels": rows}


async def _first_model(client, url: str) -> str:
    import httpx
    try:
        response = await client.get(f"{url}/v1/models")
    except httpx.HTTPError as e:
        raise UserError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
    if response.status_code != 200:
        raise UserError(f"{url}/v1/models answered HTTP {response.status_code}: {_message(response.text)}")
    models = response.json().get("data") or []
    if not models:
        raise UserError(f"{url} serves no model")
    return models[0]["id"]


def run_bench_serve(args) -> int:
    levels = _levels(args.concurrency)
    for flag, value in (("--requests", args.requests), ("--max-tokens", args.max_tokens),
                        ("--prompt-chars", args.prompt_chars)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if not (args.duration_s > 0 and args.request_timeout > 0):
        raise UserError("--duration-s and --request-timeout must be > 0")
    report = asyncio.run(_bench(args, levels))
    report.update({"date": datetime.date.today().isoformat(), "client": f"{platform.node()} ({os.cpu_count()} CPUs)",
                   "command": "dgx-emu " + " ".join(shlex.quote(a) for a in sys.argv[1:])})
    print(format_table(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


def format_table(report: dict) -> str:
    def ms(x):
        return f"{x * 1e3:9.1f}" if x is not None else f"{'-':>9}"

    def rate(x):
        return f"{x:10.1f}" if x is not None else f"{'-':>10}"
    lines = [f"{report['model']} at {report['url']}: {report['max_tokens']} tokens per request, "
             f"prompts of <= {report['prompt_chars']} chars",
             f"{'conc':>4} {'ok/req':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>9} {'ITL p99':>9} "
             f"{'tok/s/user':>10} {'tok/s node':>10} {'wall s':>7}"]
    for row in report["levels"]:
        lines.append(f"{row['concurrency']:>4} {str(row['ok']) + '/' + str(row['requests']):>8} "
                     f"{ms(row['ttft_s']['p50'])} {ms(row['ttft_s']['p99'])} {ms(row['itl_s']['p50'])} "
                     f"{ms(row['itl_s']['p99'])} {rate(row['tokens_per_s_per_user']['median'])} "
                     f"{rate(row['tokens_per_s_per_node'])} {row['wall_s']:7.1f}")
        for error, count in row["errors"].items():
            lines.append(f"     {count} x {error}")
    lines.append("(latencies in ms; tok/s/user: median over requests of (tokens - 1) / decode time)")
    return "\n".join(lines)
