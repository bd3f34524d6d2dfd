"""The metrics history against a real FlowServe daemon (`deepflow serve` on the tiny model):
completions sent between two samples show up as one point with latencies and rates."""

from __future__ import annotations

import httpx

from deepflow.api.metrics_history import MetricsHistory, Target
from tests.daemon.conftest import Daemon, daemon, tiny_model  # noqa: F401  (fixtures)


def test_history_samples_a_real_daemon(daemon: Daemon) -> None:  # noqa: F811
    target = Target("inst_1", "job_1", "tenant_1", daemon.url.removeprefix("http://"))
    history = MetricsHistory(lambda: [target], interval_s=60)
    try:
        history.sample()
        for i in range(3):
            r = httpx.post(
                f"{daemon.url}/v1/completions",
                json={"model": daemon.model, "prompt": f"Hello {i}", "max_tokens": 6},
                timeout=60,
            )
            assert r.status_code == 200, r.text
        history.sample()
    finally:
        history.stop()
    first, second = history.read("job_1")
    assert first["ttft_p50"] is None and first["instances"] == 1
    assert second["ttft_p50"] is not None and second["ttft_p50"] > 0
    assert second["ttft_mean"] is not None and second["tpot_mean"] is not None
    assert second["e2e_mean"] is not None and second["e2e_mean"] >= second["ttft_mean"]
    assert second["requests_per_s"] > 0 and second["output_tokens_per_s"] > 0
    assert second["prompt_tokens_per_s"] > 0
    assert second["running"] == 0 and second["waiting"] == 0
    assert history.tenant_of("job_1") == "tenant_1" and history.read("other") == []
