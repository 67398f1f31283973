"""The OpenAI request bodies `dgx-emu serve` accepts, the answers it sends (whole or as stream
chunks), and its errors in OpenAI's error format.

The models are strict pydantic models: a field of the wrong type is refused rather than coerced
("0.5" is not a temperature, true is not a max_tokens), and a field the API does not know is
refused by name, as OpenAI's own API does ("Unrecognized request argument supplied: x"). Fields
the OpenAI API defines but this server does not implement (n > 1, logprobs, penalties, echo...)
parse, and a value other than their neutral one gets a 400 naming the field: a request is never
served silently differently from how it asked.

Two extensions as vLLM spells them: `top_k` (0: off) and `ignore_eos` (decode all max_tokens,
for benchmarks). The `openai` client sends them through `extra_body`.
"""
from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0)]


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with its HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             429: "rate_limit_error", 503: "service_unavailable", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    """The fields completions and chat completions share."""
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # extension
    ignore_eos: bool = False  # extension

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(s == "" for s in stops):
            raise ApiError(400, "stop strings must not be empty", "stop", "invalid_value")
        return stops

    def unsupported(self) -> list[tuple[str, bool]]:
        """(field, set to something this server cannot do) for every field it only accepts neutral."""
        return [("n", self.n not in (None, 1)),
                ("presence_penalty", self.presence_penalty not in (None, 0.0)),
                ("frequency_penalty", self.frequency_penalty not in (None, 0.0)),
                ("logit_bias", bool(self.logit_bias))]

    def check_supported(self) -> None:
        for field, refused in self.unsupported():
            if refused:
                value = getattr(self, field)
                raise ApiError(400, f"{field}={value!r} is not supported by this server "
                                    f"(it decodes one choice, without penalties, logit bias or logprobs)",
                               field, "unsupported_parameter")


class CompletionRequest(_Generation):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    echo: bool | None = False
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[tuple[str, bool]]:
        return super().unsupported() + [("echo", bool(self.echo)), ("best_of", self.best_of not in (None, 1)),
                                        ("logprobs", self.logprobs is not None), ("suffix", bool(self.suffix))]

    def single_prompt(self) -> str | list[int]:
        """One prompt: a string or token ids (a list of one of either is unwrapped)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt holds {len(prompt)} prompts; this server takes one per request",
                               "prompt", "unsupported_parameter")
            prompt = prompt[0]
        if len(prompt) == 0:
            raise ApiError(400, "prompt is empty", "prompt", "invalid_value")
        return prompt


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Generation):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def unsupported(self) -> list[tuple[str, bool]]:
        return super().unsupported() + [("logprobs", bool(self.logprobs)),
                                        ("top_logprobs", self.top_logprobs is not None)]


def validation_error(errors: list[dict]) -> ApiError:
    """pydantic's errors of a request body -> one 400 naming the first field at fault."""
    first = errors[0]
    loc = [str(part) for part in first["loc"] if part != "body"]
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", first["msg"])
        return ApiError(400, f"the request body is not valid JSON: {detail}", None, "invalid_json")
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {'.'.join(loc)}", loc[-1] if loc else None,
                        "unrecognized_argument")
    if not loc:  # the body itself: missing, or not a JSON object
        return ApiError(400, f"the request body must be a JSON object: {first['msg']}", None, "invalid_type")
    param = loc[0]
    same = [e for e in errors if [str(p) for p in e["loc"] if p != "body"][:1] == [param]]
    if first["type"] == "missing":
        return ApiError(400, f"'{param}' is a required field", param, "missing_required_parameter")
    messages = sorted({e["msg"] for e in same})
    return ApiError(400, f"invalid '{'.'.join(loc) if len(same) == 1 else param}': {'; or '.join(messages)}",
                    param, "invalid_type" if "type" in first["type"] else "invalid_value")


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------

class Answer:
    """The JSON shapes of one request's answer: whole, or as stream chunks."""
    object_name = chunk_name = ""

    def __init__(self, request_id: str, model: str, prompt_tokens: int) -> None:
        self.id, self.model, self.prompt_tokens, self.created = request_id, model, prompt_tokens, int(time.time())

    def _head(self, name: str) -> dict:
        return {"id": self.id, "object": name, "created": self.created, "model": self.model}

    def usage(self, tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": tokens,
                "total_tokens": self.prompt_tokens + tokens}

    def whole(self, text: str, finish: str, tokens: int) -> dict:
        return {**self._head(self.object_name), "choices": [self.choice(text, finish)], "usage": self.usage(tokens)}

    def usage_chunk(self, tokens: int) -> dict:
        return {**self._head(self.chunk_name), "choices": [], "usage": self.usage(tokens)}

    def first_chunk(self) -> dict | None:
        return None


class CompletionAnswer(Answer):
    object_name = chunk_name = "text_completion"

    def choice(self, text: str, finish: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def chunk(self, delta: str, finish: str | None) -> dict:
        return {**self._head(self.chunk_name), "choices": [self.choice(delta, finish)]}


class ChatAnswer(Answer):
    object_name, chunk_name = "chat.completion", "chat.completion.chunk"

    def choice(self, text: str, finish: str | None) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def first_chunk(self) -> dict:  # OpenAI streams the role first
        return self.chunk(None, None, role=True)

    def chunk(self, delta: str | None, finish: str | None, role: bool = False) -> dict:
        piece = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
        return {**self._head(self.chunk_name),
                "choices": [{"index": 0, "delta": piece, "logprobs": None, "finish_reason": finish}]}
