"""The EAGLE-3 draft head at per-rank shapes: one Llama decoder layer fed by target features.

    feature  = fc(cat(target layer outputs low, mid, high))            # (B, T, 3H_t) -> (B, T, H)
    x        = cat(input_layernorm(embed(token)), hidden_norm(feature))  # (B, T, 2H): embedding FIRST
    residual = feature
    h, residual = allreduce_add_rmsnorm(o_proj(attn(x)), residual, post_attention_layernorm)
    normed, out = allreduce_add_rmsnorm(mlp(h), residual, norm)
    logits   = lm_head(normed)                                         # over the reduced draft vocab
    target_id = draft_id + d2t[draft_id]

Row t pairs token t+1 with the target feature at t, at RoPE position t. The PRE-norm output `out`
of a row is the feature of the next draft step (a tree node's children read their parent's).
The embedding (and, when a checkpoint has none, the LM head) is the target's own, borrowed, not
owned: `SharedTargetParts` keeps it out of this module's parameters.

One-model mode: the draft runs tensor-parallel on the target's ranks through the same
Communicator and the same one-visible-collective-per-sub-layer shape. `fc` is row-parallel (each
rank reads its columns of the replicated target features) and its partial sum travels in the
SAME all-reduce that completes the vocab-parallel embedding, so a draft step costs three
collectives. The attention is a plain Llama one (rotate-half RoPE, no chunking, no QK-norm),
because published EAGLE-3 drafts are Llama layers even for Llama 4 targets.

`unrolled` is the training-time-test forward (no KV cache): step i feeds row t the ground-truth
token t+1+i with the draft's own step i-1 output as feature, at position t+i; its queries see
step-0 keys causally and, of steps 1..i, only their own row.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from collectives.communicator import Communicator
from model.attention import KVCache, StepContext, build_step_context, rope_inv_freq
from model.config import ConfigError, ModelConfig, RopeScaling, _get, _int_list, _rope_from_hf
from model import fast_path
from model.ffn import MLP
from model.llama4 import KERNELS, RMSNorm, VocabEmbedding
from model.parallel import ShardLayout, layout


@dataclass(frozen=True)
class Eagle3Config:
    """The draft's architecture, as its config.json gives it (SafeAILab or ModelOpt keys)."""

    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # the target's vocabulary
    draft_vocab_size: int
    target_hidden_size: int
    n_aux: int = 3  # target layers concatenated into fc's input
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 131072
    norm_before_residual: bool = False  # some exports make the residual hidden_norm(feature)
    layer_ids: tuple[int, ...] | None = None  # output convention; None: the checkpoint names none
    has_lm_head: bool = True  # False: ModelOpt export without one, the target's LM head is used

    def __post_init__(self) -> None:
        for key in ("hidden_size", "n_heads", "n_kv_heads", "head_dim", "intermediate_size", "vocab_size",
                    "draft_vocab_size", "target_hidden_size", "n_aux"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"EAGLE-3 draft {key} must be a positive integer, got {value!r}")
        if self.draft_vocab_size > self.vocab_size:
            raise ConfigError(f"EAGLE-3 draft_vocab_size ({self.draft_vocab_size}) exceeds "
                              f"vocab_size ({self.vocab_size})")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"EAGLE-3 draft num_attention_heads ({self.n_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.n_kv_heads})")
        if self.layer_ids is not None and len(self.layer_ids) != self.n_aux:
            raise ConfigError(f"EAGLE-3 draft names {len(self.layer_ids)} aux layers {list(self.layer_ids)}, "
                              f"its fc reads {self.n_aux}")

    @classmethod
    def from_hf_dict(cls, raw: dict) -> "Eagle3Config":
        if not isinstance(raw, dict):
            raise ConfigError("draft config.json must hold a JSON object")
        layers = _get(raw, "num_hidden_layers", 1, int)
        if layers != 1:
            raise ConfigError(f"EAGLE-3 drafts with num_hidden_layers={layers} are not supported (only 1)")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"draft hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
        hidden, heads = _get(raw, "hidden_size", kind=int), _get(raw, "num_attention_heads", kind=int)
        vocab = _get(raw, "vocab_size", kind=int)
        eagle = raw.get("eagle_config") if isinstance(raw.get("eagle_config"), dict) else {}
        key = "eagle_aux_hidden_state_layer_ids"
        ids = _int_list(raw if key in raw else eagle, key, []) or None
        theta, scaling = _rope_from_hf(raw)
        return cls(
            hidden_size=hidden, n_heads=heads, n_kv_heads=_get(raw, "num_key_value_heads", heads, int),
            head_dim=_get(raw, "head_dim", hidden // heads, int),
            intermediate_size=_get(raw, "intermediate_size", kind=int),
            vocab_size=vocab, draft_vocab_size=_get(raw, "draft_vocab_size", vocab, int),
            target_hidden_size=_get(raw, "target_hidden_size", hidden, int),
            n_aux=len(ids) if ids else 3, rms_norm_eps=_get(raw, "rms_norm_eps", 1e-5, float),
            rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=_get(raw, "max_position_embeddings", 131072, int),
            norm_before_residual=_get(raw, "norm_before_residual", False, bool),
            layer_ids=tuple(ids) if ids else None)

    def to_hf_dict(self) -> dict:
        """SafeAILab-style config.json (plus the layer ids, in the output convention, when named)."""
        out = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
               "hidden_size": self.hidden_size, "num_attention_heads": self.n_heads,
               "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
               "intermediate_size": self.intermediate_size, "vocab_size": self.vocab_size,
               "draft_vocab_size": self.draft_vocab_size, "target_hidden_size": self.target_hidden_size,
               "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta, "hidden_act": "silu",
               "max_position_embeddings": self.max_position_embeddings, "tie_word_embeddings": False}
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.norm_before_residual:
            out["norm_before_residual"] = True
        if self.layer_ids is not None:
            out["eagle_aux_hidden_state_layer_ids"] = list(self.layer_ids)
        return out

    def attention_config(self) -> ModelConfig:
        """The draft as a one-layer dense ModelConfig over the DRAFT vocabulary: the shape that
        ShardLayout cuts and that build_step_context reads (no chunking, RoPE on, no NoPE tricks)."""
        return ModelConfig(
            vocab_size=self.draft_vocab_size, hidden_size=self.hidden_size, n_layers=1, n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, intermediate_size=self.intermediate_size,
            intermediate_size_mlp=self.intermediate_size, n_experts=1, experts_per_token=1, moe_layers=(),
            rope_layers=(True,), attention_chunk_size=None, use_qk_norm=False, attn_temperature_tuning=False,
            floor_scale=8192.0, attn_scale=0.1, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
            rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=False,
            max_position_embeddings=self.max_position_embeddings, name="eagle3-draft")


