"""Loading FP8 checkpoints: every format from files written by hand to its own naming, at every
layout (unsharded, 8-way TP with 32-wide expert and 64-wide MLP slices that do not align to 128,
4-way EP), compared EXACTLY with what whole-tensor math in the test says the weights are.

For each format, three models of one rank's shapes are loaded:
  * `fp8`: FP8 modules where the checkpoint's weights are FP8 (the plan comes from the files);
  * `dequantized`: all high precision, loading the same FP8 files (FP8 x scale at load);
  * `reference`: all high precision, loading float32 files that hold the dequantized values.
`fp8`'s effective weights (e4m3 value x its scale) and `dequantized`'s parameters must equal
`reference`'s bit for bit. Then: quantizing the high-precision checkpoint at load gives the same
FP8 bytes and scales as the pre-quantized files; bad scales and bad configs are refused by name.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from model.checkpoint import CheckpointError, load_shard
from model.config import ConfigError, tiny
from model.embedded import random_state_dict
from model.fp8_checkpoint import load_fp8_format, read_fp8_format
from model.fp8_modules import to_fp8
from model.llama4 import Llama4
from model.loading import checkpoint_dtypes
from model.parallel import layout
from safetensors.torch import load_file, save_file
from tests.fp8_reference import FORMATS, FakeComm, effective_weights, quantized_state_dict, write
from workers.model_build import fp8_plan

CFG = tiny(vocab_size=300)
SEED = 41
LAYOUTS = [(1, 0, "tp"), (8, 1, "tp"), (8, 6, "tp"), (4, 0, "ep"), (4, 3, "ep")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """{format: (fp8 dir, reference dir)} and the high-precision original under "original"."""
    root = tmp_path_factory.mktemp("fp8_ckpts")
    out = {"original": write(root / "original", CFG, random_state_dict(CFG, seed=SEED, std=0.08), None)}
    for fmt, quant_config in FORMATS.items():
        written, dequantized = quantized_state_dict(CFG, fmt, seed=SEED)
        out[fmt] = (write(root / fmt, CFG, written, quant_config), write(root / f"{fmt}-ref", CFG, dequantized, None))
    return out


def _model(world: int, rank: int, moe: str) -> Llama4:
    return Llama4(CFG, layout(CFG, world, rank, moe), FakeComm(world, rank)).eval()


def _fp8_model(path, world, rank, moe, plan_from=None, input_amax=None):
    model = _model(world, rank, moe)
    plan_dir = plan_from or path
    plan, _ = fp8_plan(model, checkpoint_dtypes(plan_dir), load_fp8_format(plan_dir), "auto")
    to_fp8(model, plan)
    load_shard(model, path, fp8_format=load_fp8_format(path), input_amax=input_amax)
    return model, plan


@pytest.mark.parametrize("world,rank,moe", LAYOUTS)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fp8_checkpoint_loads_the_values_its_naming_says(checkpoints, fmt, world, rank, moe):
    fp8_dir, ref_dir = checkpoints[fmt]
    reference = _model(world, rank, moe)
    load_shard(reference, ref_dir)
    ref = dict(reference.named_parameters())
    dequantized = _model(world, rank, moe)
    load_shard(dequantized, fp8_dir, fp8_format=load_fp8_format(fp8_dir))
    for name, p in dequantized.named_parameters():
        assert torch.equal(p, ref[name]), name
    fp8, plan = _fp8_model(fp8_dir, world, rank, moe)
    effective = effective_weights(fp8)
    assert effective, "no FP8 module was swapped in"
    for name, value in effective.items():
        assert torch.equal(value, ref[name]), name
    for name, p in fp8.named_parameters():  # everything not FP8 loads as in the reference
        if name in ref and name not in effective:
            assert torch.equal(p, ref[name]), name
    n_targets = 2 * CFG.n_layers + 2 * len(CFG.moe_layers) + (CFG.n_layers - len(CFG.moe_layers))
    if fmt == "compressed-tensors":  # Meta's layout: only the routed experts are FP8
        assert sorted(plan) == [f"layers.{i}.feed_forward.experts" for i in CFG.moe_layers]
    else:
        assert len(plan) == n_targets


def test_modelopt_scales_of_fused_parts_and_kv(checkpoints):
    """Q, K and V carry their own weight scales (kept per row) and input scales (the max wins)."""
    fp8_dir, _ = checkpoints["modelopt"]
    files = load_file(str(fp8_dir / "model.safetensors"))
    model, _ = _fp8_model(fp8_dir, 1, 0, "tp")
    qkv = model.layers[2].self_attn.qkv_proj
    parts = [files[f"model.layers.2.self_attn.{x}_proj.weight_scale"] for x in "qkv"]
    q_rows, kv_rows = CFG.n_heads * CFG.head_dim, CFG.n_kv_heads * CFG.head_dim
    assert torch.equal(qkv.weight_scale, torch.cat([parts[0].expand(q_rows), parts[1].expand(kv_rows),
                                                    parts[2].expand(kv_rows)]))
    inputs = torch.stack([files[f"model.layers.2.self_attn.{x}_proj.input_scale"] for x in "qkv"])
    assert len(set(inputs.tolist())) > 1 and float(qkv.input_scale) == float(inputs.max())
    assert float(model.layers[3].self_attn.k_scale) == float(files["model.layers.3.self_attn.k_scale"])
    assert float(model.layers[0].self_attn.v_scale) == float(files["model.layers.0.self_attn.v_scale"])


@pytest.mark.parametrize("world,rank,moe", [(1, 0, "tp"), (8, 6, "tp"), (4, 3, "ep")])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantizing_at_load_equals_the_prequantized_files(checkpoints, fmt, world, rank, moe):
    """Quantize-at-load scales over whole checkpoint tensors (per expert, per fused part), so a
    rank gets the same FP8 bytes and scales as from a checkpoint quantized offline."""
    fp8_dir, _ = checkpoints[fmt]
    pre, plan = _fp8_model(fp8_dir, world, rank, moe)
    static = {n: torch.tensor(1.0) for n, p in pre.named_parameters() if n.endswith("input_scale")}
    at_load, _ = _fp8_model(checkpoints["original"], world, rank, moe, plan_from=fp8_dir, input_amax=static)
    pre_params = dict(pre.named_parameters())
    compared = 0
    for name, p in at_load.named_parameters():
        if p.dtype == torch.float8_e4m3fn:
            assert torch.equal(p.view(torch.uint8), pre_params[name].view(torch.uint8)), name
        elif name.endswith(("weight_scale", "proj_scale")):
            if fmt == "compressed-tensors":  # these files store bfloat16 scales: equal up to that rounding
                torch.testing.assert_close(p, pre_params[name], rtol=2.0 ** -8, atol=0, msg=name)
            else:
                assert torch.equal(p, pre_params[name]), name
        else:
            continue
        compared += 1
    assert compared >= 2 * len(plan)


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------

def _broken(checkpoints, tmp_path, fmt, edit_tensors=None, edit_config=None):
    src, _ = checkpoints[fmt]
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config))
    return dst


BLOCK_SCALE = "model.layers.1.feed_forward.experts.3.down_proj.weight_scale_inv"
Q_SCALE = "model.layers.0.self_attn.q_proj.weight_scale"


def _set(name, fn):
    def edit(t):
        t[name] = fn(t[name])
    return edit


BAD_SCALES = {  # case: (format, tensor edit, config edit, words the message must contain)
    "nan": ("block", _set(BLOCK_SCALE, lambda s: s.index_fill(0, torch.tensor([0]), float("nan"))), None,
            [BLOCK_SCALE, "NaN"]),
    "inf": ("block", _set(BLOCK_SCALE, lambda s: s.index_fill(1, torch.tensor([0]), float("inf"))), None,
            [BLOCK_SCALE, "inf"]),
    "zero": ("modelopt", _set(Q_SCALE, lambda s: s * 0), None, [Q_SCALE, "zero"]),
    "negative": ("modelopt", _set(Q_SCALE, lambda s: -s), None, [Q_SCALE, "negative"]),
    "shape": ("block", _set(BLOCK_SCALE, lambda s: s[:, :1]), None, [BLOCK_SCALE, "shape"]),
    "channel-shape": ("compressed-tensors", _set("model.layers.3.feed_forward.experts.0.gate_proj.weight_scale",
                                                 lambda s: s[:-1]), None,
                      ["experts.0.gate_proj.weight_scale", "shape"]),
    "missing": ("block", lambda t: t.pop(BLOCK_SCALE), None,
                ["model.layers.1.feed_forward.experts.3.down_proj.weight", "has no weight_scale_inv"]),
    "missing-input": ("modelopt", lambda t: t.pop("model.layers.0.self_attn.k_proj.input_scale"), None,
                      ["k_proj.weight", "has no input_scale"]),
    "nan-byte": ("block", _set("model.layers.0.self_attn.o_proj.weight",
                               lambda w: w.view(torch.uint8).index_fill(1, torch.tensor([5]), 0x7F).view(w.dtype)),
                 None, ["o_proj.weight", "NaN"]),
    "scale-of-bf16": ("compressed-tensors", lambda t: t.update({"model.layers.0.self_attn.q_proj.weight_scale":
                                                                torch.ones(CFG.n_heads * CFG.head_dim, 1)}),
                      None, ["q_proj.weight_scale", "not FP8"]),
    "foreign-scale-name": ("block", lambda t: t.update({"model.layers.0.self_attn.q_proj.weight_scale":
                                                        torch.ones(())}),
                           None, ["q_proj.weight_scale", "not part of the fp8 format"]),
    "no-quant-config": ("block", None, lambda c: c.pop("quantization_config"),
                        ["q_proj.weight", "no quantization_config"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SCALES))
def test_bad_scales_are_refused_naming_the_tensor(checkpoints, tmp_path, case):
    fmt, edit_tensors, edit_config, words = BAD_SCALES[case]
    path = _broken(checkpoints, tmp_path, fmt, edit_tensors, edit_config)
    model = _model(1, 0, "tp")
    fmt_obj = load_fp8_format(path)
    if fmt_obj is not None:
        to_fp8(model, fp8_plan(model, checkpoint_dtypes(path), fmt_obj, "auto")[0])
    with pytest.raises(CheckpointError) as e:
        load_shard(model, path, fp8_format=fmt_obj)
    for word in words:
        assert word in str(e.value), (word, str(e.value))


BAD_CONFIGS = {
    "method": ({"quant_method": "awq"}, "quant_method"),
    "block-size": ({"quant_method": "fp8", "weight_block_size": [64, 64]}, "weight_block_size"),
    "e5m2": ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "fmt"),
    "modelopt-nvfp4": ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "quant_algo"),
    "weight-only": ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {"type": "float", "num_bits": 8, "strategy": "channel"}}}}, "input_activations"),
    "block-with-token": ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {"type": "float", "num_bits": 8, "strategy": "block"},
        "input_activations": {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True}}}}, "strategy"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_quantization_configs_are_refused_naming_the_field(case):
    config, field = BAD_CONFIGS[case]
    with pytest.raises(ConfigError, match=field):
        read_fp8_format({"quantization_config": config})


def test_a_scheme_that_contradicts_the_checkpoint_is_refused(checkpoints):
    fp8_dir, _ = checkpoints["modelopt"]
    with pytest.raises(ConfigError, match="conflicts"):
        fp8_plan(_model(1, 0, "tp"), checkpoint_dtypes(fp8_dir), load_fp8_format(fp8_dir), "block")
