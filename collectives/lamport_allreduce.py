"""The fused AllReduce (+ residual + RMSNorm [+ FP8]) kernel with Lamport-style sentinels: no flags.

Why: the flag protocol (collectives/fused_allreduce.py) publishes each push with a system-scope
release and makes the reader wait for a second NVLink write (the flag) after the data. Here the data
carries its own arrival: every slot value starts as a SENTINEL bit pattern (all ones: a NaN of
bf16, fp16 and fp32 alike), a writer never stores that pattern (an input holding it is stored as
another NaN, all ones but the sign bit), and a reader spins on its slots until no value of its row
is the sentinel. No fence, no flag, one NVLink crossing (TensorRT-LLM and FlashInfer's fused
one-shot kernels do the same with -0.0 as the sentinel; all ones keeps every number's bits, zeros'
signs included, so the results are the flag kernel's bits).

Buffers: data slots [3 buffers][source rank][capacity] and gather slots [3][capacity] in every
rank's symmetric buffer (symm_layout.Layout with protocol "lamport"), all SENTINEL before the
first launch. Launch n (every program keeps n in device memory, counters[p], as the flag kernel
does, so a captured graph replays with fresh epochs) writes buffer n % 3, and in its PUSH phase
each rank sets its own copy of buffer (n - 1) % 3 back to SENTINEL (the bytes launch n - 1 used,
kept per program in `cleared`). Safe: a peer writes buffer (n - 1) % 3 again in launch n + 2, which
it reaches only after it read this rank's push of launch n + 1, made after this launch ended; and
every peer's launch n - 1 write into it was read (waited for) by this rank's launch n - 1.

Phases as in the flag kernel (PUSH, SCATTER for two-shot, FINISH), so Triton's interpreter runs
them one at a time over the ranks. A rank never pushes to itself: it reads its own x. The sum is
the fp32 sum of the partials in rank order, rounded to the dtype: the same bits on every rank.
Loads of peer data are volatile (L2, where NVLink writes land). A spin that outlasts timeout_ns
gives up and ORs the rank's bit into the status word, as the flag kernel's waits do.
"""
from __future__ import annotations

from collectives.triton_support import tl, triton

CLEAR_WORDS = 1024  # int32 words a program sets back to SENTINEL per store

