"""Where everything sits in a rank's symmetric buffer of the fused all-reduce, and the host-side
choices around its kernels (collectives/fused_allreduce.py, collectives/lamport_allreduce.py).

Why a module of its own: the layout (flags, data slots, gather slots, how many buffers a protocol
rotates through) and the address tables of every rank's regions are plain Python that the
all-reduce, the MoE all-to-all (collectives/moe_all_to_all.py) and the symm backend share; the
kernels' file keeps the device code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from collectives.triton_support import triton

ALGORITHMS = ("one-shot", "two-shot")
PROTOCOLS = ("lamport", "flags")  # how a rank learns its peers' data arrived (collectives/lamport_allreduce.py)
PROGRAMS = 32  # programs per launch of the flag kernel; each owns every PROGRAMS-th row
LAMPORT_PROGRAMS = 128  # the Lamport kernel's: one row each up to 128 tokens (its programs need no flags)
AR_ROW = 2048  # values per row of a plain all-reduce (its message is cut into rows of this many)
TWO_SHOT_MIN_BYTES = 1 << 20  # messages this large or larger use two-shot (benchmarks/collectives_bench.py measures both)
ALIGN = 256  # bytes; every region starts 16-byte aligned (vector loads and stores)


def peer_tables(rank: int, world: int, bases: list[int], device, what: str):
    """Checks every rank's buffer address (one per rank, 16-byte aligned; Triton present) and returns
    table(offset): the (world,) int64 device tensor of one region's address on every rank, which the
    kernels index by rank (shared by the fused all-reduce and the MoE all-to-all)."""
    if len(bases) != world or not 0 <= rank < world:
        raise ValueError(f"rank {rank} and {len(bases)} buffer addresses do not fit a world of {world}")
    if any(base % 16 for base in bases):
        raise ValueError(f"every buffer of {what} must start 16-byte aligned")
    if triton is None:
        raise RuntimeError(f"{what} needs Triton")

    def table(offset: int) -> torch.Tensor:
        return torch.tensor([base + offset for base in bases], dtype=torch.int64, device=device)
    return table


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Layout:
    """Where the flags and slots sit in each rank's symmetric buffer (the same on every rank).
    capacity: the most values one message may hold, of any dtype up to 4 bytes. protocol: "flags"
    (this file's kernel: flags, two buffers) or "lamport" (collectives/lamport_allreduce.py: no
    flags, three buffers, every byte starting as `initial_byte`). Lamport runs 128 programs, flags
    32: at 128 programs Lamport took 7.9 us for a 128-token AllReduce+RMSNorm at TP2 where 32 took
    14.6 (one row per program: each row's arrival is waited for apart), and the same below 32
    tokens (benchmarks/results/h200x2-collectives.json, lamport@128 beside lamport)."""
    world: int
    capacity: int
    programs: int = 0  # 0: the protocol's (LAMPORT_PROGRAMS, or PROGRAMS with flags)
    protocol: str = "lamport"

    def __post_init__(self) -> None:
        if self.programs == 0:
            object.__setattr__(self, "programs", LAMPORT_PROGRAMS if self.protocol == "lamport" else PROGRAMS)
        if not 1 <= self.world <= 30:  # the status word holds one bit per rank
            raise ValueError(f"world size must be 1..30, got {self.world}")
        if self.capacity < 1 or self.programs < 1:
            raise ValueError(f"capacity and programs must be positive, got {self.capacity}, {self.programs}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")

    @property
    def buffers(self) -> int:
        return 3 if self.protocol == "lamport" else 2

    @property
    def initial_byte(self) -> int:
        """What every byte of the buffer must hold before any rank's first launch."""
        return 0xFF if self.protocol == "lamport" else 0

    @property
    def flag_count(self) -> int:
        """int32 [kind][parity][program][source rank]; none with Lamport sentinels."""
        return 2 * 2 * self.programs * self.world if self.protocol == "flags" else 0

    @property
    def slot_bytes(self) -> int:
        return _aligned(4 * self.capacity)

    @property
    def data_offset(self) -> int:
        return _aligned(4 * self.flag_count)

    @property
    def gather_offset(self) -> int:
        return self.data_offset + self.buffers * self.world * self.slot_bytes  # data slots: [buffer][source rank]

    @property
    def nbytes(self) -> int:
        return self.gather_offset + self.buffers * self.slot_bytes  # gather slots: [buffer]


def algorithm_for(nbytes: int, world: int) -> str:
    """One-shot, or two-shot for messages of TWO_SHOT_MIN_BYTES and more on more than two ranks. At
    two ranks both move the same bytes per rank and two-shot waits one more round: it lost at every
    size measured on 2 x H200 (1-128 tokens x 5120 bf16, up to 1.3 MB: 15.7 vs 12.8 us at 128 tokens,
    benchmarks/results/h200x2-collectives.json). Above two ranks the threshold is not measured yet."""
    return "two-shot" if world > 2 and nbytes >= TWO_SHOT_MIN_BYTES else "one-shot"
