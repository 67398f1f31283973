"""A rank's virtual clock: how long the work of a REAL run (CPU or GPU actors) would take on an
emulated node (`generate --emulate-node dgx-b200`), rank by rank.

The clock runs the shape-only walk's cost model (workers/cost_model.py) alongside the real
computation. As each module runs, a wrapper around its `forward` asks for the launch plan of that
call (workers/launch_plan.py), built from the module as a GPU run builds it (its meta twin,
emulate.gpu_twin: a CPU run's torch build lays its experts out otherwise) and the call's real shapes (rows, new tokens, keys in
the cache, the routed experts the router actually chose), and the clock follows it:

  * local ops advance the clock by their modeled seconds (charged when the next collective is
    reached, by which time a MoE layer's routing is known);
  * each planned collective is met by the real communicator call it stands for (a different call
    is an error: the plan no longer describes the run). Its transfer is costed from the real
    call's tensors, and it ends on every rank at the last modeled arrival plus the slowest
    transfer, so a rank with more modeled work makes the others wait in virtual time. Until a
    step ends the clock runs as if nobody waited; at the step's end the ranks exchange their
    times once (collectives/clocked.py) and every rank replays the same recurrence (`_settle`).

So a real run and the walk can only disagree if they see different ops; tests/test_virtual_clock.py
holds a real run's clock equal to the walk's prediction. The wrappers exist only with
--emulate-node: without it nothing here runs. With it a step pays for its plans in Python, one
exchange, and on a GPU a read-back of the cache lengths per forward and of the routing per MoE
layer (emulated steps run eagerly anyway; benchmarks/virtual_clock_overhead.py measures the cost).
With --trace the modeled timeline goes to `<trace dir>/modeled/rank<r>.msgpack`, in the measured
trace's format (collectives/trace.py), so the trace tools show both.

Speculative decoding (EAGLE-3): the SpecDecoder hands the clock its draft and tree shape
(ClockedSteps.speculating), and the clock wraps the draft's forward too. Each speculative step then
follows workers/draft_plan.py, as the walk's estimate_spec_step does: the root's pick (at the
step's first "draft" span), each depth's draft forward and its pick, the target's verification
(its forward inside the "verify" span: launch_plan.head_plan(verify=True), a pick of every row,
with the ancestor mask costing nothing beyond the keys each row reads), and the catch-up forward.
Not costed, here or in the walk: the acceptance and commit glue; a sampling row's gathers of full
distributions are costed from the real call but planned nowhere.
"""
from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from pathlib import Path

from collectives.trace import MODELED_DIR, TraceRecorder
from workers.cost_model import STAGES, Collective, CostModel, Op
from workers.draft_plan import draft_forward_plan, draft_pick_plan
from workers.emulate import gpu_twin
from workers.launch_plan import activation_bytes, embed_plan, head_plan, layer_plan
from workers.node_spec import NodeSpec
from workers.tracing import NullRecorder


class ClockError(RuntimeError):
    """The run made a collective its plan does not have (or skipped one it has)."""


