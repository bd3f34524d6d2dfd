"""Stopping an attempt stops it, on the whole platform of real processes: an operator inside
a 60-second C call is gone within 5 s of its job's cancellation, or of its task's deadline."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deepflow.procutil import signal_alive, wait_gone
from tests.integration.conftest import Platform, platform_up
from tests.workers.stop_operators import read_pid

pytestmark = pytest.mark.timeout(240)

STOP_WITHIN_S = 5.0
OUR_OPERATORS = "tests.workers.stop_operators"


@pytest.fixture(scope="module", params=["embedded", pytest.param("redis", marks=pytest.mark.redis)])
def platform(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    home = tmp_path_factory.mktemp(f"stop-{request.param}")
    with platform_up(request.param, home, operator_modules=(OUR_OPERATORS,)) as p:
        yield p


def _task(platform: Platform, job_id: str) -> dict[str, Any]:
    [task] = platform.job(job_id)["tasks"]
    return task  # type: ignore[no-any-return]


def test_cancel_stops_an_operator_inside_a_c_call(platform: Platform, tmp_path: Path) -> None:
    args = {"seconds": 60, "pid_path": str(tmp_path / "pid")}
    job_id = platform.post({"tasks": [{"name": "c", "operator": "test.c_sleep", "args": args}]})[
        "id"
    ]
    pid = read_pid(tmp_path / "pid", 90)
    assert signal_alive(pid) and platform.job(job_id)["state"] == "running"
    cancelled = platform.call("POST", f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert wait_gone(pid, STOP_WITHIN_S), "the attempt process outlived the cancellation"
    assert _task(platform, job_id)["state"] == "cancelled"


def test_timeout_stops_an_operator_inside_a_c_call(platform: Platform, tmp_path: Path) -> None:
    timeout_s = 2.0
    args = {"seconds": 60, "pid_path": str(tmp_path / "pid"), "ignore_sigterm": True}
    spec = {
        "tasks": [{"name": "t", "operator": "test.c_sleep", "timeout_s": timeout_s, "args": args}]
    }
    job_id = platform.post(spec)["id"]
    pid = read_pid(tmp_path / "pid", 90)
    started = time.monotonic()  # the claim set the deadline a moment before
    while (task := _task(platform, job_id))["state"] == "running":
        assert time.monotonic() - started < timeout_s + STOP_WITHIN_S, "not stopped in time"
        time.sleep(0.1)
    assert task["state"] == "failed", task
    # the worker's report, or the lease reconciler's, which also ends overdue attempts
    assert task["error"].startswith("timed out after"), task["error"]
    left = started + timeout_s + STOP_WITHIN_S - time.monotonic()
    assert wait_gone(pid, max(left, 0)), "the attempt process outlived its deadline by 5 s"
    assert platform.wait(job_id)["state"] == "failed"


def test_a_pool_process_runs_attempts_in_one_attempt_process(platform: Platform) -> None:
    """No fork per attempt (the cost that ``attempt_process`` explains): a chain of tasks
    runs in at most one attempt process per Celery pool process."""
    names = "abcdef"
    tasks = [
        {"name": n, "operator": "test.report", "args": {"tag": n}}
        | ({"depends_on": [names[i - 1]]} if i else {})
        for i, n in enumerate(names)
    ]
    job = platform.wait(platform.post({"tasks": tasks})["id"])
    assert job["state"] == "succeeded", job
    pids = {t["output"]["pid"] for t in job["tasks"]}
    assert len(pids) <= 2, pids  # the platform's worker has two pool processes
