"""AllReduce (+ residual add + RMSNorm [+ FP8]) over GPU peer memory, as ONE Triton kernel per call.

Why: a TP decode step runs this collective twice per layer. NCCL takes ~20 us for 5120 bf16 values
inside a CUDA graph, plus a separate norm kernel; a push-based one-shot kernel over NVLink takes a
few microseconds. Two arrival protocols share this file's layout and launcher (`FusedAllReduce`):
Lamport sentinels (collectives/lamport_allreduce.py, the default: 3.9 us a one-token call at TP2)
and flags (this file's kernel, described below: 5.5 us, selectable as "flags").

Memory: every rank owns one symmetric buffer (collectives/symm_mem.py maps all of them into every
rank); `Layout` (collectives/symm_layout.py) carves it into int32 flags, data slots [parity][source rank][capacity] and gather
slots [parity][capacity]. Each kernel gets tables of every rank's region addresses.

One launch has PROGRAMS programs; program p owns rows p, p + PROGRAMS, ... of the message
(rows of `hidden` for the norm, of AR_ROW values for a plain all-reduce). Phases (bits of PHASES):
  PUSH     store my rows into slot [my rank] of every rank's buffer (two-shot: only into the rows'
           owner, rank row % world), then signal: flag[PUSHED][parity][p][my rank] = epoch, written
           into every rank's flags with a system-scope release after a CTA barrier;
  SCATTER  (two-shot) wait for every rank's PUSHED flag of program p (acquire), reduce the rows I
           own, store them into every rank's gather slot, signal REDUCED;
  FINISH   wait (one-shot: PUSHED, two-shot: REDUCED); the reduced row is the fp32 sum of the
           world's partials IN RANK ORDER rounded to the dtype (one-shot sums the slots here,
           two-shot reads the owner's sum), so every rank gets the same bits; then plain: store it;
           norm: residual + reduced, RMSNorm * weight (collectives.fused_norm.rmsnorm_row, the
           one-GPU kernel's own code), optional FP8, store normed and the new residual.
A GPU launch runs all its phases; Triton's interpreter runs programs one after another, so a
program that pushes and then waits for a peer's push would spin forever there: the CPU test runs
PUSH on every simulated rank, then SCATTER on every rank, then FINISH.

Reuse without a host counter: program p keeps its epoch in device memory (counters[p], bumped by
FINISH, read by every phase), so a captured CUDA graph replays with fresh epochs. Every program
bumps its counter every launch (programs past the last row too), so all programs of all ranks
agree on the launch's epoch, and data and flags alternate between two parities. Safe because a
rank that writes launch n's data into a peer has finished launch n-1, which waited for that peer's
flag of n-1, posted after the peer finished launch n-2, the last user of that parity (launches on
one rank are ordered one after another: one stream, or streams that wait on each other; never
with programmatic dependent launch). A wait that outlasts timeout_ns gives up and ORs the missing
ranks' bits into a status word (`FusedAllReduce.missing_ranks`); nothing hangs forever.

Memory ordering (what the interpreter cannot check; the 2-GPU tests do): pushes are plain
vectorized stores to peer memory; a CTA barrier, then thread 0's atomic exchange with release
semantics at system scope publishes them; readers spin on acquire atomics at system scope, then
read the slots with .cg loads (L2, where NVLink writes land). No NVLink multicast.
"""
from __future__ import annotations

import torch

from collectives import fused_norm, gpu_stamps
from collectives.symm_layout import ALGORITHMS, AR_ROW, Layout, algorithm_for, peer_tables
from collectives.triton_support import INTERPRETED, pdl_kwargs, tl, triton

