"""The MoE decode kernels (model/kernels/moe_decode.py) against their torch references.

route_top1: ids and scores equal the reference (MoE.route's math with torch.argmax's tie rule)
and, without ties, MoE.route itself (torch.topk), for one expert block per row and for several
(the atomic (logit, id) reduction, whose per-row slots must be reset after every call), with ties
made on purpose (duplicated router rows; integer-valued bf16 inputs whose float32 sums are exact
in any order, so the bf16 logits and their ties are the same bits in the kernel and in torch).
dual_gate_up / dual_down: equal two linear_small_m references (and their sum), dense shared weight
+ gathered routed experts, shapes that differ between the two halves, FP8 with static and dynamic
activation scales (exactly quantizable activations: the interpreter's e4m3 cast truncates).
Outputs start as NaN, so an element no program writes fails the comparison.
"""
from __future__ import annotations

import pytest
import torch

from tests.numerics import poison_gemv_outputs, randn_on

pytest.importorskip("triton")

from model.kernels import moe_decode as md  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FP8 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    poison_gemv_outputs(monkeypatch)


def _randn(gen, *shape, dtype=torch.float32):
    return randn_on(DEVICE, gen, *shape, dtype=dtype)


def _route_module(weight: torch.Tensor):
    """MoE.route of model/ffn.py with this router weight (top_k = 1)."""
    from model.ffn import MoE
    block = MoE.__new__(MoE)
    torch.nn.Module.__init__(block)
    block.top_k = 1
    block.router = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device,
                                   dtype=weight.dtype)
    block.router.weight.data.copy_(weight)
    return block.route


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n_experts,hidden,block_e", [(16, 96, None), (12, 200, 4), (128, 64, 8), (5, 40, 1)])
def test_router_fp32_equals_moe_route(m, n_experts, hidden, block_e):
    gen = torch.Generator().manual_seed(m * 100 + n_experts)
    x, w = _randn(gen, m, hidden), _randn(gen, n_experts, hidden)
    ids, scores = md.route_top1(x, w, block_e=block_e)
    want_ids, want_scores = md.reference_route_top1(x, w)
    assert ids.dtype == torch.int32 and scores.dtype == x.dtype
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(scores, want_scores, rtol=1e-6, atol=1e-7)
    module_ids, module_scores = _route_module(w)(x)  # torch.topk: no ties among random float32 logits
    assert torch.equal(ids.long(), module_ids[:, 0])
    torch.testing.assert_close(scores, module_scores[:, 0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("block_e", [None, 2, 1])
def test_router_ties_go_to_the_lowest_id(block_e):
    """Duplicated router rows give equal logits: the lowest id wins, across blocks too."""
    gen = torch.Generator().manual_seed(7)
    w = _randn(gen, 8, 64)
    w[5], w[6] = w[2], w[2]  # experts 2, 5, 6 tie for every x
    x = _randn(gen, 16, 64)
    x[:8] = w[2] * 10  # rows whose best is surely expert 2's group
    ids, scores = md.route_top1(x, w, block_e=block_e)
    want_ids, want_scores = md.reference_route_top1(x, w)
    assert torch.equal(ids, want_ids)
    assert (ids[:8] == 2).all()
    torch.testing.assert_close(scores, want_scores, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("block_e", [None, 4])
def test_router_bf16_exact_sums_and_ties(block_e):
    """Integer-valued bf16 x and W: float32 sums exact in any order, bf16 logits rounded once, many
    ties among them; ids and scores are the reference's bits."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randint(-3, 4, (16, 64), generator=gen).to(torch.bfloat16).to(DEVICE)
    w = torch.randint(-2, 3, (16, 64), generator=gen).to(torch.bfloat16).to(DEVICE)
    ids, scores = md.route_top1(x, w, block_e=block_e)
    want_ids, want_scores = md.reference_route_top1(x, w)
    logits = (x.float() @ w.float().T).to(torch.bfloat16)
    assert (logits == logits.max(-1, keepdim=True).values).sum(-1).max() > 1, "the case has no ties"
    assert torch.equal(ids, want_ids)
    assert torch.equal(scores, want_scores)


def test_router_reduction_slots_are_reset():
    """The atomic path leaves its slots empty: a second call with other inputs is not biased by the first."""
    gen = torch.Generator().manual_seed(3)
    w = _randn(gen, 32, 48)
    for scale in (100.0, 1.0, -5.0):
        x = _randn(gen, 4, 48) * scale
        ids, _ = md.route_top1(x, w, block_e=4)
        assert torch.equal(ids, md.reference_route_top1(x, w)[0])
    key, count = md._scratch(x.device)
    assert (key == md.EMPTY_KEY).all() and (count == 0).all()


def _dense(gen, n, k, fp8=False):
    w = _randn(gen, n, k)
    if not fp8:
        return {"weight": w}
    scale = w.abs().amax(-1) / 448
    return {"weight": (w / scale[:, None]).to(FP8), "weight_scale": scale.float(), "act_quant": "token",
            "out_dtype": torch.float32}


def _experts(gen, e, n, k, fp8=False):
    w = _randn(gen, e, n, k)
    if not fp8:
        return {"weight": w}
    scale = w.abs().amax(-1) / 448  # (E, N)
    return {"weight": (w / scale[..., None]).to(FP8), "weight_scale": scale.float(), "act_quant": "token",
            "out_dtype": torch.float32}


def _close(got, want, rtol=1e-5):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert not torch.isnan(got).any(), "an output element was not written"
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


@pytest.mark.parametrize("m,i_shared,i_routed,hidden", [(1, 64, 64, 96), (3, 48, 80, 200), (16, 32, 32, 64)])
def test_pair_fp32(m, i_shared, i_routed, hidden):
    gen = torch.Generator().manual_seed(m + i_routed)
    x = _randn(gen, m, hidden)
    ids = torch.randint(0, 4, (m,), generator=gen).to(DEVICE)
    scores = torch.rand(m, generator=gen).to(DEVICE)
    fc13_s, fc13_r = _dense(gen, 2 * i_shared, hidden), _experts(gen, 4, 2 * i_routed, hidden)
    h_s, h_r = md.dual_gate_up(x, fc13_s, fc13_r, ids, scores)
    want_s, want_r = md.reference_dual_gate_up(x, fc13_s, fc13_r, ids, scores)
    _close(h_s, want_s)
    _close(h_r, want_r)
    fc2_s, fc2_r = _dense(gen, hidden, i_shared), _experts(gen, 4, hidden, i_routed)
    out = md.dual_down(h_s, h_r, fc2_s, fc2_r, ids.int())
    _close(out, md.reference_dual_down(h_s, h_r, fc2_s, fc2_r, ids))
    for cfg in ({"BLOCK_N": 16, "BLOCK_K": 32}, {"BLOCK_N": 4, "BLOCK_K": 64, "num_warps": 2}):  # tiles cut N, K
        _close(md.dual_down(h_s, h_r, fc2_s, fc2_r, ids, config=cfg), out)


def _exact_fp8_rows(gen, m, k, exps):
    q = (torch.randn(m, k, generator=gen) * 100).clamp(-448, 448).to(FP8).float()
    q[:, 0] = 448.0
    return (q * torch.tensor(exps, dtype=torch.float32).exp2()[:, None]).to(DEVICE)


@pytest.mark.parametrize("routed_static", [False, True])
def test_pair_fp8_exact_activations(routed_static):
    """FP8 halves: the shared one with a static input scale, the routed one per token or with a
    static scale per expert (the per-tensor scheme; fast_path passes Fp8Experts' (E,) input scales).
    Its input is x * score with power-of-two scores (and scales), so its quantization stays exact."""
    gen = torch.Generator().manual_seed(5)
    m, hidden, inter = 3, 96, 64
    x = _exact_fp8_rows(gen, m, hidden, [-6, -8, -5])
    ids = torch.tensor([2, 0, 2], device=DEVICE)
    scores = torch.tensor([0.5, 1.0, 0.25], device=DEVICE)
    per_expert = lambda exps: torch.tensor(exps, dtype=torch.float32).exp2().to(DEVICE)  # noqa: E731 (E,) scales
    fc13_s = {**_dense(gen, 2 * inter, hidden, fp8=True), "act_quant": torch.tensor(2.0 ** -8, device=DEVICE)}
    fc13_r = _experts(gen, 3, 2 * inter, hidden, fp8=True)
    if routed_static:  # expert 2 sees rows scaled to 2^-7 and 2^-7 of 448; expert 0 to 2^-8
        fc13_r["act_quant"] = per_expert([-8, -5, -7])
    h = md.dual_gate_up(x, fc13_s, fc13_r, ids, scores)
    for got, want in zip(h, md.reference_dual_gate_up(x, fc13_s, fc13_r, ids, scores)):
        _close(got, want)
    h_exact = _exact_fp8_rows(gen, m, inter, [-3, -4, -2]), _exact_fp8_rows(gen, m, inter, [-1, -7, -3])
    fc2_s, fc2_r = _dense(gen, hidden, inter, fp8=True), _experts(gen, 3, hidden, inter, fp8=True)
    if routed_static:  # rows of expert 2 reach 2^-1 and 2^-3 of 448: one scale of 2^-1 keeps both exact
        fc2_r["act_quant"] = per_expert([-7, -5, -1])
    _close(md.dual_down(*h_exact, fc2_s, fc2_r, ids), md.reference_dual_down(*h_exact, fc2_s, fc2_r, ids))


@pytest.mark.parametrize("m", [1, 3])
def test_pair_shared_input_quantized_by_its_producer(m):
    """shared_fp8 (x as the norm kernel quantized it) gives the bits of the shared half quantizing x itself;
    the routed half (x * score, its own scales) is untouched. Dynamic per-token scales on both halves."""
    from model.kernels.fp8_mma import prequantize
    gen = torch.Generator().manual_seed(m + 40)
    hidden, inter = 96, 64
    x = _exact_fp8_rows(gen, m, hidden, [-6, -8, -5][:m]).to(torch.bfloat16)
    ids = torch.tensor([2, 0, 2][:m], device=DEVICE)
    scores = torch.tensor([0.5, 1.0, 0.25][:m], device=DEVICE)
    fc13_s, fc13_r = _dense(gen, 2 * inter, hidden, fp8=True), _experts(gen, 3, 2 * inter, hidden, fp8=True)
    fc13_s["act_quant"], fc13_r["act_quant"] = "token", "token"
    want = md.dual_gate_up(x, fc13_s, fc13_r, ids, scores)
    for got, ref in zip(want, md.reference_dual_gate_up(x, fc13_s, fc13_r, ids, scores)):
        _close(got, ref)
    got = md.dual_gate_up(x, fc13_s, fc13_r, ids, scores, shared_fp8=prequantize(x, None, "token"))
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    with pytest.raises(ValueError, match="x_fp8 must be"):
        md.dual_gate_up(x, fc13_s, fc13_r, ids, scores, shared_fp8=(x, torch.ones(m, device=DEVICE)))


def test_bad_input_is_refused():
    gen = torch.Generator().manual_seed(1)
    x, w = _randn(gen, 2, 32), _randn(gen, 4, 32)
    with pytest.raises(ValueError, match="router weight"):
        md.route_top1(x, _randn(gen, 4, 31))
    with pytest.raises(ValueError, match="1 <= M <= 16"):
        md.route_top1(_randn(gen, 17, 32), w)
    with pytest.raises(ValueError, match="power of two"):
        md.route_top1(x, w, block_e=3)
    ids = torch.zeros(2, dtype=torch.long, device=DEVICE)
    shared, routed = _dense(gen, 16, 32), _experts(gen, 2, 16, 32)
    with pytest.raises(ValueError, match="same rows"):
        md.dual_down(x, x[:1], shared, routed, ids)
    with pytest.raises(ValueError, match="one output shape"):
        md.dual_down(x, _randn(gen, 2, 32), shared, _experts(gen, 2, 8, 32), ids)
    with pytest.raises(ValueError, match="K-contiguous"):
        md.dual_down(x, x, {"weight": _randn(gen, 32, 16).T}, routed, ids)
    assert not md.pair_applies(shared, None) and md.pair_applies(shared, routed)


gpu_only = pytest.mark.skipif(not CUDA, reason="realistic shapes and CUDA graphs need a GPU")


@gpu_only
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n_experts,hidden", [(16, 2048), (128, 5120)])
def test_gpu_router_realistic(m, n_experts, hidden):
    """bf16 at medium's and Maverick's router shapes. cuBLAS sums in another order, so where the
    two best logits are within a bf16 rounding the pick may differ: the chosen logit must then be
    the float32 maximum to that rounding, and the score its sigmoid."""
    gen = torch.Generator().manual_seed(m + n_experts)
    x = _randn(gen, m, hidden, dtype=torch.bfloat16)
    w = _randn(gen, n_experts, hidden, dtype=torch.bfloat16) * 0.02
    ids, scores = md.route_top1(x, w)
    exact = x.float() @ w.float().T  # (M, E)
    chosen = exact.gather(1, ids.long()[:, None])[:, 0]
    best = exact.max(-1).values
    assert (chosen >= best - best.abs() * 2 ** -7).all()
    # the logit rounded to bf16 (an ulp of |logit| <= ~4), then the score rounded to bf16
    torch.testing.assert_close(scores.float(), torch.sigmoid(chosen), rtol=0, atol=2 ** -6)


@gpu_only
def test_gpu_router_reduction_in_a_cuda_graph():
    """The atomic path replayed from a graph: every replay picks for its own input (slots reset)."""
    gen = torch.Generator().manual_seed(2)
    w = _randn(gen, 128, 1024, dtype=torch.float32)
    x = _randn(gen, 4, 1024)
    md.route_top1(x, w, block_e=8)  # first call: slots made outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            ids, scores = md.route_top1(x, w, block_e=8)
    torch.cuda.current_stream().wait_stream(stream)
    for seed in range(5):
        x.copy_(_randn(torch.Generator().manual_seed(seed), 4, 1024) * (seed - 2))
        graph.replay()
        want_ids, want_scores = md.reference_route_top1(x, w)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(scores, want_scores, rtol=1e-6, atol=1e-7)


@gpu_only
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_pair_medium_shapes(fp8):
    gen = torch.Generator().manual_seed(4)
    x = _randn(gen, 1, 2048, dtype=torch.bfloat16)
    ids, scores = torch.tensor([5], device=DEVICE), torch.rand(1, generator=gen).to(DEVICE)

    def bf16(args):
        return args if fp8 else {"weight": args["weight"].to(torch.bfloat16)}
    fc13_s, fc13_r = bf16(_dense(gen, 4096, 2048, fp8)), bf16(_experts(gen, 16, 4096, 2048, fp8))
    fc2_s, fc2_r = bf16(_dense(gen, 2048, 2048, fp8)), bf16(_experts(gen, 16, 2048, 2048, fp8))
    h = md.dual_gate_up(x, fc13_s, fc13_r, ids, scores)
    rtol = 2e-5 if fp8 else 2 ** -7  # FP8 outputs float32 here; bf16 rounds once at the end
    for got, want in zip(h, md.reference_dual_gate_up(x, fc13_s, fc13_r, ids, scores)):
        _close(got, want, rtol)
    h = tuple(t.to(torch.bfloat16) for t in h)
    _close(md.dual_down(*h, fc2_s, fc2_r, ids), md.reference_dual_down(*h, fc2_s, fc2_r, ids), rtol)


@pytest.mark.parametrize("cvt", ["bits", "words"])
def test_pair_fp8_conversion_variants(cvt):
    """The pair kernels with CVT 'bits' / 'words' (gemv_math.py): the reference's results."""
    gen = torch.Generator().manual_seed(9)
    m, hidden, inter = 2, 64, 32
    x = _exact_fp8_rows(gen, m, hidden, [-6, -8])
    ids, scores = torch.tensor([1, 0], device=DEVICE), torch.tensor([0.5, 1.0], device=DEVICE)
    fc13_s, fc13_r = _dense(gen, 2 * inter, hidden, fp8=True), _experts(gen, 2, 2 * inter, hidden, fp8=True)
    cfg = {"CVT": cvt, "BLOCK_K": 32}
    for got, want in zip(md.dual_gate_up(x, fc13_s, fc13_r, ids, scores, config=cfg),
                         md.reference_dual_gate_up(x, fc13_s, fc13_r, ids, scores)):
        _close(got, want)
    h = _exact_fp8_rows(gen, m, inter, [-3, -4]), _exact_fp8_rows(gen, m, inter, [-1, -7])
    fc2_s, fc2_r = _dense(gen, hidden, inter, fp8=True), _experts(gen, 2, hidden, inter, fp8=True)
    _close(md.dual_down(*h, fc2_s, fc2_r, ids, config=cfg), md.reference_dual_down(*h, fc2_s, fc2_r, ids))
    with pytest.raises(ValueError, match="FP8 weights only"):
        md.dual_down(*h, {"weight": _randn(gen, hidden, inter)}, {"weight": _randn(gen, 2, hidden, inter)}, ids,
                     config=cfg)


@pytest.mark.parametrize("m,fp8", [(1, False), (3, True), (16, False)])
def test_summed_pair_split_into_halves_gives_the_same_bits(monkeypatch, m, fp8):
    """dual_down with the shared and routed halves in programs of their own (SPLIT_SUM: the second of a tile's
    two to finish adds them) equals the one-program sum bit for bit in bf16 (float32 outputs: to an ulp, where a
    GPU contracts the one-program sum's last multiply and add into an FMA), and leaves its counters at zero."""
    gen = torch.Generator().manual_seed(60 + m)
    hidden, inter = 72, 64  # 72: the last tile of 8 rows is partial at BLOCK_N 16
    ids = torch.randint(0, 3, (m,), generator=gen).to(DEVICE)
    if fp8:
        h = tuple(_exact_fp8_rows(gen, m, inter, [(i % 3) - 4 for i in range(m)]).to(torch.bfloat16) for _ in range(2))
    else:
        h = tuple(_randn(gen, m, inter).to(torch.bfloat16) for _ in range(2))
    fc2_s, fc2_r = _dense(gen, hidden, inter, fp8), _experts(gen, 3, hidden, inter, fp8)
    if not fp8:
        fc2_s, fc2_r = ({"weight": d["weight"].to(torch.bfloat16)} for d in (fc2_s, fc2_r))
    monkeypatch.setattr(md, "SPLIT_SUM", "0")
    one = md.dual_down(*h, fc2_s, fc2_r, ids)
    monkeypatch.setattr(md, "SPLIT_SUM", "1")
    split = md.dual_down(*h, fc2_s, fc2_r, ids)
    assert not torch.isnan(split).any()
    if split.dtype == torch.bfloat16 or not CUDA:
        assert torch.equal(split, one)
    else:
        torch.testing.assert_close(split, one, rtol=2 ** -22, atol=2 ** -22 * float(one.abs().max()))
    _close(split, md.reference_dual_down(*h, fc2_s, fc2_r, ids), 2 ** -7)
    assert not any(c.any() for c in md._pair_counters.by_device.values())


def test_summed_pair_splits_by_default_at_one_row_of_fp8(monkeypatch):
    """SPLIT_SUM "auto" (the default): the split sum at one row of FP8 weights only, where it was measured faster."""
    gen = torch.Generator().manual_seed(77)
    calls = []
    original = md._pair_counters
    monkeypatch.setattr(md, "_pair_counters", lambda device, n: calls.append(n) or original(device, n))
    monkeypatch.setattr(md, "SPLIT_SUM", "auto")
    for m, fp8, split in [(1, True, True), (3, True, False), (1, False, False)]:
        h = tuple(_exact_fp8_rows(gen, m, 64, [-4] * m).to(torch.bfloat16) for _ in range(2))
        fc2_s, fc2_r = _dense(gen, 48, 64, fp8), _experts(gen, 3, 48, 64, fp8)
        before = len(calls)
        md.dual_down(*h, fc2_s, fc2_r, torch.zeros(m, dtype=torch.long, device=DEVICE))
        assert (len(calls) > before) == split, (m, fp8)
