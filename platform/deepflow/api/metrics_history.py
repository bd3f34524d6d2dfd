"""Serving metrics over time, for the dashboard's charts.

Engine daemons export cumulative Prometheus counters and histograms at ``/metrics``. A
background sampler in the API process scrapes every ready instance every few seconds and
turns the change since its previous scrape into one point per deployment: time to first
token (median and mean), time per output token, end-to-end latency, requests and tokens per
second, and the load gauges. Points live in a bounded in-memory ring per deployment (an
hour at the default interval); a restarted API starts an empty history.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

PREFIX = "flowserve:"
HISTOGRAMS = {
    "ttft": "time_to_first_token_seconds",
    "tpot": "time_per_output_token_seconds",
    "e2e": "e2e_request_latency_seconds",
}
GAUGES = {
    "running": "num_requests_running",
    "waiting": "num_requests_waiting",
    "kv": "kv_cache_usage_perc",
}
COUNTERS = {"prompt": "prompt_tokens_total", "generation": "generation_tokens_total"}


@dataclass(slots=True)
class Histogram:
    buckets: dict[float, float] = field(default_factory=dict)
    """Upper bound -> cumulative count (Prometheus' ``le`` buckets)."""
    sum: float = 0.0
    count: float = 0.0

    def minus(self, older: Histogram) -> Histogram:
        return Histogram(
            {le: n - older.buckets.get(le, 0.0) for le, n in self.buckets.items()},
            self.sum - older.sum,
            self.count - older.count,
        )

    def plus(self, other: Histogram) -> Histogram:
        les = self.buckets.keys() | other.buckets.keys()
        merged = {le: self.buckets.get(le, 0.0) + other.buckets.get(le, 0.0) for le in les}
        return Histogram(merged, self.sum + other.sum, self.count + other.count)

    def quantile(self, q: float) -> float | None:
        """Prometheus' ``histogram_quantile``: linear within the bucket holding rank q."""
        if self.count <= 0:
            return None
        rank, lower, below = q * self.count, 0.0, 0.0
        for le in sorted(self.buckets):
            cum = self.buckets[le]
            if cum >= rank:
                if math.isinf(le):
                    return lower
                width = cum - below
                return lower + (le - lower) * ((rank - below) / width if width > 0 else 1.0)
            lower, below = le, cum
        return lower

    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None


@dataclass(slots=True)
class Scrape:
    """One instance's cumulative metrics at ``t`` (monotonic seconds)."""

    t: float
    histograms: dict[str, Histogram]
    gauges: dict[str, float]
    counters: dict[str, float]


def parse_metrics(text: str, t: float) -> Scrape:
    """Read the flowserve metrics out of Prometheus text (label sets are summed)."""
    names = {PREFIX + n: k for k, n in {**GAUGES, **COUNTERS}.items()}
    histograms = {k: Histogram() for k in HISTOGRAMS}
    by_base = {PREFIX + n: k for k, n in HISTOGRAMS.items()}
    gauges = dict.fromkeys(GAUGES, 0.0)
    counters = dict.fromkeys(COUNTERS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                key = names[sample.name]
                target = gauges if key in gauges else counters
                target[key] += sample.value
                continue
            base, _, suffix = sample.name.rpartition("_")
            hist = histograms.get(by_base.get(base, ""))
            if hist is None:
                continue
            if suffix == "bucket":
                le = float(sample.labels["le"])
                hist.buckets[le] = hist.buckets.get(le, 0.0) + sample.value
            elif suffix == "sum":
                hist.sum += sample.value
            elif suffix == "count":
                hist.count += sample.value
    return Scrape(t, histograms, gauges, counters)


@dataclass(slots=True)
class Point:
    """One deployment over one sampling interval (latencies in seconds, rates per second)."""

    t: float
    """Unix time of the sample."""
    instances: int
    ttft_p50: float | None
    ttft_mean: float | None
    tpot_p50: float | None
    tpot_mean: float | None
    e2e_mean: float | None
    requests_per_s: float
    output_tokens_per_s: float
    prompt_tokens_per_s: float
    running: float
    waiting: float
    kv_cache_usage: float


@dataclass(frozen=True, slots=True)
class Target:
    """A ready instance to scrape, and the deployment (and tenant) its metrics belong to."""

    instance_id: str
    deployment_id: str
    tenant_id: str
    address: str

    @property
    def url(self) -> str:
        base = self.address if "://" in self.address else f"http://{self.address}"
        return base.rstrip("/") + "/metrics"


def _point(t: float, deltas: list[tuple[Scrape, float]], latest: list[Scrape]) -> Point:
    """Combine each instance's change over its interval (``deltas``: the difference and
    its length) and its latest gauges into the deployment's point."""
    hist = {k: Histogram() for k in HISTOGRAMS}
    rates = dict.fromkeys(("requests", *COUNTERS), 0.0)
    for delta, dt in deltas:
        for k in HISTOGRAMS:
            hist[k] = hist[k].plus(delta.histograms[k])
        rates["requests"] += delta.histograms["e2e"].count / dt
        for k in COUNTERS:
            rates[k] += delta.counters[k] / dt
    kv = [s.gauges["kv"] for s in latest]
    return Point(
        t=t,
        instances=len(latest),
        ttft_p50=hist["ttft"].quantile(0.5),
        ttft_mean=hist["ttft"].mean(),
        tpot_p50=hist["tpot"].quantile(0.5),
        tpot_mean=hist["tpot"].mean(),
        e2e_mean=hist["e2e"].mean(),
        requests_per_s=rates["requests"],
        output_tokens_per_s=rates["generation"],
        prompt_tokens_per_s=rates["prompt"],
        running=sum(s.gauges["running"] for s in latest),
        waiting=sum(s.gauges["waiting"] for s in latest),
        kv_cache_usage=sum(kv) / len(kv) if kv else 0.0,
    )


def _difference(new: Scrape, old: Scrape) -> Scrape | None:
    """The change from ``old`` to ``new``; None when a counter went down (a restart)."""
    hists = {k: new.histograms[k].minus(old.histograms[k]) for k in HISTOGRAMS}
    counters = {k: new.counters[k] - old.counters[k] for k in COUNTERS}
    if any(h.count < 0 for h in hists.values()) or any(v < 0 for v in counters.values()):
        return None
    return Scrape(new.t, hists, new.gauges, counters)


class MetricsHistory:
    """Scrapes ``targets()`` every ``interval_s`` in a daemon thread and keeps the last
    ``capacity`` points of each deployment."""

    def __init__(
        self,
        targets: Callable[[], Iterable[Target]],
        interval_s: float = 5.0,
        capacity: int = 720,
        timeout_s: float = 2.0,
    ) -> None:
        self.targets = targets
        self.interval_s = interval_s
        self.capacity = capacity
        self._client = httpx.Client(timeout=timeout_s)
        self._last: dict[str, Scrape] = {}
        self._series: dict[str, deque[Point]] = {}
        self._tenants: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsHistory:
        self._thread = threading.Thread(target=self._loop, name="metrics-history", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._client.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # a bad pass must not end the history
                log.exception("metrics sampling failed")

    def sample(self) -> None:
        """Scrape every target once and append one point per deployment."""
        now, wall = time.monotonic(), time.time()
        groups: dict[str, list[Target]] = defaultdict(list)
        for target in self.targets():
            groups[target.deployment_id].append(target)
        seen: set[str] = set()
        for deployment_id, targets in groups.items():
            deltas, latest = [], []
            for target in targets:
                scrape = self._scrape(target, now)
                if scrape is None:
                    continue
                seen.add(target.instance_id)
                latest.append(scrape)
                old = self._last.get(target.instance_id)
                self._last[target.instance_id] = scrape
                delta = _difference(scrape, old) if old is not None else None
                if delta is not None and scrape.t > old.t:  # type: ignore[union-attr]
                    deltas.append((delta, scrape.t - old.t))  # type: ignore[union-attr]
            if not latest:
                continue
            with self._lock:
                self._tenants[deployment_id] = targets[0].tenant_id
                ring = self._series.setdefault(deployment_id, deque(maxlen=self.capacity))
                ring.append(_point(wall, deltas, latest))
        for gone in self._last.keys() - seen:
            del self._last[gone]
        self._forget(wall - self.capacity * self.interval_s)

    def _forget(self, before: float) -> None:
        """Drop the history of deployments with no point since ``before`` (deleted ones)."""
        with self._lock:
            for deployment_id in [d for d, ring in self._series.items() if ring[-1].t < before]:
                del self._series[deployment_id]
                self._tenants.pop(deployment_id, None)

    def _scrape(self, target: Target, now: float) -> Scrape | None:
        try:
            response = self._client.get(target.url)
            response.raise_for_status()
            return parse_metrics(response.text, now)
        except (httpx.HTTPError, ValueError) as exc:
            log.debug("could not scrape %s: %s", target.url, exc)
            return None

    def tenant_of(self, deployment_id: str) -> str | None:
        with self._lock:
            return self._tenants.get(deployment_id)

    def read(self, deployment_id: str, since: float | None = None) -> list[dict[str, Any]]:
        """The deployment's points (newer than unix time ``since``), oldest first."""
        with self._lock:
            points = list(self._series.get(deployment_id, ()))
        return [asdict(p) for p in points if since is None or p.t > since]