PUSH, SCATTER, FINISH = 1, 2, 4
ONE_SHOT_PHASES, TWO_SHOT_PHASES = PUSH | FINISH, PUSH | SCATTER | FINISH
if triton is not None:
    from collectives.fused_norm import _round, rmsnorm_row
    from collectives.gpu_stamps import write_stamp
    from collectives.triton_support import pdl_launch_dependents, pdl_wait

    PUSHED, REDUCED = tl.constexpr(0), tl.constexpr(1)  # the two kinds of flag
    INTERPRETED_SPIN_NS = tl.constexpr(1_000_000)  # under the interpreter a spin counts as 1 ms (it has no clock)

    if INTERPRETED:
        @triton.jit
        def _now_ns():
            return tl.program_id(0).to(tl.int64) * 0

        @triton.jit
        def _elapsed_ns(start, spins):
            return spins.to(tl.int64) * INTERPRETED_SPIN_NS
    else:
        @triton.jit
        def _now_ns():
            """The GPU's global nanosecond timer."""
            return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                             pack=1)

        @triton.jit
        def _elapsed_ns(start, spins):
            return _now_ns() - start

    @triton.jit
    def _region(table, rank, DTYPE: tl.constexpr):
        """Rank `rank`'s region (its address in the int64 table) as a 16-byte aligned DTYPE pointer."""
        return tl.multiple_of(tl.load(table + rank).to(tl.pointer_type(DTYPE)), 16)

    @triton.jit
    def _signal(flag_table, index, epoch, RANK: tl.constexpr, WORLD: tl.constexpr):
        """flags[index + RANK] = epoch on every rank, released at system scope after this program's
        stores (the CTA barrier orders every thread's stores before thread 0's release)."""
        tl.debug_barrier()
        for i in tl.static_range(WORLD):
            flags = _region(flag_table, (RANK + i) % WORLD, tl.int32)
            tl.atomic_xchg(flags + index + RANK, epoch, sem="release", scope="sys")

    @triton.jit
    def _missing(flags, src, epoch, WORLD: tl.constexpr):
        """Bit r set where rank r's flag is not yet `epoch` (acquire loads at system scope)."""
        seen = tl.atomic_add(flags + src, 0, mask=src < WORLD, sem="acquire", scope="sys")
        return tl.sum(tl.where((src < WORLD) & (seen != epoch), 1 << src, 0), axis=0)

    @triton.jit
    def _wait(flag_table, index, epoch, status_ptr, timeout_ns, RANK: tl.constexpr, WORLD: tl.constexpr,
              WORLD_POW2: tl.constexpr):
        """Spins until my flags[index + r] == epoch for every rank r, or timeout_ns passes (then ORs
        the missing ranks' bits into *status_ptr and goes on)."""
        flags = _region(flag_table, RANK, tl.int32) + index
        src = tl.arange(0, WORLD_POW2)
        start = _now_ns()
        missing = _missing(flags, src, epoch, WORLD)
        spins = 0
        elapsed = start - start
        while (missing != 0) & (elapsed < timeout_ns):
            missing = _missing(flags, src, epoch, WORLD)
            spins += 1
            elapsed = _elapsed_ns(start, spins)
        if missing != 0:
            tl.atomic_or(status_ptr, missing)
        tl.debug_barrier()

    @triton.jit
    def _launch_epoch(counter_ptr, stamps_ptr, stamp_slot, STAMP: tl.constexpr, PDL: tl.constexpr):
        """The start both fused kernels share: the PDL handshake (wait for x's writer, let the next
        kernel launch), program 0's begin stamp, and (program id, this launch's epoch)."""
        pdl_wait(PDL)
        pdl_launch_dependents(PDL)
        pid = tl.program_id(0)
        if STAMP:
            if pid == 0:
                write_stamp(stamps_ptr, stamp_slot)
        return pid, tl.load(counter_ptr + pid) + 1

    @triton.jit
    def _finish_row(acc, offs, cols, mask, residual_ptr, weight_ptr, scale_ptr, out_ptr, new_residual_ptr, eps,
                    HIDDEN: tl.constexpr, NORM: tl.constexpr, NORM_DTYPE: tl.constexpr, QUANT: tl.constexpr,
                    HAS_RESIDUAL: tl.constexpr):
        """acc: the fp32 rank-order sum of one row. Stores the reduced row (plain), or normed and the
        new residual (norm), exactly as all_reduce then collectives.communicator.add_rmsnorm would
        (without HAS_RESIDUAL the reduced row is the new residual: a step's first norm)."""
        io = new_residual_ptr.dtype.element_ty
        reduced = _round(acc, io)  # what an all-reduce returning the dtype holds
        if NORM:
            s = reduced
            if HAS_RESIDUAL:
                r = tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                s = _round(r + reduced, io)
            tl.store(new_residual_ptr + offs, s.to(io), mask=mask)
            y = rmsnorm_row(s, weight_ptr, scale_ptr, cols, mask, eps, HIDDEN, io, NORM_DTYPE, QUANT)
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + offs, reduced.to(io), mask=mask)

    @triton.jit
    def _fused_allreduce_kernel(
            x_ptr, residual_ptr, weight_ptr, scale_ptr, out_ptr, new_residual_ptr,
            flag_table, data_table, gather_table, counter_ptr, status_ptr,
            rows, numel, slot_elems, eps, timeout_ns,
            RANK: tl.constexpr, WORLD: tl.constexpr, WORLD_POW2: tl.constexpr, PROGRAMS: tl.constexpr,
            HIDDEN: tl.constexpr, BLOCK: tl.constexpr, NORM: tl.constexpr, NORM_DTYPE: tl.constexpr,
            QUANT: tl.constexpr, TWO_SHOT: tl.constexpr, PHASES: tl.constexpr,
            stamps_ptr, stamp_slot, STAMP: tl.constexpr, PDL: tl.constexpr = False,
            HAS_RESIDUAL: tl.constexpr = True):
        """See the module docstring. x, residual, out, new_residual: (rows, HIDDEN) flat, numel values.
        With STAMP, program 0 writes GPU times to stamps_ptr[stamp_slot + 0, 1, 2]: its start, the
        moment every peer's data had arrived (its wait ended), and its end (collectives/gpu_stamps.py).
        With PDL it waits for the kernel that wrote x, then lets the next kernel launch: that kernel
        (a GEMV) streams its first weight tiles while this one waits on its peers, and waits for
        this one to complete before it reads anything this one writes (triton_support.py)."""
        pid, epoch = _launch_epoch(counter_ptr, stamps_ptr, stamp_slot, STAMP, PDL)
        parity = epoch & 1
        io = x_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK)
        flag_set = (parity * PROGRAMS + pid) * WORLD  # + kind * 2 * PROGRAMS * WORLD, + source rank
        kind_stride = 2 * PROGRAMS * WORLD
        my_slots = _region(data_table, RANK, io) + parity * WORLD * slot_elems  # (WORLD, slot_elems)
        if pid < rows:  # programs past the last row only advance their epoch
            if (PHASES & 1) != 0:  # PUSH
                row = pid
                while row < rows:
                    offs = row * HIDDEN + cols
                    mask = (cols < HIDDEN) & (offs < numel)
                    x = tl.load(x_ptr + offs, mask=mask)
                    if TWO_SHOT:  # to the row's owner only
                        dst = _region(data_table, row % WORLD, io) + (parity * WORLD + RANK) * slot_elems
                        tl.store(dst + offs, x, mask=mask)
                    else:
                        for i in tl.static_range(WORLD):  # start at the next rank: links share the load
                            dst = _region(data_table, (RANK + i) % WORLD, io) + (parity * WORLD + RANK) * slot_elems
                            tl.store(dst + offs, x, mask=mask)
                    row += PROGRAMS
                _signal(flag_table, PUSHED * kind_stride + flag_set, epoch, RANK, WORLD)
            if TWO_SHOT and (PHASES & 2) != 0:  # SCATTER: reduce the rows I own, send them to everyone
                _wait(flag_table, PUSHED * kind_stride + flag_set, epoch, status_ptr, timeout_ns, RANK, WORLD,
                      WORLD_POW2)
                row = pid
                while row < rows:
                    if row % WORLD == RANK:
                        offs = row * HIDDEN + cols
                        mask = (cols < HIDDEN) & (offs < numel)
                        acc = tl.load(my_slots + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
                        for src in tl.static_range(1, WORLD):  # rank order
                            acc += tl.load(my_slots + src * slot_elems + offs, mask=mask, other=0.0,
                                           cache_modifier=".cg").to(tl.float32)
                        reduced = _round(acc, io).to(io)
                        for i in tl.static_range(WORLD):
                            dst = _region(gather_table, (RANK + i) % WORLD, io) + parity * slot_elems
                            tl.store(dst + offs, reduced, mask=mask)
                    row += PROGRAMS
                _signal(flag_table, REDUCED * kind_stride + flag_set, epoch, RANK, WORLD)
            if (PHASES & 4) != 0:  # FINISH
                kind = REDUCED if TWO_SHOT else PUSHED
                _wait(flag_table, kind * kind_stride + flag_set, epoch, status_ptr, timeout_ns, RANK, WORLD,
                      WORLD_POW2)
                if STAMP:
                    if pid == 0:
                        write_stamp(stamps_ptr, stamp_slot + 1)
                gathered = _region(gather_table, RANK, io) + parity * slot_elems
                row = pid
                while row < rows:
                    offs = row * HIDDEN + cols
                    mask = (cols < HIDDEN) & (offs < numel)
                    if TWO_SHOT:
                        acc = tl.load(gathered + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
                    else:
                        acc = tl.load(my_slots + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
                        for src in tl.static_range(1, WORLD):  # rank order
                            acc += tl.load(my_slots + src * slot_elems + offs, mask=mask, other=0.0,
                                           cache_modifier=".cg").to(tl.float32)
                    _finish_row(acc, offs, cols, mask, residual_ptr, weight_ptr, scale_ptr, out_ptr,
                                new_residual_ptr, eps, HIDDEN, NORM, NORM_DTYPE, QUANT, HAS_RESIDUAL)
                    row += PROGRAMS
        if (PHASES & 4) != 0:
            tl.store(counter_ptr + pid, epoch)
            if STAMP:
                if pid == 0:
                    write_stamp(stamps_ptr, stamp_slot + 2)


class FusedAllReduce:
    """One rank's launcher over the world's symmetric buffers.

    bases: the address of every rank's buffer as mapped in this process (Layout.nbytes each, all
    zero before any rank's first launch). On GPUs they come from torch's symmetric memory; the CPU
    test passes the data_ptr()s of CPU tensors, which Triton's interpreter dereferences the same way.
    Launches of one rank must be ordered on one stream, and every rank must make the same calls
    (shapes, dtypes, algorithm) in the same order, as for any collective."""

    def __init__(self, rank: int, layout: Layout, bases: list[int], device: torch.device | str,
                 timeout_s: float = 120.0) -> None:
        table = peer_tables(rank, layout.world, bases, device, "the fused all-reduce")
        self.rank, self.layout, self.device = rank, layout, torch.device(device)
        self.flag_table, self.data_table, self.gather_table = table(0), table(layout.data_offset), table(layout.gather_offset)
        self.counters = torch.zeros(layout.programs, dtype=torch.int32, device=self.device)  # epochs, per program
        self.cleared = torch.zeros(layout.programs, 2, dtype=torch.int32, device=self.device)  # lamport: last launch's bytes, two-shot
        self.status = torch.zeros(1, dtype=torch.int32, device=self.device)  # bits of ranks a wait gave up on
        self.timeout_ns = int(timeout_s * 1e9)

    def fits(self, x: torch.Tensor) -> bool:
        """True when `x` can go through the kernel: a contiguous float32/bf16/fp16 tensor on this
        rank's device, at most `capacity` values."""
        return (x.device == self.device and x.dtype in fused_norm.DTYPES and x.is_contiguous()
                and x.numel() <= self.layout.capacity)

    def all_reduce(self, x: torch.Tensor, algorithm: str | None = None) -> torch.Tensor:
        """The rank-order sum of every rank's x, in x's dtype (same bits on every rank)."""
        out = torch.empty_like(x)
        self.launch(x, out, algorithm=algorithm or algorithm_for(x.numel() * x.element_size(), self.layout.world))
        return out

    def allreduce_add_rmsnorm(self, partial: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                              eps: float, quant_scale: torch.Tensor | None = None,
                              algorithm: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Communicator.allreduce_add_rmsnorm in one launch: (normed [FP8 with quant_scale], new residual);
        residual None: the sum is the new residual."""
        fused_norm._check(partial, residual, weight, quant_scale)
        norm_dtype = torch.promote_types(partial.dtype, weight.dtype)
        normed = torch.empty(partial.shape, dtype=fused_norm.FP8 if quant_scale is not None else norm_dtype,
                             device=partial.device)
        new_residual = torch.empty_like(partial)
        algorithm = algorithm or algorithm_for(partial.numel() * partial.element_size(), self.layout.world)
        self.launch(partial, normed, residual, weight, eps, quant_scale, new_residual, algorithm)
        return normed, new_residual

    def launch(self, x: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None = None,
               weight: torch.Tensor | None = None, eps: float = 0.0, quant_scale: torch.Tensor | None = None,
               new_residual: torch.Tensor | None = None, algorithm: str = "one-shot", phases: int | None = None) -> None:
        """One kernel launch. Plain all-reduce (weight None): out = sum of x. Norm: out = normed,
        new_residual = residual + sum (residual None: the sum). phases: the bits of PUSH/SCATTER/FINISH
        to run (default all of the algorithm's; the CPU test runs them one at a time over every rank)."""
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if not self.fits(x):
            raise ValueError(f"the fused all-reduce takes a contiguous float32/bf16/fp16 tensor on {self.device} of at "
                             f"most {self.layout.capacity} values, got {x.dtype} {tuple(x.shape)} on {x.device}")
        all_phases = TWO_SHOT_PHASES if algorithm == "two-shot" else ONE_SHOT_PHASES
        phases = all_phases if phases is None else phases
        if phases == 0 or phases & ~all_phases:
            raise ValueError(f"phases {phases} are not a subset of {algorithm}'s {all_phases}")
        norm = weight is not None
        if (norm or residual is not None) and (new_residual is None or weight is None
                                               or not 1 <= x.shape[-1] <= fused_norm.MAX_HIDDEN):
            raise ValueError(f"the norm needs weight, new_residual and a hidden size of 1..{fused_norm.MAX_HIDDEN}")
        hidden = x.shape[-1] if norm else AR_ROW
        rows = triton.cdiv(x.numel(), hidden)
        if rows == 0:
            return
        block = triton.next_power_of_2(hidden)
        norm_dtype = torch.promote_types(x.dtype, weight.dtype) if norm else x.dtype
        stamps, stamp_slot = gpu_stamps.triple("allreduce_add_rmsnorm" if norm else "all_reduce", x)
        tensors = (x, residual if residual is not None else x, weight if norm else x,
                   quant_scale if quant_scale is not None else x, out, new_residual if norm else out)
        shape = dict(RANK=self.rank, WORLD=self.layout.world, PROGRAMS=self.layout.programs, HIDDEN=hidden,
                     BLOCK=block, NORM=norm, NORM_DTYPE=fused_norm.TL_DTYPES[norm_dtype], QUANT=quant_scale is not None,
                     TWO_SHOT=algorithm == "two-shot", PHASES=phases,
                     stamps_ptr=stamps if stamps is not None else self.counters, stamp_slot=stamp_slot,
                     STAMP=stamps is not None, HAS_RESIDUAL=residual is not None, num_warps=fused_norm.num_warps(block),
                     enable_fp_fusion=False, **pdl_kwargs(x))
        slot_elems = self.layout.slot_bytes // x.element_size()
        if self.layout.protocol == "lamport":
            from collectives.lamport_allreduce import _lamport_kernel  # it imports this file's jit helpers
            bits = {4: tl.int32, 2: tl.int16}[x.element_size()]
            _lamport_kernel[(self.layout.programs,)](
                *tensors, self.data_table, self.gather_table, self.counters, self.cleared, self.status,
                rows, x.numel(), slot_elems, self.layout.slot_bytes // 4, float(eps), self.timeout_ns,
                BITS=bits, ELEM_BYTES=x.element_size(), NOT_SIGN=(1 << 8 * x.element_size() - 1) - 1, **shape)
        else:
            _fused_allreduce_kernel[(self.layout.programs,)](
                *tensors, self.flag_table, self.data_table, self.gather_table, self.counters, self.status,
                rows, x.numel(), slot_elems, float(eps), self.timeout_ns,
                WORLD_POW2=triton.next_power_of_2(self.layout.world), **shape)

    def missing_ranks(self) -> list[int]:
        """Ranks some wait of this rank gave up on (timeout); reads the device (a host sync)."""
        bits = int(self.status.item())
        return [r for r in range(self.layout.world) if bits >> r & 1]
