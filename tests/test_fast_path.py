"""The fused-kernel path (`Llama4(kernels="triton")`) equals the reference ops, step by step.

Two models with the same weights, one on the torch ops and one on the kernels (on CPU the kernels
run in Triton's interpreter, fp32), take the same prefill and then decode steps of 1 token and
verify steps of 4 tokens with a causal chain and with a tree mask, over a KV cache of random
history: logits must agree to fp32 rounding, caches must hold the same keys and values, the cache
lengths must advance by each row's n_new (a row may be finished: 0), the greedy pick on the argmax
kernel must be torch's, and the static step (whole cache buffer, no host sync) must equal the
dynamic one. The `tiny` shape has
every feature: dense and MoE layers, chunked RoPE layers with a chunk the prompt crosses, a NoPE
layer with temperature tuning, QK-norm and GQA. GPU-only: graph replay equals eager for 128
greedy tokens, in bf16 and in FP8.
"""
from __future__ import annotations

import pytest
import torch

from collectives.communicator import SingleRankCommunicator
from collectives.triton_support import INTERPRETED
from model.sampling import distributed_argmax
from model.checkpoint import load_shard
from model.config import load_model_config, tiny
from model.embedded import random_state_dict, write_checkpoint
from model.llama4 import Llama4
from model.parallel import layout

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPT = 70  # crosses the 64-token attention chunk


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("fast_path_ckpt")
    cfg = tiny(vocab_size=509)
    write_checkpoint(path, cfg, random_state_dict(cfg, seed=23, std=0.08))
    return path


def _model(path, kernels: str) -> Llama4:
    cfg = load_model_config(path)
    with torch.device(DEVICE):
        model = Llama4(cfg, layout(cfg, 1, 0, "tp"), SingleRankCommunicator(), kernels=kernels).eval()
    load_shard(model, path)
    return model


@pytest.fixture(scope="module")
def models(checkpoint):
    return _model(checkpoint, "torch"), _model(checkpoint, "triton")


def _prefilled(model: Llama4, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, PROMPT), generator=gen).to(DEVICE)
    cache = model.new_cache(batch, PROMPT + 16)
    lengths = torch.tensor([PROMPT - 7 * b for b in range(batch)], device=DEVICE)  # rows of their own length
    model(ids, cache, n_new=lengths)
    return cache


def _tree_mask(batch: int, n: int) -> torch.Tensor:
    """Root 0; nodes 1, 2 children of the root; 3 a child of 1: each node sees itself and its ancestors."""
    parents = [-1, 0, 0, 1][:n]
    mask = torch.zeros(n, n, dtype=torch.bool)
    for node in range(n):
        at = node
        while at >= 0:
            mask[node, at] = True
            at = parents[at]
    return mask.expand(batch, n, n).to(DEVICE)


@pytest.mark.parametrize("n_new,tree", [(1, False), (4, False), (4, True)])
@pytest.mark.parametrize("static", [False, True])
def test_kernels_equal_reference_ops(models, n_new, tree, static):
    reference, fused = models
    batch = 2
    caches = [_prefilled(m, batch, seed=n_new) for m in models]
    gen = torch.Generator().manual_seed(100 + n_new)
    ids = torch.randint(0, reference.cfg.vocab_size, (batch, n_new), generator=gen).to(DEVICE)
    positions = caches[0].lengths[:, None] + (torch.tensor([0, 1, 1, 2][:n_new], device=DEVICE) if tree
                                              else torch.arange(n_new, device=DEVICE))
    step_mask = _tree_mask(batch, n_new) if tree else None
    active = torch.tensor([n_new, n_new - 1], device=DEVICE)  # the second row stops early (n_new as graphs pass it)
    before = caches[1].lengths.clone()
    out = [m(ids, c, positions=positions, step_mask=step_mask, static=static, n_new=active).logits
           for m, c in zip(models, caches)]
    err = (out[1] - out[0]).abs().max().item() / out[0].abs().max().item()
    assert err < 2e-5, f"relative logit error {err}"
    assert torch.equal(caches[0].lengths, caches[1].lengths) and torch.equal(caches[1].lengths, before + active)
    # the greedy pick as a GPU step makes it (the argmax kernel; the interpreter here) = torch's choice
    picked = distributed_argmax(out[1][:, -1], 0, SingleRankCommunicator(), kernel=True)
    assert torch.equal(picked, out[1][:, -1].argmax(-1)) and torch.equal(picked, out[0][:, -1].argmax(-1))
    for k_ref, k_fast in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        written = int(caches[0].lengths.max())
        ref, fast = k_ref[:, :, :written], k_fast[:, :, :written]
        assert (fast - ref).abs().max() <= 2e-5 * ref.abs().max(), "cached keys / values differ"