class VirtualClock:
    def __init__(self, node: NodeSpec, rank: int, world_size: int, trace_dir: str | None = None,
                 keep_ops: bool = False, comm: str = "symm") -> None:
        """node: the emulated node, resolved from its name or file above workers/ (cluster.hardware.
        node_spec). keep_ops: keep every charged op and settled collective (tests compare them).
        comm: the emulated node's collectives (cost_model.emulated_comm of the run's backend)."""
        if not isinstance(node, NodeSpec):
            raise TypeError(f"VirtualClock needs a NodeSpec (cluster.hardware.node_spec resolves a name or file), "
                            f"got {node!r}")
        self.node, self.rank, self.world = node, rank, world_size
        self.cost = CostModel(node, world_size, comm)
        self.exchange = lambda values: [list(values)]  # collectives/clocked.py installs the ranks' exchange
        self.now_s = 0.0  # inside a step: ignoring the waits for other ranks until the step is settled
        self.queue: deque = deque()  # (layer, plan item) not yet charged
        self.layer, self.step, self.step_start, self.in_step = -1, -1, 0.0, False
        self.experts_read: dict[int, int] = {}  # MoE layer -> routed experts this rank read in the running forward
        self.shape = None  # (batch, new tokens, keys read summed over rows, KV element bytes) of the running forward
        self.ops: list[tuple[int, int, Op]] | None = [] if keep_ops else None  # (step, layer, op)
        self.routing: list[tuple[int, int, int]] = []  # (step, layer, experts read), with keep_ops
        self.settled: list[tuple[int, str, float, float]] = []  # (step, call, arrival, end), with keep_ops
        self.step_seconds: list[float] = []
        self.step_colls: list[tuple[float, float]] = []  # this step's (arrival, transfer), not yet settled
        self.events: list[tuple] = []  # this step's spans and collective rows, in unsettled time
        self.span: list | None = None  # the modeled stage being coalesced: [name, layer, t0, t1]
        self.seq = 0
        self.pending: tuple | None = None  # the collective between arrive() and depart()
        self.route_after: tuple | None = None  # (layer, MoE) whose input the next fused all-reduce returns
        self.recorder = None
        if trace_dir:
            self.recorder = TraceRecorder(Path(trace_dir) / MODELED_DIR, rank, world_size, f"modeled:{node.name}",
                                          device="virtual", now=self.now_ns,
                                          header={"timeline": "modeled", "node": node.name, "clock": "virtual_ns"})
            self.recorder.algorithm_of = self.cost.algorithm
        self.recording = self.recorder is not None
        self.phase: str | None = None  # the engine's span the run is in ("draft", "verify", ...)
        self.spec: tuple | None = None  # (draft, tree shape) of the speculative decoder, once it said so
        self.draft_marks: list = []  # the wrappers of that draft's forward
        self.batch, self.draft_spans = 0, 0  # the running step's rows; its "draft" spans so far
        self.step_fields: list[tuple[int, dict]] = []  # (step, what its end reported), with keep_ops

    def now_ns(self) -> int:
        return round(self.now_s * 1e9)

    # --- local ops ----------------------------------------------------------------------------
    def charge(self, op: Op, layer: int) -> None:
        start = self.now_s
        self.now_s = start + op.seconds
        if self.ops is not None:
            self.ops.append((self.step, layer, op))
        stage = STAGES[op.part]
        if self.span is not None and self.span[0] == stage and self.span[1] == layer:
            self.span[3] = self.now_s
        else:
            self._close_span()
            self.span = [stage, layer, start, self.now_s]

    def _close_span(self) -> None:
        if self.span is not None and self.recording:
            self.events.append(("span", len(self.step_colls), *self.span))
            if not self.in_step:
                self._emit([0.0], [])
        self.span = None

    def _charge_until_collective(self) -> tuple[int, Collective] | None:
        """Charges queued local ops up to the next planned collective, which it returns (None: none queued)."""
        while self.queue:
            layer, item = self.queue.popleft()
            if isinstance(item, Collective):
                return layer, item
            for op in [item] if isinstance(item, Op) else item():
                self.charge(op, layer)
        return None

    def follow(self, plan: list, layer: int = -1) -> None:
        """A module call's plan: what is left of the previous one is charged, this one is queued."""
        self.flush()
        self.queue.extend((layer, item) for item in plan)

    def flush(self) -> None:
        planned = self._charge_until_collective()
        while planned is not None and planned[1].optional:  # a call this run need not make
            planned = self._charge_until_collective()
        if planned is not None:
            raise ClockError(f"rank {self.rank}: the plan of layer {planned[0]} has {planned[1].call} "
                             f"({planned[1].name}) but the run never made that call")

    # --- collectives (called by collectives/clocked.py) ----------------------------------------
    def arrive(self, call: str, args: tuple) -> None:
        planned = self._charge_until_collective()
        while planned is not None and planned[1].optional and call not in (planned[1].call, *planned[1].accepts):
            planned = self._charge_until_collective()  # the run passed an optional call by
        if planned is not None and call not in (planned[1].call, *planned[1].accepts):
            raise ClockError(f"rank {self.rank}: layer {planned[0]}'s plan has {planned[1].call} "
                             f"({planned[1].name}) where the run calls {call}")
        if planned is not None:  # costed as the emulated GPU makes the call
            layer, name, part, costed = planned[0], planned[1].name, planned[1].part, planned[1].call
        else:  # a call no plan has (sampling's gather of full logits): costed all the same
            layer, name, part, costed = self.layer, call, "head", call
        ops = self.cost.collective(Collective(costed, name, part, self.cost.message_bytes(call, args)))
        self._close_span()
        self.pending = (call, layer, ops, self.now_s, sum(op.seconds for op in ops))

    def depart(self, out, record: tuple | None) -> None:
        """After the real call: inside a step the collective ends, for now, after this rank's own
        transfer (the step's end settles the waits); outside one it is settled at once."""
        call, layer, ops, arrival, transfer = self.pending
        if self.route_after is not None and call == "allreduce_add_rmsnorm":
            self._route(*self.route_after, out[0])
        if self.ops is not None:
            self.ops += [(self.step, layer, op) for op in ops]
        self.seq += 1
        self.events.append(("coll", len(self.step_colls), call, layer, self.seq, arrival, record))
        self.step_colls.append((arrival, transfer))
        self.now_s = arrival + transfer
        if not self.in_step:
            self._settle(arrival)

    # --- settling: every rank's modeled times, one exchange per step ----------------------------
    def _settle(self, start: float) -> None:
        """Each collective of the step ends at the last arrival plus the slowest transfer; every
        event after it moves by what this rank waited. One exchange of (start, then per collective
        the work since the previous one and its transfer) carries what the recurrence needs."""
        mine, previous_end = [start], start
        for arrival, transfer in self.step_colls:
            mine += [arrival - previous_end, transfer]
            previous_end = arrival + transfer
        rows = self.exchange(mine) if self.step_colls else [mine]
        ready, shifts, ends = [row[0] for row in rows], [0.0], []
        for k, (arrival, transfer) in enumerate(self.step_colls):
            last = max(t + row[1 + 2 * k] for t, row in zip(ready, rows))
            end = last + max(row[2 + 2 * k] for row in rows)
            ends.append(end)
            shifts.append(end - (arrival + transfer))
            ready = [end] * len(rows)
        self._emit(shifts, ends)
        self.now_s += shifts[-1]
        self.step_colls = []

    def _emit(self, shifts: list[float], ends: list[float]) -> None:
        """The step's spans and collective rows at their settled times (to the trace, and to
        `settled` with keep_ops)."""
        ns = lambda t: round(t * 1e9)  # noqa: E731
        for event in self.events:
            if event[0] == "span":
                _, segment, name, layer, t0, t1 = event
                if self.recording:
                    self.recorder.add_span((name, layer, self.step, ns(t0 + shifts[segment]), ns(t1 + shifts[segment])))
                continue
            _, k, call, layer, seq, arrival, record = event
            arrival += shifts[k]
            if self.ops is not None:
                self.settled.append((self.step, call, arrival, ends[k]))
            if record is not None and self.recording:
                op_name, sent, dtype, received = record
                self.recorder.add_collective((op_name, list(range(self.world)), seq, sent, dtype, layer, self.step,
                                              ns(arrival), ns(ends[k]), received))
        self.events = []

    # --- steps (the engine's recorder calls, through ClockedSteps) -----------------------------
    def step_begin(self, step: int, requests: list[str]) -> None:
        self.flush()
        self._close_span()
        self.step, self.step_start, self.layer, self.in_step = step, self.now_s, -1, True
        self.batch, self.draft_spans = len(requests), 0
        if self.recording:
            self.recorder.step_begin(step, requests)

    def step_end(self, tokens: int, **fields) -> None:
        self.flush()
        self._close_span()
        self._settle(self.step_start)
        self.in_step = False
        self.step_seconds.append(self.now_s - self.step_start)
        if self.ops is not None:
            self.step_fields.append((self.step, fields))
        if self.recording:
            self.recorder.step_end(tokens, **fields)

    def take_stats(self) -> dict:
        """The modeled times of the steps since the last call: step 0 (prefill and first token),
        then each decode step."""
        steps, self.step_seconds = self.step_seconds, []
        return {"node": self.node.name, "ttft_s": steps[0] if steps else None, "step_s": steps[1:],
                "total_s": sum(steps)}

    def set_recording(self, on: bool) -> None:
        """Paused tracing pauses the modeled tracks too (the clock keeps counting)."""
        self.recording = on and self.recorder is not None

    def close(self) -> None:
        for mark in self.draft_marks:
            mark.remove()
        self.draft_marks, self.spec = [], None
        if self.recorder is not None:
            self.recorder.close()

    # --- the wrappers that feed the clock the model's calls --------------------------------------
    def instrument(self, model) -> list:
        """Wraps the model's forward, each decoder layer's and each expert-parallel MoE's experts
        (the experts this rank computes, after the dispatch); returns handles."""
        twin = gpu_twin(model)  # the plans are the GPU build's (this run may be the torch build)
        handles = [_Shadow(model, "forward", lambda original: self._model_forward(twin, original))]
        for i, layer in enumerate(model.layers):
            handles.append(_Shadow(layer, "forward", lambda original, i=i, layer=layer:
                                   self._layer_forward(twin, layer, i, original)))
            block = layer.feed_forward
            if layer.is_moe and block.expert_parallel:
                handles.append(_Shadow(block.experts, "forward",
                                       lambda original, i=i: self._local_experts(i, original)))
        return handles

    def _model_forward(self, model, original):
        def forward(token_ids, cache, **kwargs):
            batch, tokens = token_ids.shape
            keys = int(cache.lengths.sum()) + batch * tokens  # each row reads its cache and its new tokens
            self.shape = (batch, tokens, keys, cache.k[0].element_size())
            self.layer = -1
            self.follow(embed_plan(self.cost, model, batch, tokens))
            out = original(token_ids, cache, **kwargs)
            self.layer = -1
            self.follow(head_plan(self.cost, model, batch, tokens, bool(kwargs.get("last_only")),
                                  verify=self.phase == "verify"))
            return out
        return forward

    # --- speculative decoding: the draft's forwards and picks -------------------------------------
    def speculating(self, draft, shape: tuple[int, int, int]) -> None:
        """The speculative decoder's draft and tree shape (top_k, depth, tokens): its forward is
        wrapped (once per draft; the draft is planned from itself: its modules have the GPU's shapes)."""
        if self.spec is None or self.spec[0] is not draft:
            for mark in self.draft_marks:
                mark.remove()
            self.draft_marks = [_Shadow(draft, "forward", lambda original: self._draft_forward(draft, original))]
        self.spec = (draft, tuple(shape))

    @contextmanager
    def phase_of(self, name: str):
        """The run inside the engine's span `name`. A step's first "draft" span grows the tree: it
        opens with the draft's pick of the root's children (from the catch-up's logits)."""
        previous, self.phase = self.phase, name
        if name == "draft" and self.spec is not None and self.in_step:
            if self.draft_spans == 0:
                draft, (top_k, _, _) = self.spec
                self.follow(draft_pick_plan(self.cost, draft, self.batch, top_k))
            self.draft_spans += 1
        try:
            yield
        finally:
            self.phase = previous

    def _draft_forward(self, draft, original):
        def forward(tokens, cache, *, target_features=None, logit_rows=None, **kwargs):
            batch, n = tokens.shape
            keys = int(cache.lengths.sum()) + batch * n  # each row reads its cache and its new tokens
            rows = n if logit_rows is None else logit_rows.shape[1]
            plan = draft_forward_plan(self.cost, draft, batch, n, keys, target_features is not None, rows)
            if target_features is None and self.spec is not None:  # a depth of the tree: its pick follows
                top_k = self.spec[1][0]
                plan += draft_pick_plan(self.cost, draft, batch * top_k, top_k)
            self.layer = -1
            self.follow(plan)
            return original(tokens, cache, target_features=target_features, logit_rows=logit_rows, **kwargs)
        return forward

    def _layer_forward(self, twin, layer, index: int, original):
        """layer: the run's module (its routing is read); its plan is the GPU twin's layer's."""
        act, planned = activation_bytes(twin), twin.layers[index]

        def forward(*args, **kwargs):
            self.layer = index
            batch, tokens, keys, kv_bytes = self.shape
            read = (lambda: self._experts_of(index)) if layer.is_moe else 0
            self.follow(layer_plan(self.cost, planned, act, batch, tokens, keys, kv_bytes, read), layer=index)
            if layer.is_moe and not layer.feed_forward.expert_parallel:
                self.route_after = (index, layer.feed_forward)  # its input: the next collective's output
            return original(*args, **kwargs)
        return forward

    def _experts_of(self, layer: int) -> int:
        try:
            read = self.experts_read.pop(layer)
        except KeyError:
            raise ClockError(f"rank {self.rank}: MoE layer {layer} ran without routing any token") from None
        if self.ops is not None:
            self.routing.append((self.step, layer, read))
        return read

    def _route(self, layer: int, block, normed) -> None:
        """Tensor-parallel experts: the distinct experts the MoE's input routes to, from the module's
        own router on the collective's output (the fused path routes inside a kernel the clock
        cannot see; the two agree but for exact ties)."""
        self.route_after = None
        expert_ids, _ = block.route(normed.reshape(-1, normed.shape[-1]))  # (N, k)
        self.experts_read[layer] = len(set(expert_ids.flatten().tolist()))  # a handful of ids: faster than unique()

    def _local_experts(self, layer: int, original):
        def forward(x, local_expert):
            self.experts_read[layer] = len(set(local_expert.tolist()))
            return original(x, local_expert)
        return forward


