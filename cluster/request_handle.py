"""One request as its caller sees it: a stream of TokenEvents, blocking or asyncio, and cancel().

The scheduler's pump thread delivers events; a caller reads them with `events(timeout)` (any
thread) or `async for event in handle.stream()` (an asyncio server: events are handed to its loop
with call_soon_threadsafe, no thread per request). The last event has a finish_reason or an error.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator

from model.sampling import SamplingParams


@dataclass(frozen=True)
class TokenEvent:
    token_ids: tuple[int, ...]  # new tokens since the last event (may be empty on finish / error)
    finish_reason: str | None = None  # "stop" (EOS), "length", "cancelled"; None while running
    error: str | None = None  # the request failed (e.g. "rank 3 failed: ..."); a final event

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class RequestHandle:
    def __init__(self, request_id: str, prompt: tuple[int, ...], params: SamplingParams, scheduler) -> None:
        self.request_id, self.prompt, self.params = request_id, prompt, params
        self.prompt_tokens = len(prompt)
        self.scheduler = scheduler
        self.slot: int | None = None
        self.submitted_at = time.monotonic()
        self.ttft_s: float | None = None  # submit -> first token at the driver
        self.token_times: list[float] = []  # time.monotonic() of each token's arrival
        self.token_ids: list[int] = []  # everything generated so far
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.spec: dict = {}  # speculative decoding: acceptance metrics, once there are any
        self._queue: queue.Queue[TokenEvent] = queue.Queue()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_queue: asyncio.Queue | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def _deliver(self, event: TokenEvent, now: float | None = None) -> None:
        """Called by the scheduler (under its lock); ignores anything after the final event."""
        with self._lock:
            if self.done:
                return
            now = time.monotonic() if now is None else now
            if event.token_ids:
                if self.ttft_s is None:
                    self.ttft_s = now - self.submitted_at
                self.token_ids += event.token_ids
                self.token_times += [now] * len(event.token_ids)
            self.finish_reason, self.error = event.finish_reason, event.error
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._async_queue.put_nowait, event)
                except RuntimeError:  # the loop was closed: nobody is listening any more
                    pass
            else:
                self._queue.put(event)

    def events(self, timeout: float) -> TokenEvent:
        """The next event, waiting at most `timeout` seconds (TimeoutError otherwise)."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"request {self.request_id}: no event within {timeout} s") from None

    async def stream(self) -> AsyncIterator[TokenEvent]:
        """The events in an asyncio loop, ending after the final one. Leaving early (a client that
        went away: the generator is closed or its task cancelled) cancels the request."""
        with self._lock:
            self._loop, self._async_queue = asyncio.get_running_loop(), asyncio.Queue()
            while not self._queue.empty():  # events that came before the stream started
                self._async_queue.put_nowait(self._queue.get_nowait())
        finished = False
        try:
            while True:
                event = await self._async_queue.get()
                yield event
                if event.final:
                    finished = True
                    return
        finally:
            if not finished:
                self.cancel()

    def cancel(self) -> None:
        """Frees the request's slot at the next step boundary (a final "cancelled" event follows)."""
        self.scheduler._cancel(self)

    def result(self, timeout: float) -> list[int]:
        """Blocks until the request ends (at most `timeout` s overall); returns its tokens, raises
        RuntimeError with the error of a failed request."""
        deadline = time.monotonic() + timeout
        while not self.done or not self._queue.empty():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"request {self.request_id}: not finished within {timeout} s")
            if self.events(left).final:
                break
        if self.error is not None:
            raise RuntimeError(self.error)
        return list(self.token_ids)