def test_static_step_equals_dynamic_step(models):
    """The whole-buffer step with a length mask is the same math as the step over the used slots."""
    reference, _ = models
    caches = [_prefilled(reference, 3, seed=5) for _ in range(2)]
    ids = torch.randint(0, reference.cfg.vocab_size, (3, 1), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    dynamic = reference(ids, caches[0]).logits
    static = reference(ids, caches[1], static=True).logits
    err = (static - dynamic).abs().max().item() / dynamic.abs().max().item()
    assert err < 2e-5, f"relative logit error {err}"


def test_static_step_never_reads_the_device(models, monkeypatch):
    """A captured step must not read a device value on the host: no .item(), int() or .tolist().
    The step (2 tokens, no n_new, the last row's logits only) still equals the reference ops'."""
    reference, fused = models
    caches = [_prefilled(m, 1, seed=8) for m in models]
    ids = torch.tensor([[5, 9]], device=DEVICE)
    calls = []
    for name in ("item", "tolist", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (calls.append(_n), _o(self, *a, **k))[1])
    got = fused(ids, caches[1], static=True, last_only=True).logits
    monkeypatch.undo()
    assert calls == [], f"the static step read device values back: {calls}"
    want = reference(ids, caches[0], static=True, last_only=True).logits
    assert got.shape == want.shape == (1, 1, reference.shard.vocab_per_rank)
    assert (got - want).abs().max() <= 2e-5 * want.abs().max()
    assert torch.equal(caches[0].lengths, caches[1].lengths)


@pytest.mark.parametrize("settings,message", [
    ({"device": "cpu", "kernels": "triton"}, "--kernels triton needs --device cuda"),
    ({"device": "cpu", "cuda_graphs": "on"}, "--cuda-graphs on needs --device cuda"),
    ({"device": "cuda", "comm": "gloo", "world_size": 1, "cuda_graphs": "on", "kernels": "torch"}, "fused kernels"),
    ({"kernels": "cutlass"}, "kernels must be one of"),
    ({"device": "cpu", "comm": "symm"}, "--comm symm needs --device cuda"),
])
def test_kernel_and_graph_settings_are_checked(settings, message):
    from model.config import ConfigError
    from workers.run_config import RunConfig
    with pytest.raises(ConfigError, match=message):
        RunConfig(model_path="m", **settings)


def test_kernels_default_to_the_fused_path_on_gpus_only():
    from workers.run_config import RunConfig
    assert RunConfig("m", device="cuda", comm="gloo", world_size=1).model_kernels == "triton"
    assert RunConfig("m", device="cuda", comm="symm", world_size=2).model_kernels == "triton"
    assert RunConfig("m", device="cpu", world_size=1).model_kernels == "torch"
    assert RunConfig("m", device="cpu").engine_graphs == "off"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_bench_decode_refuses_without_a_gpu():
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "launch", "bench", "decode", "--model", "medium"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no CUDA device" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, "-m", "launch", "bench", "decode", "--steps", "draft"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--steps: unknown draft" in run.stderr
    run = subprocess.run([sys.executable, "-m", "launch", "bench", "decode", "--model", "embedded", "--dtype", "fp8",
                          "--fp8-scheme", "per-tensor"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--fp8-scheme sets the scales of a random preset" in run.stderr


@pytest.mark.skipif(DEVICE != "cuda", reason="programmatic dependent launch: GPU only")
def test_gpu_decode_step_same_bits_with_and_without_pdl(models, monkeypatch):
    """PDL changes when kernels start, never what they compute: a decode step's logits and KV writes
    are the same bits with it on and off, eager and replayed from a CUDA graph."""
    from collectives import triton_support
    _, fused = models
    ids = torch.randint(0, fused.cfg.vocab_size, (2, 1), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    results = {}
    for enabled in (False, True):
        monkeypatch.setattr(triton_support, "PDL_ENABLED", enabled)
        cache = _prefilled(fused, 2, seed=4)
        saved = cache.lengths.clone()
        eager = fused(ids, cache, static=True).logits.clone()
        cache.lengths.copy_(saved)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                captured = fused(ids, cache, static=True).logits
        torch.cuda.current_stream().wait_stream(stream)
        cache.lengths.copy_(saved)
        graph.replay()
        torch.cuda.synchronize()
        results[enabled] = (eager, captured.clone(), cache.k[0].clone(), cache.v[-1].clone())
    for off, on in zip(results[False], results[True]):
        assert torch.equal(off, on)
    assert torch.equal(results[True][0], results[True][1])


@pytest.mark.skipif(not INTERPRETED, reason="counts the kernels on CPU tensors under Triton's interpreter "
                    "(tests/test_launch_plan.py counts a replayed graph's kernels on a GPU)")
def test_decode_step_launches():
    """Kernel launches of one fused decode graph step with medium's layer structure (counted on the
    CPU, benchmarks/launch_count.py): ONE kernel before the first layer (embedding, first RMSNorm,
    positions, cache lengths); per layer the attention's three kernels (QKV GEMV; RoPE + cache write
    + split-KV attention + merge; o_proj GEMV), a dense MLP's two GEMVs or the MoE's three launches
    (router, FC13 pair, FC2 pair), the two add + RMSNorm kernels; the LM head GEMV and ONE argmax
    kernel, which writes the chosen ids into the graph's token buffer itself; no torch op at all
    (no router GEMM, top-k or sigmoid, no copy of the ids)."""
    from benchmarks.launch_count import small_config, step_launches
    cfg = small_config("medium")
    counts = step_launches("medium", "bf16")
    assert counts["triton _embed_norm_kernel"] == 1 and counts["triton _argmax_kernel"] == 1
    n_moe = len(cfg.moe_layers)
    n_dense = cfg.n_layers - n_moe
    assert counts["triton _router_kernel"] == n_moe and counts["triton _pair_kernel"] == 2 * n_moe
    assert counts["triton _gemv_kernel"] == 2 * cfg.n_layers + 2 * n_dense + 1  # qkv, o; FC13, FC2; LM head
    assert counts["triton _split_kernel"] == cfg.n_layers
    assert "triton _merge_kernel" not in counts and "triton _qkv_rope_cache_kernel" not in counts
    assert counts["triton _add_rmsnorm_kernel"] == 2 * cfg.n_layers
    assert not {"torch mm", "torch topk", "torch sigmoid", "torch addmm"} & set(counts), counts
    assert not [k for k in counts if k.startswith("torch")], counts


def test_hooked_router_runs_as_a_module(models):
    """A forward hook on a router (workers/step_bench.py counts routed experts through one) still
    fires on the fused path, and the step's logits are the same as without it."""
    _, fused = models
    ids = torch.randint(0, fused.cfg.vocab_size, (1, 1), generator=torch.Generator().manual_seed(12)).to(DEVICE)
    caches = [_prefilled(fused, 1, seed=6) for _ in range(2)]
    plain = fused(ids, caches[0], static=True).logits
    seen = []
    moe = next(layer.feed_forward for layer in fused.layers if layer.is_moe)
    hook = moe.router.register_forward_hook(lambda module, args, out: seen.append(out.argmax(-1)))
    try:
        hooked = fused(ids, caches[1], static=True).logits
    finally:
        hook.remove()
    assert len(seen) == 1
    err = (hooked - plain).abs().max().item() / plain.abs().max().item()
    assert err < 2e-5, f"relative logit error {err}"


def test_big_fp8_shared_expert_apart_equals_the_pair(monkeypatch):
    """At 2+ rows a big FP8 shared expert leaves the pair for the tensor cores (fast_path.
    shared_on_tensor_cores; here for any size): the MoE output equals the pair path's (whose kernels
    test_kernel_moe_decode holds to their references) to FP8 GEMM rounding, and the path is chosen
    by rows. (On the CPU both are ~6% off the torch module's output, normwise: Triton's interpreter
    (3.6) converts float32 -> e4m3 wrongly where rounding up carries into the next power of two,
    124.95 -> 64 not 128, 7.99 -> 4 not 8, so a few quantized activations are off by 2x there;
    reference_linear_small_m equals the module exactly, and on a GPU the quantization is checked bit
    for bit: test_kernel_linear_small_m's random-activation tests.)"""
    from model import fast_path
    from workers.step_bench import random_model
    from tests.test_launch_plan import four_layer_medium
    model = random_model(four_layer_medium(), "fp8", "triton", device=DEVICE)
    block = next(layer.feed_forward for layer in model.layers if layer.is_moe)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 1, model.cfg.hidden_size, generator=gen).to(DEVICE, torch.bfloat16)  # (B, T, H)
    with torch.no_grad():
        assert fast_path.moe_path(block, 4) == "pair"  # tiny widths: below SHARED_PASSES_BYTES
        paired = fast_path.moe(block, x).float()
        monkeypatch.setattr(fast_path, "SHARED_PASSES_BYTES", 0)
        assert fast_path.moe_path(block, 4) == "separate" and fast_path.moe_path(block, 1) == "pair"
        apart = fast_path.moe(block, x).float()
    assert (apart - paired).abs().max() <= 1e-2 * paired.abs().max()


@pytest.mark.parametrize("scheme", ["channel", "per-tensor"])
@pytest.mark.parametrize("tokens", [1, 4])
def test_fp8_rows_from_the_norm_change_no_bits(monkeypatch, tokens, scheme):
    """FP8 with per-token scales, or static ones (per-tensor: the norm quantizes with the next linear's scale):
    the norm kernel's rows (fast_path.fp8_rows) feed QKV (after layer 0), FC13 and the shared expert in place
    of the GEMVs' own quantization (one row: in each GEMV program; 4 rows: the tensor-core path's pre-pass,
    whose launches go). Same bytes, same sums: the logits are the same bits with and without (the interpreter
    runs the norm kernel here, as a GPU does: launch_count._gpu_norm)."""
    from benchmarks.launch_count import _gpu_norm, count_launches
    from collections import Counter
    from tests.test_launch_plan import four_layer_medium
    from workers.step_bench import random_model
    model = random_model(four_layer_medium(), "fp8", "triton", device=DEVICE, fp8_scheme=scheme)
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, model.cfg.vocab_size, (1, tokens), generator=gen).to(DEVICE)

    def step() -> tuple[torch.Tensor, Counter]:
        cache = model.new_cache(1, 32)
        cache.lengths.fill_(5)
        counts: Counter = Counter()
        with torch.no_grad(), _gpu_norm(), count_launches(counts):
            logits = model(ids, cache, static=True).logits
        return logits, counts

    from model import fast_path
    made = []
    original = fast_path.fp8_rows
    monkeypatch.setattr(fast_path, "fp8_rows", lambda *a: made.append(original(*a)) or made[-1])
    with_rows, counts = step()
    # after layer 0's attention too (its dense FC13); static scales at one row: none (fast_path._rows_pay)
    assert sum(rows is not None for rows in made) == (0 if scheme == "per-tensor" and tokens == 1 else 3 + 4)
    monkeypatch.setattr(SingleRankCommunicator, "norm_quantizes_rows", lambda self, x: False)
    without, counts_without = step()
    assert torch.isfinite(with_rows).all() and torch.equal(with_rows, without)
    fed = 3 + 2  # QKV of layers 1..3, FC13 of the two dense layers; the MoE layers' shared experts sit in pairs
    assert counts["triton _quantize_kernel"] == counts_without["triton _quantize_kernel"] - (fed if tokens > 1 else 0)


def test_fp8_rows_only_where_they_pay(monkeypatch):
    """fp8_rows: for an FP8 linear with per-token scales, or one static scale (then with it as a third item, for
    the norm to quantize with, and from 2 rows only: measured slower at one), not BF16, at hidden sizes up to
    NORM_FP8_ROWS_MAX_K (measured slower at Maverick's 5120), on a communicator whose norm makes them, and not
    with DGX_EMU_NORM_FP8_ROWS=0; the launch plans ask the same question (plans_fp8_rows)."""
    from torch import nn
    from model import fast_path
    from model.fp8 import PER_CHANNEL, PER_TENSOR, Fp8Linear
    comm = SingleRankCommunicator()
    for hidden, scheme, tokens, wanted in [(4096, PER_CHANNEL, 2, True), (4096, PER_CHANNEL, 1, True),
                                           (5120, PER_CHANNEL, 2, False), (64, PER_TENSOR, 2, True),
                                           (64, PER_TENSOR, 1, False), (5120, PER_TENSOR, 2, False)]:
        linear = Fp8Linear(hidden, 32, scheme, torch.bfloat16).to(DEVICE)
        partial = torch.zeros(1, tokens, hidden, dtype=torch.bfloat16, device=DEVICE)
        rows = fast_path.fp8_rows(comm, linear, partial)
        assert (rows is not None) == wanted == fast_path.plans_fp8_rows(linear, 1, tokens)
        if wanted:
            assert rows[0].shape == partial.shape and rows[0].dtype == torch.float8_e4m3fn
            assert rows[1].shape == (tokens,)
            assert not fast_path.plans_fp8_rows(linear, 2, tokens)  # several ranks: the multi-rank norms make none
            assert len(rows) == (3 if scheme is PER_TENSOR else 2)
            assert scheme is not PER_TENSOR or rows[2] is linear.input_scale  # the scale the norm quantizes with
    bf16 = nn.Linear(64, 32, bias=False).to(DEVICE, torch.bfloat16)
    assert fast_path.fp8_rows(comm, bf16, torch.zeros(1, 64, dtype=torch.bfloat16, device=DEVICE)) is None
    monkeypatch.setattr(fast_path, "NORM_FP8_ROWS", False)
    linear = Fp8Linear(64, 32, PER_CHANNEL, torch.bfloat16).to(DEVICE)
    assert fast_path.fp8_rows(comm, linear, torch.zeros(1, 64, dtype=torch.bfloat16, device=DEVICE)) is None
