"""A real Prometheus exporter with the engine daemon's metric names, for tests of the
metrics history and the dashboard's charts where no engine daemon runs.

It serves ``/metrics`` over HTTP from its own registry (prometheus_client's server), and
``serve(n)`` records n finished requests with latencies drawn around the given means.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from deepflow.launcher import free_port

BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass
class MetricsSource:
    model: str = "tiny-llama"
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def hist(name: str) -> Histogram:
            return Histogram(f"flowserve:{name}", name, labels, buckets=BUCKETS, registry=r)

        self.ttft = hist("time_to_first_token_seconds").labels(self.model)
        self.tpot = hist("time_per_output_token_seconds").labels(self.model)
        self.e2e = hist("e2e_request_latency_seconds").labels(self.model)
        self.running = Gauge("flowserve:num_requests_running", "", labels, registry=r)
        self.waiting = Gauge("flowserve:num_requests_waiting", "", labels, registry=r)
        self.kv = Gauge("flowserve:kv_cache_usage_perc", "", labels, registry=r)
        self.prompt = Counter("flowserve:prompt_tokens", "", labels, registry=r).labels(self.model)
        self.generation = Counter("flowserve:generation_tokens", "", labels, registry=r).labels(
            self.model
        )
        self.server, self.thread = start_http_server(self.port, "127.0.0.1", registry=r)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def serve(
        self, n: int, ttft_s: float = 0.05, tpot_s: float = 0.01, tokens: int = 32, seed: int = 0
    ) -> None:
        rng = random.Random(seed)
        for _ in range(n):
            ttft = ttft_s * rng.uniform(0.8, 1.2)
            tpot = tpot_s * rng.uniform(0.8, 1.2)
            self.ttft.observe(ttft)
            self.tpot.observe(tpot)
            self.e2e.observe(ttft + tpot * tokens)
            self.prompt.inc(16)
            self.generation.inc(tokens)

    def load(self, running: int, waiting: int, kv: float) -> None:
        self.running.labels(self.model).set(running)
        self.waiting.labels(self.model).set(waiting)
        self.kv.labels(self.model).set(kv)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