def check_against_target(draft: Eagle3Config, target: ModelConfig) -> None:
    """Everything the draft must agree on with the target it serves; the error names the field."""
    if draft.vocab_size != target.vocab_size:
        raise ConfigError(f"EAGLE-3 draft vocab_size ({draft.vocab_size}) differs from the target's "
                          f"({target.vocab_size})")
    if draft.target_hidden_size != target.hidden_size:
        raise ConfigError(f"EAGLE-3 draft target_hidden_size ({draft.target_hidden_size}) differs from the target's "
                          f"hidden_size ({target.hidden_size})")
    if draft.hidden_size != target.hidden_size:
        raise ConfigError(f"EAGLE-3 draft hidden_size ({draft.hidden_size}) differs from the target's "
                          f"({target.hidden_size}); the draft embeds tokens with the target's embedding")
    if not draft.has_lm_head and draft.draft_vocab_size != target.vocab_size:
        raise ConfigError(f"EAGLE-3 draft has no lm_head, so it drafts over the target's {target.vocab_size} tokens, "
                          f"but draft_vocab_size is {draft.draft_vocab_size}")
    if draft.layer_ids is not None:
        bad = [i for i in draft.layer_ids if not 0 <= i < target.n_layers]
        if bad:
            raise ConfigError(f"EAGLE-3 draft layer id {bad[0]} is outside the target's {target.n_layers} layers")


