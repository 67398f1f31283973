"""`dgx-emu generate --replicas N`: one batch of prompts split over N copies of the node.

Why: `generate` runs a fixed batch in lockstep on one node; with several prompts and several
replicas, each replica takes every N-th prompt and they decode at once. ReplicaNodes has the node
interface the CLI uses (model_cfg, validate, load, generate, shutdown), so `generate` runs one
node or N the same way. Outputs are those of one node: every request is decoded on its own row
with its own sampling seed, whichever replica it lands on.

A replica that fails (a rank died, after its own restarts if --max-restarts allows them) does not
fail the batch: its prompts are decoded again from the start on a replica that finished, and the
failure is reported in the summary. Only when every replica failed does generate fail.

Stats of the merged batch: time to first token and total time are the slowest replica's; the
decode steps are those of the replica that took longest, so tokens/s over them is the aggregate
rate of all replicas; memory and control overhead are listed per replica.
"""
from __future__ import annotations

import threading

from cluster.faults import RankFailure
from cluster.replicas import replica_makers
from workers.engine import GenerationStats


class ReplicaNodes:
    def __init__(self, nodes: list, on_close=None) -> None:
        """nodes: started (not yet loaded) nodes; on_close: called after they shut down."""
        self.nodes, self.on_close = list(nodes), on_close
        self.model_cfg = self.nodes[0].model_cfg
        self.failures: list[dict] = []

    @classmethod
    def start(cls, run, n: int, build_kwargs: dict) -> "ReplicaNodes":
        """n nodes of `run`, placed as cluster/replicas.py places replicas."""
        makers, on_close = replica_makers(run, n, build_kwargs)
        nodes = []
        try:
            for make in makers:
                nodes.append(make())
        except BaseException:
            for node in nodes:
                node.shutdown()
            if on_close:
                on_close()
            raise
        return cls(nodes, on_close)

    def validate(self, requests) -> None:
        self.nodes[0].validate(requests)

    def load(self, progress=None) -> list[dict]:
        return [report for node in self.nodes for report in node.load(progress)]

    def generate(self, requests, on_tokens=None, spec=None, **kw):
        parts = [requests[i::len(self.nodes)] for i in range(len(self.nodes))]  # replica i: every N-th request
        results: list = [None] * len(self.nodes)

        def run(i: int, node, part) -> None:
            try:
                results[i] = node.generate(part, on_tokens, spec=spec, **kw) if part else None
            except RankFailure as e:
                results[i] = e
        self._each(run, [(i, node, part) for i, (node, part) in enumerate(zip(self.nodes, parts))])
        for i, result in enumerate(results):
            if isinstance(result, RankFailure):
                self.failures.append({"replica": i, "error": str(result)})
                results[i] = self._rerun(parts[i], results, on_tokens, spec, kw, result)
        done = [r for r in results if r is not None]
        by_id = {c.request_id: c for completions, _, _ in done for c in completions}
        completions = [by_id[r.request_id] for r in requests]
        return completions, _merged_stats([s for _, s, _ in done]), self._info(done)

    def _rerun(self, part, results, on_tokens, spec, kw, failure):
        """A failed replica's prompts, again, on the first replica that finished its own."""
        for j, other in enumerate(results):
            if other is not None and not isinstance(other, RankFailure):
                return self.nodes[j].generate(part, on_tokens, spec=spec, **kw)
        raise failure  # every replica failed

    @staticmethod
    def _each(work, jobs) -> None:
        threads = [threading.Thread(target=work, args=job, daemon=True) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _info(self, done) -> dict:
        info = {"replicas": len(self.nodes), "replica_failures": self.failures,
                "memory_per_rank": [m for _, _, i in done for m in i.get("memory_per_rank", [])],
                "control_overhead_per_step_s": max((i.get("control_overhead_per_step_s", 0.0) for _, _, i in done),
                                                   default=0.0)}
        placements = [i["placement"] for _, _, i in done if "placement" in i]
        if placements:
            info["placement"] = placements
        return info

    def set_tracing(self, on: bool) -> None:
        for node in self.nodes:
            node.set_tracing(on)

    def shutdown(self) -> None:
        try:
            for node in self.nodes:
                node.shutdown()
        finally:
            self.nodes = []
            if self.on_close is not None:
                self.on_close()
                self.on_close = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _merged_stats(stats: list[GenerationStats]) -> GenerationStats:
    longest = max(stats, key=lambda s: sum(s.step_s))
    return GenerationStats(ttft_s=max(s.ttft_s for s in stats), step_s=list(longest.step_s),
                           total_s=max(s.total_s for s in stats), spec=longest.spec, modeled=longest.modeled)
