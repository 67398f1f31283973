"""SpecConfig: how speculative decoding runs, and which target layers feed the EAGLE-3 draft.

EAGLE-3 reads the residual stream of three target layers (low, mid, high). Engines number those
layers two ways, and an off-by-one between them collapses acceptance, so the convention is part
of the config rather than a comment:
  * "output": id i is the residual stream AFTER layer i (TensorRT-LLM, ModelOpt, SpecForge, and
    what `Llama4.forward(aux_layers=...)` returns). Maverick's NVIDIA draft: (1, 23, 44).
  * "input": id i is the residual stream ENTERING layer i, i.e. the output of layer i - 1
    (SafeAILab's reference code). Input id 0 would be the embedding output, which no draft uses.
When neither the run nor the draft checkpoint names layers, the reference rule applies: the
inputs of layers 2, N//2 and N-3, i.e. the outputs of layers 1, N//2 - 1 and N - 4.

Drafting is a chain of `draft_len` tokens (TensorRT-LLM's min-latency choice) or, with
`tree=True`, an EAGLE-2 dynamic tree: every depth keeps the `top_k` best nodes by cumulative
draft log-probability, expands each into `top_k` children, and after `depth` levels the best
`tree_tokens` nodes are verified. A chain is the tree with top_k=1 and depth=tokens=draft_len,
and the decoder treats it exactly so.
"""
from __future__ import annotations

from dataclasses import dataclass

from model.config import ConfigError

CONVENTIONS = ("output", "input")


def reference_layer_ids(n_layers: int) -> tuple[int, int, int]:
    """SafeAILab's default in the output convention: outputs of layers 1, N//2 - 1, N - 4."""
    if n_layers < 4:
        raise ConfigError(f"the EAGLE-3 reference layer rule needs a target of >= 4 layers, this one has {n_layers}; "
                          "name the layers explicitly")
    return (1, n_layers // 2 - 1, n_layers - 4)


def to_output_ids(ids: tuple[int, ...], convention: str, n_layers: int) -> tuple[int, ...]:
    """Layer ids in `convention` -> the output convention, checked against a target of n_layers."""
    if convention not in CONVENTIONS:
        raise ConfigError(f"layer id convention must be one of {CONVENTIONS}, got {convention!r}")
    shift = 0 if convention == "output" else 1
    out = tuple(i - shift for i in ids)
    for given, layer in zip(ids, out):
        if layer < 0:
            raise ConfigError(f"EAGLE-3 layer id {given} in the input convention is the embedding output, "
                              "which the target does not expose as a feature")
        if layer >= n_layers:
            raise ConfigError(f"EAGLE-3 layer id {given} ({convention} convention) is outside the target's "
                              f"{n_layers} layers")
    return out


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding for one batch. Validated when made; see the module docstring."""

    draft_len: int = 3  # chain: tokens drafted per verification step
    tree: bool = False  # True: EAGLE-2 dynamic tree with the three knobs below
    top_k: int = 4
    depth: int = 5
    tree_tokens: int = 8  # nodes verified per step, the root (last accepted token) not counted
    layer_ids: tuple[int, ...] | None = None  # None: the draft checkpoint's, else the reference rule
    layer_convention: str = "output"

    def __post_init__(self) -> None:
        for name in ("draft_len", "top_k", "depth", "tree_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"speculative {name} must be an integer >= 1, got {value!r}")
        if self.tree and self.tree_tokens > self.max_tree_candidates:
            raise ConfigError(f"tree_tokens ({self.tree_tokens}) exceeds the {self.max_tree_candidates} candidates "
                              f"a tree of top_k {self.top_k} and depth {self.depth} produces")
        if self.layer_convention not in CONVENTIONS:
            raise ConfigError(f"layer_convention must be one of {CONVENTIONS}, got {self.layer_convention!r}")
        if self.layer_ids is not None:
            ids = tuple(self.layer_ids)  # msgpack hands back a list
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ConfigError(f"layer_ids must be non-negative integers, got {self.layer_ids!r}")
            object.__setattr__(self, "layer_ids", ids)

    @property
    def max_tree_candidates(self) -> int:
        return self.top_k + (self.depth - 1) * self.top_k ** 2

    @property
    def shape(self) -> tuple[int, int, int]:
        """(top_k, depth, tokens) of the draft tree; a chain is (1, draft_len, draft_len)."""
        if self.tree:
            return self.top_k, self.depth, self.tree_tokens
        return 1, self.draft_len, self.draft_len

    def describe(self) -> str:
        k, depth, tokens = self.shape
        return f"tree(top_k={k}, depth={depth}, tokens={tokens})" if self.tree else f"chain({self.draft_len})"


def resolve_layer_ids(spec: SpecConfig, n_layers: int, checkpoint_ids: tuple[int, ...] | None) -> tuple[int, ...]:
    """The target layers (output convention) whose outputs feed the draft: the run's choice, else
    the checkpoint's (always output convention), else the reference rule."""
    if spec.layer_ids is not None:
        return to_output_ids(spec.layer_ids, spec.layer_convention, n_layers)
    if checkpoint_ids is not None:
        return to_output_ids(checkpoint_ids, "output", n_layers)
    return reference_layer_ids(n_layers)
