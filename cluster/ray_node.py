"""The node as Ray actors: one actor per virtual GPU, placed together, driven in lockstep.

Ray is the control plane only: it starts, places and supervises the ranks and carries msgpack
requests. Tensors move between ranks through the data plane (torch.distributed, later shared
memory), never through Ray objects.

A request batch is ONE Ray call per rank: every rank runs the whole generation loop itself and
they stay in step through their collectives. The driver streams tokens by polling rank 0
(a threaded actor, so the poll runs beside the generation) and measures the control overhead:
driver wall time minus the slowest rank's own time in the loop.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.clocks import estimate_offset, write_clock_file
from cluster.interrupts import deferred_interrupts, raise_if_interrupted
from cluster.node import UserError
from cluster.placement import check_fits, data_plane, describe
from cluster.faults import NodeStartError, RankFailure, diagnose  # noqa: F401 (NodeStartError: re-exported)
from collectives.factory import shm_name
from collectives.shm_sync import sweep_segments
from workers.engine import Completion, GenerationStats, Request
from workers.messages import pack, pack_batch, pack_result, pack_run, unpack, unpack_batch, unpack_result, unpack_run
from workers.run_config import RunConfig

LOCAL_HOST = "127.0.0.1"


GPU_ENV = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1",
           # NVLink multicast stays off on the lent machines (and costs nothing to say elsewhere)
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def bind_gpu() -> int:
    """Makes this actor's GPU (the one Ray assigned it) the current device. Ray is told not to
    narrow CUDA_VISIBLE_DEVICES (GPU_ENV: in the driver's environment before a local Ray starts, and
    in each GPU actor's runtime_env), so every actor sees every GPU of its host: peer access
    and symmetric memory need that (with one visible GPU each, torch refuses "allocations from
    overlapping devices"), and a rank must therefore pick its own device explicitly."""
    import torch
    assigned = ray.get_gpu_ids()
    if len(assigned) != 1:
        raise RuntimeError(f"a GPU rank needs exactly one GPU from Ray, got {assigned}")
    index = int(assigned[0])
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"Ray assigned GPU {index}, but this process sees {torch.cuda.device_count()} GPUs "
                           "(is CUDA_VISIBLE_DEVICES narrowed outside Ray?)")
    torch.cuda.set_device(index)
    return index


def child_pids() -> set[int]:
    """The process ids of this process's children (empty where there is no /proc)."""
    me, children = os.getpid(), set()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        children.add(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return children


def kill_new_children(before: set[int]) -> None:
    """Kills (and reaps) the children started since `before`. A Ray start that fails (its raylet
    missed Ray's start-up window) leaves the head processes it did start -- GCS, monitor, dashboard,
    log monitor -- running until this process exits; on a loaded host every retry added more."""
    for pid in child_pids() - before:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


_ray_owner: ThreadPoolExecutor | None = None


def on_long_lived_thread(fn):
    """Runs fn() on a thread that lives as long as this process, and returns its result. Ray starts
    its head processes (GCS, raylet, ...) with PR_SET_PDEATHSIG, which Linux ties to the THREAD that
    forked them: a local Ray started from a short-lived thread (the scheduler's pump restarting a
    failed node) is SIGKILLed when that thread ends, and this process's next Ray call waits 60 s
    for the dead GCS before Ray terminates the whole process. The main thread lives long enough;
    any other caller hands the start to one idle worker thread kept for the purpose."""
    global _ray_owner
    if threading.current_thread() is threading.main_thread():
        return fn()
    if _ray_owner is None:
        _ray_owner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-owner")
    return _ray_owner.submit(fn).result()


def probe_gcs(address: str, timeout_s: float = 10.0) -> None:
    """Raises ConnectionError unless something answers at the cluster's GCS address: ray.init waits
    minutes for a GCS that is not there. "auto" is resolved as Ray resolves it (RAY_ADDRESS, then
    the address `ray start` left in its temp dir); a form it cannot resolve is left to ray.init."""
    import socket
    from ray._private.services import canonicalize_bootstrap_address_or_die
    if address.startswith("ray://"):
        return
    resolved = canonicalize_bootstrap_address_or_die(address)  # ConnectionError: no cluster found
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise ConnectionError(f"no Ray cluster answers at {resolved} ({e})") from None


class RankActor:
    """The Ray-side shell of one Worker (the Worker itself knows nothing of Ray).

    The actor is threaded (a poll runs beside a generation), and CUDA's current device belongs to
    a thread, so every method that touches the GPU first binds this rank's GPU in the thread it
    runs on (`_on_own_gpu`); binding once in __init__ left later calls on GPU 0, where the
    symmetric-memory rendezvous of TP2 found both ranks."""

    def __init__(self, rank: int, run_msg: bytes) -> None:
        import torch
        self.rank, self.run = rank, unpack_run(run_msg)
        torch.set_num_threads(self.run.threads_per_rank)
        self.gpu_index = bind_gpu() if self.run.device == "cuda" else None
        self.store, self.worker, self.comm = None, None, None
        self.load_done, self.load_total = 0, 0
        self.stream: list = []

    def open_store(self, host: str) -> int:
        from collectives.torch_dist import open_store
        self.store = open_store(host, self.run.world_size, self.run.collective_timeout_s)
        return self.store.port

    def _on_own_gpu(self) -> None:
        if self.gpu_index is not None:
            import torch
            torch.cuda.set_device(self.gpu_index)

    def connect(self, rendezvous: dict) -> int:
        """rendezvous: {"file": path} for one host, or {"host": ip, "port": n} across hosts; "hosts":
        the Ray node id each rank's bundle was placed on (the data plane follows it)."""
        self._on_own_gpu()
        hosts = rendezvous["hosts"]
        if hosts[self.rank] != ray.get_runtime_context().get_node_id():
            raise RuntimeError(f"rank {self.rank} runs on Ray node {ray.get_runtime_context().get_node_id()}, "
                               f"but its bundle was placed on {hosts[self.rank]}")
        from collectives.factory import make_communicator
        from collectives.torch_dist import file_store, join_store
        from cluster.hardware import emulated_node, gpu_spec
        from workers.worker import Worker
        if "file" in rendezvous:
            store = file_store(rendezvous["file"], self.run.world_size)
        else:
            store = self.store or join_store(rendezvous["host"], rendezvous["port"], self.run.world_size,
                                             self.run.collective_timeout_s)
        self.comm = make_communicator(self.run.comm, self.rank, self.run.world_size, store, rendezvous["node_id"],
                                      self.run.collective_timeout_s, self.run.device, hosts=hosts)
        self.worker = Worker(self.rank, self.run, self.comm, gpu_spec(self.run.hardware).as_dict(),
                             emulated_node(self.run.emulate_node))
        return os.getpid()

    def load(self) -> bytes:
        def progress(done: int, total: int) -> None:
            self.load_done, self.load_total = done, total
        self._on_own_gpu()
        return pack(self.worker.load(progress))

    def load_progress(self) -> tuple[int, int]:
        return self.load_done, self.load_total

    def generate(self, requests_msg: bytes) -> bytes:
        requests, spec = unpack_batch(requests_msg)
        self.stream = []
        self._on_own_gpu()

        def on_tokens(step: int, new: list[list[int]]) -> None:
            if self.rank == 0:
                self.stream.append([step, new])

        start = time.perf_counter()
        completions, stats = self.worker.generate(requests, on_tokens, spec)
        busy = time.perf_counter() - start
        extra = {"rank": self.rank, "busy_s": busy, "kv_cache_bytes": self.worker.kv_cache_bytes(requests),
                 "weights_bytes": self.worker.model.weight_bytes()}
        return pack_result(completions, stats, extra)

    def set_tracing(self, on: bool) -> None:
        self._on_own_gpu()
        self.worker.set_tracing(on)

    def clock(self) -> tuple[int, str]:
        from cluster.clocks import local_clock
        return local_clock()

    def poll(self, since: int) -> bytes:
        return pack(self.stream[since:])

    def comm_calls(self) -> dict:
        """Calls per operation that took the several-host (hierarchical) path; {} for a flat backend."""
        return dict(getattr(self.comm, "hierarchical_calls", {}))

    def close(self) -> None:
        if self.worker is not None:
            self._on_own_gpu()
            self.worker.close()
        self.worker = self.store = None


class RayNode:
    def __init__(self, run: RunConfig, address: str | None = None, placement: str = "STRICT_PACK",
                 startup_timeout_s: float = 120.0, dashboard: bool = False, comm_auto: bool = False,
                 target_node: str | None = None) -> None:
        """comm_auto: run.comm is a default, not the user's choice: it may follow where the ranks land
        (cluster/placement.py). Layouts the cluster cannot hold are refused before any actor starts.
        target_node: a Ray node id this node's ranks should go to if it has room (STRICT_PACK only;
        replicas use it to take one host each, cluster/replicas.py)."""
        from cluster.hardware import emulated_node
        from model.config import load_model_config
        self.run, self.timeout, self.comm_auto, self.target_node = run, startup_timeout_s, comm_auto, target_node
        self.model_cfg = load_model_config(run.model_path)
        emulated_node(run.emulate_node)  # refused here, not in every actor (each resolves it again for its worker)
        self.actors, self.pg, self.started_ray, self.scratch = [], None, False, None
        self.clock_offsets: dict = {}
        self.node_id = uuid.uuid4().hex[:12]  # names this node's shared-memory segments
        try:
            self._start(address, placement, dashboard)
        except ray.exceptions.RayError as e:  # Ray's own failure (an RPC timeout, a rank dying at start)
            self.shutdown()
            last = (str(e).strip().splitlines() or [""])[-1]  # a rank's error carries its traceback
            raise NodeStartError(f"the node did not start: {type(e).__name__}: {last}") from None
        except BaseException:
            self.shutdown()
            raise

    def _start(self, address: str | None, placement: str, dashboard: bool) -> None:
        world = self.run.world_size
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            if address:
                self.join(address)
            else:
                if self.run.device == "cuda":  # read by the raylet and its workers: set before Ray starts
                    os.environ.update(GPU_ENV)
                self._start_local_ray(world, dashboard)
                self.started_ray = True
        bundle = {"CPU": 1, "GPU": 1} if self.run.device == "cuda" else {"CPU": 1}
        if not self.started_ray:  # a cluster of unknown shape: a layout it can never hold is refused now
            check_fits(ray.nodes(), bundle, world, placement)
        hint = {"_soft_target_node_id": self.target_node} if self.target_node and placement == "STRICT_PACK" else {}
        self.pg = placement_group([bundle] * world, strategy=placement, **hint)
        try:
            ray.get(self.pg.ready(), timeout=self.timeout)
        except ray.exceptions.GetTimeoutError:
            raise NodeStartError(f"could not place {world} ranks ({bundle} each, {placement}) within "
                               f"{self.timeout:.0f} s: the cluster lacks the resources") from None
        placed = placement_group_table(self.pg)["bundles_to_node_id"]
        self.hosts = [placed[r] for r in range(world)]  # Ray node id of every rank: the data plane follows it
        self.run = data_plane(self.run, self.hosts, self.comm_auto)  # refuses a backend the hosts cannot carry
        self.layout = describe(self.hosts, self.run.comm)
        actor_cls = ray.remote(max_concurrency=4)(RankActor)  # serving: loop, poll, push
        gpus = 1 if self.run.device == "cuda" else 0
        msg = pack_run(self.run)
        env = {"runtime_env": {"env_vars": GPU_ENV}} if gpus else {}
        self.actors = [actor_cls.options(
            num_cpus=1, num_gpus=gpus, name=None, **env,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
        ).remote(r, msg) for r in range(world)]
        if self.started_ray:  # every rank on this host: rendezvous through a private file
            self.scratch = tempfile.mkdtemp(prefix="dgx-emu-node-")
            rendezvous = {"file": os.path.join(self.scratch, "store")}
        else:
            host = ray.get(self.actors[0].__ray_call__.remote(lambda self: ray.util.get_node_ip_address()),
                           timeout=self.timeout)
            rendezvous = {"host": host, "port": ray.get(self.actors[0].open_store.remote(host), timeout=self.timeout)}
        rendezvous["node_id"], rendezvous["hosts"] = self.node_id, self.hosts
        self.pids = ray.get([a.connect.remote(rendezvous) for a in self.actors], timeout=self.timeout)
        self.clock_offsets = {"start": self.measure_clocks()}

    def measure_clocks(self) -> list[dict]:
        """Each rank's clock offset against the driver's (see cluster/clocks.py)."""
        return [{"rank": r, **estimate_offset(lambda a=a: ray.get(a.clock.remote(), timeout=self.timeout))}
                for r, a in enumerate(self.actors)]

    @staticmethod
    def join(address: str) -> None:
        """Connects this process to the Ray cluster at `address` ("auto": the one `ray start` left here)."""
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            probe_gcs(address)
        except ConnectionError as e:  # nothing to join there: the flag is at fault
            raise UserError(f"--ray-address {address}: {e}") from None
        for attempt in (1, 2):  # something answers: a failure now is the cluster's (an overloaded GCS)
            try:
                ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
                return
            except ConnectionError as e:
                ray.shutdown()
                if attempt == 2:
                    raise NodeStartError(f"could not join the Ray cluster at {address} (2 attempts): {e}") from None

    @staticmethod
    def _start_local_ray(world: int, dashboard: bool, attempts: int = 2) -> None:
        """Starts a local Ray (no dashboard unless asked). Note: Ray 2.60 turns a 127.0.0.1 node
        address into the host's own IP and binds its gRPC servers on the wildcard address, so Ray
        itself is not loopback-only; our data plane opens no socket. Ray gives its raylet a fixed
        30 s to come up, which an overloaded host can miss: then it cleans up and tries once more
        before giving up with one clear error."""
        for attempt in range(1, attempts + 1):
            before = child_pids()
            try:
                on_long_lived_thread(lambda: ray.init(
                    address="local",  # a new instance even where `ray start` left a cluster to join
                    num_cpus=max(os.cpu_count() or 1, world), include_dashboard=dashboard,
                    _node_ip_address=LOCAL_HOST, logging_level=logging.ERROR, log_to_driver=False))
                return
            except Exception as e:  # Ray raises a bare Exception for a startup timeout
                ray.shutdown()
                kill_new_children(before)  # the failed attempt's GCS, monitor, dashboard...
                if attempt == attempts:
                    raise NodeStartError(f"could not start a local Ray instance ({attempts} attempts): {e}") from None

    def load(self, progress=None) -> list[dict]:
        futures = [a.load.remote() for a in self.actors]
        pending, deadline = list(futures), time.monotonic() + max(self.timeout, 3600)
        with deferred_interrupts():
            while pending:
                raise_if_interrupted()
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
                if progress:
                    progress([ray.get(a.load_progress.remote(), timeout=self.timeout) for a in self.actors])
                if time.monotonic() > deadline:
                    raise TimeoutError("loading the model did not finish in time")
        self.load_reports = [unpack(r) for r in ray.get(futures, timeout=self.timeout)]
        return self.load_reports

    def generate(self, requests: list[Request], on_tokens=None, timeout_s: float = 3600.0,
                 spec=None) -> tuple[list[Completion], GenerationStats, dict]:
        """spec: a model.spec.SpecConfig (EAGLE-3 speculative decoding, still one call per rank), or None."""
        start = time.perf_counter()
        payload = pack_batch(requests, spec)
        futures = [a.generate.remote(payload) for a in self.actors]
        rank_of = {ref: r for r, ref in enumerate(futures)}
        pending, seen, deadline = list(futures), 0, time.monotonic() + timeout_s
        with deferred_interrupts():
            while True:
                raise_if_interrupted()
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.02)
                failure = diagnose(done, rank_of) if done else None
                if failure is None:
                    try:
                        news = unpack(ray.get(self.actors[0].poll.remote(seen), timeout=self.timeout))
                    except ray.exceptions.RayError:
                        failure = diagnose(futures, rank_of) or RankFailure(0, "stopped answering")
                if failure is not None:
                    failure.detected_after_s = time.perf_counter() - start
                    self.abort()
                    raise failure
                for step, new in news:
                    seen += 1
                    if on_tokens:
                        on_tokens(step, new)
                if not pending:
                    break
                if time.monotonic() > deadline:
                    self.abort()
                    raise TimeoutError(f"generation did not finish within {timeout_s:.0f} s")
        results = [unpack_result(r) for r in ray.get(futures, timeout=self.timeout)]
        wall = time.perf_counter() - start
        completions, stats, _ = results[0]
        busiest = max(extra["busy_s"] for _, _, extra in results)
        steps = 1 + len(stats.step_s)
        memory = [{"rank": e["rank"], "weights_bytes": e["weights_bytes"], "kv_cache_bytes": e["kv_cache_bytes"]}
                  for _, _, e in results]
        info = {"memory_per_rank": memory, "control_overhead_s": wall - busiest,
                "control_overhead_per_step_s": (wall - busiest) / steps, "placement": self.layout}
        return completions, stats, info

    def set_tracing(self, on: bool) -> None:
        """Pauses or resumes tracing on every rank (the node must have been started with a trace directory)."""
        ray.get([a.set_tracing.remote(on) for a in self.actors], timeout=self.timeout)

    def comm_calls(self) -> list[dict]:
        """Per rank, the calls that took the several-host (hierarchical) path, by operation."""
        return ray.get([a.comm_calls.remote() for a in self.actors], timeout=self.timeout)

    def node_pids(self) -> list[int]:
        """The process id of every rank, in rank order."""
        return list(self.pids)

    def abort(self) -> None:
        """Kills every rank at once (some may be blocked in a collective with a dead peer)."""
        for actor in self.actors:
            ray.kill(actor)

    def shutdown(self) -> None:
        if self.run.trace_dir and self.actors:
            try:
                self.clock_offsets["end"] = self.measure_clocks()
            except Exception:  # a dead rank: keep the start offsets, the trace tools say what is missing
                pass
            write_clock_file(self.run.trace_dir, self.clock_offsets)
        for actor in self.actors:
            try:
                ray.get(actor.close.remote(), timeout=10)
            except Exception:
                pass
            ray.kill(actor)
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
            self.started_ray = False
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
        sweep_segments(shm_name(self.node_id, ""))  # segments a crashed rank never unlinked

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
