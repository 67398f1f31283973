"""Timing one rank's decode and verify steps against their HBM floor (`dgx-emu bench decode`).

The floor of a step is the bytes it must read from device memory once: the weights of every layer
it runs (only the experts the router actually picked: a step of one token reads one expert per
MoE layer), the KV cache of its context, the LM head; divided by the device-to-device copy
bandwidth measured in the same run (bytes read + written), not a datasheet number. Every timed
step is reported as a ratio to it.

Models: `embedded` (the shipped checkpoint), a checkpoint directory, or a preset built with random
weights directly on the device in its shard's shape (`medium`; `maverick-slice`: Maverick's
widths and 128 experts, 4 layers, 2 of them MoE), never on the host. The KV cache holds random
keys and values for the whole context. Steps are timed with CUDA events after warm-up, each
replay on its own pair of events, and the cache length is reset before every step so that each
one reads the same context; median and p90 over many steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from collectives.communicator import Communicator, SingleRankCommunicator
from model.config import ModelConfig, maverick, preset
from model.fp8 import FP8, SCHEMES
from model.fp8_modules import all_fp8, to_fp8
from model.llama4 import Llama4
from model.parallel import layout
from workers.emulate import module_bytes
from workers.model_build import default_dtype

RANDOM_PRESETS = {"medium": lambda: preset("medium"), "maverick-slice": lambda: maverick(n_layers=4)}
STEPS = {"decode": 1, "verify": 4, "verify16": 16}  # new tokens per row: one; a chain of 3 drafts + its root; a 15-node tree + its root


@dataclass(frozen=True)
class StepTiming:
    name: str
    tokens: int
    median_us: float
    p90_us: float
    floor_us: float
    bytes_read: int

    def as_dict(self) -> dict:
        return {"name": self.name, "tokens": self.tokens, "median_us": round(self.median_us, 2),
                "p90_us": round(self.p90_us, 2), "floor_us": round(self.floor_us, 2),
                "bytes_read": self.bytes_read, "x_floor": round(self.median_us / self.floor_us, 3)}


def random_model(cfg: ModelConfig, dtype: str, kernels: str, device: str = "cuda", seed: int = 0,
                 comm: Communicator | None = None, moe_mode: str = "tp", fp8_scheme: str = "channel",
                 replicate_embedding: bool = False) -> Llama4:
    """Llama4 of `cfg` with random weights made on `device` (bf16, or fp8 in `fp8_scheme`: a
    model.fp8.SCHEMES name; per-tensor's static input scales are those _fill gives), in the shard
    shapes of `comm`'s rank (default: a world of one). Every rank fills its parameters in the same
    order from the same seed, so replicated ones (norms, routers) are equal on every rank."""
    comm = comm or SingleRankCommunicator()
    shard = layout(cfg, comm.world_size, comm.rank, moe_mode, replicate_embedding)
    with torch.device(device), default_dtype(torch.bfloat16):
        model = Llama4(cfg, shard, comm, kernels=kernels)
    if dtype == "fp8":
        to_fp8(model, all_fp8(model, SCHEMES[fp8_scheme]))
    gen = torch.Generator(device).manual_seed(seed)
    for name, param in model.named_parameters():
        _fill(name, param.data, gen)
    return model.eval()


def _fill(name: str, t: torch.Tensor, gen: torch.Generator) -> None:
    """Normal(0, 0.02) weights, unit norms, FP8 weights as e4m3 of N(0, 1) with scale 0.02, one
    leading slice at a time so that no float32 copy of a large tensor is ever made."""
    if "norm" in name:
        t.fill_(1.0)
    elif name.endswith("_scale"):  # weight, input and per-expert FP8 scales
        t.fill_(0.02)
    elif t.dim() >= 3:
        for part in t:
            _fill(name, part, gen)
    elif t.dtype == FP8:
        t.copy_(torch.randn(t.shape, generator=gen, device=t.device).clamp(-448, 448).to(FP8))
    else:
        t.copy_(torch.randn(t.shape, generator=gen, device=t.device, dtype=torch.float32) * 0.02)


def copy_bandwidth(device: str = "cuda", gib: int = 2, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(gib << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * (gib << 30) / sorted(times[3:])[len(times[3:]) // 2]


def step_bytes(model: Llama4, context: int, experts_read: list[int], kv_element_bytes: int) -> int:
    """Bytes a step must read: weights of every layer (experts_read[i] routed experts for the i-th
    MoE layer), the KV cache of `context` keys, the final norm and the LM head."""
    total, moe_index = 0, 0
    for layer in model.layers:
        total += module_bytes(layer.self_attn) + module_bytes(layer.input_layernorm)
        total += module_bytes(layer.post_attention_layernorm)
        ffn = layer.feed_forward
        if layer.is_moe:
            per_expert = sum(p[0].numel() * p.element_size() for p in ffn.experts.parameters())
            total += module_bytes(ffn.router) + module_bytes(ffn.shared_expert)
            total += per_expert * experts_read[moe_index]
            moe_index += 1
        else:
            total += module_bytes(ffn)
        attn = layer.self_attn
        total += 2 * context * attn.n_kv_heads_per_rank * attn.head_dim * kv_element_bytes
    return total + module_bytes(model.norm) + model.lm_head_weight().numel() * model.lm_head_weight().element_size()


def routed_experts(model: Llama4, tokens: torch.Tensor, cache, n_new: torch.Tensor) -> list[int]:
    """Distinct experts each MoE layer routes this step's tokens to (one eager step, hooks on the
    routers; the cache length is restored afterwards)."""
    seen, hooks = [], []
    for layer in model.layers:
        if layer.is_moe:
            top_k = layer.feed_forward.top_k
            hooks.append(layer.feed_forward.router.register_forward_hook(
                lambda m, args, out, k=top_k: seen.append(int(torch.topk(out, k, dim=-1).indices.unique().numel()))))
    saved = cache.lengths.clone()
    try:
        model(tokens, cache, n_new=n_new, static=True)
    finally:
        for h in hooks:
            h.remove()
        cache.lengths.copy_(saved)
    return seen


def time_steps(run_step, reset, n_steps: int) -> list[float]:
    """Seconds of each of n_steps runs of run_step(), timed on the GPU by an event pair each."""
    events = []
    for _ in range(n_steps):
        reset()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_step()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in events]


def time_eager(run_step, reset, n_steps: int) -> list[float]:
    """Wall seconds of each eager step (host-bound: launch time is the step's time), synchronized."""
    times = []
    for _ in range(n_steps):
        reset()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run_step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def prepared_cache(model: Llama4, context: int, tokens: int, kv_dtype: torch.dtype | None, seed: int = 1):
    """A batch-1 cache of random keys and values whose committed prefix is context - tokens long."""
    from workers.cuda_graphs import cache_slots
    cache = model.new_cache(1, cache_slots(context, context), kv_dtype)
    gen = torch.Generator(cache.lengths.device).manual_seed(seed)
    for stored in cache.k + cache.v:
        stored.copy_(torch.randn(stored.shape, generator=gen, device=stored.device).to(stored.dtype))
    cache.lengths.fill_(context - tokens)
    return cache


def measure_step(model: Llama4, name: str, tokens: int, context: int, bandwidth: float, n_steps: int,
                 mode: str = "graph", kv_dtype: torch.dtype | None = None) -> StepTiming:
    """Times a step of `tokens` new tokens over `context` keys. mode: "graph" (replayed CUDA graph
    of the fused step) or "eager" (the model's forward as called, host-launched)."""
    from workers.cuda_graphs import DecodeGraph
    cache = prepared_cache(model, context, tokens, kv_dtype)
    start = cache.lengths.clone()
    ids = torch.randint(0, model.cfg.vocab_size, (1, tokens), device=start.device,
                        generator=torch.Generator(start.device).manual_seed(2))
    n_new = torch.full((1,), tokens, dtype=torch.long, device=start.device)
    kv_bytes = cache.k[0].element_size()
    floor_s = step_bytes(model, context, routed_experts(model, ids, cache, n_new), kv_bytes) / bandwidth
    reset = lambda: cache.lengths.copy_(start)  # noqa: E731 (every step reads the same context)
    if mode == "graph":
        graph = DecodeGraph(model, cache, n_tokens=tokens)
        graph.tokens.copy_(ids)
        times = time_steps(graph.graph.replay, reset, n_steps)
    else:
        run = lambda: model(ids, cache, n_new=n_new)  # noqa: E731 (as generate calls it)
        for _ in range(3):
            reset()
            run()
        times = time_eager(run, reset, n_steps)
    times.sort()
    return StepTiming(name, tokens, times[len(times) // 2] * 1e6, times[int(0.9 * (len(times) - 1))] * 1e6,
                      floor_s * 1e6, int(floor_s * bandwidth))


def bench_model(settings: dict, comm: Communicator, kernels: str) -> tuple[Llama4, torch.dtype | None]:
    """This rank's model for a bench run: a random preset (settings["model"] names it) or the
    checkpoint at settings["path"], sharded for comm's rank. Returns (model, KV cache dtype)."""
    if settings["model"] in RANDOM_PRESETS:
        cfg = RANDOM_PRESETS[settings["model"]]()
        return random_model(cfg, settings["dtype"], kernels, comm=comm, moe_mode=settings["moe"],
                            fp8_scheme=settings.get("fp8_scheme", "channel"),
                            replicate_embedding=settings.get("replicate_embedding", False)), None
    from model.config import load_model_config
    from workers.model_build import build_model
    from workers.run_config import RunConfig
    run = RunConfig(model_path=settings["path"], dtype=settings["dtype"], device="cuda", world_size=comm.world_size,
                    comm="nccl" if comm.world_size > 1 else "gloo", kernels=kernels, moe_mode=settings["moe"])
    cfg = load_model_config(settings["path"])
    model, _ = build_model(run, cfg, layout(cfg, comm.world_size, comm.rank, settings["moe"],
                                            settings.get("replicate_embedding", False)), comm)
    return model.eval(), (torch.float8_e4m3fn if run.kv_dtype == "fp8" else None)


def measure_all(settings: dict, comm: Communicator | None = None, log=print) -> tuple[list[dict], float]:
    """Every (step, mode) of a bench run on this rank. Every rank of a TP group calls this in step
    (the collectives of each step pair up); the floor counts this rank's shard, which every rank
    reads in parallel. Returns (result rows, copy bandwidth in bytes/s)."""
    comm = comm or SingleRankCommunicator()
    bandwidth = copy_bandwidth()
    rows = []
    for kernels in ("triton", "torch"):
        wanted = [m for m in settings["modes"] if (m == "eager-torch") == (kernels == "torch")]
        if not wanted:
            continue
        model, kv_dtype = bench_model(settings, comm, kernels)
        for step in settings["steps"]:
            for mode in wanted:
                iters = settings["iters"] if mode == "graph" else max(10, settings["iters"] // 10)
                timing = measure_step(model, step, STEPS[step], settings["context"], bandwidth, iters,
                                      mode="graph" if mode == "graph" else "eager", kv_dtype=kv_dtype)
                rows.append({**timing.as_dict(), "name": f"{step}-{mode}", "model": settings["model"],
                             "dtype": settings["dtype"], "tp": comm.world_size, "moe": settings["moe"],
                             **({"fp8_scheme": settings.get("fp8_scheme", "channel")} if settings["dtype"] == "fp8" else {}),
                             **({"replicate_embedding": True} if settings.get("replicate_embedding") else {}),
                             "context": settings["context"]})
                log(f"  {rows[-1]['name']}: {rows[-1]['median_us']:.1f} us ({rows[-1]['x_floor']:.2f}x floor)")
        if settings.get("profile") and kernels == "triton":  # every rank replays; rank 0 profiles
            from workers.step_profile import profile_graph_step
            profile_graph_step(model, settings["context"], kv_dtype, settings["profile"] if comm.rank == 0 else None)
        del model
        torch.cuda.empty_cache()
    return rows, bandwidth


def bench_rank(comm: Communicator, settings: dict) -> None:
    """One process of `bench decode --tp N` (cluster/procs.run_world): rank 0 writes the rows and
    the copy bandwidth as JSON to settings["rows_path"]."""
    import json
    rows, bandwidth = measure_all(settings, comm, log=print if comm.rank == 0 else (lambda _: None))
    if comm.rank == 0:
        with open(settings["rows_path"], "w") as f:
            json.dump({"rows": rows, "bandwidth": bandwidth}, f)
