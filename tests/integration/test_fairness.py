"""Fairness between jobs, on a platform of its own (the embedded one): a job of thousands of
tasks does not starve a small job submitted after it."""

from __future__ import annotations

import time

import pytest

from tests.integration.conftest import Platform

pytestmark = pytest.mark.timeout(300)


def test_a_small_job_is_not_starved_by_a_job_of_thousands(platform: Platform) -> None:
    """5,000 independent tasks, then a job of 4: the small one finishes within 30 s, while
    the large one still runs (each job has at most MAX_ACTIVE_TASKS queued or running)."""
    if platform.name != "embedded":
        pytest.skip("one flavour is enough: the cap is the driver's, not the broker's")
    big = platform.post({"tasks": [{"name": f"t{i}", "operator": "noop"} for i in range(5000)]})
    try:
        small_spec = {
            "tasks": [
                {"name": "a", "operator": "noop"},
                {"name": "b", "operator": "noop", "depends_on": ["a"]},
                {"name": "c", "operator": "noop", "depends_on": ["a"]},
                {"name": "d", "operator": "noop", "depends_on": ["b", "c"]},
            ]
        }
        _wait_for_running(platform, big["id"])
        start = time.monotonic()
        small = platform.wait(platform.post(small_spec)["id"], timeout_s=120)
        took = time.monotonic() - start
        assert small["state"] == "succeeded", small
        assert took < 30, f"the 4-task job took {took:.0f} s behind the 5,000-task one"
        assert platform.job(big["id"])["state"] == "running"
    finally:
        platform.call("POST", f"/v1/jobs/{big['id']}/cancel")


def _wait_for_running(platform: Platform, job_id: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while platform.job(job_id)["state"] != "running":
        assert time.monotonic() < deadline, "the large job never started"
        time.sleep(0.5)
