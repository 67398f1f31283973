"""GET /metrics of `dgx-emu serve`: Prometheus text from prometheus_client.

Two sources:
  * what the HTTP front sees, as histograms and counters it updates itself: time to first token
    (request received -> first token event), inter-token latency (between token events of one
    request; a speculative step delivers several tokens in one event), generated tokens, finished
    requests by finish reason, errors by status. Histograms let Prometheus compute any quantile
    over any window.
  * the scheduler's own state, read at scrape time from `backend.metrics()`: queue length,
    running requests, completed requests, its tokens/s and acceptance length, and its own TTFT /
    inter-token latency samples. A number becomes a gauge; a list of recent samples, or a
    {"p50": .., "p99": ..} mapping, becomes a gauge per quantile; None (nothing yet) is left out.

Each app has its own CollectorRegistry, so several servers in one process (tests, replicas) do
not collide in prometheus_client's global registry.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

PREFIX = "dgx_emu"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# scheduler metrics() key -> (metric name, help)
SCHEDULER_GAUGES = {
    "queue_length": ("queue_length", "requests waiting for a batch slot"),
    "running": ("running_requests", "requests decoding in the batch"),
    "completed": ("completed_requests", "requests the scheduler has finished since it started"),
    "tokens_per_s": ("tokens_per_second", "generated tokens per second over the scheduler's recent window"),
    "acceptance_length": ("acceptance_length", "speculative decoding: tokens accepted per verify step (mean)"),
    "failed": ("failed_requests", "requests the scheduler ended with an error (a rank failed, it closed)"),
    "cancelled": ("cancelled_requests", "requests cancelled (clients that left, stop strings)"),
    "restarts": ("node_restarts", "times the scheduler restarted the node after a failure"),
    "ttft_s": ("scheduler_ttft_seconds", "time to first token at the driver (submit -> first token), recent requests"),
    "itl_s": ("scheduler_inter_token_latency_seconds", "inter-token latency at the driver, recent tokens"),
}
QUANTILES = (0.5, 0.9, 0.99)


class _SchedulerCollector:
    """Reads backend.metrics() when Prometheus scrapes (no thread, no staleness)."""

    def __init__(self, backend) -> None:
        self.backend = backend

    def describe(self):
        return []  # the families depend on what the backend reports; collect() is authoritative

    def collect(self):
        stats = self.backend.metrics()
        for key, (name, doc) in SCHEDULER_GAUGES.items():
            value = stats.get(key)
            if isinstance(value, (list, tuple)):  # recent samples: their quantiles
                value = _quantiles(value) if value else None
            if isinstance(value, dict):
                family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["quantile"])
                for label, v in value.items():
                    if isinstance(v, (int, float)):
                        family.add_metric([_quantile_label(label)], float(v))
                yield family
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=float(value))


def _quantiles(samples) -> dict:
    ordered = sorted(samples)
    return {f"p{q * 100:g}": ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] for q in QUANTILES}


def _quantile_label(key: str) -> str:
    """'p50' -> '0.5', 'p99' -> '0.99', 'mean' stays 'mean'."""
    if key.startswith("p") and key[1:].replace(".", "", 1).isdigit():
        return str(float(key[1:]) / 100)
    return key


class ServeMetrics:
    def __init__(self, backend) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "request received -> first token (HTTP front)",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "between token events of one request",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter(f"{PREFIX}_generated_tokens", "tokens sent to clients (before stop strings cut them)",
                              registry=self.registry)
        self.finished = Counter(f"{PREFIX}_requests_finished", "requests answered in full, by finish reason",
                                ["finish_reason"], registry=self.registry)
        self.errors = Counter(f"{PREFIX}_request_errors", "requests answered with an error, by HTTP status",
                              ["status"], registry=self.registry)
        self.registry.register(_SchedulerCollector(backend))

    def on_tokens(self, count: int, since_previous_s: float, first: bool) -> None:
        (self.ttft if first else self.itl).observe(since_previous_s)
        self.tokens.inc(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
