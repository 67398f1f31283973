"""Loading one rank's slices of a checkpoint, as the table in model/checkpoint.py says.

Each rank opens the safetensors files lazily and reads only its own slices (`get_slice`), never a
whole tensor, with one exception: a high-precision weight going into an FP8 module is quantized
over the WHOLE checkpoint tensor (one expert at a time), so that every rank computes the scales
the unsharded model has; a rank then reads that tensor whole (world_size times its slice). For a
large model, quantize once offline and load the FP8 checkpoint instead.

Each weight loads one of four ways: high precision as is; FP8 into an FP8 module (with its
scales, cut as model/fp8_checkpoint.py explains); high precision into an FP8 module (quantized at
load); FP8 into a high-precision module (dequantized). Anything wrong raises CheckpointError
naming the tensor or file, before any weight is used; every FP8 scale is checked to be set,
finite and positive when loading ends.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from model.checkpoint import (_DTYPES, _KV_SCALE, _PER_EXPERT, LOADABLE_DTYPES, CheckpointError, checkpoint_names,
                              hf_name, index_files, match, scale_param, split_scale_name)
from model.config import ModelConfig
from model.fp8 import FP8, quantize_weight, scale_from_amax
from model.fp8_checkpoint import (Fp8Format, ScaleError, check_fp8_bytes, check_scale, dequantize_piece,
                                  expected_scale_shapes, scale_dest, weight_scale_piece)
from model.parallel import ShardLayout


class Source:
    """One checkpoint tensor as stored: name (for messages), full shape, dtype, and sliced reads."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype, read: Callable[[tuple], torch.Tensor],
                 dtype_name: str = "") -> None:
        self.name, self.shape, self.dtype, self._read = name, tuple(shape), dtype, read
        self.dtype_name = dtype_name or str(dtype)  # as the file names it (F32, BF16, F8_E4M3, ...)

    def read(self, index: tuple | None = None) -> torch.Tensor:
        return self._read(index if index is not None else (slice(None),) * len(self.shape))


def _file_source(handle, stored: str, file: Path) -> Source:
    sl = handle.get_slice(stored)

    def read(index):
        try:
            return sl[index]
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {stored!r} from {file.name} (truncated?): {e}") from None
    name = f"{stored!r} in {file.name}"
    return Source(name, sl.get_shape(), _DTYPES.get(sl.get_dtype()), read, sl.get_dtype())


def _expert_view(fused: Source, expert: int, cols: slice) -> Source:
    """Expert `expert` of a fused HF tensor (E, in, out), columns `cols`, seen as an (out, in) Linear."""
    out_cols = range(*cols.indices(fused.shape[2]))

    def read(index):
        rows, inputs = index
        picked = out_cols[rows]
        return fused.read((slice(expert, expert + 1), inputs, slice(picked.start, picked.stop)))[0].t()
    return Source(f"{fused.name} (expert {expert})", (len(out_cols), fused.shape[1]), fused.dtype, read)


def _memory_source(name: str, tensor: torch.Tensor) -> Source:
    return Source(name, tensor.shape, tensor.dtype, lambda index: tensor[index])


