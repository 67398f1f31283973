"""Greedy token choice over the LM head's logits, as ONE wide Triton launch.

Why: torch's argmax over a row of V_r = 32k..200k logits is one reduce kernel with a single
512-thread block per row (11.7 us on an H200 for medium's 32k bf16 logits, 64 KB: a few us of
bandwidth at most), plus a second launch to add the rank's vocabulary offset. Here many programs
each reduce a slice of the row; each publishes its (value, index) and the last program of the row
to arrive (an atomic arrival counter, reset by that program) reduces the partials and writes the
token id (+ offset), or, for the vocab-parallel argmax of several ranks, the (max, id) pair that
model/sampling.py all-gathers. No host sync, no allocation that depends on a device value: CUDA
graph capturable. With PDL the kernel waits for the LM head before it reads anything.

What it returns is torch.argmax's choice, exactly (it is a selection, not arithmetic):
  * the largest value; ties go to the LOWEST index;
  * NaN counts as larger than everything (torch's rule): a row holding NaN returns its first NaN;
  * -inf is an ordinary value: a row of all -inf returns index 0 (the first of equals);
  * `valid`: only columns [0, valid) are read; the rest (a rank's vocabulary padding) are as if
    -inf had been written there, and a row with no valid column returns index 0 and value -inf,
    what torch.argmax of the padded row (all -inf) returns;
  * pair values are the winner's value in float32 (`logits.float().max(-1)`: a -0.0 stays -0.0; a
    NaN winner's value is a NaN, not necessarily its bits).
The choice is a total order on (value, index) (`_better` lane by lane, `_best` across lanes), so the
order in which programs arrive or lanes reduce changes nothing: the result does not depend on timing.

State: a per-device buffer of int32 arrival counters, one per row, zero between calls, made (or
grown) at the first call outside a CUDA graph capture (the capture's warm-up makes it); calls on
one device must not run concurrently (the decode step's kernels run one after another). The
partials are per-call scratch (B, programs).
"""
from __future__ import annotations

import torch

from collectives import gpu_stamps
from collectives.triton_support import INTERPRETED, ArrivalCounters, pdl_kwargs, tl, triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024  # columns a program reads per step: 8 per thread with 4 warps (16-byte loads of bf16)
MAX_PROGRAMS = 256  # programs per row at most (~2 per SM of an H200); longer rows loop
NO_INDEX = 2 ** 31 - 1  # index of masked lanes: loses every tie against a real column

