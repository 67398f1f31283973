"""L2 prefetch of the weights a decode layer reads next, issued by its attention kernel (Hopper+).

Why: at batch 1 the attention of a decode step reads ~2 MB of cache in ~9 us on an H200 (a chain of
latencies: RoPE, scores, softmax, values, the merge of the splits), and HBM idles meanwhile, ~38 MB
of reads' worth. The o_proj and FFN GEMVs after it are weight streams. So each attention program,
right after its PDL wait, asks L2 for its share of those weights with Hopper's bulk prefetch
(`cp.async.bulk.prefetch.L2`: one instruction per piece, no registers, nothing to wait for), and
they stream while the attention runs. Only then: GEMVs that prefetched their own weight span before
their PDL wait competed with the bandwidth-bound kernel before them and lost (c6bff85).

A layer's table lists (address, bytes) of o_proj's weight, then the dense MLP's or the shared
expert's FC13 and FC2 (the routed experts are not known yet), cut at BUDGET bytes (a share of
L2's 50 MB: the attention's cache reads and the GEMVs' own traffic use L2 too). Weights do not move,
so the table is built once per layer (before CUDA graph capture) and a captured step reuses it.
DGX_EMU_L2_PREFETCH_MB sets the budget (0 turns it off); results are the same bits either way.
"""
from __future__ import annotations

import functools
import os

import torch

from collectives.triton_support import INTERPRETED, tl, triton

LANES = 128  # prefetch pieces per program and region (one per thread at 4 warps)


def _budget_from_env() -> int:
    raw = os.environ.get("DGX_EMU_L2_PREFETCH_MB", "24").strip()
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"DGX_EMU_L2_PREFETCH_MB must be a number of megabytes (0: off), got {raw!r}") from None
    if mb < 0:
        raise ValueError(f"DGX_EMU_L2_PREFETCH_MB must be >= 0, got {raw!r}")
    return int(mb * (1 << 20))


BUDGET = _budget_from_env()

if triton is not None:
    @triton.jit
    def _prefetch_piece(address, nbytes):
        """cp.async.bulk.prefetch.L2 of nbytes (a multiple of 16, skipped when 0) at a 16-aligned address."""
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [address, nbytes], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def prefetch_share(table_ptr, N_REGIONS: tl.constexpr, program, programs):
        """This program's share of every region of the table ((N_REGIONS, 2) int64: address, bytes):
        each region cut into programs x LANES pieces of a multiple of 16 bytes."""
        lane = tl.arange(0, LANES_C)
        for r in tl.static_range(N_REGIONS):
            base = tl.load(table_ptr + 2 * r)
            nbytes = tl.load(table_ptr + 2 * r + 1)
            pieces = programs * LANES_C
            piece = (nbytes + pieces - 1) // pieces + 15 & ~15  # bytes, a multiple of 16
            offset = (program * LANES_C + lane).to(tl.int64) * piece  # (LANES,)
            size = tl.minimum(piece, tl.maximum(nbytes - offset, 0)) & ~15
            _prefetch_piece(base + offset, size.to(tl.int32))

    LANES_C = tl.constexpr(LANES)


@functools.lru_cache(maxsize=None)
def _hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def supported(x: torch.Tensor) -> bool:
    """Can kernels on x's device issue bulk L2 prefetches? Compiled Triton on an sm90+ GPU."""
    if triton is None or INTERPRETED or not x.is_cuda or BUDGET == 0:
        return False
    return _hopper(x.device.index if x.device.index is not None else torch.cuda.current_device())


def regions(weights: list[torch.Tensor], budget: int = None) -> list[tuple[int, int]]:
    """(address, bytes) of each weight in order, 16-byte aligned, cut so the total stays within budget."""
    budget = BUDGET if budget is None else budget
    out, left = [], budget
    for w in weights:
        address, nbytes = w.data_ptr(), min(w.numel() * w.element_size(), left)
        if not w.is_contiguous() or address % 16:
            raise ValueError(f"l2_prefetch: weights must be contiguous and 16-byte aligned, got strides "
                             f"{w.stride()} at {address:#x}")
        nbytes -= nbytes % 16
        if nbytes > 0:
            out.append((address, nbytes))
            left -= nbytes
    return out


def table(owner: torch.nn.Module, weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The device table of `weights`' regions, kept on `owner` (remade if a weight moved); None when
    prefetching does not apply. Made outside CUDA graph capture only (a graph holds its address)."""
    if not weights or not supported(weights[0]):
        return None
    spans = regions(weights)
    key = tuple(spans)
    held = getattr(owner, "_l2_prefetch_table", None)
    if held is not None and held[0] == key:
        return held[1]
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("l2_prefetch: run a step once before CUDA graph capture (the table is made outside it)")
    flat = torch.tensor([v for span in spans for v in span], dtype=torch.int64, device=weights[0].device)
    object.__setattr__(owner, "_l2_prefetch_table", (key, flat.view(-1, 2)))  # not a buffer: no state_dict entry
    return flat.view(-1, 2)


def layer_weights(attn: torch.nn.Module, ffn: torch.nn.Module) -> list[torch.Tensor]:
    """The weights a decode layer reads after its attention, in order: o_proj, then the dense MLP's or
    the MoE's shared expert's FC13 and FC2."""
    mlp = getattr(ffn, "shared_expert", ffn)
    return [attn.o_proj.weight, mlp.gate_up_proj.weight, mlp.down_proj.weight]
