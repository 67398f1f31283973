"""Where the ranks landed, and the data plane that follows from it.

Ray places the ranks (one placement-group bundle per rank); the data plane only needs to know
which ranks share a host. Ranks on one host talk through shared memory (CPU actors) or peer
memory (GPUs); only traffic between hosts crosses the network. A rank's host is its Ray node id:
two Ray nodes on one machine (ray.cluster_utils.Cluster in the tests) count as two hosts, which is
what lets one machine exercise the several-host path.

Everything here runs before any actor starts. A layout the cluster can never hold (more ranks on
one node than any node has CPUs or GPUs, with STRICT_PACK) is refused at once instead of waiting
out the placement timeout, and a backend that cannot span the hosts the ranks landed on is refused
by name: both are UserErrors (exit 2, one line), as for a local start. Resources that exist but
are busy only delay placement (the startup timeout bounds that wait).

The backend for each layout:
  CPU, shm (the default):  one host -> flat shared memory; several -> hierarchical (shm within each
      host, gloo among one leader per host: collectives/hierarchical.py).
  GPU, symm (the default): one host -> fused peer-memory collectives; several -> NCCL when the user
      left --comm to us (NCCL keeps intra-host traffic on NVLink itself), an error when they asked
      for symm.
  gloo, nccl: flat, any layout.
"""
from __future__ import annotations

from dataclasses import replace

from cluster.node import UserError
from collectives.hierarchical import host_groups
from workers.run_config import RunConfig

SPREADING = ("PACK", "SPREAD")


def bundles_per_node(resources: dict, bundle: dict) -> int:
    """How many `bundle`s fit into one node's total `resources`."""
    return min(int(resources.get(key, 0) // need) for key, need in bundle.items() if need > 0)


def check_fits(nodes: list[dict], bundle: dict, world: int, strategy: str) -> None:
    """nodes: ray.nodes() (dicts with "Alive" and "Resources", the node's totals). Raises a UserError
    when no node (STRICT_PACK) or not the whole cluster (PACK, SPREAD) could ever hold `world` bundles."""
    fits = sorted((bundles_per_node(n.get("Resources", {}), bundle) for n in nodes if n.get("Alive")), reverse=True)
    what = " + ".join(f"{v:g} {k}" for k, v in bundle.items())
    if strategy == "STRICT_PACK" and (not fits or fits[0] < world):
        hint = f"; the cluster as a whole holds {sum(fits)}: use --placement PACK or SPREAD" if sum(fits) >= world else ""
        raise UserError(f"--placement STRICT_PACK puts all {world} ranks ({what} each) on one Ray node, and the "
                        f"largest node of this cluster holds {fits[0] if fits else 0}{hint}")
    if sum(fits) < world:
        raise UserError(f"{world} ranks ({what} each) do not fit this Ray cluster: its {len(fits)} node(s) hold "
                        f"{sum(fits)} in all ({', '.join(map(str, fits)) or 'none'})")


def check_replicas_fit(nodes: list[dict], bundle: dict, world: int, replicas: int, strategy: str) -> list:
    """Like check_fits, for `replicas` nodes of `world` ranks each. Returns a Ray node id per replica
    to hint its placement group at (STRICT_PACK on a cluster of several nodes: replicas go round the
    nodes, each to the least used node that still has room), else None per replica."""
    alive = sorted((n for n in nodes if n.get("Alive")), key=lambda n: n.get("NodeID", ""))
    room = [bundles_per_node(n.get("Resources", {}), bundle) for n in alive]
    what = " + ".join(f"{v:g} {k}" for k, v in bundle.items())
    if strategy != "STRICT_PACK" or len(alive) < 2:
        if sum(room) < world * replicas:
            raise UserError(f"{replicas} replicas of {world} ranks ({what} each) do not fit this Ray cluster: its "
                            f"{len(room)} node(s) hold {sum(room)} ranks in all")
        return [None] * replicas
    fits = [r // world for r in room]  # whole replicas per node
    if sum(fits) < replicas:
        raise UserError(f"{replicas} replicas of {world} ranks ({what} each), each on one node (STRICT_PACK), do not "
                        f"fit this Ray cluster: its nodes hold {', '.join(map(str, fits))} such replicas")
    used, targets = [0] * len(alive), []
    for _ in range(replicas):
        best = min((i for i in range(len(alive)) if used[i] < fits[i]), key=lambda i: used[i])
        used[best] += 1
        targets.append(alive[best]["NodeID"])
    return targets


def data_plane(run: RunConfig, hosts: list, comm_auto: bool) -> RunConfig:
    """The run, with the backend its ranks' hosts call for (see the module docstring).
    comm_auto: the user left --comm unset, so it may follow the layout."""
    n_hosts = len(host_groups(hosts))
    if n_hosts == 1 or run.comm != "symm":
        return run
    if comm_auto:
        return replace(run, comm="nccl")
    raise UserError(f"--comm symm needs every rank on one host, and Ray placed the {run.world_size} ranks on "
                    f"{n_hosts} nodes: use --comm nccl (or leave --comm unset), or --placement STRICT_PACK")


def describe(hosts: list, comm: str) -> dict:
    """The layout as the JSON summary reports it: host count, ranks per host and the data plane."""
    groups = host_groups(hosts)
    hierarchical = comm == "shm" and len(groups) > 1
    return {"hosts": len(groups), "ranks_per_host": groups,
            "data_plane": "shm within a host, gloo between hosts" if hierarchical else comm}