def load_shard(model: torch.nn.Module, path: str | Path, progress: Callable[[int, int], None] | None = None,
               fp8_format: Fp8Format | None = None, input_amax: dict[str, torch.Tensor] | None = None) -> int:
    """Fills `model` (built at this rank's shapes, FP8 modules swapped in where wanted) with its
    slices of the checkpoint at `path`. `fp8_format`: how the checkpoint's FP8 tensors are scaled
    (model.fp8_checkpoint.read_fp8_format); `input_amax`: calibrated amax per static input-scale
    parameter, for FP8 modules quantized at load. Returns the checkpoint bytes read. Validates
    names, shapes, dtypes and values (scales included) before any weight is used."""
    cfg: ModelConfig = model.cfg
    files = index_files(path)
    expected = checkpoint_names(cfg, per_expert=has_per_expert_names(files))
    missing = [n for n in expected if n not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint {path} is missing tensor {hf_name(missing[0])!r}{more}")
    scales, kv_scales = _extra_names(cfg, files, expected, path)
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    done, nbytes = 0, 0
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(_open(file)) for file in sorted({f for f, _ in files.values()})}

        def source(canon: str) -> Source:
            file, stored = files[canon]
            return _file_source(handles[file], stored, file)

        for canon in expected:
            weight_scales = {suffix: source(name) for suffix, name in scales.get(canon, {}).items()}
            nbytes += _load_weight(model, params, canon, source(canon), weight_scales, fp8_format)
            done += 1
            if progress:
                progress(done, len(expected))
        for canon in kv_scales:
            nbytes += _load_kv_scale(model.shard, params, canon, source(canon))
    for name, amax in (input_amax or {}).items():
        params[name].data.copy_(scale_from_amax(amax))
    check_fp8_scales(model, path)
    return nbytes


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None


def _extra_names(cfg: ModelConfig, files: dict, expected: list[str], path) -> tuple[dict, list[str]]:
    """Sorts the names beyond the expected weights: scales of those weights ({weight: {suffix:
    name}}) and KV-cache scales. Anything else is an error naming the tensor."""
    wanted = set(expected)
    scales: dict[str, dict[str, str]] = {}
    kv_scales, extra = [], []
    for name in files:
        if name in wanted or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        split = split_scale_name(name)
        if _KV_SCALE.match(name):
            kv_scales.append(name)
        elif split and split[0] in wanted:
            scales.setdefault(split[0], {})[split[1]] = name
        else:
            extra.append(name)
    for name in extra:
        match(cfg, split_scale_name(name)[0] if split_scale_name(name) else name)  # raises for non-Llama names
    if extra:
        raise CheckpointError(f"checkpoint {path} has tensor {extra[0]!r}, which this config does not use")
    return scales, kv_scales


def _load_weight(model, params: dict, canon: str, src: Source, scales: dict[str, Source],
                 fmt: Fp8Format | None) -> int:
    shard = model.shard
    dest, shape, cuts = match(shard.model, canon)
    if src.shape != shape:
        raise CheckpointError(f"tensor {src.name} has shape {list(src.shape)}, the config expects {list(shape)}")
    param = params[dest]
    if src.dtype == FP8:
        return _load_fp8_weight(model, params, dest, cuts, src, scales, fmt)
    if src.dtype not in LOADABLE_DTYPES:
        raise CheckpointError(f"tensor {src.name} has dtype {src.dtype_name}, expected F32, BF16 or F16 "
                              "(or F8_E4M3 with its scales)")
    if scales:
        raise CheckpointError(f"tensor {next(iter(scales.values())).name} scales {src.name}, which is not FP8")
    if param.dtype == FP8:
        return _quantize_at_load(model, params, canon, dest, shape, src)
    return _copy_pieces(shard, param, shape, cuts, src)


def _copy_pieces(shard: ShardLayout, param, shape, cuts, src: Source) -> int:
    nbytes = 0
    for cut_fn in cuts:
        cut = cut_fn(shard, shape)
        if cut is None:
            continue
        piece = src.read(cut.src)
        if not bool(torch.isfinite(piece).all()):
            raise CheckpointError(f"tensor {src.name} holds NaN or inf values")
        param.data[cut.dest].copy_(piece.mT if cut.transpose else piece)
        nbytes += piece.numel() * piece.element_size()
    return nbytes


def _checked_scale(scale: Source | None, allowed: tuple, weight: Source, suffix: str) -> torch.Tensor:
    if scale is None:
        raise CheckpointError(f"FP8 tensor {weight.name} has no {suffix}")
    try:
        return check_scale(scale.read(), allowed)
    except ScaleError as e:
        raise CheckpointError(f"scale tensor {scale.name} {e}") from None


