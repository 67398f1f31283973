"""Shard math: the only place that knows how a rank's slice of each tensor is cut.

`ShardLayout` turns (ModelConfig, ParallelConfig) into named per-rank sizes and offsets.
Modules are built at these shapes; the checkpoint table asks it for slices. Invalid layouts
(heads or experts that do not divide, KV heads that cannot be grouped) fail here, when the
layout is made, so a launcher can refuse them before any actor starts.

Layout (tensor parallel, as in TensorRT-LLM's min-latency Maverick setup):
  * attention: query heads split evenly; KV heads split when n_kv_heads >= world_size, else each
    rank keeps the one KV head its query heads read (replicated across that group); o_proj is
    row-parallel and returns a partial sum.
  * dense MLP and shared expert: gate/up column-parallel, down row-parallel (partial sums).
  * MoE "tp": every expert's intermediate dim split (no all-to-all); "ep": whole experts per rank.
  * vocabulary: embedding rows and LM-head rows split; the vocab is padded up to a multiple of
    the world size, the pad rows are zero and their logits are masked. With replicate_embedding
    every rank holds the whole embedding (its step starts without an all-reduce); the LM head
    stays split.
"""
from __future__ import annotations

from dataclasses import dataclass

from model.config import ConfigError, ModelConfig, ParallelConfig, ceil_div


@dataclass(frozen=True)
class ShardLayout:
    model: ModelConfig
    parallel: ParallelConfig

    def __post_init__(self) -> None:
        m, world = self.model, self.parallel.world_size
        if m.n_heads % world:
            raise ConfigError(f"num_attention_heads ({m.n_heads}) is not divisible by world size {world}")
        if m.n_kv_heads >= world and m.n_kv_heads % world:
            raise ConfigError(f"num_key_value_heads ({m.n_kv_heads}) is not divisible by world size {world}")
        if m.n_kv_heads < world and world % m.n_kv_heads:
            raise ConfigError(f"world size {world} is not a multiple of num_key_value_heads ({m.n_kv_heads}), "
                              "so KV heads cannot be replicated evenly")
        if m.intermediate_size_mlp % world and any(not m.is_moe(i) for i in range(m.n_layers)):
            raise ConfigError(f"intermediate_size_mlp ({m.intermediate_size_mlp}) is not divisible by world size {world}")
        if self.parallel.replicate_embedding and m.tie_word_embeddings and world > 1:
            raise ConfigError("a replicated embedding needs an untied LM head (tie_word_embeddings is true: the "
                              "LM head is the embedding, whose vocab slices the ranks read)")
        if m.moe_layers:
            if m.intermediate_size % world:
                raise ConfigError(f"intermediate_size ({m.intermediate_size}) is not divisible by world size {world}")
            if self.parallel.moe_mode == "ep" and m.n_experts % world:
                raise ConfigError(f"num_local_experts ({m.n_experts}) is not divisible by world size {world} "
                                  "(required by --moe ep)")

    # --- attention -------------------------------------------------------------------------
    @property
    def n_heads_per_rank(self) -> int:
        return self.model.n_heads // self.parallel.world_size

    @property
    def n_kv_heads_per_rank(self) -> int:
        return max(1, self.model.n_kv_heads // self.parallel.world_size)

    @property
    def head_start(self) -> int:
        return self.parallel.rank * self.n_heads_per_rank

    @property
    def kv_head_start(self) -> int:
        """First KV head this rank holds: the group of its first query head."""
        group = self.model.n_heads // self.model.n_kv_heads  # query heads per KV head
        return self.head_start // group

    # --- feed-forward ----------------------------------------------------------------------
    @property
    def mlp_intermediate_per_rank(self) -> int:
        return self.model.intermediate_size_mlp // self.parallel.world_size

    @property
    def shared_intermediate_per_rank(self) -> int:
        return self.model.intermediate_size // self.parallel.world_size

    @property
    def expert_parallel(self) -> bool:
        return self.parallel.moe_mode == "ep"

    @property
    def experts_per_rank(self) -> int:
        world = self.parallel.world_size if self.expert_parallel else 1
        return self.model.n_experts // world

    @property
    def expert_start(self) -> int:
        return self.parallel.rank * self.experts_per_rank if self.expert_parallel else 0

    @property
    def expert_intermediate_per_rank(self) -> int:
        """Intermediate width of each expert held here: split in "tp", whole in "ep"."""
        world = 1 if self.expert_parallel else self.parallel.world_size
        return self.model.intermediate_size // world

    # --- row-parallel inputs: where this rank's input columns start in the unsharded layer -----
    # (FP8 block scales are cut on global 128-column boundaries, so a rank needs its offset.)
    @property
    def o_proj_in_start(self) -> int:
        return self.head_start * self.model.head_dim

    @property
    def mlp_in_start(self) -> int:
        return self.parallel.rank * self.mlp_intermediate_per_rank

    @property
    def shared_in_start(self) -> int:
        return self.parallel.rank * self.shared_intermediate_per_rank

    @property
    def expert_in_start(self) -> int:
        return 0 if self.expert_parallel else self.parallel.rank * self.expert_intermediate_per_rank

    # --- vocabulary ------------------------------------------------------------------------
    @property
    def vocab_per_rank(self) -> int:
        return ceil_div(self.model.vocab_size, self.parallel.world_size)

    @property
    def vocab_start(self) -> int:
        return self.parallel.rank * self.vocab_per_rank

    @property
    def vocab_valid_per_rank(self) -> int:
        """Rows of this rank's vocab slice that are real tokens (the last rank may hold padding)."""
        return max(0, min(self.vocab_per_rank, self.model.vocab_size - self.vocab_start))

    @property
    def embedding_replicated(self) -> bool:
        """Does every rank hold the whole embedding (replicate_embedding at several ranks)?"""
        return self.parallel.replicate_embedding and self.parallel.world_size > 1

    def rank_slice(self, size: int, per_rank: int) -> slice:
        """The contiguous slice [rank * per_rank, ...) of a dimension of `size` split evenly."""
        start = self.parallel.rank * per_rank
        return slice(start, min(start + per_rank, size))


def layout(model: ModelConfig, world_size: int = 1, rank: int = 0, moe_mode: str = "tp",
           replicate_embedding: bool = False) -> ShardLayout:
    return ShardLayout(model, ParallelConfig(world_size=world_size, rank=rank, moe_mode=moe_mode,
                                             replicate_embedding=replicate_embedding))
