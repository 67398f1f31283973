"""The L2 prefetch table of a decode layer (model/kernels/l2_prefetch.py): which weights, in which
order, cut at the budget, aligned; and that the attention kernel's prefetch changes no result.
The instruction itself is checked in the sm90 PTX (tests/test_kernel_pdl.py); its effect on step
time is measured on a GPU (benchmarks/gpu_s9_session.sh)."""
from __future__ import annotations

import pytest
import torch

from model.config import medium
from model.ffn import MLP
from model.kernels import l2_prefetch


def test_regions_follow_the_weights_in_order_within_the_budget():
    a = torch.empty(1000, dtype=torch.bfloat16)  # 2000 bytes
    b = torch.empty(3000, dtype=torch.float8_e4m3fn)  # 3000 bytes
    c = torch.empty(64, dtype=torch.float32)  # 256 bytes
    assert l2_prefetch.regions([a, b, c], budget=1 << 20) == [(a.data_ptr(), 2000 - 2000 % 16),
                                                             (b.data_ptr(), 3000 - 3000 % 16), (c.data_ptr(), 256)]
    cut = l2_prefetch.regions([a, b, c], budget=2500)  # a whole, b cut to a multiple of 16, c left out
    assert cut == [(a.data_ptr(), 2000), (b.data_ptr(), 496)]
    assert sum(n for _, n in cut) <= 2500 and all(n % 16 == 0 and p % 16 == 0 for p, n in cut)
    assert l2_prefetch.regions([a, b], budget=0) == []
    with pytest.raises(ValueError, match="contiguous"):
        l2_prefetch.regions([torch.empty(8, 8).T], budget=1 << 20)


def test_layer_weights_are_o_proj_then_the_mlp_or_the_shared_expert():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.o_proj = torch.nn.Linear(16, 16, bias=False)

    class MoE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.shared_expert = MLP(16, 32)

    attn, mlp, moe = Attn(), MLP(16, 32), MoE()
    assert [w is v for w, v in zip(l2_prefetch.layer_weights(attn, mlp),
                                   (attn.o_proj.weight, mlp.gate_up_proj.weight, mlp.down_proj.weight))] == [True] * 3
    shared = moe.shared_expert
    assert [w is v for w, v in zip(l2_prefetch.layer_weights(attn, moe),
                                   (attn.o_proj.weight, shared.gate_up_proj.weight, shared.down_proj.weight))] == [True] * 3


def test_no_table_off_a_hopper_gpu():
    """CPU tensors (and Triton's interpreter) never prefetch: no table, so the kernels take no argument."""
    attn = torch.nn.Linear(4, 4)
    assert l2_prefetch.table(attn, [torch.empty(64)]) is None and not hasattr(attn, "_l2_prefetch_table")


@pytest.mark.parametrize("value,budget", [("0", 0), ("1.5", 3 << 19), ("24", 24 << 20)])
def test_budget_from_the_environment(monkeypatch, value, budget):
    monkeypatch.setenv("DGX_EMU_L2_PREFETCH_MB", value)
    assert l2_prefetch._budget_from_env() == budget
    for bad in ("lots", "-1"):
        monkeypatch.setenv("DGX_EMU_L2_PREFETCH_MB", bad)
        with pytest.raises(ValueError, match="DGX_EMU_L2_PREFETCH_MB"):
            l2_prefetch._budget_from_env()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the prefetch instruction runs on a Hopper GPU only")
def test_gpu_prefetching_attention_gives_the_same_bits():
    """rope_decode_attention with a table of real weights == without one (a prefetch moves no data the
    kernel computes with), and the table is built once per owner and reused."""
    from model.kernels import decode_attention
    if not l2_prefetch.supported(torch.empty(1, device="cuda")):
        pytest.skip("needs an sm90+ GPU and a non-zero budget")
    cfg = medium()
    gen = torch.Generator("cuda").manual_seed(11)
    heads, kv_heads, dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    qkv = torch.randn(1, 1, (heads + 2 * kv_heads) * dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    weights = [torch.randn(4096, 2048, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3)]
    owner = torch.nn.Linear(1, 1)
    table = l2_prefetch.table(owner, weights)
    assert table is l2_prefetch.table(owner, weights) and table.shape[1] == 2
    outs = []
    for prefetch in (None, table):
        k_cache = torch.randn(1, kv_heads, 1024, dim, device="cuda", generator=torch.Generator("cuda").manual_seed(3),
                              dtype=torch.bfloat16)
        v_cache = k_cache.flip(2).contiguous()
        start = torch.tensor([511], device="cuda")
        outs.append(decode_attention.rope_decode_attention(
            qkv, start[:, None], start, k_cache, v_cache, n_heads=heads, n_kv_heads=kv_heads, head_dim=dim,
            inv_freq=torch.ones(dim // 2, device="cuda"), use_rope=True, use_qk_norm=False, eps=1e-5,
            temperature=(8192.0, 0.1), scale=dim ** -0.5, chunk_size=8192, l2_prefetch=prefetch))
    assert torch.equal(outs[0], outs[1])
