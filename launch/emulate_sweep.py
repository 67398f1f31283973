"""`dgx-emu emulate --sweep`: the emulator over layouts, batch sizes, draft lengths, dtypes and nodes.

Every combination the model splits into (tensor-parallel sizes that divide the node, MoE as TP or
EP, batch 1..16 rows, plain or an EAGLE-3 chain of 3, BF16 or FP8, each node file) is projected;
those whose weights and KV cache do not fit a GPU's HBM are kept in the table but marked and left
out of the plot. The plot is the latency / throughput trade-off a node offers: tokens/s per user
against tokens/s per node, one marker per node.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

from cluster.hardware import node_spec
from model.parallel import layout
from workers.emulate import project, shape_only_model

NODES = ("dgx-b200", "hgx-h200", "hgx-h100")
BATCHES = (1, 2, 4, 8, 16)
DRAFTS = (0, 3)
MAX_ROWS = 16  # the decode kernels' rows: batch x (draft length + 1)


def sweep(cfg, context: int, acceptance_length: float, kv_element_bytes: int = 2, progress=None) -> list[dict]:
    rows, models = [], {}
    nodes = [node_spec(n) for n in NODES]
    tps = [t for t in (1, 2, 4, 8) if t <= min(n.gpus_per_node for n in nodes)]
    for tp, moe, dtype in itertools.product(tps, ("tp", "ep"), ("bf16", "fp8")):
        try:
            layout(cfg, tp, 0, moe)
        except ValueError:
            continue  # this model does not split that way
        models[tp, moe, dtype] = shape_only_model(cfg, tp, moe, dtype)
        if progress:
            progress(f"built TP{tp} {moe} {dtype}")
    for (tp, moe, dtype), model in models.items():
        for node, batch, draft in itertools.product(nodes, BATCHES, DRAFTS):
            if batch * (draft + 1) > MAX_ROWS or (moe == "ep" and tp == 1):
                continue
            p = project(cfg, node, tp, moe, dtype, batch, context, draft, acceptance_length if draft else 1.0,
                        kv_element_bytes, model=model)
            memory = p.breakdown["memory_per_rank_bytes"]
            rows.append({"node": node.name, "tp": tp, "moe": moe, "dtype": dtype, "batch": batch, "draft_len": draft,
                         "step_time_s": p.step_s, "tokens_per_s_per_user": p.tokens_per_s_per_user,
                         "tokens_per_s_per_node": p.tokens_per_s_per_node, "memory_per_rank_gb": memory / 1e9,
                         "fits": memory <= node.gpu.hbm_bytes,
                         "collective_share": p.breakdown["by_kind"].get("collective", 0.0) / p.step_s})
    return rows


def write_sweep(rows: list[dict], out_dir: Path, title: str) -> None:
    """sweep.json and sweep.png (per-user vs per-node tokens/s of every configuration that fits)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=1))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for node, marker in zip(sorted({r["node"] for r in rows}), "osD^"):
        fit = [r for r in rows if r["node"] == node and r["fits"]]
        ax.scatter([r["tokens_per_s_per_node"] for r in fit], [r["tokens_per_s_per_user"] for r in fit],
                   marker=marker, alpha=0.6, label=node)
    ax.set_xscale("log")
    ax.set_xlabel("tokens/s per node")
    ax.set_ylabel("tokens/s per user")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "sweep.png", dpi=120)
    plt.close(fig)


def print_best(rows: list[dict], count: int = 12) -> None:
    fit = sorted((r for r in rows if r["fits"]), key=lambda r: -r["tokens_per_s_per_user"])
    print(f"{len(rows)} configurations, {len(fit)} fit in HBM; fastest per user:")
    print(f"{'node':<10} {'tp':>2} {'moe':<3} {'dtype':<5} {'batch':>5} {'draft':>5} {'step us':>8} "
          f"{'tok/s/user':>10} {'tok/s/node':>10} {'GB/rank':>8} {'comm':>5}")
    for r in fit[:count]:
        print(f"{r['node']:<10} {r['tp']:>2} {r['moe']:<3} {r['dtype']:<5} {r['batch']:>5} {r['draft_len']:>5} "
              f"{r['step_time_s'] * 1e6:>8.0f} {r['tokens_per_s_per_user']:>10.0f} {r['tokens_per_s_per_node']:>10.0f} "
              f"{r['memory_per_rank_gb']:>8.1f} {r['collective_share']:>5.0%}")