if triton is not None:
    from collectives.gpu_stamps import write_latest_stamp
    from collectives.triton_support import pdl_launch_dependents, pdl_wait

    NO_INDEX_C = tl.constexpr(NO_INDEX)

    @triton.jit
    def _better(v1, i1, v2, i2):
        """Lane by lane, the (value, index) torch.argmax prefers of two: the larger value, NaN above
        everything, the lower index between equals (and between NaNs)."""
        nan1 = v1 != v1
        nan2 = v2 != v2
        tie = (v1 == v2) | (nan1 & nan2)
        take2 = (v2 > v1) | (nan2 & ~nan1) | (tie & (i2 < i1))
        return tl.where(take2, v2, v1), tl.where(take2, i2, i1)

    @triton.jit
    def _best(v, i):
        """The (value, index) torch.argmax picks among the lanes (v, i) (distinct indices; unused lanes
        hold -inf and NO_INDEX): the first NaN if any, else the lowest index holding the maximum, with
        its own value (a -0.0 stays -0.0). Built from plain max / min reductions, whose order does not
        matter (and which Triton's interpreter runs vectorized, unlike a custom combine)."""
        nan = v != v
        first_nan = tl.min(tl.where(nan, i, NO_INDEX_C), axis=0)
        top = tl.max(tl.where(nan, float("-inf"), v), axis=0)
        first_top = tl.min(tl.where(v == top, i, NO_INDEX_C), axis=0)
        has_nan = first_nan != NO_INDEX_C
        winner = tl.where(has_nan, first_nan, first_top)
        value = tl.max(tl.where(i == winner, v, float("-inf")), axis=0)  # the winner's own bits (one lane)
        return tl.where(has_nan, float("nan"), value), winner

    @triton.jit
    def _finish(v, i, out_ptr, row, stride_o, offset, PAIR: tl.constexpr):
        """Writes the row's winner: index + offset (int64), or the pair (value, float32(index + offset))."""
        i = tl.where(i == NO_INDEX_C, 0, i).to(tl.int64)  # no valid column: index 0 (value stays -inf)
        if PAIR:
            tl.store(out_ptr + row * stride_o, v)
            tl.store(out_ptr + row * stride_o + 1, (i + offset).to(tl.float32))
        else:
            tl.store(out_ptr + row * stride_o, i + offset)

    @triton.jit
    def _argmax_kernel(x_ptr, part_v_ptr, part_i_ptr, count_ptr, out_ptr, stride_x, stride_o, n_cols, offset,
                       PROGRAMS: tl.constexpr, SPAN: tl.constexpr, BLOCK: tl.constexpr, PROGRAMS_P2: tl.constexpr,
                       PAIR: tl.constexpr, stamps_ptr, stamp_slot, STAMP: tl.constexpr, PDL: tl.constexpr):
        """Program (split, row): the best of columns [split * SPAN, + SPAN) of the row (< n_cols), in
        BLOCK-wide steps, each lane keeping its own best; with several programs per row, the last one
        to arrive reduces the row's partials and writes the result. With STAMP, the program that
        writes a row's result then stamps the step's end (the latest over rows: gpu_stamps.py)."""
        pdl_wait(PDL)  # the logits come from the kernel just before
        pdl_launch_dependents(PDL)
        split = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)
        lanes = tl.arange(0, BLOCK)
        best_v = tl.full((BLOCK,), float("-inf"), tl.float32)
        best_i = tl.full((BLOCK,), NO_INDEX_C, tl.int32)
        for c0 in range(0, SPAN, BLOCK):
            cols = split * SPAN + c0 + lanes
            ok = cols < n_cols
            v = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=float("-inf")).to(tl.float32)
            best_v, best_i = _better(best_v, best_i, v, tl.where(ok, cols, NO_INDEX_C))
        v, i = _best(best_v, best_i)
        if PROGRAMS == 1:
            _finish(v, i, out_ptr, row, stride_o, offset, PAIR)
            if STAMP:
                write_latest_stamp(stamps_ptr, stamp_slot)
        else:
            slot = row * PROGRAMS + split
            tl.store(part_v_ptr + slot, v)
            tl.store(part_i_ptr + slot, i)
            tl.debug_barrier()  # the partial stored before the (release) count
            counter = count_ptr + row
            if tl.atomic_add(counter, 1) == PROGRAMS - 1:
                ks = tl.arange(0, PROGRAMS_P2)
                have = ks < PROGRAMS
                pv = tl.load(part_v_ptr + row * PROGRAMS + ks, mask=have, other=float("-inf"), cache_modifier=".cg")
                pi = tl.load(part_i_ptr + row * PROGRAMS + ks, mask=have, other=NO_INDEX_C, cache_modifier=".cg")
                v, i = _best(pv, pi)
                tl.atomic_xchg(counter, 0)  # ready for the next call
                _finish(v, i, out_ptr, row, stride_o, offset, PAIR)
                if STAMP:
                    write_latest_stamp(stamps_ptr, stamp_slot)


    @triton.jit
    def _winner_kernel(pairs_ptr, out_ptr, rows, stride_o, stamps_ptr, stamp_slot, WORLD: tl.constexpr,
                       WORLD_P2: tl.constexpr, STAMP: tl.constexpr, PDL: tl.constexpr):
        """Program `row`: of the ranks' (max, id) pairs (WORLD, rows, 2), the id torch.argmax of the
        whole row picks (_best: NaN first, then the largest value, the lowest id between equals: the
        ranks hold ascending vocabulary slices), written as int64."""
        pdl_wait(PDL)  # the pairs come from the all-gather just before
        pdl_launch_dependents(PDL)
        row = tl.program_id(0).to(tl.int64)
        ranks = tl.arange(0, WORLD_P2)
        ok = ranks < WORLD
        at = pairs_ptr + (ranks * rows + row) * 2
        v = tl.load(at, mask=ok, other=float("-inf"))
        i = tl.where(ok, tl.load(at + 1, mask=ok, other=0.0).to(tl.int32), NO_INDEX_C)  # ids < 2^24: exact
        _, winner = _best(v, i)
        tl.store(out_ptr + row * stride_o, winner.to(tl.int64))
        if STAMP:
            write_latest_stamp(stamps_ptr, stamp_slot)