if triton is not None:
    from collectives.fused_allreduce import _elapsed_ns, _finish_row, _launch_epoch, _now_ns, _region
    from collectives.fused_norm import _round
    from collectives.gpu_stamps import write_stamp

    SENTINEL = tl.constexpr(-1)  # all bits set, as a signed integer of the value's width
    CLEAR_BLOCK = tl.constexpr(CLEAR_WORDS)

    @triton.jit
    def _arrived(src_ptr, offs, mask, status_ptr, timeout_ns, source):
        """The row's bits at src_ptr + offs once none of them is SENTINEL (volatile loads), or what
        is there when timeout_ns has passed (then bit `source` goes into *status_ptr)."""
        bits = tl.load(src_ptr + offs, mask=mask, other=0, volatile=True)
        pending = tl.sum(((bits == SENTINEL) & mask).to(tl.int32), axis=0)
        start = _now_ns()
        spins = 0
        elapsed = start - start
        while (pending != 0) & (elapsed < timeout_ns):
            bits = tl.load(src_ptr + offs, mask=mask, other=0, volatile=True)
            pending = tl.sum(((bits == SENTINEL) & mask).to(tl.int32), axis=0)
            spins += 1
            elapsed = _elapsed_ns(start, spins)
        if pending != 0:
            tl.atomic_or(status_ptr, 1 << source)
        return bits

    @triton.jit
    def _clear(words_ptr, words, pid, PROGRAMS: tl.constexpr):
        """words_ptr[0:words] = SENTINEL, the words shared out over the launch's programs."""
        idx = pid * CLEAR_BLOCK + tl.arange(0, CLEAR_BLOCK)
        while pid * CLEAR_BLOCK < words:
            tl.store(words_ptr + idx, tl.full([CLEAR_BLOCK], -1, tl.int32), mask=idx < words)
            idx += PROGRAMS * CLEAR_BLOCK
            pid += PROGRAMS

    @triton.jit
    def _no_sentinel(bits, NOT_SIGN: tl.constexpr):
        """bits with SENTINEL stored as another NaN (all ones but the sign bit)."""
        return tl.where(bits == SENTINEL, bits & NOT_SIGN, bits)

    @triton.jit
    def _source_row(x_ptr, my_slots, offs, mask, slot_elems, status_ptr, timeout_ns,
                    SOURCE: tl.constexpr, RANK: tl.constexpr, BITS: tl.constexpr, NOT_SIGN: tl.constexpr):
        """Rank SOURCE's row in fp32: mine from x (with the sentinel replaced as my peers see it, so
        every rank sums the same bits), a peer's from its slot once it has arrived."""
        if SOURCE == RANK:
            bits = _no_sentinel(tl.load(x_ptr.to(tl.pointer_type(BITS)) + offs, mask=mask, other=0), NOT_SIGN)
        else:
            bits = _arrived(my_slots + SOURCE * slot_elems, offs, mask, status_ptr, timeout_ns, SOURCE)
        return bits.to(x_ptr.dtype.element_ty, bitcast=True).to(tl.float32)

    @triton.jit
    def _row_sum(x_ptr, my_slots, offs, mask, slot_elems, status_ptr, timeout_ns,
                 RANK: tl.constexpr, WORLD: tl.constexpr, BITS: tl.constexpr, NOT_SIGN: tl.constexpr):
        """The fp32 sum of every rank's row in rank order (from rank 0's row, as torch sums)."""
        acc = _source_row(x_ptr, my_slots, offs, mask, slot_elems, status_ptr, timeout_ns, 0, RANK, BITS, NOT_SIGN)
        for src in tl.static_range(1, WORLD):
            acc += _source_row(x_ptr, my_slots, offs, mask, slot_elems, status_ptr, timeout_ns, src, RANK, BITS,
                               NOT_SIGN)
        return acc

    @triton.jit
    def _lamport_kernel(
            x_ptr, residual_ptr, weight_ptr, scale_ptr, out_ptr, new_residual_ptr,
            data_table, gather_table, counter_ptr, cleared_ptr, status_ptr,
            rows, numel, slot_elems, slot_words, eps, timeout_ns,
            RANK: tl.constexpr, WORLD: tl.constexpr, PROGRAMS: tl.constexpr,
            HIDDEN: tl.constexpr, BLOCK: tl.constexpr, NORM: tl.constexpr, NORM_DTYPE: tl.constexpr,
            QUANT: tl.constexpr, TWO_SHOT: tl.constexpr, PHASES: tl.constexpr,
            BITS: tl.constexpr, ELEM_BYTES: tl.constexpr, NOT_SIGN: tl.constexpr,
            stamps_ptr, stamp_slot, STAMP: tl.constexpr, PDL: tl.constexpr = False,
            HAS_RESIDUAL: tl.constexpr = True):
        """See the module docstring; arguments as fused_allreduce._fused_allreduce_kernel's. BITS:
        the integer type of the values' width (their bits are moved and compared as integers);
        slot_words: a slot's size in int32 words; cleared_ptr: (PROGRAMS, 2) int32, the bytes and
        the two-shot bit of the program's last launch (what its PUSH sets back to SENTINEL)."""
        pid, epoch = _launch_epoch(counter_ptr, stamps_ptr, stamp_slot, STAMP, PDL)
        buf = epoch % 3
        io = x_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK)
        my_slots = _region(data_table, RANK, BITS) + buf * WORLD * slot_elems  # (WORLD, slot_elems)
        if (PHASES & 1) != 0:  # PUSH my rows to every peer (two-shot: to the row's owner), then clear
            row = pid
            while row < rows:
                offs = row * HIDDEN + cols
                mask = (cols < HIDDEN) & (offs < numel)
                bits = _no_sentinel(tl.load(x_ptr.to(tl.pointer_type(BITS)) + offs, mask=mask), NOT_SIGN)
                for i in tl.static_range(1, WORLD):  # start at the next rank: links share the load
                    peer = (RANK + i) % WORLD
                    if (not TWO_SHOT) or (row % WORLD == peer):
                        dst = _region(data_table, peer, BITS) + (buf * WORLD + RANK) * slot_elems
                        tl.store(dst + offs, bits, mask=mask)
                row += PROGRAMS
            words = (tl.load(cleared_ptr + 2 * pid) + 3) // 4
            last = (buf + 2) % 3  # the previous launch's buffer
            for src in tl.static_range(WORLD):
                if src != RANK:
                    _clear(_region(data_table, RANK, tl.int32) + (last * WORLD + src) * slot_words, words, pid, PROGRAMS)
            if tl.load(cleared_ptr + 2 * pid + 1) != 0:
                _clear(_region(gather_table, RANK, tl.int32) + last * slot_words, words, pid, PROGRAMS)
        if TWO_SHOT and (PHASES & 2) != 0:  # SCATTER: reduce the rows I own, send them to every rank
            row = pid
            while row < rows:
                if row % WORLD == RANK:
                    offs = row * HIDDEN + cols
                    mask = (cols < HIDDEN) & (offs < numel)
                    acc = _row_sum(x_ptr, my_slots, offs, mask, slot_elems, status_ptr, timeout_ns, RANK, WORLD, BITS, NOT_SIGN)
                    bits = _no_sentinel(_round(acc, io).to(io).to(BITS, bitcast=True), NOT_SIGN)
                    for i in tl.static_range(WORLD):
                        dst = _region(gather_table, (RANK + i) % WORLD, BITS) + buf * slot_elems
                        tl.store(dst + offs, bits, mask=mask)
                row += PROGRAMS
        if (PHASES & 4) != 0:  # FINISH
            my_gather = _region(gather_table, RANK, BITS) + buf * slot_elems
            row = pid
            while row < rows:
                offs = row * HIDDEN + cols
                mask = (cols < HIDDEN) & (offs < numel)
                if TWO_SHOT:
                    bits = _arrived(my_gather, offs, mask, status_ptr, timeout_ns, row % WORLD)
                    acc = bits.to(io, bitcast=True).to(tl.float32)
                else:
                    acc = _row_sum(x_ptr, my_slots, offs, mask, slot_elems, status_ptr, timeout_ns, RANK, WORLD, BITS, NOT_SIGN)
                if STAMP:
                    if row == 0:
                        write_stamp(stamps_ptr, stamp_slot + 1)
                _finish_row(acc, offs, cols, mask, residual_ptr, weight_ptr, scale_ptr, out_ptr,
                            new_residual_ptr, eps, HIDDEN, NORM, NORM_DTYPE, QUANT, HAS_RESIDUAL)
                row += PROGRAMS
            tl.store(counter_ptr + pid, epoch)
            tl.store(cleared_ptr + 2 * pid, numel * ELEM_BYTES)
            tl.store(cleared_ptr + 2 * pid + 1, 1 if TWO_SHOT else 0)
            if STAMP:
                if pid == 0:
                    write_stamp(stamps_ptr, stamp_slot + 2)
