"""Which drafted tokens the target keeps: greedy acceptance and lossless speculative sampling.

Both walk the draft tree from the root (a chain is a tree with one child per node) and return the
accepted path plus one token from the target itself, so every verification step yields >= 1 token.

  greedy   a child is kept iff its token is the target's argmax at its parent; the extra token is
           the target's argmax where the walk stops. Output = plain greedy decoding, token for token.
  sampling at a node with target distribution p, the children are tried in order. A child drawn
           from q is kept with probability min(1, p(x)/q(x)); on rejection p becomes
           norm(max(0, p - q)) and the next child is tried (Leviathan et al. 2023; SpecInfer for
           several children). A top-k pick is a draw from the point mass on its token, so it is
           kept with probability p(x) and rejection zeroes p(x). When every child is rejected, or
           the node is a leaf, the extra token is drawn from what is left of p. The output is
           distributed exactly as sampling from the target.

`p` is the target distribution after the request's temperature / top-k / top-p, computed by the
caller from gathered logits. Random draws use the request's generator, identical on every rank,
so all ranks accept the same tokens without talking.
"""
from __future__ import annotations

import torch


def _children(parents: list[int]) -> dict[int, list[int]]:
    """parents[i] = verification row of node row i+1's parent. Returns row -> child rows, in order."""
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(parents, start=1):
        children.setdefault(parent, []).append(node)
    return children


def accept_greedy(target_argmax: list[int], tokens: list[int], parents: list[int]) -> tuple[list[int], int]:
    """target_argmax: the target's argmax at rows 0..N (row 0 = root); tokens/parents: of nodes 1..N.
    Returns (accepted node rows, root to leaf; the target's token after them)."""
    children, row, path = _children(parents), 0, []
    while True:
        best = target_argmax[row]
        row = next((c for c in children.get(row, ()) if tokens[c - 1] == best), None)
        if row is None:
            return path, best
        path.append(row)


def residual_distribution(p: torch.Tensor, q: torch.Tensor | None, token: int) -> torch.Tensor:
    """What is left of p after rejecting `token` drawn from q (None: the point mass on `token`)."""
    if q is None:
        left = p.clone()
        left[token] = 0.0
    else:
        left = (p - q).clamp(min=0.0)
    total = left.sum()
    return left / total if total > 0 else p  # total 0 only if p == q, where rejection cannot happen


def accept_sampled(target_probs: torch.Tensor, tokens: list[int], parents: list[int],
                   proposals: torch.Tensor | None, generator: torch.Generator) -> tuple[list[int], int]:
    """target_probs: (N+1, V) p at every row; proposals: (N, V) the q each node was drawn from, or
    None for top-k picks. Returns (accepted node rows, the extra token)."""
    children, row, path = _children(parents), 0, []
    while True:
        p = target_probs[row]
        for child in children.get(row, ()):
            token = tokens[child - 1]
            q = proposals[child - 1] if proposals is not None else None
            keep = p[token] / q[token] if q is not None else p[token]
            if float(torch.rand((), generator=generator)) < float(keep):
                path.append(child)
                row = child
                break
            p = residual_distribution(p, q, token)
        else:
            return path, int(torch.multinomial(p, 1, generator=generator))
