"""Control-plane messages between the driver and the ranks, as msgpack (never pickle).

Ray carries these as opaque bytes; tensors never travel this way (they use the data plane).
Sizes are bounded when decoding so a corrupt or hostile message cannot balloon memory.
"""
from __future__ import annotations

import dataclasses

import msgpack

from model.sampling import SamplingParams
from model.spec import SpecConfig
from workers.engine import Completion, GenerationStats, Request
from workers.run_config import RunConfig

MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def _unpack(data: bytes):
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    return msgpack.unpackb(data, raw=False, strict_map_key=True)


def pack_run(run: RunConfig) -> bytes:
    return msgpack.packb(dataclasses.asdict(run))


def unpack_run(data: bytes) -> RunConfig:
    return RunConfig(**_unpack(data))


def pack_requests(requests: list[Request]) -> bytes:
    return msgpack.packb([{"prompt_ids": list(r.prompt_ids), "params": dataclasses.asdict(r.params),
                           "request_id": r.request_id} for r in requests])


def unpack_requests(data: bytes) -> list[Request]:
    return [Request(tuple(r["prompt_ids"]), SamplingParams(**r["params"]), r["request_id"]) for r in _unpack(data)]


def pack_batch(requests: list[Request], spec: SpecConfig | None = None) -> bytes:
    """One generate call: the requests and how to decode them (spec None: plain decoding)."""
    return msgpack.packb({"requests": pack_requests(requests),
                          "spec": dataclasses.asdict(spec) if spec is not None else None})


def unpack_batch(data: bytes) -> tuple[list[Request], SpecConfig | None]:
    msg = _unpack(data)
    spec = SpecConfig(**msg["spec"]) if msg["spec"] is not None else None
    return unpack_requests(msg["requests"]), spec


def pack_result(completions: list[Completion], stats: GenerationStats, extra: dict) -> bytes:
    return msgpack.packb({"completions": [dataclasses.asdict(c) for c in completions],
                          "stats": dataclasses.asdict(stats), "extra": extra})


def unpack_result(data: bytes) -> tuple[list[Completion], GenerationStats, dict]:
    msg = _unpack(data)
    return [Completion(**c) for c in msg["completions"]], GenerationStats(**msg["stats"]), msg["extra"]


def pack(obj) -> bytes:
    return msgpack.packb(obj)


def unpack(data: bytes):
    return _unpack(data)
