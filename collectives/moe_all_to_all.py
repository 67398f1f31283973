"""MoE dispatch and combine over GPU peer memory, two Triton kernels with no host sync.

Why: `--moe ep` sends every routed row to the rank that owns its expert and back. Over NCCL that
is an all-to-all whose split sizes must be on the host first (a counts exchange and a `.tolist()`
per layer), so an EP decode step cannot be captured in a CUDA graph. Here the shapes are static:
every rank passes M rows (the same M on every rank), row i of rank s lands in slot [s, i] of its
destination, so a destination holds world x M slots whatever the routing, and a slot nobody
filled reads as padding (expert id -1, a zero row). Decode steps route at most a few dozen rows,
so the buffers are small. The reference of this contract, on top of all_to_all, is
`Communicator.dispatch_static` / `combine_static` (every backend has it; the CPU ones use it).

Memory: every rank owns one symmetric buffer (`SymmetricMoeAllToAll` allocates it through torch's
symmetric memory; the CPU test passes CPU tensors); `MoeLayout` carves it into int32 flags
[kind][parity][program][source rank], expert-id slots [parity][source][max_rows] (int32), row
slots [parity][source][max_rows x max_hidden] and combine slots [parity][max_rows x max_hidden].

Kernels (the fused all-reduce's machinery: collectives/fused_allreduce.py's `_region`, `_signal`,
`_wait`, per-program device epochs, two parities, timeouts). One launch has PROGRAMS programs;
program p owns rows p, p + PROGRAMS, ... on every rank, so it waits only for its peers' program p:
  dispatch  PUSH    row i with destination d = dest_rank[i] in [0, world): its values into d's row
                    slot [me, i]; its expert id into d's id slot [me, i] and -1 into every other
                    rank's (a row with any other destination goes nowhere); signal DISPATCHED;
            FINISH  wait for every rank's DISPATCHED; recv_x[s * M + i] = row slot [s, i] where the
                    id slot holds an id >= 0, else zeros; recv_ids[s * M + i] = the id slot;
  combine   PUSH    every slot [s, i] with recv_ids >= 0: y[s * M + i] into rank s's combine slot
                    [i] (exactly one rank writes it); signal COMBINED;
            FINISH  wait for every rank's COMBINED; out[i] = combine slot [i] if dest_rank[i] was
                    sent, else zeros.
Values are copied, never summed: the results are the reference's bits. Reuse across calls is the
fused kernel's argument, per kernel: a rank writing launch n into a peer's parity n & 1 has
finished launch n - 1, which waited for that peer's flag of n - 1, posted after the peer finished
launch n - 2. Triton's interpreter runs programs one after another, so the CPU test runs PUSH on
every simulated rank, then FINISH. Every rank must make the same calls with the same M and H.
A destination outside -1..world-1 goes nowhere here (checking would read the device); the
reference refuses it. `DeviceDispatch` is the mixin that puts the kernels behind a Communicator's
dispatch_static / combine_static.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from collectives import fused_norm
from collectives.fused_allreduce import FINISH, PUSH
from collectives.symm_layout import ALIGN, peer_tables
from collectives.triton_support import tl, triton

PROGRAMS = 32
DEFAULT_MAX_ROWS = 64  # rows one rank may send per call (the EP decode path sends <= 16; the benchmark sizes its own)
DEFAULT_MAX_HIDDEN = 8192
ALL_PHASES = PUSH | FINISH
ID_DTYPES = (torch.int32, torch.int64)

if triton is not None:
    from collectives.fused_allreduce import _region, _signal, _wait

    DISPATCHED, COMBINED = tl.constexpr(0), tl.constexpr(1)  # the two kinds of flag

    @triton.jit
    def _flag_index(KIND: tl.constexpr, parity, pid, PROGRAMS: tl.constexpr, WORLD: tl.constexpr):
        return ((KIND * 2 + parity) * PROGRAMS + pid) * WORLD  # + source rank

    @triton.jit
    def _dispatch_kernel(x_ptr, dest_ptr, ids_ptr, recv_x_ptr, recv_ids_ptr,
                         flag_table, id_table, data_table, counter_ptr, status_ptr,
                         rows, slot_elems, timeout_ns,
                         RANK: tl.constexpr, WORLD: tl.constexpr, WORLD_POW2: tl.constexpr,
                         PROGRAMS: tl.constexpr, MAX_ROWS: tl.constexpr, HIDDEN: tl.constexpr,
                         BLOCK: tl.constexpr, PHASES: tl.constexpr):
        """x (rows, HIDDEN), dest / ids (rows,) -> recv_x (WORLD * rows, HIDDEN), recv_ids (WORLD * rows,)."""
        pid = tl.program_id(0)
        epoch = tl.load(counter_ptr + pid) + 1
        parity = epoch & 1
        io = x_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK)
        in_row = cols < HIDDEN
        flags_at = _flag_index(DISPATCHED, parity, pid, PROGRAMS, WORLD)
        if pid < rows:  # programs past the last row only advance their epoch
            if (PHASES & 1) != 0:  # PUSH
                row = pid
                while row < rows:
                    dest = tl.load(dest_ptr + row).to(tl.int32)
                    expert = tl.load(ids_ptr + row).to(tl.int32)
                    if (dest >= 0) & (dest < WORLD):
                        slot = _region(data_table, dest, io) + (parity * WORLD + RANK) * slot_elems + row * HIDDEN
                        tl.store(slot + cols, tl.load(x_ptr + row * HIDDEN + cols, mask=in_row), mask=in_row)
                    for i in tl.static_range(WORLD):  # every rank learns whether row `row` is its
                        peer = (RANK + i) % WORLD
                        ids = _region(id_table, peer, tl.int32) + (parity * WORLD + RANK) * MAX_ROWS
                        tl.store(ids + row, tl.where(dest == peer, expert, -1))
                    row += PROGRAMS
                _signal(flag_table, flags_at, epoch, RANK, WORLD)
            if (PHASES & 4) != 0:  # FINISH
                _wait(flag_table, flags_at, epoch, status_ptr, timeout_ns, RANK, WORLD, WORLD_POW2)
                my_ids = _region(id_table, RANK, tl.int32) + parity * WORLD * MAX_ROWS
                my_rows = _region(data_table, RANK, io) + parity * WORLD * slot_elems
                for src in tl.static_range(WORLD):
                    row = pid
                    while row < rows:
                        expert = tl.load(my_ids + src * MAX_ROWS + row, cache_modifier=".cg")
                        filled = in_row & ((cols * 0 + expert) >= 0)  # a mask of tensors only (interpreter)
                        x = tl.load(my_rows + src * slot_elems + row * HIDDEN + cols, mask=filled, other=0.0,
                                    cache_modifier=".cg")
                        out = src * rows + row
                        tl.store(recv_x_ptr + out * HIDDEN + cols, x, mask=in_row)
                        tl.store(recv_ids_ptr + out, expert.to(recv_ids_ptr.dtype.element_ty))
                        row += PROGRAMS
        if (PHASES & 4) != 0:
            tl.store(counter_ptr + pid, epoch)

    @triton.jit
    def _combine_kernel(y_ptr, recv_ids_ptr, dest_ptr, out_ptr,
                        flag_table, combine_table, counter_ptr, status_ptr,
                        rows, slot_elems, timeout_ns,
                        RANK: tl.constexpr, WORLD: tl.constexpr, WORLD_POW2: tl.constexpr,
                        PROGRAMS: tl.constexpr, HIDDEN: tl.constexpr, BLOCK: tl.constexpr,
                        PHASES: tl.constexpr):
        """y (WORLD * rows, HIDDEN), recv_ids (WORLD * rows,), dest (rows,) -> out (rows, HIDDEN)."""
        pid = tl.program_id(0)
        epoch = tl.load(counter_ptr + pid) + 1
        parity = epoch & 1
        io = y_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK)
        in_row = cols < HIDDEN
        flags_at = _flag_index(COMBINED, parity, pid, PROGRAMS, WORLD)
        if pid < rows:
            if (PHASES & 1) != 0:  # PUSH: each filled slot back to the rank that sent it
                for i in tl.static_range(WORLD):  # start at the next rank: links share the load
                    src = (RANK + i) % WORLD
                    row = pid
                    while row < rows:
                        if tl.load(recv_ids_ptr + src * rows + row) >= 0:
                            y = tl.load(y_ptr + (src * rows + row) * HIDDEN + cols, mask=in_row)
                            back = _region(combine_table, src, io) + parity * slot_elems + row * HIDDEN
                            tl.store(back + cols, y, mask=in_row)
                        row += PROGRAMS
                _signal(flag_table, flags_at, epoch, RANK, WORLD)
            if (PHASES & 4) != 0:  # FINISH
                _wait(flag_table, flags_at, epoch, status_ptr, timeout_ns, RANK, WORLD, WORLD_POW2)
                mine = _region(combine_table, RANK, io) + parity * slot_elems
                row = pid
                while row < rows:
                    dest = tl.load(dest_ptr + row).to(tl.int32)
                    sent = in_row & ((cols * 0 + dest) >= 0) & ((cols * 0 + dest) < WORLD)
                    y = tl.load(mine + row * HIDDEN + cols, mask=sent, other=0.0, cache_modifier=".cg")
                    tl.store(out_ptr + row * HIDDEN + cols, y, mask=in_row)
                    row += PROGRAMS
        if (PHASES & 4) != 0:
            tl.store(counter_ptr + pid, epoch)


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class MoeLayout:
    """Where flags and slots sit in each rank's MoE buffer (the same on every rank). max_rows: the
    most rows one rank sends per call; max_hidden: the widest row (values of up to 4 bytes)."""
    world: int
    max_rows: int = DEFAULT_MAX_ROWS
    max_hidden: int = DEFAULT_MAX_HIDDEN
    programs: int = PROGRAMS

    def __post_init__(self) -> None:
        if not 1 <= self.world <= 30:  # the status word holds one bit per rank
            raise ValueError(f"world size must be 1..30, got {self.world}")
        if min(self.max_rows, self.max_hidden, self.programs) < 1:
            raise ValueError(f"max_rows, max_hidden and programs must be positive, got "
                             f"{self.max_rows}, {self.max_hidden}, {self.programs}")

    @property
    def flag_count(self) -> int:
        return 2 * 2 * self.programs * self.world  # int32 [kind][parity][program][source rank]

    @property
    def ids_offset(self) -> int:
        return _aligned(4 * self.flag_count)

    @property
    def data_offset(self) -> int:
        return self.ids_offset + _aligned(4 * 2 * self.world * self.max_rows)  # ids: [parity][source][row]

    @property
    def slot_bytes(self) -> int:
        return _aligned(4 * self.max_rows * self.max_hidden)

    @property
    def combine_offset(self) -> int:
        return self.data_offset + 2 * self.world * self.slot_bytes  # rows: [parity][source]

    @property
    def nbytes(self) -> int:
        return self.combine_offset + 2 * self.slot_bytes  # combine: [parity]


class MoeAllToAll:
    """One rank's launcher of the dispatch and combine kernels over the world's MoE buffers.

    bases: every rank's buffer address as mapped in this process (MoeLayout.nbytes each, all zero
    before any rank's first launch): torch symmetric memory on GPUs, CPU tensors' data_ptr()s under
    Triton's interpreter. Launches of one rank are ordered on one stream; every rank makes the same
    calls with the same shapes and dtypes in the same order, as for any collective."""

    def __init__(self, rank: int, layout: MoeLayout, bases: list[int], device: torch.device | str,
                 timeout_s: float = 120.0) -> None:
        table = peer_tables(rank, layout.world, bases, device, "the MoE all-to-all")
        self.rank, self.layout, self.device = rank, layout, torch.device(device)
        self.flag_table, self.id_table = table(0), table(layout.ids_offset)
        self.data_table, self.combine_table = table(layout.data_offset), table(layout.combine_offset)
        self.dispatch_epochs = torch.zeros(layout.programs, dtype=torch.int32, device=self.device)
        self.combine_epochs = torch.zeros(layout.programs, dtype=torch.int32, device=self.device)
        self.status = torch.zeros(1, dtype=torch.int32, device=self.device)  # bits of ranks a wait gave up on
        self.timeout_ns = int(timeout_s * 1e9)

    def fits(self, x: torch.Tensor, rows: int | None = None) -> bool:
        """True when `x` (M, H) (or a combine's (world*M, H) with rows=M) can go through the kernels:
        contiguous float32/bf16/fp16 on this rank's device, M <= max_rows, H <= max_hidden."""
        rows = x.shape[0] if rows is None else rows
        return (x.device == self.device and x.dtype in fused_norm.DTYPES and x.dim() == 2 and x.is_contiguous()
                and rows <= self.layout.max_rows and 1 <= x.shape[1] <= self.layout.max_hidden)

    def _check_rows(self, x: torch.Tensor, what: str) -> None:
        if not self.fits(x):
            raise ValueError(f"MoE {what} takes contiguous float32/bf16/fp16 rows (M <= {self.layout.max_rows}, "
                             f"H <= {self.layout.max_hidden}) on {self.device}, got {x.dtype} {tuple(x.shape)} "
                             f"on {x.device}")

    def _check_index(self, t: torch.Tensor, name: str, n: int) -> None:
        if t.shape != (n,) or t.dtype not in ID_DTYPES or not t.is_contiguous() or t.device != self.device:
            raise ValueError(f"MoE all-to-all: {name} must be a contiguous int32/int64 ({n},) tensor on "
                             f"{self.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")

    def _phases(self, phases: int | None) -> int:
        phases = ALL_PHASES if phases is None else phases
        if phases == 0 or phases & ~ALL_PHASES:
            raise ValueError(f"phases {phases} are not a subset of PUSH | FINISH ({ALL_PHASES})")
        return phases

    def _launch_args(self, x: torch.Tensor) -> dict:
        block = triton.next_power_of_2(x.shape[1])
        return dict(RANK=self.rank, WORLD=self.layout.world, WORLD_POW2=triton.next_power_of_2(self.layout.world),
                    PROGRAMS=self.layout.programs, HIDDEN=x.shape[1], BLOCK=block,
                    num_warps=fused_norm.num_warps(block))

    def dispatch(self, x: torch.Tensor, dest_rank: torch.Tensor,
                 expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Communicator.dispatch_static in one launch: (recv_x (world*M, H), recv_ids (world*M,))."""
        world, (m, hidden) = self.layout.world, x.shape
        recv_x = torch.empty(world * m, hidden, dtype=x.dtype, device=x.device)
        recv_ids = torch.empty(world * m, dtype=expert_ids.dtype, device=x.device)
        self.launch_dispatch(x, dest_rank, expert_ids, recv_x, recv_ids)
        return recv_x, recv_ids

    def combine(self, y: torch.Tensor, recv_ids: torch.Tensor, dest_rank: torch.Tensor) -> torch.Tensor:
        """Communicator.combine_static in one launch: (M, H), row i from the rank it went to."""
        out = torch.empty(dest_rank.shape[0], y.shape[1], dtype=y.dtype, device=y.device)
        self.launch_combine(y, recv_ids, dest_rank, out)
        return out

    def launch_dispatch(self, x, dest_rank, expert_ids, recv_x, recv_ids, phases: int | None = None) -> None:
        """One dispatch launch into preallocated outputs; phases: bits of PUSH / FINISH (the CPU
        test runs them one at a time over every rank)."""
        phases = self._phases(phases)
        self._check_rows(x, "dispatch")
        m, world = x.shape[0], self.layout.world
        self._check_index(dest_rank, "dest_rank", m)
        self._check_index(expert_ids, "expert_ids", m)
        self._check_index(recv_ids, "recv_ids", world * m)
        if recv_x.shape != (world * m, x.shape[1]) or recv_x.dtype != x.dtype or not recv_x.is_contiguous():
            raise ValueError(f"MoE dispatch: recv_x must be contiguous {x.dtype} {(world * m, x.shape[1])}")
        if m == 0:
            return
        _dispatch_kernel[(self.layout.programs,)](
            x, dest_rank, expert_ids, recv_x, recv_ids, self.flag_table, self.id_table, self.data_table,
            self.dispatch_epochs, self.status, m, self.layout.slot_bytes // x.element_size(), self.timeout_ns,
            MAX_ROWS=self.layout.max_rows, PHASES=phases, **self._launch_args(x))

    def launch_combine(self, y, recv_ids, dest_rank, out, phases: int | None = None) -> None:
        """One combine launch into a preallocated `out` (M, H); phases as launch_dispatch."""
        phases = self._phases(phases)
        m, world = dest_rank.shape[0] if dest_rank.dim() == 1 else -1, self.layout.world
        self._check_index(dest_rank, "dest_rank", max(m, 0))
        self._check_rows(out, "combine")
        if y.shape != (world * m, out.shape[1]) or y.dtype != out.dtype or not y.is_contiguous() or y.device != out.device:
            raise ValueError(f"MoE combine: y must be contiguous {out.dtype} {(world * m, out.shape[1])} (world x M "
                             f"rows of the dispatch), got {y.dtype} {tuple(y.shape)}")
        self._check_index(recv_ids, "recv_ids", world * m)
        if out.shape[0] != m:
            raise ValueError(f"MoE combine: out must have {m} rows (dest_rank's), got {tuple(out.shape)}")
        if m == 0:
            return
        _combine_kernel[(self.layout.programs,)](
            y, recv_ids, dest_rank, out, self.flag_table, self.combine_table, self.combine_epochs, self.status,
            m, self.layout.slot_bytes // y.element_size(), self.timeout_ns, PHASES=phases, **self._launch_args(y))

    def missing_ranks(self) -> list[int]:
        """Ranks some wait of this rank gave up on (timeout); reads the device (a host sync)."""
        bits = int(self.status.item())
        return [r for r in range(self.layout.world) if bits >> r & 1]


class SymmetricMoeAllToAll(MoeAllToAll):
    """MoeAllToAll over a buffer of its own in torch's symmetric memory, mapped into every rank.

    group: a TorchDistCommunicator over NCCL whose process group is the default (WORLD) group, as
    SymmMemCommunicator.nccl is. Construction is collective (every rank, same layout); it returns
    once every rank's buffer is zero, so no kernel can signal into a buffer not yet cleared."""

    def __init__(self, group, layout: MoeLayout | None = None, timeout_s: float = 120.0) -> None:
        from collectives.symm_buffer import map_symmetric
        layout = layout or MoeLayout(group.world_size)
        self.mapped = map_symmetric(layout.nbytes, group)
        super().__init__(group.rank, layout, self.mapped.bases, group.device, timeout_s)
        torch.cuda.synchronize(group.device)
        group.barrier()

    def close(self) -> None:
        """Drops the buffer; call after a barrier (no peer pushes into it any more)."""
        self.mapped = None


class DeviceDispatch:
    """Mixin for a Communicator that holds a MoeAllToAll as `self.moe`: dispatch_static and
    combine_static run the kernels where they take the rows (MoeAllToAll.fits: a property of
    shapes and dtypes, so every rank takes the same branch), else the all_to_all reference."""

    device_dispatch = True

    def dispatch_static(self, x: torch.Tensor, dest_rank: torch.Tensor,
                        expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.moe.fits(x):
            return self.moe.dispatch(x, dest_rank, expert_ids)
        return super().dispatch_static(x, dest_rank, expert_ids)

    def combine_static(self, y: torch.Tensor, recv_ids: torch.Tensor, dest_rank: torch.Tensor) -> torch.Tensor:
        if self.moe.fits(y, rows=dest_rank.shape[0]):
            return self.moe.combine(y, recv_ids, dest_rank)
        return super().combine_static(y, recv_ids, dest_rank)

