"""Joining a Ray cluster: real multi-node clusters on this one machine.

Two Ray nodes of one machine (ray.cluster_utils.Cluster, 2 CPUs each) stand for two hosts: a
rank's host is its Ray node id, so ranks on different nodes take the hierarchical data plane
(shared memory within a node, gloo between them) exactly as on two machines. A cluster started
with `ray start --head` in a subprocess checks the user's path end to end (`--ray-address auto`).
Each checks that the output equals the single-host run (fp32, the embedded model), which path the
collectives took, and that nothing is left running: Ray stopped, every process gone, no
shared-memory segment in /dev/shm. Cheap checks of the placement rules need no cluster.

Ray writes the address of a cluster it starts into $RAY_TMPDIR/ray_current_cluster, which a
plain `ray.init()` elsewhere on the machine would join; every cluster here gets a private
RAY_TMPDIR, so concurrent runs of other tests never see it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import torch

from benchmarks.cluster_join import start_head, stop_head
from cluster.drills import snapshot
from cluster.inprocess import InProcessNode
from cluster.node import UserError
from cluster.placement import check_fits, check_replicas_fit, data_plane, describe
from cluster.ray_node import RayNode, child_pids, kill_new_children
from collectives.factory import shm_name
from model.embedded import ensure_default_model
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer
from workers.engine import Request
from workers.run_config import RunConfig

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ("def fibonacci(n):", "The os module")


def _requests(model_dir: Path) -> list[Request]:
    tokenizer = Tokenizer.from_file(model_dir / "tokenizer.json")
    params = SamplingParams(max_new_tokens=8, stop_on_eos=False)
    return [Request(tuple(tokenizer.encode(p)), params, str(i)) for i, p in enumerate(PROMPTS)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(f"/proc/{pid}").exists() else "X"
    return state not in ("Z", "X")


def _wait_gone(pids, timeout_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_default_model()


@pytest.fixture(scope="module")
def reference(model_dir) -> list[list[int]]:
    """The single-host run: the unsharded model in this process."""
    with InProcessNode(RunConfig(str(model_dir), world_size=1)) as node:
        node.load()
        completions, _, _ = node.generate(_requests(model_dir))
    return [c.token_ids for c in completions]


@pytest.fixture(scope="module")
def two_hosts():
    """Two Ray nodes of 2 CPUs each, the driver connected; torn down (and checked) at the end."""
    tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("RAY_TMPDIR", tmp)
            env.setenv("RAY_USAGE_STATS_ENABLED", "0")
            cluster = _start_cluster()
            try:
                ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
                nodes = [cluster.head_node, *cluster.worker_nodes]
                ray_pids = [p.process.pid for n in nodes for infos in n.all_processes.values() for p in infos]
                yield cluster
            finally:
                ray.shutdown()
                cluster.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert _wait_gone(ray_pids) == [], "Ray processes of the test cluster outlived it"


def _start_cluster(attempts: int = 2):
    """A head and one more node. Ray gives a raylet a fixed 30 s to register, which a loaded 2-core
    host can miss: then everything started is torn down and it is tried once more."""
    from ray.cluster_utils import Cluster
    for attempt in range(1, attempts + 1):
        cluster, before = Cluster(), child_pids()
        try:
            cluster.add_node(num_cpus=2, include_dashboard=False)
            cluster.add_node(num_cpus=2)
            return cluster
        except Exception:
            cluster.shutdown()
            kill_new_children(before)  # a node that failed to start is not the cluster's to stop
            if attempt == attempts:
                raise


def test_generate_joins_a_cluster_started_with_ray_start(model_dir):
    """The user's path: `ray start --head`, then `dgx-emu generate --ray-address auto`; then the
    cluster is stopped (its `ray start --block` process and everything under it)."""
    tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    argv = ["generate", "--prompt", PROMPTS[0], "--max-new-tokens", "8", "--ignore-eos", "--no-spec", "--json"]
    local = subprocess.Popen([sys.executable, "-m", "launch", *argv, "--world-size", "1"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    before = snapshot()["shm"]
    head = None
    try:
        head = start_head(tmp, 2, env)
        joined = subprocess.run([sys.executable, "-m", "launch", *argv, "--world-size", "2", "--ray-address", "auto"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        too_wide = subprocess.run([sys.executable, "-m", "launch", *argv, "--world-size", "4", "--ray-address", "auto"],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        cluster_pids = _descendants(head.pid) | {head.pid}
    finally:
        if head is not None:
            stop_head(head)
        shutil.rmtree(tmp, ignore_errors=True)
        local_out, local_err = local.communicate(timeout=300)
    assert too_wide.returncode == 2 and too_wide.stderr.strip().splitlines() == [  # one line, before any actor
        "error: --placement STRICT_PACK puts all 4 ranks (1 CPU each) on one Ray node, and the largest node of "
        "this cluster holds 2"], too_wide.stderr[-2000:]
    assert joined.returncode == 0, joined.stderr[-2000:]
    assert local.returncode == 0, local_err[-2000:]
    mine, theirs = json.loads(joined.stdout.splitlines()[-1]), json.loads(local_out.splitlines()[-1])
    assert mine["token_ids"] == theirs["token_ids"] and len(mine["token_ids"]) == 8
    assert mine["placement"] == {"hosts": 1, "ranks_per_host": [[0, 1]], "data_plane": "shm"}
    assert _wait_gone(cluster_pids, 60) == [], "processes of the `ray start` cluster outlived it"
    assert snapshot()["shm"] - before == set()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_ranks_joining_a_one_host_cluster_keep_the_fused_collectives():
    """2 GPUs: `ray start --head` (with the no-narrowing GPU environment, as the README says), then
    `generate --device cuda --world-size 2 --ray-address auto` picks symm as a local start does and
    prints the local start's tokens."""
    from cluster.ray_node import GPU_ENV
    tmp = tempfile.mkdtemp(prefix="rg", dir="/tmp")
    env = {**os.environ, **GPU_ENV, "RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    argv = [sys.executable, "-m", "launch", "generate", "--device", "cuda", "--world-size", "2", "--prompt",
            PROMPTS[1], "--max-new-tokens", "16", "--ignore-eos", "--no-spec", "--json"]
    local = subprocess.run(argv, cwd=REPO, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, capture_output=True,
                           text=True, timeout=600)
    head = None
    try:
        head = start_head(tmp, 4, env, gpus=2)
        joined = subprocess.run(argv + ["--ray-address", "auto"], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=600)
    finally:
        if head is not None:
            stop_head(head)
        shutil.rmtree(tmp, ignore_errors=True)
    assert local.returncode == 0 and joined.returncode == 0, (local.stderr[-2000:], joined.stderr[-2000:])
    mine, theirs = json.loads(joined.stdout.splitlines()[-1]), json.loads(local.stdout.splitlines()[-1])
    assert mine["placement"]["data_plane"] == "symm" and mine["token_ids"] == theirs["token_ids"]