def _load_fp8_weight(model, params: dict, dest: str, cuts, src: Source, scales: dict[str, Source],
                     fmt: Fp8Format | None) -> int:
    """A pre-quantized FP8 weight: into an FP8 module as is, or dequantized into a high-precision one."""
    if fmt is None:
        raise CheckpointError(f"tensor {src.name} is FP8 but config.json has no quantization_config")
    if len(src.shape) != 2:
        raise CheckpointError(f"FP8 tensor {src.name} must be a 2-D Linear weight "
                              "(FP8 experts are stored per expert: experts.{e}.gate_proj.weight, ...)")
    allowed = {fmt.weight_scale_name} | ({"input_scale"} if fmt.scheme.static_input else set())
    stray = sorted(set(scales) - allowed)
    if stray:
        raise CheckpointError(f"tensor {scales[stray[0]].name} is not part of the {fmt.method} format")
    granularity = fmt.scheme.weight
    weight_scale = _checked_scale(scales.get(fmt.weight_scale_name), expected_scale_shapes(granularity, *src.shape),
                                  src, fmt.weight_scale_name)
    input_scale = (_checked_scale(scales.get("input_scale"), ((), (1,)), src, "input_scale").reshape(())
                   if fmt.scheme.static_input else None)
    param = params[dest]
    if param.dtype != FP8:
        return _dequantize_pieces(model.shard, param, cuts, src, weight_scale, granularity)
    scheme = _owner(model, dest).scheme
    if scheme != fmt.scheme:
        raise CheckpointError(f"tensor {src.name} is {fmt.method} FP8 ({fmt.scheme}), "
                              f"but the model's module was built for {scheme}")
    return _place_fp8(model.shard, params, dest, cuts, src, weight_scale, granularity, input_scale)


def _owner(model, dest: str):
    """The FP8 module owning a weight parameter: `m.weight` -> m; experts' `…experts.gate_up_proj` -> experts."""
    return model.get_submodule(dest.rsplit(".", 1)[0])


def _fp8_pieces(shard: ShardLayout, cuts, src: Source, check: bool):
    """This rank's (cut, FP8 piece) pairs of one checkpoint tensor; NaN bytes are a CheckpointError."""
    for cut_fn in cuts:
        cut = cut_fn(shard, src.shape)
        if cut is None:
            continue
        piece = src.read(cut.src)
        try:
            if check:
                check_fp8_bytes(piece)
        except ScaleError as e:
            raise CheckpointError(f"tensor {src.name} {e}") from None
        yield cut, piece


def _place_fp8(shard: ShardLayout, params: dict, dest: str, cuts, src: Source, weight_scale: torch.Tensor,
               granularity: str, input_scale: torch.Tensor | None, from_file: bool = True) -> int:
    param, scale_param_ = params[dest], params[scale_param(dest, "weight")]
    nbytes = 0
    for cut, piece in _fp8_pieces(shard, cuts, src, check=from_file):  # bytes we quantized cannot be NaN
        param.data[cut.dest].copy_(piece.mT if cut.transpose else piece)
        scales = weight_scale_piece(weight_scale, granularity, cut.src, src.shape)
        target = scale_param_.data[scale_dest(cut.dest, granularity)]
        if target.shape != scales.shape:
            raise CheckpointError(f"scales of {src.name}: this rank needs {list(target.shape)}, "
                                  f"the checkpoint's cut gives {list(scales.shape)}")
        target.copy_(scales)
        if input_scale is not None:
            inputs = params[scale_param(dest, "input")].data
            index = (cut.dest[0],) if inputs.dim() else ()
            inputs[index] = torch.maximum(inputs[index], input_scale)  # fused parts share an input: max
        nbytes += piece.numel() + scales.numel() * 4
    return nbytes


