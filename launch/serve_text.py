"""Text around the token stream of `dgx-emu serve`: chat templates in, text deltas with stop strings out.

Chat template. A checkpoint brings its own (chat_template.jinja, or "chat_template" in
tokenizer_config.json, as transformers reads them); it is rendered the way transformers renders
it (a sandboxed Jinja environment, trim_blocks and lstrip_blocks, `raise_exception`). A checkpoint
without one, like the embedded model, gets DEFAULT_CHAT_TEMPLATE: Llama 4's text format,

    <|begin_of_text|><|header_start|>user<|header_end|>\\n\\nHello<|eot|><|header_start|>assistant<|header_end|>\\n\\n

whose special tokens the embedded byte-level tokenizer knows. (The embedded model was trained on
documentation, not conversations: its replies are documentation-like text, not answers.)

Stop strings. Text arrives token by token; a stop string may span tokens, and a multi-byte
character may span tokens too. TextStream decodes the ids incrementally (StreamDecoder holds back
incomplete UTF-8), holds back any tail that could still grow into a stop string, and cuts the
text where the first stop string starts; the caller then cancels the request.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from model.tokenizer import StreamDecoder, Tokenizer

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|header_start|>{{ message['role'] }}<|header_end|>\n\n{{ message['content'] }}<|eot|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)
DEFAULT_BOS = "<|begin_of_text|>"


class ChatTemplateError(ValueError):
    """The template refused the conversation (raise_exception) or failed to render."""


def _token_text(value) -> str | None:
    """tokenizer_config.json spells special tokens as strings or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # a template string (Jinja)
    origin: str  # where it came from, for the startup line and errors
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def for_checkpoint(cls, model_dir: Path) -> "ChatTemplate":
        config_file = model_dir / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        bos, eos = _token_text(config.get("bos_token")) or "", _token_text(config.get("eos_token")) or ""
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            return cls(jinja_file.read_text(), str(jinja_file), bos, eos)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the one called "default"
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str):
            return cls(template, str(config_file), bos, eos)
        return cls(DEFAULT_CHAT_TEMPLATE, "default (Llama 4 text format)", bos or DEFAULT_BOS, eos)

    def render(self, messages: list[dict]) -> str:
        from jinja2.exceptions import TemplateError
        try:
            return _compiled(self.source).render(messages=messages, add_generation_prompt=True,
                                                 bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:  # a syntax error, or one while rendering these messages
            raise ChatTemplateError(f"chat template ({self.origin}): {e}") from None


@functools.lru_cache(maxsize=8)
def _compiled(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatTemplateError(message)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


class TextStream:
    """Token ids in, text deltas out; `stopped` once a stop string appeared (the text ends before it)."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.stops = [s for s in stops if s]
        self.held = ""  # decoded, not yet emitted: it may be the start of a stop string
        self.stopped = False

    def push(self, ids: list[int]) -> str:
        return self._cut(self.held + self.decoder.push(list(ids)), final=False)

    def flush(self) -> str:
        """The rest, once the request finished (stop strings still apply)."""
        return self._cut(self.held + self.decoder.flush(), final=True)

    def _cut(self, text: str, final: bool) -> str:
        starts = [text.find(s) for s in self.stops if s in text]
        if starts:
            self.stopped, self.held = True, ""
            return text[:min(starts)]
        keep = 0 if final else max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])),
                                   default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]
