"""The launch plans of a speculative step's EAGLE-3 parts: the draft's forwards, the draft's picks
of its next tokens, and the step they make with the target's verification, for the shape-only walk
(workers/emulate.py estimate_spec_step) and the virtual clock of real runs (workers/virtual_clock.py).

Why: a speculative step is not the target's forward alone. Per step (workers/speculative.py) the
draft picks the root's children, runs one forward per further depth (a chain's nodes so far, or a
tree's frontier, re-run under their ancestor mask) and picks again after each; the target verifies
root + nodes in ONE forward and picks at every node; the draft's catch-up reads the accepted rows.
At batch 1 those draft forwards are a dozen small launches each, as many as a third of the step,
so the clock of `generate --emulate-node` and the walk of `dgx-emu emulate --draft-len` must both
cost them, from the same plans, or they would disagree.

  draft forward, fused (rows <= fast_path.MAX_TOKENS and model/eagle3_fast_path.takes the draft):
    fc GEMV (target features only); at one rank the prologue gathers the embedding itself, at
    several the vocab-parallel embedding's torch ops and, with features, the concat of the two
    partial sums, then ONE all-reduce of both; the prologue kernel (norms, concat, positions,
    lengths); QKV GEMV over the 2H-wide input; ONE attention kernel (RoPE, KV write, split-KV with
    the step mask, merge where it fuses); o_proj GEMV; AllReduce + add + RMSNorm; FC13 + SwiGLU GEMV;
    FC2 GEMV; AllReduce + add + RMSNorm; the gather of the logit rows; the LM head GEMV over those
    rows; the draft vocabulary's padding mask (the last rank's)
  draft forward, torch ops (a prompt's catch-up): the same GEMVs, the embedding and norms as
    torch ops, attention unfused (costed as launch_plan costs the target's torch step)
  draft pick: model/draft_tree.py's draft_top1 / draft_topk over this rank's slice, at several
    ranks their all-gather of (value, id, logsumexp) per row and the merge, then the draft -> target
    id gather (the counts below are read off those lines, not yet counted under the interpreter)

The verification is the target's own plan (launch_plan: embed, layers at N + 1 tokens a row, the
LM head over every row, the pick of every row: head_plan(verify=True)). Not costed, in the walk
or the clock: the acceptance and commit glue (model/spec_verdict.py) and the tree bookkeeping
between the forwards (a few elementwise launches a step inside the GPU's one-graph step).
"""
from __future__ import annotations

from types import SimpleNamespace

from model import fast_path
from workers.cost_model import FP8, Collective, CostModel, PlanItem
from workers.launch_plan import RMSNORM_TORCH_OPS, SHARDED_EMBED_OPS, merge_fuses, norm_collective

# torch ops of model/draft_tree.py's picks, beside the top-k itself (one launch, "topk")
TOPK_LOCAL_OPS = (1, 2)  # draft_topk at one rank: logsumexp (a row reduce) | subtract, clamp
TOPK_PACK_OPS = 3  # draft_topk at several ranks before its all-gather: ids + start, float, the concat
TOPK_MERGE_OPS = (1, 4)  # after it: logsumexp over the ranks | permute copies, subtract + clamp, gather


def draft_fused(draft, rows: int) -> bool:
    """Does a draft forward of `rows` rows (batch x tokens) run on the fused kernels on the GPU?
    fast_path's size test and eagle3_fast_path.takes (the draft's shapes and dtypes; its cache has
    the weights' dtype: Eagle3Draft.new_cache), as Eagle3Draft.forward asks them."""
    if not fast_path.fits(rows):
        return False
    try:
        from model import eagle3_fast_path
    except ImportError:  # no Triton on this host: the GPU's path is still the fused one
        return True
    return eagle3_fast_path.takes(draft, SimpleNamespace(dtype=draft.fc.weight.dtype))


def _attention(cost: CostModel, draft, batch: int, tokens: int, keys: int, fused: bool) -> list:
    attn, kv = draft.midlayer.self_attn, draft.fc.weight.element_size()
    shape = SimpleNamespace(n_heads_per_rank=attn.hq, n_kv_heads_per_rank=attn.hkv, head_dim=attn.head_dim)
    one_launch = fused and merge_fuses(cost, shape, batch, tokens, keys, kv)
    return cost.attention("draft attention", "draft", tokens, keys, attn.hq, attn.hkv, attn.head_dim, kv,
                          fused=one_launch)


def _embed(cost: CostModel, draft, rows: int, features: bool, fused: bool) -> list[PlanItem]:
    """fc and the embedding up to the prologue (fused) or the norms (torch): at one rank on the
    kernels the prologue gathers the embedding; elsewhere Eagle3Draft.embed_and_feature's one
    all-reduce completes both partial sums (a CPU run's torch path makes it at one rank too: optional
    there, where it costs nothing)."""
    hidden, act = draft.cfg.hidden_size, draft.fc.weight.element_size()
    fc = [cost.linear("draft fc", "draft", draft.fc, rows)] if features else []
    width = 2 * hidden if features else hidden
    if fused and cost.world == 1 and draft.target.embed.owns_every_id:
        return fc + [Collective("all_reduce", "draft embedding + fc all-reduce", "draft", rows * width * act,
                                optional=True)]
    embed = [cost.kernel("draft embedding", "draft", "gather")]
    if not draft.target.embed.owns_every_id:
        embed.append(cost.kernel("draft embedding mask", "draft", "elementwise", SHARDED_EMBED_OPS))
    concat = [cost.kernel("draft embedding + fc concat", "draft", "copy")] if features else []
    return embed + fc + concat + [Collective("all_reduce", "draft embedding + fc all-reduce", "draft",
                                             rows * width * act)]


