"""Each static speculative step (workers/spec_graphs.py) against the eager forward it stands for,
on fresh random inputs over caches filled alike: the verify step's logits, aux features and
argmax (a random tree mask, so chains and trees alike), the padded catch-up's root logits and
hidden state, and every per-depth draft step's logits and hidden states, with the caches'
lengths left as the eager path leaves them. CPU tests run it on StaticSteps that do not capture
(tests/test_spec_graph_loop.py); the GPU test on captured graphs (tests/test_spec_cuda_graphs.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.draft_tree import Tree, TreeGrower, ancestor_mask
from model.sampling import SamplingParams
from model.spec import SpecConfig
from workers.spec_graphs import SpecGraphs
from workers.speculative import SpecDecoder
from workers.tracing import NullRecorder

SLOTS = 256


def random_parents(batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """(B, n) a random tree's parent rows among 0..n (0: the root), parents before children."""
    return torch.stack([torch.randint(0, i + 1, (batch,), generator=gen) for i in range(n)], dim=1)


def depths_of(parents: torch.Tensor) -> torch.Tensor:
    """(B, n) depth of each node (1: a child of the root) for parent rows as random_parents gives."""
    depth = torch.zeros(parents.shape[0], parents.shape[1] + 1, dtype=torch.long)
    for i in range(parents.shape[1]):
        depth[:, i + 1] = depth.gather(1, parents[:, i:i + 1])[:, 0] + 1
    return depth[:, 1:]


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _same_argmax(got: torch.Tensor, logits: torch.Tensor, tol: float) -> None:
    """got (..): ids; logits (.., V): the eager step's. Equal wherever the top two are apart by > 2 tol."""
    top2 = logits.float().topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * tol
    assert torch.equal(got[clear], logits.argmax(-1)[clear]), "the graph's argmax differs from the eager step's"
    assert clear.float().mean() > 0.5, "too many near-ties for the comparison to mean anything"


def check_static_steps(model, draft, spec: SpecConfig, capture_it: bool, tol: float, seed: int = 0) -> None:
    device = model.embed_tokens.weight.device
    decoder = SpecDecoder(model, draft, spec, NullRecorder())
    gen = torch.Generator().manual_seed(seed)
    vocab, batch = model.cfg.vocab_size, 2
    lengths = torch.randint(5, 40, (batch,), generator=gen)
    graphs = SpecGraphs(model, draft, None, batch, SLOTS, spec.shape, decoder.layer_ids, capture_it)
    eager_cache, eager_draft_cache = model.new_cache(batch, SLOTS), draft.new_cache(batch, SLOTS)
    prompt = torch.randint(3, vocab, (batch, int(lengths.max())), generator=gen).to(device)
    lengths = lengths.to(device)
    for cache, draft_cache in ((graphs.cache, graphs.draft_cache), (eager_cache, eager_draft_cache)):
        out = model(prompt, cache, n_new=lengths, aux_layers=decoder.aux_set)
        draft(prompt, draft_cache, target_features=decoder.features(out.aux_hidden), n_new=lengths)
    k, depth, n_tokens = spec.shape
    rows = torch.arange(batch, device=device)

    # verify: root + n_tokens nodes of a random tree
    parents = random_parents(batch, n_tokens, gen)
    tree = Tree(tokens=torch.randint(3, vocab, (batch, n_tokens), generator=gen).to(device),
                parents=parents.to(device), depths=depths_of(parents).to(device))
    start = eager_cache.lengths.clone()
    tokens, positions, mask = tree.verify_inputs(prompt[:, 0], start)
    n_new = torch.full((batch,), n_tokens + 1, device=device)
    logits, features, argmax = graphs.verify(tokens=tokens, positions=positions, mask=mask, n_new=n_new)
    want = model(tokens, eager_cache, n_new=n_new, positions=positions, step_mask=mask, aux_layers=decoder.aux_set)
    _close(logits, want.logits, tol, "verify logits")
    _close(features, decoder.features(want.aux_hidden), tol, "verify features")
    _same_argmax(argmax, want.logits, tol)
    assert torch.equal(graphs.cache.lengths, eager_cache.lengths)

    # catch-up: a pending block narrower than the graph's (it is padded), rows of their own length
    width = depth
    pending = torch.randint(3, vocab, (batch, width), generator=gen).to(device)
    target_features = torch.randn(batch, width, features.shape[-1], generator=gen).to(device, features.dtype)
    pending_n = torch.tensor([width, 1], device=device)
    last = pending_n - 1
    root_logits, root_hidden = graphs.catch_up(tokens=F.pad(pending, (0, graphs.width - width)),
                                               features=F.pad(target_features, (0, 0, 0, graphs.width - width)),
                                               n_new=pending_n, last=last)
    want = draft(pending, eager_draft_cache, target_features=target_features, n_new=pending_n, logit_rows=last[:, None])
    _close(root_logits, want.logits[:, 0], tol, "catch-up logits")
    _close(root_hidden, want.hidden[rows, last], tol, "catch-up hidden")
    assert torch.equal(graphs.draft_cache.lengths, eager_draft_cache.lengths)

    # the draft steps of every depth: P nodes drafted so far, a random forest under the root
    start = eager_draft_cache.lengths.clone()
    grower = TreeGrower(draft, eager_draft_cache, spec.shape, [SamplingParams()] * batch, [None] * batch)
    for nodes, step in graphs.nodes.items():
        parent_rows = random_parents(batch, nodes, gen) - 1  # -1: the root
        node_tokens = torch.randint(3, vocab, (batch, nodes), generator=gen).to(device)
        hidden = torch.randn(batch, nodes, root_hidden.shape[-1], generator=gen).to(device, root_hidden.dtype)
        node_mask = ancestor_mask((parent_rows + 1).to(device))[:, 1:, 1:]
        node_positions = start[:, None] - 1 + depths_of(parent_rows + 1).to(device)
        got = step(tokens=node_tokens, positions=node_positions, hidden=hidden, mask=node_mask)
        want = grower._run_draft(node_tokens, hidden, node_positions, node_mask, start)
        _close(got.logits, want.logits, tol, f"draft step over {nodes} nodes: logits")
        _close(got.hidden, want.hidden, tol, f"draft step over {nodes} nodes: hidden")
        assert torch.equal(graphs.draft_cache.lengths, start) and torch.equal(eager_draft_cache.lengths, start)
