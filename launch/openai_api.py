"""The ASGI app of `dgx-emu serve`: the OpenAI API over a scheduler's token streams (Starlette).

    GET  /v1/models, /v1/models/{id}   the one served model
    POST /v1/completions               prompt text or token ids -> text
    POST /v1/chat/completions          messages -> chat template -> text
    GET  /health                       200 while the backend serves, else 503
    GET  /metrics                      Prometheus text (launch/serve_metrics.py)

The backend is anything with the scheduler's interface (cluster/scheduler.py): submit(prompt_ids,
params, request_id) -> a handle whose async stream() yields TokenEvents and whose cancel() frees
its slot, metrics() -> dict. One Scheduler, or replicas behind the same interface.

A request's life: the body is parsed by strict pydantic models (launch/openai_schema.py), checked
against the model (name, context), submitted (QueueFull -> 429, NodeUnavailable -> 503,
RequestError -> 400), then its token events are detokenized incrementally, cut at stop strings
(launch/serve_text.py), and sent as server-sent events or gathered into one JSON answer. Every
path out of a request (finished, stop string, error, client gone) cancels its handle, so a slot is
never held for a client that left: a streaming client's disconnect cancels the stream's task
(Starlette listens for it); a non-streaming request polls for the disconnect while it waits.
Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}; errors after a stream
started arrive as a final `data: {"error": ...}` event, which the `openai` client raises.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
import uuid
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cluster.scheduler import NodeUnavailable, QueueFull
from launch.openai_schema import (ApiError, ChatAnswer, ChatRequest, CompletionAnswer, CompletionRequest,
                                  validation_error)
from launch.serve_metrics import ServeMetrics
from launch.serve_text import ChatTemplate, ChatTemplateError, TextStream
from model.sampling import SamplingError, SamplingParams
from model.tokenizer import Tokenizer
from workers.engine import RequestError

FINISH_REASONS = {"stop": "stop", "eos": "stop", "length": "length"}  # scheduler's -> OpenAI's
DISCONNECT_POLL_S = 0.2


@dataclass(frozen=True)
class ServedModel:
    name: str
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    bos_token_id: int | None
    max_context: int
    created: int = 0


@dataclass(frozen=True)
class ServeOptions:
    api_key: str | None = None
    # Safety nets behind the scheduler's own stall detection; a request that waits longer fails with 503.
    first_token_timeout_s: float = 600.0  # submit -> first event (includes the wait in the queue)
    token_timeout_s: float = 120.0  # between events of a running request
    default_chat_max_tokens: int | None = None  # None: the rest of the context


def error_response(error: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status in (429, 503) else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class ApiKeyMiddleware:
    """401 for /v1/* without `Authorization: Bearer KEY` (before the body is read)."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = Headers(scope=scope).get("authorization")
            if given is None or not hmac.compare_digest(given.encode(), self.expected):
                message = ("missing API key: send the header 'Authorization: Bearer KEY'" if given is None
                           else "incorrect API key provided")
                await error_response(ApiError(401, message, None, "invalid_api_key"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


class OpenAIServer:
    """The routes, over one backend and one served model."""

    def __init__(self, backend, served: ServedModel, options: ServeOptions) -> None:
        self.backend, self.served, self.options = backend, served, options
        self.metrics = ServeMetrics(backend)

    # ----------------------------------------------------------------------------- info routes
    def model_card(self) -> dict:
        return {"id": self.served.name, "object": "model", "created": self.served.created, "owned_by": "dgx-emu",
                "max_model_len": self.served.max_context}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name != self.served.name:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves '{self.served.name}'",
                           "model", "model_not_found")
        return JSONResponse(self.model_card())

    async def health(self, request: Request) -> Response:
        stats = self.backend.metrics()
        state = stats.get("state", "up")
        if state != "up":
            return error_response(ApiError(503, f"the node is {state}", None, "node_unavailable"))
        return JSONResponse({"status": "ok", "running": stats.get("running"), "queue_length": stats.get("queue_length")})

    async def prometheus(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    # ----------------------------------------------------------------------------- generation routes
    async def completions(self, request: Request) -> Response:
        body = await _parse(request, CompletionRequest)
        prompt = body.single_prompt()
        if isinstance(prompt, str):
            ids = self.served.tokenizer.encode(prompt)
            bos = self.served.bos_token_id
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
        else:
            ids = list(prompt)
        return await self._generate(request, body, ids, body.max_tokens or 16, chat=False)

    async def chat(self, request: Request) -> Response:
        body = await _parse(request, ChatRequest)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = self.served.chat_template.render(messages)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None
        ids = self.served.tokenizer.encode(text)
        rest = self.served.max_context - len(ids)
        default = max(1, min(rest, self.options.default_chat_max_tokens or rest))  # < 1: the context check refuses
        return await self._generate(request, body, ids, body.max_completion_tokens or body.max_tokens or default,
                                    chat=True)

    async def _generate(self, request: Request, body, ids: list[int], max_tokens: int, chat: bool) -> Response:
        self._check(body, ids, max_tokens)
        params = _sampling(body, max_tokens)
        stream = TextStream(self.served.tokenizer, body.stop_strings())
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        started = time.perf_counter()
        try:
            handle = self.backend.submit(ids, params, request_id=request_id)
        except QueueFull as e:
            raise ApiError(429, f"the server is at capacity, try again: {e}", None, "queue_full") from None
        except NodeUnavailable as e:
            raise ApiError(503, f"the node is unavailable: {e}", None, "node_unavailable") from None
        except (RequestError, SamplingError) as e:
            raise ApiError(400, str(e), None, "invalid_value") from None
        deltas = self._deltas(handle, stream, started)
        answer = (ChatAnswer if chat else CompletionAnswer)(request_id, self.served.name, len(ids))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(answer, deltas, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})
        pieces = await _unless_disconnected(request, _gather(deltas))
        if pieces is None:  # the client left; its handle is cancelled
            return Response(status_code=499)
        text, finish, tokens = pieces
        self.metrics.finished.labels(finish).inc()
        return JSONResponse(answer.whole(text, finish, tokens), headers={"X-Request-Id": request_id})

    def _check(self, body, ids: list[int], max_tokens: int) -> None:
        if body.model != self.served.name:
            raise ApiError(400, f"The model '{body.model}' does not exist; this server serves '{self.served.name}'",
                           "model", "model_not_found")
        body.check_supported()
        limit = self.served.max_context
        if len(ids) + max_tokens > limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                                f"completion). Please reduce the prompt or max_tokens.", "max_tokens"
                           if len(ids) < limit else "prompt", "context_length_exceeded")

    async def _deltas(self, handle, stream: TextStream, started: float):
        """Yields (text delta, OpenAI finish reason or None, completion tokens so far); cancels the
        handle on every way out. A stalled or failed node raises ApiError(503)."""
        events = handle.stream().__aiter__()
        tokens, last = 0, started
        try:
            while True:
                wait = self.options.token_timeout_s if tokens else self.options.first_token_timeout_s
                try:
                    event = await asyncio.wait_for(events.__anext__(), wait)
                except StopAsyncIteration:
                    raise ApiError(503, "the request's stream ended without finishing", None, "node_unavailable")
                except TimeoutError:
                    raise ApiError(503, f"no token for {wait:.0f} s: the node stalled", None, "node_timeout")
                if event.error:
                    raise ApiError(503, f"the node failed while serving this request: {event.error}", None,
                                   "node_unavailable")
                if event.token_ids:
                    now = time.perf_counter()
                    self.metrics.on_tokens(len(event.token_ids), now - last, first=tokens == 0)
                    tokens, last = tokens + len(event.token_ids), now
                delta = stream.push(event.token_ids)
                if not stream.stopped and event.finish_reason is not None:
                    if event.finish_reason not in FINISH_REASONS:
                        raise ApiError(503, f"the server ended this request ({event.finish_reason})", None,
                                       event.finish_reason)
                    delta += stream.flush()
                if stream.stopped or event.finish_reason is not None:
                    yield delta, "stop" if stream.stopped else FINISH_REASONS[event.finish_reason], tokens
                    return
                if delta:
                    yield delta, None, tokens
        finally:
            handle.cancel()

    async def _sse(self, answer, deltas, include_usage: bool):
        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"
        try:
            first = answer.first_chunk()
            if first is not None:
                yield event(first)
            async for delta, finish, tokens in deltas:
                yield event(answer.chunk(delta, finish))
            self.metrics.finished.labels(finish).inc()
            if include_usage:
                yield event(answer.usage_chunk(tokens))
            yield "data: [DONE]\n\n"
        except ApiError as e:  # the status is sent already: the error travels as the last event
            self.metrics.errors.labels(str(e.status)).inc()
            yield event(e.body())
        finally:
            await deltas.aclose()

    def app(self) -> Starlette:
        routes = [Route("/v1/models", self.models), Route("/v1/models/{name:path}", self.model),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/health", self.health), Route("/metrics", self.prometheus)]

        async def api_error(request: Request, error: ApiError) -> Response:
            self.metrics.errors.labels(str(error.status)).inc()
            return error_response(error)

        async def http_error(request: Request, error: HTTPException) -> Response:
            return await api_error(request, ApiError(error.status_code, f"{request.method} {request.url.path}: "
                                                                         f"{error.detail}", None, "not_found"))

        async def server_error(request: Request, error: Exception) -> Response:
            return await api_error(request, ApiError(500, f"internal error: {type(error).__name__}: {error}"))

        app = Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error,
                                                            Exception: server_error})
        if self.options.api_key:
            app.add_middleware(ApiKeyMiddleware, api_key=self.options.api_key)
        return app


def create_app(backend, served: ServedModel, options: ServeOptions = ServeOptions()) -> Starlette:
    return OpenAIServer(backend, served, options).app()


async def _parse(request: Request, model):
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None


def _sampling(body, max_tokens: int) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    seed = body.seed if body.seed is not None or temperature == 0 else secrets.randbits(32)  # unseeded: varies
    try:
        return SamplingParams(temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p,
                              top_k=body.top_k or 0, seed=seed, max_new_tokens=max_tokens,
                              stop_on_eos=not body.ignore_eos)
    except SamplingError as e:
        raise ApiError(400, str(e), None, "invalid_value") from None


async def _gather(deltas) -> tuple[str, str, int]:
    parts, finish, tokens = [], None, 0
    async for delta, finish, tokens in deltas:
        parts.append(delta)
    return "".join(parts), finish, tokens


async def _unless_disconnected(request: Request, coroutine):
    """Awaits `coroutine`, or cancels it (and so its request) when the client disconnects; None then."""
    task = asyncio.ensure_future(coroutine)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)  # its handle is cancelled on the way out
                return None
        return task.result()
    finally:
        if not task.done():
            task.cancel()
