"""Reading per-rank traces, aligning their clocks, and matching each collective across ranks.

A trace directory holds `rank<r>.msgpack` per rank (collectives/trace.py writes them) and
`clock.json` (each rank's clock offset against the driver, cluster/clocks.py). Reading is
strict and bounded: a missing or corrupt file is a TraceError naming it, msgpack objects are
size-limited, and ranks are never merged without their clock offsets unless the caller says
the clocks are the same (`assume_same_clock`).

A run with --emulate-node also leaves `modeled/rank<r>.msgpack` (workers/virtual_clock.py): the
same records on each rank's virtual clock, which all ranks share by construction (no offsets).
`read_trace` attaches them as `trace.modeled`, a Trace of its own, so every tool that reads a
measured trace reads the modeled one the same way.

A collective instance is one (group, sequence number); the same instance appears on every rank
of its group. Its arrival on rank r is r's start time; the last arrival releases the collective,
so on every rank the time from its own arrival to the last arrival is waiting, and the rest is
the transfer itself. Exporters (Chrome/Perfetto JSON, HTA) and the summary build on this.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from collectives.trace import COLL_FIELDS, FORMAT, MODELED_DIR, SPAN_FIELDS, VERSION

MAX_OBJECT_BYTES = 1 << 20
MAX_FILE_BYTES = 4 << 30


class TraceError(ValueError):
    """A trace directory that cannot be read as asked (the message names the file)."""


@dataclass
class RankTrace:
    header: dict
    steps: list[dict] = field(default_factory=list)
    spans: list[dict] = field(default_factory=list)
    collectives: list[dict] = field(default_factory=list)


@dataclass
class Instance:
    """One collective as every rank of its group saw it (times aligned, ns)."""

    op: str
    group: tuple[int, ...]
    seq: int
    nbytes: int
    algorithm: str
    step: int
    per_rank: dict[int, dict]  # rank -> its record

    @property
    def last_arrival(self) -> int:
        return max(r["t0"] for r in self.per_rank.values())

    @property
    def first_arrival(self) -> int:
        return min(r["t0"] for r in self.per_rank.values())

    @property
    def skew_ns(self) -> int:
        return self.last_arrival - self.first_arrival

    @property
    def last_rank(self) -> int:
        return max(self.per_rank, key=lambda r: (self.per_rank[r]["t0"], r))


@dataclass
class Trace:
    ranks: dict[int, RankTrace]
    offsets: dict[int, dict]
    world_size: int
    modeled: "Trace | None" = None  # the virtual clock's timeline of the same run (--emulate-node)

    @property
    def node(self) -> str | None:
        """The emulated node of a modeled timeline (None for a measured one)."""
        return next(iter(self.ranks.values())).header.get("node")

    def instances(self) -> list[Instance]:
        by_key: dict[tuple, dict[int, dict]] = {}
        for rank, rt in self.ranks.items():
            for c in rt.collectives:
                by_key.setdefault((tuple(c["g"]), c["q"]), {})[rank] = c
        out = []
        for (group, seq), per_rank in sorted(by_key.items(), key=lambda kv: min(r["t0"] for r in kv[1].values())):
            first = next(iter(per_rank.values()))
            out.append(Instance(first["op"], group, seq, first["b"], first["a"], first["s"], per_rank))
        return out


_FIELDS = {"coll": COLL_FIELDS, "span": SPAN_FIELDS}


def _record(path: Path, kind: str, row, algorithms: dict) -> dict:
    """One record as a map with its kind under "k" (a row of a batch: its fields in order)."""
    if kind in _FIELDS:
        if not isinstance(row, list) or len(row) != len(_FIELDS[kind]):
            raise TraceError(f"{path} holds a malformed {kind} record: {str(row)[:120]}")
        record = dict(zip(_FIELDS[kind], row))
        if kind == "coll":
            if record["rb"] is None:
                del record["rb"]
            try:
                record["a"] = algorithms[record["op"], record["b"]]
            except (KeyError, TypeError):
                raise TraceError(f"{path}: the batch names no algorithm for {str(row)[:120]}") from None
    elif isinstance(row, dict):
        record = dict(row)
    else:
        raise TraceError(f"{path} holds a malformed {kind} record: {str(row)[:120]}")
    if not isinstance(record.get("t0"), int) or not isinstance(record.get("t1"), int):
        raise TraceError(f"{path} holds a {kind} record without integer times: {str(row)[:120]}")
    record["k"] = kind
    return record


def _algorithms(path: Path, batch: dict) -> dict:
    """The batch's [op, bytes, algorithm] table as a map."""
    table = batch.get("algorithms", [])
    if not isinstance(table, list) or not all(isinstance(e, list) and len(e) == 3 for e in table):
        raise TraceError(f"{path} holds a malformed algorithm table: {str(table)[:120]}")
    return {(op, nbytes): algorithm for op, nbytes, algorithm in table}


