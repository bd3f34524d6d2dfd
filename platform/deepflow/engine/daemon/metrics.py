"""Prometheus metrics with vLLM's meanings under the ``flowserve:`` prefix.

Latency histograms are observed by the daemon as outputs arrive; gauges and token counters
are read from the engine's own stats at scrape time (so they count every request the engine
ran, aborted ones included). Each app gets its own CollectorRegistry: several apps can live
in one process (tests), and the global registry stays untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from deepflow.engine.llm_engine import EngineStats, RequestOutput

PREFIX = "flowserve:"


def _buckets(bounds: str) -> tuple[float, ...]:
    return tuple(float(b) for b in bounds.split())


_TTFT_BUCKETS = _buckets(
    "0.001 0.005 0.01 0.02 0.04 0.06 0.08 0.1 0.25 0.5 0.75 1 2.5 5 7.5 10 20 40"
)
_TOKEN_BUCKETS = _buckets(
    "0.001 0.005 0.01 0.015 0.02 0.025 0.03 0.04 0.05 0.075 0.1 0.15 0.2 0.3 0.5 1 5"
)
_E2E_BUCKETS = _buckets(
    "0.05 0.1 0.3 0.5 0.8 1 1.5 2 2.5 5 10 15 20 30 60 120 240 480 960 1920 7680"
)
FINISH_REASONS = ("stop", "length", "abort")


class _EngineCollector:
    """Gauges and counters the engine keeps itself, read once per scrape."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self.model_name = model_name
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        label = [self.model_name]
        gauges = [
            ("num_requests_running", "Sequences in the running batch.", s.num_running),
            ("num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", s.kv_cache_usage),
        ]
        for name, doc, value in gauges:
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            gauge.add_metric(label, value)
            yield gauge
        counters = [
            ("prompt_tokens", "Prompt tokens prefilled (once per request).", s.prompt_tokens),
            ("generation_tokens", "Tokens generated, every sample counted.", s.generation_tokens),
            ("num_preemptions", "Sequences preempted (recomputed later).", s.num_preemptions),
        ]
        for name, doc, value in counters:
            counter = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            counter.add_metric(label, value)
            yield counter


class DaemonMetrics:
    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, registry=self.registry, buckets=buckets)

        self.ttft = histogram(
            "time_to_first_token_seconds", "Arrival to first token, per request.", _TTFT_BUCKETS
        ).labels(model_name)
        self.tpot = histogram(
            "time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            _TOKEN_BUCKETS,
        ).labels(model_name)
        self.itl = histogram(
            "inter_token_latency_seconds",
            "Time between two outputs of one request.",
            _TOKEN_BUCKETS,
        ).labels(model_name)
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Arrival to finish, per request.", _E2E_BUCKETS
        ).labels(model_name)
        success = Counter(
            PREFIX + "request_success",
            "Requests finished, by finish reason.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self.registry.register(_EngineCollector(model_name, stats))

    def first_token(self, out: RequestOutput) -> None:
        m = out.metrics
        if m.first_token_time is not None:
            self.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, out: RequestOutput) -> None:
        """A request's last output: its latencies and one count under its finish reason
        ('length' if any sample hit its limit, 'abort' if aborted, else 'stop')."""
        m = out.metrics
        reasons = {c.finish_reason for c in out.outputs}
        reason = "abort" if "abort" in reasons else "length" if "length" in reasons else "stop"
        self.success[reason].inc()
        if m.finished_time is None:
            return
        self.e2e.observe(max(0.0, m.finished_time - m.arrival_time))
        tokens = max((len(c.token_ids) for c in out.outputs), default=0)
        if m.first_token_time is not None and tokens > 1:
            self.tpot.observe(max(0.0, m.finished_time - m.first_token_time) / (tokens - 1))

    def aborted(self) -> None:
        """A request that ended without a final output (its client went away)."""
        self.success["abort"].inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
