"""Tokenizers: `tokenizer.json` through the `tokenizers` library, and the byte-level one the
embedded default model ships with.

The byte-level tokenizer maps every byte to one token (no merges), after 256 special tokens laid
out like Llama 4's (begin/end of text, end of turn, headers, then reserved ids). It needs no
training data and can spell any text, which is all a randomly initialised model needs; a trained
model brings its own `tokenizer.json`.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot|>", "<|header_start|>", "<|header_end|>"]
N_SPECIAL = 256


class Tokenizer:
    def __init__(self, inner: HFTokenizer) -> None:
        self.inner = inner

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        return cls(HFTokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: int | None = None) -> list[int]:
        ids = self.inner.encode(text, add_special_tokens=False).ids
        return ([add_bos] if add_bos is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character may still be arriving
            return ""
        delta, self.emitted = text[self.emitted:], len(text)
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        delta, self.emitted = text[self.emitted:], len(text)
        return delta


def byte_level_tokenizer() -> Tokenizer:
    """256 special tokens (ids 0..255), then one token per byte (ids 256..511)."""
    specials = SPECIAL_TOKENS + [f"<|reserved_special_token_{i}|>" for i in range(N_SPECIAL - len(SPECIAL_TOKENS))]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)):
        vocab[char] = N_SPECIAL + i
    inner = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    inner.decoder = decoders.ByteLevel()
    inner.add_special_tokens(specials)
    return Tokenizer(inner)


def _byte_of(char: str) -> int:
    """The byte that GPT-2's byte-level alphabet maps to `char` (so token 256 + b spells byte b)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    if ord(char) in printable:
        return ord(char)
    others = [b for b in range(256) if b not in printable]
    return others[ord(char) - 256]