def read_rank_file(path: str | Path) -> RankTrace:
    """One rank's trace file, checked: its header, then its step, span and collective records."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise TraceError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
    unpacker = msgpack.Unpacker(open(path, "rb"), raw=False, max_buffer_size=MAX_OBJECT_BYTES,
                                strict_map_key=True)
    try:
        header = next(unpacker)
    except StopIteration:
        raise TraceError(f"{path} is empty" if size == 0 else f"{path} is truncated inside its header") from None
    except (ValueError, msgpack.UnpackException) as e:
        raise TraceError(f"{path} is not a dgx-emu trace: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise TraceError(f"{path} is not a dgx-emu trace (no header)")
    if header.get("version") != VERSION:
        raise TraceError(f"{path} has trace format version {header.get('version')}, this reader knows {VERSION}")
    rt = RankTrace(header)
    kinds = {"step": rt.steps, "span": rt.spans, "coll": rt.collectives}
    end = unpacker.tell()  # where the last whole object ended (after a cut-off one, tell() is not that)
    try:
        for batch in unpacker:
            end = unpacker.tell()
            if not isinstance(batch, dict) or batch.get("type") != "batch" \
                    or set(batch) - {"type", "algorithms", *kinds} \
                    or not all(isinstance(batch.get(kind, []), list) for kind in kinds):
                raise TraceError(f"{path} holds a malformed batch: {str(batch)[:120]}")
            algorithms = _algorithms(path, batch)
            for kind, records in kinds.items():
                values, width = batch.get(kind, []), len(_FIELDS.get(kind, ())) or 1
                if len(values) % width:
                    raise TraceError(f"{path} holds a {kind} batch of {len(values)} values, not rows of {width}")
                for i in range(0, len(values), width):
                    records.append(_record(path, kind, values[i: i + width] if kind in _FIELDS else values[i],
                                           algorithms))
    except (ValueError, msgpack.UnpackException) as e:
        if isinstance(e, TraceError):
            raise
        raise TraceError(f"{path} is truncated or corrupt: {e}") from None
    if end != size:  # the stream ended inside a record
        raise TraceError(f"{path} is truncated: {size - end} trailing bytes do not form a record")
    return rt


def _read_ranks(directory: Path) -> tuple[dict[int, RankTrace], int]:
    files = sorted(directory.glob("rank*.msgpack"))
    if not files:
        raise TraceError(f"{directory} holds no rank*.msgpack trace files")
    ranks = {}
    for f in files:
        rt = read_rank_file(f)
        ranks[int(rt.header["rank"])] = rt
    world = int(next(iter(ranks.values())).header["world_size"])
    missing = sorted(set(range(world)) - set(ranks))
    if missing:
        raise TraceError(f"{directory} lacks the traces of rank(s) {missing} (world size {world})")
    return ranks, world


def read_trace(directory: str | Path, assume_same_clock: bool = False) -> Trace:
    directory = Path(directory)
    if not directory.is_dir():
        raise TraceError(f"trace directory {directory} does not exist")
    ranks, world = _read_ranks(directory)
    offsets = _read_offsets(directory, world, assume_same_clock)
    for rank, rt in ranks.items():
        shift = offsets[rank]["offset_ns"]
        for record in rt.steps + rt.spans + rt.collectives:
            record["t0"] -= shift
            record["t1"] -= shift
    return Trace(ranks, offsets, world, _read_modeled(directory / MODELED_DIR, world))


def _read_modeled(directory: Path, world: int) -> Trace | None:
    """The virtual clock's tracks, when the run had them: one clock shared by the ranks by construction."""
    if not directory.is_dir():
        return None
    ranks, modeled_world = _read_ranks(directory)
    if modeled_world != world or any(rt.header.get("timeline") != "modeled" for rt in ranks.values()):
        raise TraceError(f"{directory} does not hold the modeled timeline of this {world}-rank trace")
    return Trace(ranks, {r: {"offset_ns": 0, "uncertainty_ns": 0, "virtual": True} for r in ranks}, world)


def _read_offsets(directory: Path, world: int, assume_same_clock: bool) -> dict[int, dict]:
    path = directory / "clock.json"
    if not path.is_file():
        if assume_same_clock:
            return {r: {"offset_ns": 0, "uncertainty_ns": None, "assumed": True} for r in range(world)}
        raise TraceError(f"{path} is missing: the ranks' clocks cannot be aligned "
                         "(pass --assume-same-clock to merge them unaligned)")
    try:
        clock = json.loads(path.read_text())
        phases = [clock[p] for p in ("start", "end") if p in clock]
        by_rank: dict[int, list[dict]] = {}
        for phase in phases:
            for entry in phase:
                by_rank.setdefault(int(entry["rank"]), []).append(entry)
        offsets = {r: {"offset_ns": sum(e["offset_ns"] for e in es) // len(es),
                       "uncertainty_ns": max(e["uncertainty_ns"] for e in es),
                       "drift_ns": es[-1]["offset_ns"] - es[0]["offset_ns"]} for r, es in by_rank.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise TraceError(f"{path} is malformed: {e!r}") from None
    missing = sorted(set(range(world)) - set(offsets))
    if missing:
        raise TraceError(f"{path} has no clock offset for rank(s) {missing}")
    return offsets