# --- the placement rules, without a cluster ---------------------------------------------------
NODE = {"Alive": True, "Resources": {"CPU": 2.0, "memory": 1e9}}


def test_check_fits_refuses_what_no_state_of_the_cluster_could_hold():
    check_fits([NODE, NODE], {"CPU": 1}, 4, "PACK")  # 2 + 2
    check_fits([NODE, {"Alive": True, "Resources": {"CPU": 8.0}}], {"CPU": 1}, 8, "STRICT_PACK")
    with pytest.raises(UserError, match="STRICT_PACK .* holds 2; the cluster as a whole holds 4"):
        check_fits([NODE, NODE], {"CPU": 1}, 4, "STRICT_PACK")
    with pytest.raises(UserError, match="5 ranks .* hold 4 in all"):
        check_fits([NODE, NODE, {"Alive": False, "Resources": {"CPU": 64.0}}], {"CPU": 1}, 5, "SPREAD")
    with pytest.raises(UserError, match="GPU"):
        check_fits([NODE, NODE], {"CPU": 1, "GPU": 1}, 2, "PACK")


def test_replicas_go_round_the_nodes_that_can_hold_them():
    nodes = [{"Alive": True, "NodeID": n, "Resources": {"CPU": cpus}} for n, cpus in (("a", 8.0), ("b", 4.0), ("c", 1.0))]
    assert check_replicas_fit(nodes, {"CPU": 1}, 4, 3, "STRICT_PACK") == ["a", "b", "a"]  # c holds none
    assert check_replicas_fit(nodes, {"CPU": 1}, 2, 4, "STRICT_PACK") == ["a", "b", "a", "b"]
    assert check_replicas_fit(nodes, {"CPU": 1}, 4, 3, "PACK") == [None] * 3  # spans nodes: no hint
    with pytest.raises(UserError, match="4 replicas of 4 ranks .* hold 2, 1, 0 such replicas"):
        check_replicas_fit(nodes, {"CPU": 1}, 4, 4, "STRICT_PACK")
    with pytest.raises(UserError, match="3 replicas of 5 ranks .* hold 13 ranks in all"):
        check_replicas_fit(nodes, {"CPU": 1}, 5, 3, "SPREAD")


