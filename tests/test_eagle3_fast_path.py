"""The EAGLE-3 draft on the fused kernels (`Eagle3Draft(kernels="triton")`, model/eagle3_fast_path.py)
equals the draft on the torch ops.

Two drafts with the same random weights (norm weights too) share a prefill of two rows of different
lengths (more than 16 rows: the torch ops, on both), then take the same step on CPU in Triton's
interpreter, fp32: from target features (a catch-up) and from the draft's own hidden states (a
depth step), with the causal chain mask and with a tree mask, logits of chosen rows, over the static
cache (and once the dynamic one). Logits, hidden states, the cache's lengths and the keys and values
written must agree to fp32 rounding. A static fused forward reads nothing back to the host, and
takes the launches its plan says. The whole speculative step on the static path (what the CUDA graph
captures) with the shipped draft on the kernels still decodes exactly as plain greedy.
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from collectives.communicator import SingleRankCommunicator
from model.eagle3 import Eagle3Config, Eagle3Draft, SharedTargetParts, draft_layout
from model.llama4 import VocabEmbedding
from model.parallel import layout

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_ONLY = pytest.mark.skipif(DEVICE == "cuda", reason="runs the kernels in Triton's interpreter (CPU tensors)")
DTYPES = {"fp32": (torch.float32, 2e-5), "bf16": (torch.bfloat16, 3e-2)}  # relative tolerances
PROMPT = 20
HIDDEN, FEATURES = 32, 3 * 32
TREE = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]  # root; 1, 2 its children; 3 a child of 1
TREE_OFFSETS = [0, 1, 1, 2]  # depths: the tree's positions past the cache length


@functools.lru_cache(maxsize=None)
def _drafts(norm_before_residual: bool, dtype: torch.dtype = torch.float32) -> tuple[Eagle3Draft, Eagle3Draft]:
    cfg = Eagle3Config(hidden_size=HIDDEN, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=48, vocab_size=96,
                       draft_vocab_size=80, target_hidden_size=HIDDEN, norm_before_residual=norm_before_residual)
    gen = torch.Generator().manual_seed(int(norm_before_residual))
    embed = VocabEmbedding(layout(dataclasses.replace(cfg.attention_config(), vocab_size=cfg.vocab_size)), HIDDEN)
    drafts = tuple(Eagle3Draft(cfg, draft_layout(cfg, 1, 0), SingleRankCommunicator(), SharedTargetParts(embed),
                               kernels=kernels).eval() for kernels in ("torch", "triton"))
    with torch.no_grad():
        embed.weight.normal_(generator=gen)
        for param in drafts[0].parameters():  # norms near 1 but not 1: a swapped norm weight shows
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1 + (1.0 if param.dim() == 1 else 0.0))
        drafts[0].set_draft_vocab(torch.randperm(cfg.vocab_size, generator=gen)[:cfg.draft_vocab_size].sort().values)
    drafts[1].load_state_dict(drafts[0].state_dict())
    embed.to(DEVICE, dtype)
    return tuple(d.to(DEVICE, dtype) for d in drafts)


def _on_device(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(DEVICE, dtype if x.is_floating_point() else x.dtype)


def _prefilled(draft: Eagle3Draft, gen_seed: int):
    gen = torch.Generator().manual_seed(gen_seed)
    cache = draft.new_cache(2, PROMPT + 12)
    dtype = draft.fc.weight.dtype
    tokens = torch.randint(0, draft.cfg.vocab_size, (2, PROMPT), generator=gen).to(DEVICE)
    draft(tokens, cache, target_features=_on_device(torch.randn(2, PROMPT, FEATURES, generator=gen), dtype),
          n_new=torch.tensor([PROMPT, PROMPT - 7], device=DEVICE))  # rows of their own length
    return cache


@pytest.mark.parametrize("source,tree,logit_rows,static,norm_before_residual,gather,dtype", [
    ("features", False, [[3], [1]], True, False, True, "fp32"),  # a catch-up: causal, one row's logits per row
    ("hidden", True, [[2, 3], [2, 3]], True, True, True, "fp32"),  # a depth step: tree mask, the frontier's logits
    # the dynamic (eager) step, every row's logits; the embedding as at several ranks (its rows reduced
    # with fc's before the prologue, which then reads both from the all-reduce's strided halves)
    ("features", True, None, False, False, False, "fp32"),
    pytest.param("hidden", True, [[3], [2]], True, False, True, "bf16",
                 marks=pytest.mark.skipif(DEVICE != "cuda", reason="bf16 as a GPU rounds it")),
])
def test_fused_draft_equals_torch_draft(poison_empty, monkeypatch, source, tree, logit_rows, static,
                                        norm_before_residual, gather, dtype):
    dtype, tol = DTYPES[dtype]
    drafts = _drafts(norm_before_residual, dtype)
    monkeypatch.setattr(drafts[0].target.embed, "owns_every_id", gather)
    caches = [_prefilled(d, gen_seed=3) for d in drafts]
    gen = torch.Generator().manual_seed(7)
    n = 4
    tokens = torch.randint(0, drafts[0].cfg.vocab_size, (2, n), generator=gen).to(DEVICE)
    inputs = {"target_features": torch.randn(2, n, FEATURES, generator=gen)} if source == "features" else {
        "hidden": torch.randn(2, n, HIDDEN, generator=gen)}
    if tree:
        inputs["step_mask"] = torch.tensor(TREE, dtype=torch.bool).expand(2, n, n)
        inputs["positions"] = caches[0].lengths[:, None].cpu() + torch.tensor(TREE_OFFSETS)
    if logit_rows is not None:
        inputs["logit_rows"] = torch.tensor(logit_rows)
    inputs = {k: _on_device(v, dtype) for k, v in inputs.items()}
    out = [d(tokens, c, static=static, **inputs) for d, c in zip(drafts, caches)]
    for name in ("logits", "hidden"):
        want, got = getattr(out[0], name).float(), getattr(out[1], name).float()
        assert got.shape == want.shape and not got.isnan().any()
        err = (got - want).abs().max().item() / want.abs().max().item()
        assert err < tol, f"{name}: relative error {err}"
    assert out[0].logits.shape[1] == (len(logit_rows[0]) if logit_rows else n)
    assert torch.equal(caches[0].lengths, caches[1].lengths)
    assert caches[1].lengths.tolist() == [PROMPT + n, PROMPT - 7 + n]
    for ref, fast in ((caches[0].k[0], caches[1].k[0]), (caches[0].v[0], caches[1].v[0])):
        for row, length in enumerate(caches[0].lengths.tolist()):  # the prefix and the step's keys
            scale = ref[row, :, :length].abs().max().item()
            torch.testing.assert_close(fast[row, :, :length], ref[row, :, :length], rtol=tol, atol=tol * scale)


def test_static_fused_draft_never_reads_the_device(monkeypatch):
    """A captured speculative step must not read a device value on the host: no .item(), int() or
    .tolist() in a static fused draft forward."""
    _, fused = _drafts(False)
    cache = _prefilled(fused, gen_seed=4)
    tokens = torch.zeros(2, 2, dtype=torch.long, device=DEVICE)
    features = torch.randn(2, 2, FEATURES, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    fused(tokens, cache, target_features=features, static=True)  # the QKV weight's pair-order copy made (warm-up)
    calls = []
    for name in ("item", "tolist", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _o=original, _n=name, **k: (calls.append(_n), _o(self, *a, **k))[1])
    n_new, logit_rows = torch.tensor([2, 1], device=DEVICE), torch.tensor([[1], [0]], device=DEVICE)
    fused(tokens, cache, target_features=features, n_new=n_new, logit_rows=logit_rows, static=True)
    monkeypatch.undo()
    assert calls == [], f"the static draft step read device values back: {calls}"


@CPU_ONLY
def test_fused_draft_launches():
    """One fused draft forward (benchmarks/launch_count.py --draft): the prologue, the split-KV
    attention, the GEMVs (fc for a catch-up, QKV, o_proj, FC13 + SwiGLU, FC2, LM head), the two
    add + RMSNorm kernels and the one torch gather of the logit rows; no torch matmul, SDPA or norm."""
    from benchmarks.launch_count import draft_launches
    for step, gemvs in (("catch_up", 6), ("depth", 5)):
        counts = draft_launches(step, "triton")
        assert counts["triton _gemv_kernel"] + counts["triton _dot_kernel"] == gemvs, counts
        assert counts["triton _prologue_kernel"] == counts["triton _split_kernel"] == 1, counts
        assert counts["triton _add_rmsnorm_kernel"] == 2, counts
        assert {k for k in counts if k.startswith("torch")} == {"torch gather"}, counts
        assert sum(counts.values()) == gemvs + 5


def test_kernels_choice_is_checked_and_rope_stays_float32():
    """A bf16 draft keeps float32 RoPE frequencies (Module.to would cast the buffer: a bf16 one is
    off by ~2^-9 relative, radians at positions of a few thousand), on either path alike."""
    from model.attention import rope_inv_freq
    reference, _ = _drafts(False)
    with pytest.raises(ValueError, match="kernels must be one of"):
        Eagle3Draft(reference.cfg, reference.shard, reference.comm, reference.target, kernels="cutlass")
    copy = Eagle3Draft(reference.cfg, reference.shard, reference.comm, reference.target).to(torch.bfloat16)
    assert copy.fc.weight.dtype == torch.bfloat16 and copy.inv_freq.dtype == torch.float32
    assert torch.equal(copy.inv_freq, rope_inv_freq(reference.shard.model))


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU: tests/test_spec_cuda_graphs.py (load_draft gives the draft "
                                             "its target's kernels)")
def test_spec_step_with_the_fused_draft_equals_plain_greedy(monkeypatch):
    """The embedded target (torch ops) and its shipped draft on the kernels, chain-3, through the
    one-graph step's static path (tree growth, verify, acceptance, compaction, padded catch-up; the
    draft's prefill on the torch ops, its steps on the kernels over the same cache): the tokens
    equal plain greedy's, drafts are accepted, and as often as with the torch draft. The GEMV
    kernel (tests/test_kernel_linear_small_m.py) is swapped for its reference here: interpreted,
    the embedded draft's GEMVs take ~10 s a forward; the prologue and the attention stay kernels."""
    from model.eagle3_checkpoint import load_draft
    from model.kernels import linear_small_m
    from model.sampling import SamplingParams
    from model.spec import SpecConfig
    from tests.spec_reference import default_target, load_pair, random_prompts, shipped_draft, torch_threads
    from workers.cuda_graphs import cache_slots
    from workers.engine import Engine, Request
    from workers.spec_graphs import SpecGraphs

    monkeypatch.setattr(linear_small_m, "linear_small_m", linear_small_m.reference_linear_small_m)
    spec = SpecConfig(draft_len=3)
    prompts = random_prompts(2, 512, seed=23)
    requests = lambda: [Request(p, SamplingParams(max_new_tokens=n, stop_on_eos=False), str(i))  # noqa: E731
                        for i, (p, n) in enumerate(zip(prompts, (9, 6)))]
    with torch_threads(1):
        model, torch_draft = load_pair(SingleRankCommunicator(), str(default_target()), str(shipped_draft()))
        fused_draft, _ = load_draft(str(shipped_draft()), model, kernels="triton")
        plain, _ = Engine(model).generate(requests())
        engine = Engine(model, draft=fused_draft, cuda_graphs="auto")
        made = []

        def spec_graph(decoder, batch, needed):
            slots = cache_slots(needed, engine.max_context + decoder.margin)
            made.append(SpecGraphs(model, fused_draft, None, batch, slots, decoder.spec.shape, decoder.layer_ids,
                                   capture_it=False))
            return made[-1]
        engine._spec_graph = spec_graph
        got, stats = engine.generate(requests(), spec=spec)
        eager, _ = Engine(model, draft=torch_draft).generate(requests(), spec=spec)
    assert [c.token_ids for c in got] == [c.token_ids for c in plain]
    assert made and made[0].step.calls == stats.spec["steps"] > 0
    accepted = [c.spec["acceptance_length"] for c in got]
    assert max(accepted) > 1.0, "no draft was accepted: the catch-up of accepted tokens went untested"
    assert accepted == pytest.approx([c.spec["acceptance_length"] for c in eager], abs=0.2)


