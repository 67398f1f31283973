"""FP8 checkpoints: which format a checkpoint is in, and how a weight's scales are read and cut.

Three pre-quantized formats are read, each recognized by `quantization_config` in config.json:
  * "modelopt" (NVIDIA ModelOpt, `quant_algo` FP8): `X.weight` e4m3 + `X.weight_scale` () +
    `X.input_scale` () per Linear: per-tensor weights, static per-tensor activations.
    `kv_cache_quant_algo` FP8 adds `self_attn.k_scale` / `v_scale`.
  * "compressed-tensors" (llm-compressor; Meta's Llama-4-Maverick-17B-128E-Instruct-FP8): strategy
    "channel" weights with `X.weight_scale` (out, 1) and dynamic "token" activations (no input
    scale); "tensor" + static "tensor" activations (with `input_scale`) is read too.
  * "fp8" with `weight_block_size` [128, 128] (DeepSeek-V3 / HF fine-grained FP8):
    `X.weight_scale_inv` (ceil(out/128), ceil(in/128)) with dynamic 1x128 activations.
Quantized experts are named per expert, as transformers' compressed-tensors path and vLLM's Llama
4 loader expect: `feed_forward.experts.{e}.{gate,up,down}_proj.weight` (+ scales), each (out, in).

Every scale is checked before it is used: its shape against the weight's, its values finite and
positive. A problem raises `ScaleError`, which the loader turns into a CheckpointError naming the
tensor. The functions here are pure (tensors in, tensors out); `model.checkpoint` does the I/O.

How a rank cuts a scale follows from how it cuts the weight (`Cut.src` gives the global rows
and columns it reads): per-channel scales follow the weight's rows (column-parallel layers keep
their rows, row-parallel ones keep every row); per-tensor scales fill the rows of their part of
a fused parameter; block scales are looked up by the GLOBAL block of each row and column read,
so a slice that does not start on a 128 boundary still finds its scales.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import ConfigError
from model.fp8 import BLOCK, FP8, Fp8Scheme, PER_CHANNEL, PER_TENSOR, BLOCK_128, ceil_div

SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ScaleError(ValueError):
    """A scale tensor that cannot be used (the loader adds the tensor's name)."""


@dataclass(frozen=True)
class Fp8Format:
    """A pre-quantized checkpoint's format: its scheme and the name of its weight scales."""

    method: str  # modelopt | compressed-tensors | fp8
    scheme: Fp8Scheme
    weight_scale_name: str  # "weight_scale" or "weight_scale_inv"
    kv_cache_fp8: bool = False


def _modelopt(q: dict) -> Fp8Format:
    inner = q.get("quantization", q)
    algo = inner.get("quant_algo")
    if algo != "FP8":
        raise ConfigError(f"quantization_config.quant_algo {algo!r} is not supported (only 'FP8')")
    kv = inner.get("kv_cache_quant_algo")
    if kv not in (None, "FP8"):
        raise ConfigError(f"quantization_config.kv_cache_quant_algo {kv!r} is not supported (only 'FP8' or none)")
    return Fp8Format("modelopt", PER_TENSOR, "weight_scale", kv == "FP8")


def _ct_side(args: dict | None, what: str) -> dict:
    if not isinstance(args, dict):
        raise ConfigError(f"quantization_config: {what} must be quantized (weight-only FP8 is not supported)")
    if args.get("type", "float") != "float" or int(args.get("num_bits", 8)) != 8:
        raise ConfigError(f"quantization_config: {what} must be 8-bit float, got type {args.get('type')!r} "
                          f"with {args.get('num_bits')} bits")
    return args


def _compressed_tensors(q: dict) -> Fp8Format:
    groups = q.get("config_groups") or {}
    if not groups:
        raise ConfigError("quantization_config.config_groups is empty")
    schemes = set()
    for name, group in groups.items():
        weights = _ct_side(group.get("weights"), f"config_groups.{name}.weights")
        acts = _ct_side(group.get("input_activations"), f"config_groups.{name}.input_activations")
        w, a = weights.get("strategy"), acts.get("strategy")
        if w == "block" and list(weights.get("block_structure") or [BLOCK, BLOCK]) != [BLOCK, BLOCK]:
            raise ConfigError(f"config_groups.{name}.weights.block_structure must be [128, 128]")
        act = {"token": "token", "group": "group", "tensor": "static"}.get(a)
        if a == "tensor" and acts.get("dynamic", False):
            raise ConfigError(f"config_groups.{name}: dynamic per-tensor activations are not supported")
        if a == "group" and int(acts.get("group_size", BLOCK)) != BLOCK:
            raise ConfigError(f"config_groups.{name}.input_activations.group_size must be 128")
        try:
            schemes.add(Fp8Scheme(w, act))
        except ValueError as e:
            raise ConfigError(f"config_groups.{name}: weight strategy {w!r} with activation strategy {a!r}: "
                              f"{e}") from None
    if len(schemes) != 1:
        raise ConfigError("quantization_config: config_groups with different schemes are not supported")
    kv = q.get("kv_cache_scheme")
    return Fp8Format("compressed-tensors", schemes.pop(), "weight_scale", kv is not None)


def _fine_grained(q: dict) -> Fp8Format:
    if q.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"quantization_config.fmt {q.get('fmt')!r} is not supported (only 'e4m3')")
    block = q.get("weight_block_size")
    if block is None:
        if q.get("activation_scheme") != "static":
            raise ConfigError("quantization_config: per-tensor 'fp8' needs activation_scheme 'static'")
        return Fp8Format("fp8", PER_TENSOR, "weight_scale")
    if list(block) != [BLOCK, BLOCK]:
        raise ConfigError(f"quantization_config.weight_block_size {block} is not supported (only [128, 128])")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise ConfigError("quantization_config: block FP8 needs activation_scheme 'dynamic'")
    return Fp8Format("fp8", BLOCK_128, "weight_scale_inv")