def test_a_failed_start_leaves_no_children_behind():
    """What RayNode does after a failed local Ray start: the children started since are killed
    and reaped; older ones are left alone."""
    older = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        before = child_pids()
        assert older.pid in before
        strays = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
        kill_new_children(before)
        assert all(not Path(f"/proc/{p.pid}").exists() for p in strays)  # killed and reaped: no zombie
        assert older.poll() is None
    finally:
        older.kill()
        older.wait()


def test_the_data_plane_follows_the_hosts():
    one, two = ["n1"] * 4, ["n1", "n1", "n2", "n2"]
    cpu = RunConfig("m", world_size=4)
    assert data_plane(cpu, two, comm_auto=True).comm == "shm"  # made hierarchical by the factory
    assert describe(two, "shm")["data_plane"] == "shm within a host, gloo between hosts"
    gpu = RunConfig("m", world_size=4, device="cuda", comm="symm")
    assert data_plane(gpu, one, comm_auto=True).comm == "symm"
    assert data_plane(gpu, two, comm_auto=True).comm == "nccl"
    with pytest.raises(UserError, match="--comm symm needs every rank on one host.* on 2 nodes"):
        data_plane(gpu, two, comm_auto=False)


def test_a_ray_start_off_the_main_thread_runs_on_a_thread_that_outlives_the_caller():
    """Ray's head processes die with the THREAD that forked them (PR_SET_PDEATHSIG): a restart from
    the scheduler's pump thread must start Ray on a thread that is still alive after the pump ends."""
    import threading

    from cluster.ray_node import on_long_lived_thread
    assert on_long_lived_thread(threading.current_thread) is threading.main_thread()
    owners = []
    for _ in range(2):
        caller = threading.Thread(target=lambda: owners.append(on_long_lived_thread(threading.current_thread)))
        caller.start()
        caller.join(10)
        assert not caller.is_alive()
    assert owners[0] is owners[1] and owners[0].is_alive() and owners[0] is not threading.main_thread()


# The two-host cluster (module fixture) lives from its first test to the end of this file: these come last,
# so that no test above ever sees two clusters at once (`--ray-address auto` would have to pick one).
def test_two_hosts_take_the_hierarchical_path_and_match_one_host(two_hosts, model_dir, reference):
    run = RunConfig(str(model_dir), world_size=4)  # comm shm, fp32: 2 hosts x 2 ranks on this 2-core machine
    node = RayNode(run, address=two_hosts.address, placement="SPREAD", startup_timeout_s=90)
    try:
        assert node.layout["hosts"] == 2 and sorted(map(len, node.layout["ranks_per_host"])) == [2, 2], node.layout
        pids = node.node_pids()
        node.load()
        completions, stats, info = node.generate(_requests(model_dir), timeout_s=300)
        calls = node.comm_calls()
    finally:
        node.shutdown()
    assert [c.token_ids for c in completions] == reference
    assert info["placement"]["data_plane"] == "shm within a host, gloo between hosts"
    fused_calls = 2 * node.model_cfg.n_layers * (1 + len(stats.step_s))  # 2 per layer, each forward
    assert all(c.get("allreduce_add_rmsnorm", 0) >= fused_calls for c in calls), calls
    assert len({json.dumps(c, sort_keys=True) for c in calls}) == 1, f"ranks made different calls: {calls}"
    assert _wait_gone(pids) == []
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(shm_name(node.node_id, ""))]


def test_a_layout_the_cluster_cannot_hold_is_refused_before_any_actor(two_hosts, model_dir):
    before = len(ray.util.placement_group_table())
    start = time.monotonic()
    with pytest.raises(UserError, match="largest node of this cluster holds 2; .* use --placement PACK or SPREAD"):
        RayNode(RunConfig(str(model_dir), world_size=4), address=two_hosts.address, placement="STRICT_PACK")
    with pytest.raises(UserError, match="do not fit this Ray cluster"):
        RayNode(RunConfig(str(model_dir), world_size=6), address=two_hosts.address, placement="PACK")
    assert time.monotonic() - start < 10
    assert len(ray.util.placement_group_table()) == before  # refused before placing, so before any actor