def _dequantize_pieces(shard: ShardLayout, param, cuts, src: Source, weight_scale, granularity: str) -> int:
    nbytes = 0
    for cut, piece in _fp8_pieces(shard, cuts, src, check=True):
        scales = weight_scale_piece(weight_scale, granularity, cut.src, src.shape)
        col_start = range(*cut.src[1].indices(src.shape[1])).start
        values = dequantize_piece(piece, scales, granularity, col_start)
        param.data[cut.dest].copy_(values.mT if cut.transpose else values)
        nbytes += piece.numel()
    return nbytes


def _quantize_at_load(model, params: dict, canon: str, dest: str, shape, src: Source) -> int:
    """A high-precision weight into an FP8 module: quantized over the WHOLE checkpoint tensor (one
    expert at a time), so every rank gets the scales the unsharded model has, then cut as a
    pre-quantized tensor would be. Fused HF experts are seen per expert, as (out, in) Linears."""
    granularity = _owner(model, dest).scheme.weight
    if len(shape) == 2:
        parts = [(canon, src)]
    else:
        parts = list(_per_expert_views(model.shard, canon, src))
    nbytes = 0
    for name, part in parts:
        full = part.read()
        if not bool(torch.isfinite(full).all()):
            raise CheckpointError(f"tensor {part.name} holds NaN or inf values")
        w_q, scale = quantize_weight(full, granularity)
        _, part_shape, cuts = match(model.cfg, name)
        _place_fp8(model.shard, params, dest, cuts, _memory_source(part.name, w_q), scale, granularity, None,
                   from_file=False)
        nbytes += full.numel() * full.element_size()
    return nbytes


def _per_expert_views(shard: ShardLayout, canon: str, fused: Source):
    """(per-expert canonical name, (out, in) view) for every expert this rank holds."""
    layer = canon.split(".")[1]
    inter = shard.model.intermediate_size
    kinds = ([("gate", slice(0, inter)), ("up", slice(inter, 2 * inter))] if canon.endswith("gate_up_proj")
             else [("down", slice(None))])
    for expert in range(shard.expert_start, shard.expert_start + shard.experts_per_rank):
        for kind, cols in kinds:
            name = f"layers.{layer}.feed_forward.experts.{expert}.{kind}_proj.weight"
            if kind == "down":  # fused down is (E, I, H) = (E, in, out) already
                yield name, _expert_view(fused, expert, slice(None))
            else:
                yield name, _expert_view(fused, expert, cols)


def _load_kv_scale(shard: ShardLayout, params: dict, canon: str, src: Source) -> int:
    dest, _, _ = match(shard.model, canon)
    try:
        value = check_scale(src.read(), ((), (1,)))
    except ScaleError as e:
        raise CheckpointError(f"scale tensor {src.name} {e}") from None
    params[dest].data.copy_(value.reshape(()))
    return value.numel() * 4


def check_fp8_scales(model: torch.nn.Module, path) -> None:
    """Every scale of every FP8 module must have been set (scales start at 0) and be finite."""
    for name, p in model.named_parameters():
        if name.endswith("scale") and p.dtype == torch.float32:
            if not bool(torch.isfinite(p).all()) or not bool((p > 0).all()):
                raise CheckpointError(f"FP8 scale {name} was not set by checkpoint {path} "
                                      "(or calibration) to finite positive values")


def checkpoint_dtypes(path: str | Path) -> dict[str, str]:
    """Canonical tensor name -> dtype as the file names it (F32, BF16, F8_E4M3, ...); headers only."""
    files = index_files(path)
    dtypes = {}
    for file in sorted({f for f, _ in files.values()}):
        with _open(file) as handle:
            for canon, (f, stored) in files.items():
                if f == file:
                    dtypes[canon] = handle.get_slice(stored).get_dtype()
    return dtypes


def has_per_expert_names(names) -> bool:
    return any(_PER_EXPERT.match(n) for n in names)


def has_kv_scales(names) -> bool:
    return any(_KV_SCALE.match(n) for n in names)