def test_prologue_compiles_for_sm90_with_pdl():
    """Triton's interpreter never traces the PDL branches: the prologue (gathering and not, norming
    the residual and not) compiles for an H100/H200 without a GPU (tests/sm90_compile.py's stand-in
    driver), with one griddepcontrol.wait and one launch_dependents, and no load before the wait
    (the feature and the lengths were written by the kernels before)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = """
import json, torch
import sys
from tests import sm90_compile
try:
    compiled = sm90_compile._install()
except (ImportError, AttributeError, TypeError) as exc:  # another Triton's internals: nothing compiled
    print(f"SETUP-FAILED: {type(exc).__name__}: {exc}")
    sys.exit(3)
from collectives import triton_support
from model.kernels import draft_prologue
triton_support.use_pdl = draft_prologue.available = lambda x: True
H, bf16 = 4096, torch.bfloat16
ones = torch.ones(H, dtype=bf16)
ids, lengths = torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, dtype=torch.long)
draft_prologue.draft_prologue(torch.randn(1, 4, H, dtype=bf16), ones, ones, 1e-5, lengths=lengths, token_ids=ids,
                              embed_weight=torch.randn(64, H, dtype=bf16))
both = torch.randn(1, 4, 2 * H, dtype=bf16)
draft_prologue.draft_prologue(both[..., H:], ones, ones, 1e-5, lengths=lengths, embeds=both[..., :H],
                              n_new=torch.ones(1, dtype=torch.long), positions=ids, residual_normed=True)
for name, pdl, kernel in compiled:
    print(json.dumps(sm90_compile._summary(name, pdl, kernel)))
"""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DGX_EMU_PDL")}
    run = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    if run.returncode == 3 and "SETUP-FAILED" in run.stdout:
        pytest.skip(f"this Triton cannot compile without a GPU here: {run.stdout.strip()}")
    assert run.returncode == 0, run.stderr[-3000:]
    kernels = [json.loads(line) for line in run.stdout.splitlines()]
    assert [k["kernel"] for k in kernels] == ["_prologue_kernel"] * 2
    assert all(k["launch_pdl"] and k["waits"] == k["launch_dependents"] == 1 and k["loads_before_wait"] == 0
               for k in kernels), kernels
