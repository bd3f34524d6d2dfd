"""The metrics history's arithmetic on a real exporter: quantiles from bucket deltas, a
restarted daemon (counters back to zero), an unreachable instance, forgetting the gone."""

from __future__ import annotations

import time

from deepflow.api.metrics_history import Histogram, MetricsHistory, Target
from deepflow.launcher import free_port
from tests.browser.metrics_source import MetricsSource


def test_quantile_interpolates_within_the_bucket() -> None:
    hist = Histogram({0.1: 2.0, 0.2: 6.0, float("inf"): 8.0}, sum=1.2, count=8.0)
    assert hist.quantile(0.5) == 0.1 + 0.1 * (4 - 2) / 4
    assert hist.quantile(1.0) == 0.2  # the +Inf bucket answers its lower bound
    assert hist.mean() == 0.15
    assert Histogram().quantile(0.5) is None and Histogram().mean() is None


def test_restart_unreachable_and_forgetting() -> None:
    source = MetricsSource()
    port = source.port
    dead = Target("inst_dead", "dep", "t", f"127.0.0.1:{free_port()}")
    targets = [Target("inst_1", "dep", "t", source.address), dead]
    history = MetricsHistory(lambda: targets, interval_s=1, capacity=3)
    try:
        source.serve(10)
        history.sample()
        source.serve(10)
        history.sample()
        source.close()
        source = MetricsSource(port=port)  # the daemon restarted: its counters start again
        source.serve(2)
        history.sample()
        points = history.read("dep")
        assert [p["instances"] for p in points] == [1, 1, 1]  # the dead one is left out
        assert points[1]["requests_per_s"] > 0 and points[1]["ttft_p50"] is not None
        assert points[2]["requests_per_s"] == 0 and points[2]["ttft_p50"] is None
        targets.clear()
        history._forget(time.time() + 1)
        assert history.read("dep") == [] and history.tenant_of("dep") is None
    finally:
        history.stop()
        source.close()