def draft_layout(cfg: Eagle3Config, world_size: int, rank: int) -> ShardLayout:
    """This rank's cut of the draft (heads, MLP, draft vocab); the errors say it is the draft's."""
    if (cfg.n_aux * cfg.target_hidden_size) % world_size:
        raise ConfigError(f"EAGLE-3 draft fc input ({cfg.n_aux} x {cfg.target_hidden_size}) is not divisible by "
                          f"world size {world_size}")
    try:
        return layout(cfg.attention_config(), world_size, rank)
    except ConfigError as e:
        raise ConfigError(f"EAGLE-3 draft: {e}") from None


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama (rotate-half) RoPE: pair i is (x[i], x[i + D/2]). x: (B, T, heads, D); cos/sin: (B, T, D/2).
    The rotated pair i comes out at (2i, 2i + 1), the fused kernels' interleaved order, so the draft's
    KV cache holds the same keys on either path (model/eagle3_fast_path.py); q and k meet only in
    dot products, which one permutation of both leaves unchanged."""
    first, second = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = torch.stack((first * cos - second * sin, second * cos + first * sin), dim=-1)  # (B, T, heads, D/2, 2)
    return rotated.flatten(-2).type_as(x)


class DraftAttention(nn.Module):
    """Column-parallel fused QKV over the 2H-wide input, row-parallel o_proj (returns a partial sum)."""

    def __init__(self, shard: ShardLayout) -> None:
        super().__init__()
        cfg = shard.model
        self.head_dim, self.hq, self.hkv = cfg.head_dim, shard.n_heads_per_rank, shard.n_kv_heads_per_rank
        self.qkv_proj = nn.Linear(2 * cfg.hidden_size, (self.hq + 2 * self.hkv) * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(self.hq * cfg.head_dim, cfg.hidden_size, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: (B, T, 2H) -> q (B, T, hq, D), k and v (B, T, hkv, D), RoPE applied."""
        batch, n, _ = x.shape
        d = self.head_dim
        q, k, v = self.qkv_proj(x).split([self.hq * d, self.hkv * d, self.hkv * d], dim=-1)
        q = rotate_half_rope(q.view(batch, n, self.hq, d), cos, sin)
        k = rotate_half_rope(k.view(batch, n, self.hkv, d), cos, sin)
        return q, k, v.view(batch, n, self.hkv, d)

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: KVCache) -> torch.Tensor:
        batch, n, _ = x.shape
        q, k, v = self.project(x, ctx.cos, ctx.sin)
        rows = torch.arange(batch, device=x.device)[:, None]  # (B, 1)
        cache.k[0][rows, :, ctx.slots] = k.to(cache.k[0].dtype)  # indexed view: (B, T, hkv, D)
        cache.v[0][rows, :, ctx.slots] = v.to(cache.v[0].dtype)
        keys = cache.k[0][:, :, : ctx.n_keys].to(q.dtype)  # (B, hkv, S, D)
        values = cache.v[0][:, :, : ctx.n_keys].to(q.dtype)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=ctx.masks["full"],
                                             scale=self.head_dim ** -0.5, enable_gqa=self.hq != self.hkv)
        return self.o_proj(out.transpose(1, 2).reshape(batch, n, self.hq * self.head_dim))  # (B, T, H)

    def unrolled(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: list) -> torch.Tensor:
        """Training-time-test attention (no cache). past: [(k, v)] of steps 0..i-1, each (B, T, hkv, D);
        this step's keys are appended to it. Step-0 keys are seen causally, later steps' only on the
        query's own row."""
        batch, n, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        past.append((k, v))
        group = self.hq // self.hkv
        heads = [(kk.repeat_interleave(group, 2), vv.repeat_interleave(group, 2)) for kk, vv in past]
        scale = self.head_dim ** -0.5
        k0, v0 = heads[0]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        scores0 = torch.einsum("bthd,bshd->bhts", q, k0) * scale  # (B, hq, T, T)
        scores0 = scores0.masked_fill(~causal, float("-inf"))
        diag = [torch.einsum("bthd,bthd->bht", q, kj)[..., None] * scale for kj, _ in heads[1:]]  # (B, hq, T, 1) each
        weights = torch.softmax(torch.cat([scores0, *diag], dim=-1).float(), dim=-1).type_as(q)  # (B, hq, T, T+i)
        out = torch.einsum("bhts,bshd->bthd", weights[..., :n], v0)  # (B, T, hq, D)
        for j, (_, vj) in enumerate(heads[1:]):
            out = out + weights[..., n + j].transpose(1, 2)[..., None] * vj
        return self.o_proj(out.reshape(batch, n, self.hq * self.head_dim))


@dataclass
class SharedTargetParts:
    """What the draft borrows from the target: its embedding, and its LM head when the draft has none."""

    embed: VocabEmbedding
    lm_head_weight: torch.Tensor | None = None


@dataclass
class DraftOutput:
    logits: torch.Tensor  # (B, R, draft_vocab_per_rank): this rank's slice of the draft vocabulary
    hidden: torch.Tensor  # (B, T, H) pre-norm output: the next step's feature


