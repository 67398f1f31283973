"""A running `dgx-emu serve` for tests: the CLI's own start-up (flags -> node -> Scheduler -> app)
with uvicorn in a thread on 127.0.0.1, a free port. Tests talk to it through the official `openai`
client (max_retries=0: the client would otherwise retry 429s and 503s) or httpx."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import openai

from launch.cli import build_parser
from launch.openai_api import create_app
from launch.serve_cli import BackgroundServer, start_backend

REQUEST_TIMEOUT_S = 60.0


@dataclass
class Serving:
    url: str
    scheduler: object
    served: object
    api_key: str = "unused"

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", self.api_key), max_retries=0,
                             timeout=REQUEST_TIMEOUT_S, **kw)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0,
                                  timeout=REQUEST_TIMEOUT_S)

    def wait_idle(self, timeout_s: float = 10.0) -> dict:
        """Scheduler metrics once nothing runs or waits (AssertionError after timeout_s)."""
        return wait_for(lambda: (m := self.scheduler.metrics())["running"] == 0 and m["queue_length"] == 0
                        and m, timeout_s, "the scheduler to be idle")


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def serving(*flags: str, api_key: str | None = None):
    """`dgx-emu serve --world-size 1 --no-spec FLAGS` in this process; everything stops on exit."""
    argv = ["serve", "--world-size", "1", "--no-spec", "--port", "0", *flags]
    if api_key:
        argv += ["--api-key", api_key]
    args = build_parser().parse_args(argv)
    scheduler, served, options = start_backend(args)
    try:
        server = BackgroundServer(create_app(scheduler, served, options)).start()
        try:
            yield Serving(server.url, scheduler, served, api_key or "unused")
        finally:
            server.stop()
    finally:
        scheduler.close()