class _Shadow:
    """Shadows `obj.name` (a forward or a method) with make(original) until removed."""

    def __init__(self, obj, name: str, make) -> None:
        self.obj, self.name = obj, name
        setattr(obj, name, make(getattr(obj, name)))

    def remove(self) -> None:
        self.obj.__dict__.pop(self.name, None)  # the class's attribute shows through again


class ClockedSteps:
    """The engine's recorder while the clock runs: the trace recorder's calls (or a NullRecorder's),
    and the step boundaries to the clock. Not a NullRecorder, so the engine runs steps eagerly (a
    replayed CUDA graph would pass by the clock's wrappers)."""

    def __init__(self, recorder, clock: VirtualClock) -> None:
        self.recorder, self.clock = recorder or NullRecorder(), clock

    @contextmanager
    def span(self, name: str):
        with self.recorder.span(name), self.clock.phase_of(name):
            yield

    def speculating(self, draft, shape: tuple[int, int, int]) -> None:
        """workers/speculative.py's SpecDecoder: its draft and tree shape, for the clock."""
        self.clock.speculating(draft, shape)

    def step_begin(self, step: int, requests: list[str]) -> None:
        self.clock.step_begin(step, requests)
        self.recorder.step_begin(step, requests)

    def step_end(self, tokens: int, **fields) -> None:
        self.recorder.step_end(tokens, **fields)
        self.clock.step_end(tokens, **fields)

    def close(self) -> None:
        self.recorder.close()
