"""What each virtual GPU stands for: the hardware numbers of the nodes we emulate.

Sources: NVIDIA's DGX B200 / HGX and H200 / H100 SXM datasheets (see shared anchors §3). Rates
are dense (no sparsity). NVLink is quoted bidirectional per GPU, as NVIDIA quotes it; one
direction is half. The emulator's cost model reads these; the runtime reports them with each
rank so a user sees whether a shard would fit the HBM of the GPU it stands for.

This module finds and reads the numbers; the types they fill (GpuSpec, NodeSpec) live in
workers/node_spec.py, so the workers that cost their work take a NodeSpec handed down from here
without importing cluster/.
"""
from __future__ import annotations

import json
from pathlib import Path

from model.config import ConfigError
from workers.node_spec import GpuSpec, NodeSpec

GB = 1e9
TB = 1e12

GPUS = {
    "b200": GpuSpec("B200", 180 * GB, 8.0 * TB, 1.8 * TB, 2.25e15, 4.5e15, 9.0e15),
    "h200": GpuSpec("H200", 141 * GB, 4.8 * TB, 0.9 * TB, 0.989e15, 1.979e15),
    "h100": GpuSpec("H100", 80 * GB, 3.35 * TB, 0.9 * TB, 0.989e15, 1.979e15),
}
GPUS_PER_NODE = 8


def gpu_spec(name: str) -> GpuSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown hardware {name!r}; choose one of {sorted(GPUS)}") from None


# ---------------------------------------------------------------------------------------------
# Node specs for the emulator: data files in cluster/nodes/, each number with its source
# ---------------------------------------------------------------------------------------------
NODES_DIR = Path(__file__).resolve().parent / "nodes"
NODE_ALIASES = {"b200": "dgx-b200", "h200": "hgx-h200", "h100": "hgx-h100"}


def node_spec(name_or_path: str) -> NodeSpec:
    """A node by name (dgx-b200, hgx-h200, hgx-h100, or b200 / h200 / h100) or a JSON file of the
    same form (a user's own node). Refuses a file that lacks a number, naming it."""
    key = NODE_ALIASES.get(name_or_path.lower(), name_or_path.lower())
    path = NODES_DIR / f"{key}.json"
    if not path.is_file():
        path = Path(name_or_path)
        if not path.is_file():
            known = sorted(p.stem for p in NODES_DIR.glob("*.json"))
            raise ConfigError(f"unknown node {name_or_path!r}: choose one of {known} or give a node JSON file")
    try:
        return NodeSpec.from_dict(json.loads(path.read_text()))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"node file {path}: missing or malformed {e}") from None


def emulated_node(name_or_path: str | None) -> NodeSpec | None:
    """The node a run's `--emulate-node` names (None: no emulation), for the worker it is handed to."""
    return node_spec(name_or_path) if name_or_path else None
