"""A world of one, run in the driver's own process: no Ray, no sockets.

It is the unsharded reference the sharded node is checked against, and the quickest way to
step through the model in a debugger. It offers the same interface as the Ray node.
"""
from __future__ import annotations

from cluster.clocks import estimate_offset, local_clock, write_clock_file
from cluster.hardware import emulated_node, gpu_spec
from collectives.communicator import SingleRankCommunicator
from workers.engine import Completion, GenerationStats, Request
from workers.run_config import RunConfig
from workers.worker import Worker


class InProcessNode:
    def __init__(self, run: RunConfig) -> None:
        if run.world_size != 1:
            raise ValueError("InProcessNode runs world size 1 only")
        self.run = run
        self.worker = Worker(0, run, SingleRankCommunicator(), gpu_spec(run.hardware).as_dict(),
                             emulated_node(run.emulate_node))
        self.model_cfg = self.worker.model_cfg

    def load(self, progress=None) -> list[dict]:
        return [self.worker.load(progress)]

    def generate(self, requests: list[Request], on_tokens=None,
                 spec=None) -> tuple[list[Completion], GenerationStats, dict]:
        completions, stats = self.worker.generate(requests, on_tokens, spec)
        memory = [{"rank": 0, "weights_bytes": self.worker.model.weight_bytes(),
                   "kv_cache_bytes": self.worker.kv_cache_bytes(requests)}]
        return completions, stats, {"memory_per_rank": memory, "control_overhead_s": 0.0}

    def set_tracing(self, on: bool) -> None:
        self.worker.set_tracing(on)

    def shutdown(self) -> None:
        if self.run.trace_dir:
            same = [{"rank": 0, **estimate_offset(local_clock)}]
            write_clock_file(self.run.trace_dir, {"start": same, "end": same})
        self.worker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