def available(logits: torch.Tensor) -> bool:
    """True when the kernel takes `logits`: a (B, V) float32/bf16/fp16 tensor with unit stride along V
    on CUDA (or on the CPU under Triton's interpreter)."""
    on_device = logits.is_cuda or (INTERPRETED and logits.device.type == "cpu")
    return (triton is not None and on_device and logits.dim() == 2 and logits.dtype in DTYPES
            and (logits.stride(1) == 1 or logits.shape[1] <= 1))


def _check(logits: torch.Tensor, valid: int | None, block: int, max_programs: int) -> int:
    """Refuses what the kernel does not take, naming it. Returns the columns to read."""
    if logits.dim() != 2 or logits.dtype not in DTYPES or not (logits.stride(1) == 1 or logits.shape[1] <= 1):
        raise ValueError(f"argmax: logits must be (B, V) float32/bfloat16/float16 with unit stride along V, got "
                         f"{logits.dtype} {tuple(logits.shape)} strides {logits.stride()}")
    if logits.shape[1] >= NO_INDEX:
        raise ValueError(f"argmax: at most {NO_INDEX - 1} columns, got {logits.shape[1]}")
    if valid is not None and not 0 <= valid <= logits.shape[1]:
        raise ValueError(f"argmax: valid must be in 0..{logits.shape[1]} (the row length), got {valid}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"argmax: block must be a power of two >= 16, got {block}")
    if max_programs < 1:
        raise ValueError(f"argmax: max_programs must be >= 1, got {max_programs}")
    if not available(logits):
        raise ValueError(f"argmax: needs Triton and a CUDA tensor (or Triton's interpreter), got {logits.device}")
    return logits.shape[1] if valid is None else valid


_counters = ArrivalCounters("argmax", 64)  # per device; see triton_support.ArrivalCounters
_COUNTERS = _counters.by_device


def _launch(logits: torch.Tensor, out: torch.Tensor, n_cols: int, offset: int, pair: bool, block: int,
            max_programs: int, stamp: tuple[torch.Tensor | None, int] = (None, 0)) -> None:
    rows = logits.shape[0]
    if rows == 0:
        return
    block = min(block, max(16, triton.next_power_of_2(max(n_cols, 1))))
    steps = max(1, triton.cdiv(n_cols, block))  # BLOCK-wide steps to cover the row
    per_program = triton.cdiv(steps, max_programs)
    programs = triton.cdiv(steps, per_program)
    if programs > 1:
        part_v = torch.empty((rows, programs), dtype=torch.float32, device=logits.device)  # (B, programs)
        part_i = torch.empty((rows, programs), dtype=torch.int32, device=logits.device)
        count = _counters(logits.device, rows)
    else:  # placeholders, never touched
        part_v, part_i, count = out, out, out
    _argmax_kernel[(programs, rows)](
        logits, part_v, part_i, count, out, logits.stride(0), out.stride(0), n_cols, offset,
        PROGRAMS=programs, SPAN=per_program * block, BLOCK=block, PROGRAMS_P2=triton.next_power_of_2(programs),
        PAIR=pair, stamps_ptr=stamp[0] if stamp[0] is not None else out, stamp_slot=stamp[1],
        STAMP=stamp[0] is not None, num_warps=4, **pdl_kwargs(logits))


def argmax(logits: torch.Tensor, *, valid: int | None = None, offset: int = 0, block: int = BLOCK,
           max_programs: int = MAX_PROGRAMS, out: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V), unit stride along V (rows may be strided). Returns (B,) int64:
    logits[:, :valid].argmax(-1) + offset, torch.argmax's choice exactly (module docstring: ties,
    NaN, -inf, valid = 0), written into `out` when given (an int64 (B,) tensor, any stride: a graph's
    token buffer, with no copy after). block: columns a program reads per step; max_programs:
    programs per row at most, each looping over several blocks when the row needs more (tests make
    both small)."""
    n_cols = _check(logits, valid, block, max_programs)
    if out is None:
        out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)  # (B,)
    elif out.shape != logits.shape[:1] or out.dtype != torch.int64 or out.device != logits.device:
        raise ValueError(f"argmax: out must be an int64 ({logits.shape[0]},) tensor on {logits.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    # a traced decode graph's last kernel: it stamps the step's end (collectives/gpu_stamps.py)
    _launch(logits, out, n_cols, int(offset), False, block, max_programs, gpu_stamps.step_edge("end"))
    return out


def max_argmax(logits: torch.Tensor, *, valid: int | None = None, offset: int = 0, block: int = BLOCK,
               max_programs: int = MAX_PROGRAMS) -> torch.Tensor:
    """The vocab-parallel argmax's local part: (B, 2) float32 pairs (max value, float(argmax + offset)),
    as model/sampling.py builds them from `logits.float().max(-1)` (ids below 2^24 are exact)."""
    n_cols = _check(logits, valid, block, max_programs)
    out = torch.empty((logits.shape[0], 2), dtype=torch.float32, device=logits.device)  # (B, 2)
    _launch(logits, out, n_cols, int(offset), True, block, max_programs)
    return out


def pick_winner(pairs: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """pairs (world, B, 2) float32: every rank's max_argmax of its vocabulary slice (ranks in
    vocabulary order), as the vocab-parallel argmax all-gathers them. Returns (B,) int64 (into
    `out` when given, as `argmax`): the id torch.argmax of the whole row picks, in ONE launch (it
    replaces torch's max / compare / argmax / gather / cast and the copy into a graph's ids)."""
    if pairs.dim() != 3 or pairs.shape[2] != 2 or pairs.dtype != torch.float32 or not pairs.is_contiguous():
        raise ValueError(f"pick_winner: pairs must be a contiguous float32 (world, B, 2) tensor, got {pairs.dtype} "
                         f"{tuple(pairs.shape)}")
    if not (pairs.is_cuda or (INTERPRETED and pairs.device.type == "cpu")) or triton is None:
        raise ValueError(f"pick_winner: needs Triton and a CUDA tensor (or Triton's interpreter), got {pairs.device}")
    world, rows = pairs.shape[:2]
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=pairs.device)  # (B,)
    elif out.shape != (rows,) or out.dtype != torch.int64 or out.device != pairs.device:
        raise ValueError(f"pick_winner: out must be an int64 ({rows},) tensor on {pairs.device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    if rows:
        stamps, slot = gpu_stamps.step_edge("end")  # a traced graph's last kernel at several ranks
        _winner_kernel[(rows,)](pairs, out, rows, out.stride(0), stamps if stamps is not None else out, slot,
                                WORLD=world, WORLD_P2=triton.next_power_of_2(world), STAMP=stamps is not None,
                                num_warps=1, **pdl_kwargs(pairs))
    return out


def reference_argmax(logits: torch.Tensor, *, valid: int | None = None, offset: int = 0) -> torch.Tensor:
    """`argmax` in torch: the padded columns written -inf (as Llama4.forward does), then torch.argmax."""
    padded = logits.clone()
    if valid is not None:
        padded[:, valid:] = float("-inf")
    return padded.argmax(dim=-1) + offset


def reference_max_argmax(logits: torch.Tensor, *, valid: int | None = None, offset: int = 0) -> torch.Tensor:
    """`max_argmax` in torch: model/sampling.py's pair of the -inf-padded row."""
    padded = logits.float()
    if valid is not None:
        padded = padded.clone()
        padded[:, valid:] = float("-inf")
    values, ids = padded.max(dim=-1)
    return torch.stack((values, (ids + offset).float()), dim=-1)