def read_fp8_format(raw_config: dict) -> Fp8Format | None:
    """The FP8 format config.json declares (top level or text_config), None if it declares none."""
    q = raw_config.get("quantization_config") or (raw_config.get("text_config") or {}).get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError("quantization_config must be a JSON object")
    method = q.get("quant_method")
    readers = {"modelopt": _modelopt, "compressed-tensors": _compressed_tensors, "fp8": _fine_grained}
    if method not in readers:
        raise ConfigError(f"quantization_config.quant_method {method!r} is not supported "
                          f"(one of {sorted(readers)})")
    return readers[method](q)


# ---------------------------------------------------------------------------------------------
# Scales of one (out, in) checkpoint weight
# ---------------------------------------------------------------------------------------------

def expected_scale_shapes(granularity: str, out_features: int, in_features: int) -> tuple[tuple[int, ...], ...]:
    if granularity == "tensor":
        return (), (1,)
    if granularity == "channel":
        return (out_features, 1), (out_features,)
    return ((ceil_div(out_features, BLOCK), ceil_div(in_features, BLOCK)),)


def check_scale(scale: torch.Tensor, allowed: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """The scale as float32 if its shape is allowed and its values finite and positive."""
    if tuple(scale.shape) not in allowed:
        raise ScaleError(f"has shape {list(scale.shape)}, expected {' or '.join(str(list(s)) for s in allowed)}")
    if scale.dtype not in SCALE_DTYPES:
        raise ScaleError(f"has dtype {scale.dtype}, expected a float32, bfloat16 or float16 scale")
    scale = scale.float()
    if not bool(torch.isfinite(scale).all()):
        raise ScaleError("holds NaN or inf values")
    if not bool((scale > 0).all()):
        raise ScaleError("holds zero or negative values (a scale must be > 0)")
    return scale


def check_fp8_bytes(piece: torch.Tensor) -> None:
    """e4m3fn has no inf; its two NaN encodings are 0x7F and 0xFF."""
    if piece.dtype == FP8 and bool(((piece.view(torch.uint8) & 0x7F) == 0x7F).any()):
        raise ScaleError("holds NaN values")


def _span(sl: slice, size: int) -> range:
    return range(*sl.indices(size))


def weight_scale_piece(scale: torch.Tensor, granularity: str, src: tuple[slice, slice],
                       weight_shape: tuple[int, int]) -> torch.Tensor:
    """This rank's scales for the weight rows/columns `src` reads, one per row: (rows,) or, for
    blocks, (rows, G) over the global 128-column groups that the columns touch."""
    rows = _span(src[0], weight_shape[0])
    if granularity == "tensor":
        return scale.reshape(()).expand(len(rows))
    if granularity == "channel":
        return scale.reshape(-1)[rows.start: rows.stop]
    cols = _span(src[1], weight_shape[1])
    col_blocks = slice(cols.start // BLOCK, (cols.stop - 1) // BLOCK + 1)
    row_blocks = torch.arange(rows.start, rows.stop, device=scale.device) // BLOCK
    return scale[row_blocks][:, col_blocks]  # (rows, G)


def scale_dest(weight_dest: tuple, granularity: str) -> tuple:
    """Where a weight piece's per-row scales land: the weight's index without its input axis
    (axis 1 in both our layouts: Linear (out, in) and experts (E, in, out)), plus the groups."""
    dest = tuple(weight_dest[:1]) + tuple(weight_dest[2:])
    return dest + (slice(None),) if granularity == "block" else dest


def dequantize_piece(piece: torch.Tensor, scales: torch.Tensor, granularity: str, col_start: int) -> torch.Tensor:
    """A (rows, cols) FP8 weight piece times its per-row scales ((rows,) or (rows, G)), float32."""
    values = piece.float()
    if granularity != "block":
        return values * scales[:, None]
    cols = torch.arange(col_start, col_start + piece.shape[1], device=piece.device) // BLOCK
    return values * scales[:, cols - col_start // BLOCK]


def scheme_name(scheme: Fp8Scheme) -> str:
    return {PER_TENSOR: "per-tensor", PER_CHANNEL: "channel", BLOCK_128: "block"}.get(
        scheme, f"{scheme.weight}/{scheme.activation}")


def load_fp8_format(path) -> Fp8Format | None:
    """read_fp8_format of a checkpoint directory's config.json (None when it has none)."""
    file = Path(path) / "config.json"
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {file}: {e}") from None
    return read_fp8_format(raw) if isinstance(raw, dict) else None