def _torch_norms(cost: CostModel) -> list[PlanItem]:
    """hidden_norm and input_layernorm as collectives.communicator.rms_norm's ops, and their concat."""
    before, after = RMSNORM_TORCH_OPS
    one = [cost.kernel("draft rmsnorm", "draft", "elementwise", before),
           cost.kernel("draft rmsnorm mean", "draft", "row_reduce"),
           cost.kernel("draft rmsnorm scale", "draft", "elementwise", after)]
    return one + one + [cost.kernel("draft norms concat", "draft", "copy")]


def draft_forward_plan(cost: CostModel, draft, batch: int, tokens: int, keys: int, features: bool,
                       logit_rows: int) -> list[PlanItem]:
    """One Eagle3Draft forward of `tokens` new tokens per row: keys, the keys its attention reads
    summed over the rows (each row its cache and its new tokens); features: fed the target's
    features (the catch-up) rather than its own hidden states (a depth); logit_rows: rows per batch
    row whose logits it computes."""
    rows, hidden, act = batch * tokens, draft.cfg.hidden_size, draft.fc.weight.element_size()
    fused = draft_fused(draft, rows)
    layer, message = draft.midlayer, rows * hidden * act
    plan = _embed(cost, draft, rows, features, fused)
    plan += [cost.kernel("draft prologue", "draft", "add_rmsnorm")] if fused else _torch_norms(cost)
    plan += [cost.linear("draft qkv_proj", "draft", layer.self_attn.qkv_proj, rows),
             *_attention(cost, draft, batch, tokens, keys, fused),
             cost.linear("draft o_proj", "draft", layer.self_attn.o_proj, rows),
             *norm_collective(cost, "draft attention all-reduce", "draft", message),
             cost.linear("draft fc13 + swiglu", "draft", layer.mlp.gate_up_proj, rows),
             cost.linear("draft fc2", "draft", layer.mlp.down_proj, rows),
             *norm_collective(cost, "draft mlp all-reduce", "draft", message),
             cost.kernel("draft logit rows", "draft", "elementwise")]
    head, head_rows = draft.lm_head_weight(), batch * logit_rows
    plan.append(cost.gemv("draft lm head", "draft", head.numel() * head.element_size(), head.dtype == FP8,
                          head_rows, 2.0 * head_rows * head.numel()))
    if draft.shard.vocab_valid_per_rank < draft.shard.vocab_per_rank:
        plan.append(cost.kernel("draft vocab padding", "draft", "elementwise"))
    return plan


def draft_pick_plan(cost: CostModel, draft, rows: int, top_k: int) -> list[PlanItem]:
    """The draft's choice over `rows` rows of its logits: a chain's top-1 (draft_top1) or a tree's
    top_k with log-probabilities (draft_topk), then their target ids (Eagle3Draft.to_target_ids)."""
    plan: list[PlanItem] = []
    if draft.fc.weight.element_size() != 4:
        plan.append(cost.kernel("draft logits to fp32", "draft", "elementwise"))  # draft_tree._fp32
    target_ids = cost.kernel("draft target ids", "draft", "gather")
    if cost.world == 1 and top_k == 1:
        return plan + [cost.kernel("draft top-1", "draft", "topk"), target_ids]
    reduce, after = TOPK_LOCAL_OPS
    plan += [cost.kernel("draft logsumexp", "draft", "row_reduce", reduce), cost.kernel("draft top-k", "draft", "topk")]
    if cost.world == 1:
        return plan + [cost.kernel("draft log-probabilities", "draft", "elementwise", after), target_ids]
    merge_reduce, merge_after = TOPK_MERGE_OPS
    k = min(top_k, draft.shard.vocab_per_rank)
    return plan + [cost.kernel("draft top-k pack", "draft", "elementwise", TOPK_PACK_OPS),
                   Collective("all_gather", "draft top-k all-gather", "draft", rows * (2 * k + 1) * 4),
                   cost.kernel("draft top-k logsumexp", "draft", "row_reduce", merge_reduce),
                   cost.kernel("draft top-k merge", "draft", "topk"),
                   cost.kernel("draft top-k scores", "draft", "elementwise", merge_after), target_ids]


def catch_up_plan(cost: CostModel, draft, batch: int, width: int, keys: int) -> list[PlanItem]:
    """The draft's catch-up: `width` rows a batch row with the target's features, one row's logits."""
    return draft_forward_plan(cost, draft, batch, width, keys, features=True, logit_rows=1)


def grow_plan(cost: CostModel, draft, batch: int, shape: tuple[int, int, int], context: int) -> list[PlanItem]:
    """Growing a chain or tree of shape (top_k, depth, tokens) (model/draft_tree.py TreeGrower): the
    root's pick, then per further depth the (depth - 1) x top_k nodes so far through the draft (each
    row reading its `context` committed keys and those nodes) and the pick of the frontier's children."""
    k, depth, _ = shape
    plan = draft_pick_plan(cost, draft, batch, k)
    for d in range(1, depth):
        nodes = d * k
        plan += draft_forward_plan(cost, draft, batch, nodes, batch * (context + nodes), features=False, logit_rows=k)
        plan += draft_pick_plan(cost, draft, batch * k, k)
    return plan
