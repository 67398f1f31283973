"""Building one rank's model in the run's dtype and filling it from the checkpoint.

For `--dtype fp8` the FP8 modules are swapped in before the checkpoint is read:
  * a pre-quantized checkpoint (config.json declares its `quantization_config`) decides which
    modules are FP8 (those whose weights are FP8 in the files) and the scheme;
  * a high-precision checkpoint is quantized at load, every FP8 target with the run's scheme
    (`--fp8-scheme`, default channel / per-token).
Static scales the checkpoint does not carry are calibrated on a fixed text: per-tensor input scales
on the high-precision model first (which is then discarded and rebuilt in FP8), FP8 KV-cache
scales on the final model. Calibration reduces its amax over ranks, so every rank agrees.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from model.checkpoint import checkpoint_names, load_shard
from model.config import ConfigError, ModelConfig
from model.fp8 import SCHEMES
from model.fp8_calibration import calibrate, calibration_ids, set_kv_scales
from model.fp8_checkpoint import Fp8Format, load_fp8_format, scheme_name
from model.fp8_modules import all_fp8, checkpoint_plan, to_fp8
from model.llama4 import Llama4
from model.loading import checkpoint_dtypes, has_kv_scales, has_per_expert_names
from model.parallel import ShardLayout
from model.tokenizer import Tokenizer


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Builds parameters directly in the run's dtype (no fp32 copy first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def fp8_plan(model: Llama4, dtypes: dict[str, str], fmt: Fp8Format | None, requested: str):
    """(plan, quantized at load?) for `--dtype fp8` with `--fp8-scheme requested`."""
    if fmt is None:
        scheme = SCHEMES["channel" if requested == "auto" else requested]
        return all_fp8(model, scheme), True
    if requested not in ("auto", scheme_name(fmt.scheme)):
        raise ConfigError(f"--fp8-scheme {requested} conflicts with the checkpoint, which is pre-quantized "
                          f"as {fmt.method} ({scheme_name(fmt.scheme)})")
    names = checkpoint_names(model.cfg, per_expert=has_per_expert_names(dtypes))
    fp8_names = {n for n, d in dtypes.items() if d == "F8_E4M3"}
    return checkpoint_plan(model, fp8_names, names, fmt.scheme), False


def _calibration_ids(path: Path, cfg: ModelConfig) -> list[int]:
    tok_file = path / "tokenizer.json"
    tokenizer = Tokenizer.from_file(tok_file) if tok_file.is_file() else None
    return calibration_ids(tokenizer, cfg.vocab_size, cfg.bos_token_id)


def build_model(run, cfg: ModelConfig, shard: ShardLayout, comm, progress=None) -> tuple[Llama4, int]:
    """This rank's model, loaded. Returns (model, checkpoint bytes read)."""
    path = Path(run.model_path)
    fmt = load_fp8_format(path)

    def fresh() -> Llama4:
        with torch.device(run.device), default_dtype(run.torch_dtype):
            return Llama4(cfg, shard, comm, kernels=run.model_kernels)

    model = fresh()
    if run.dtype != "fp8":
        return model, load_shard(model, path, progress, fp8_format=fmt)  # FP8 tensors get dequantized
    dtypes = checkpoint_dtypes(path)
    plan, quantized_at_load = fp8_plan(model, dtypes, fmt, run.fp8_scheme)
    input_amax = kv_amax = None
    if quantized_at_load and any(s.static_input for s in plan.values()):
        load_shard(model, path, fp8_format=fmt)
        input_amax, kv_amax = calibrate(model, _calibration_ids(path, cfg), list(plan))
        model = fresh()
    to_fp8(model, plan)
    read = load_shard(model, path, progress, fp8_format=fmt, input_amax=input_amax)
    if run.kv_dtype == "fp8" and not has_kv_scales(dtypes):
        if kv_amax is None:
            _, kv_amax = calibrate(model, _calibration_ids(path, cfg), paths=[])
        set_kv_scales(model, kv_amax)
    return model, read