class Eagle3Draft(nn.Module):
    def __init__(self, cfg: Eagle3Config, shard: ShardLayout, comm: Communicator, target: SharedTargetParts,
                 kernels: str = "torch") -> None:
        """kernels: "torch" (reference ops) or "triton" (fused kernels for forwards of up to
        fast_path.MAX_TOKENS rows on CUDA or Triton's interpreter: model/eagle3_fast_path.py);
        load_draft gives the draft its target's choice."""
        super().__init__()
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        self.cfg, self.shard, self.comm, self.target, self.kernels = cfg, shard, comm, target, kernels
        self.eps = cfg.rms_norm_eps
        fc_in = cfg.n_aux * cfg.target_hidden_size
        self.fc_cols = shard.rank_slice(fc_in, fc_in // shard.parallel.world_size)
        self.fc = nn.Linear(fc_in // shard.parallel.world_size, cfg.hidden_size, bias=False)  # row-parallel
        self.midlayer = nn.Module()
        self.midlayer.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.midlayer.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.midlayer.self_attn = DraftAttention(shard)
        self.midlayer.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.midlayer.mlp = MLP(cfg.hidden_size, shard.mlp_intermediate_per_rank)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, shard.vocab_per_rank, bias=False) if cfg.has_lm_head else None
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))  # target = draft + d2t
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))  # target ids in the draft vocab
        self.register_buffer("inv_freq", rope_inv_freq(shard.model), persistent=False)

    def _apply(self, fn, recurse=True):
        """Module.to(dtype) casts floating buffers too; RoPE's inverse frequencies stay float32, as the
        target's do (bf16 rounds them by up to 2^-9: at position 3000 a phase is then radians off)."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = rope_inv_freq(self.shard.model).to(self.inv_freq.device)
        return self

    def lm_head_weight(self) -> torch.Tensor:
        return self.target.lm_head_weight if self.lm_head is None else self.lm_head.weight

    def forget_kernel_copies(self) -> None:
        """Drops what the fused path derived from the weights (eagle3_fast_path.rotary_qkv_weight), after
        a load that wrote them through `.data` (which moves no version counter)."""
        self.__dict__.pop("_rotary_qkv", None)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        weight = self.fc.weight
        return KVCache(1, batch, max_len, self.shard.n_kv_heads_per_rank, self.cfg.head_dim, weight.dtype,
                       weight.device)

    @torch.no_grad()
    def set_draft_vocab(self, target_ids: torch.Tensor) -> None:
        """target_ids: (Vd,) the target token of each draft token (SafeAILab sorts them ascending)."""
        self.d2t.copy_(target_ids - torch.arange(len(target_ids), device=target_ids.device))
        self.t2d.zero_()
        self.t2d[target_ids] = True

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids -> target ids: one gather from `target_id_table`."""
        return self.target_id_table()[draft_ids]

    def target_id_table(self) -> torch.Tensor:
        """(Vd,) draft + d2t[draft], made again whenever d2t changes (its version counter moves
        with every in-place write, a load's included). A CUDA graph that captured a lookup must
        hold on to the table it read."""
        if self.d2t.is_inference():  # made in inference mode: no version counter, so no cached table
            return self.d2t + torch.arange(len(self.d2t), device=self.d2t.device)
        made_from = self.__dict__.get("_target_ids_from")  # (d2t, its version): the tensor held, not its id()
        if made_from is None or made_from[0] is not self.d2t or made_from[1] != self.d2t._version:
            self.__dict__["_target_ids"] = self.d2t + torch.arange(len(self.d2t), device=self.d2t.device)
            self.__dict__["_target_ids_from"] = (self.d2t, self.d2t._version)
        return self.__dict__["_target_ids"]

    def embed_and_feature(self, tokens: torch.Tensor, target_features: torch.Tensor | None,
                          hidden: torch.Tensor | None, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings and features (B, T, H) each, replicated: ONE all-reduce completes both
        the vocab-parallel embedding and, for target features, the row-parallel fc (fused: its GEMV)."""
        embed_partial = self.target.embed.partial(tokens)  # (B, T, H) this rank's share of the rows
        if target_features is None:
            return self.comm.all_reduce(embed_partial), hidden
        fc_in = target_features[..., self.fc_cols].to(self.fc.weight.dtype)
        fc_partial = fast_path.linear(self.fc, fc_in) if fused else self.fc(fc_in)  # (B, T, H)
        both = self.comm.all_reduce(torch.cat([embed_partial, fc_partial], dim=-1))  # (B, T, 2H)
        return both.split(self.cfg.hidden_size, dim=-1)

    def layer(self, embeds: torch.Tensor, feature: torch.Tensor, attend) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder layer; attend(x (B, T, 2H)) -> attention partial sum. Returns (normed, pre-norm)."""
        layer = self.midlayer
        feature_normed = layer.hidden_norm(feature)
        x = torch.cat([layer.input_layernorm(embeds), feature_normed], dim=-1)  # (B, T, 2H)
        residual = feature_normed if self.cfg.norm_before_residual else feature
        h, residual = self.comm.allreduce_add_rmsnorm(attend(x), residual, layer.post_attention_layernorm.weight,
                                                      self.eps)
        return self.comm.allreduce_add_rmsnorm(layer.mlp(h), residual, self.norm.weight, self.eps)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        return self.mask_padded_vocab(normed @ self.lm_head_weight().t())  # (B, R, Vd_r)

    def mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """-inf (in place) on this rank's padding columns past the draft vocabulary, if it has any."""
        if self.shard.vocab_valid_per_rank < self.shard.vocab_per_rank:
            logits[..., self.shard.vocab_valid_per_rank:] = float("-inf")
        return logits

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, *, target_features: torch.Tensor | None = None,
                hidden: torch.Tensor | None = None, n_new: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, step_mask: torch.Tensor | None = None,
                logit_rows: torch.Tensor | None = None, static: bool = False) -> DraftOutput:
        """tokens: (B, T); target_features (B, T, n_aux*H_t) OR hidden (B, T, H) (the draft's own).
        logit_rows: (B, R) rows to compute logits for (default all). Advances cache.lengths by n_new.
        static: attend over the whole cache buffer with a length mask, reading nothing back to the
        host (a CUDA graph captures it: workers/spec_graphs.py). With kernels="triton", a forward of
        up to fast_path.MAX_TOKENS rows runs on the fused kernels (model/eagle3_fast_path.py)."""
        batch, n_tokens = tokens.shape
        if self.kernels == "triton" and fast_path.applies(tokens[..., None]):
            from model import eagle3_fast_path
            fused = eagle3_fast_path.forward(self, tokens, cache, target_features, hidden, n_new, positions,
                                             step_mask, logit_rows, static)
            if fused is not None:
                return DraftOutput(logits=fused[0], hidden=fused[1])
        if n_new is None:
            n_new = torch.full((batch,), n_tokens, dtype=torch.long, device=tokens.device)
        if positions is None:
            positions = cache.lengths[:, None] + torch.arange(n_tokens, device=tokens.device)
        ctx = build_step_context(self.shard.model, self.inv_freq, cache, positions, step_mask, static=static)
        embeds, feature = self.embed_and_feature(tokens, target_features, hidden)
        normed, out = self.layer(embeds, feature, lambda x: self.midlayer.self_attn(x, ctx, cache))
        cache.lengths += n_new
        if logit_rows is not None:
            normed = normed.gather(1, logit_rows[..., None].expand(-1, -1, normed.shape[-1]))  # (B, R, H)
        return DraftOutput(logits=self.logits(normed), hidden=out)

    def unrolled(self, tokens: torch.Tensor, target_features: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training-time test on full sequences (world size 1, autograd on). tokens: (B, T) with
        tokens[:, t] = x_{t+1}; target_features: (B, T, n_aux*H_t). Returns per-step draft logits
        (B, T, Vd); step i's row t predicts x_{t+2+i}. Rows past the end read token 0."""
        batch, n = tokens.shape
        past, out, hidden = [], [], None
        for step in range(steps):
            shifted = F.pad(tokens[:, step:], (0, step))  # (B, T): x_{t+1+step}
            positions = torch.arange(n, device=tokens.device).expand(batch, n) + step
            freqs = positions[..., None].float() * self.inv_freq  # (B, T, D/2)
            cos, sin = freqs.cos(), freqs.sin()
            embeds, feature = self.embed_and_feature(shifted, target_features if step == 0 else None, hidden)
            normed, hidden = self.layer(embeds, feature, lambda x: self.midlayer.self_attn.unrolled(x, cos, sin, past))
            out.append(self.logits(normed))
        return out

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.parameters()) + list(self.buffers()))
