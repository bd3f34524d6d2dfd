"""Jobs run end to end on real processes: API -> Prefect flow run -> Celery workers."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.integration.conftest import Platform, platform_up

pytestmark = pytest.mark.timeout(240)

DIES_WITH_WORKER_S = 1.0
"""How soon after its worker's SIGKILL an attempt's process must have stopped."""

NO_POLL_S = 3600
"""The Prefect worker polls once at its start, then not for an hour: here every job's flow run
is started because its Scheduled event woke the worker (``deepflow.flows.wakeup``)."""


@pytest.fixture(scope="module", params=["embedded", pytest.param("redis", marks=pytest.mark.redis)])
def platform(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    home = tmp_path_factory.mktemp(f"orchestration-{request.param}")
    with platform_up(request.param, home, worker_poll_s=NO_POLL_S) as p:
        yield p


def _states(job: dict[str, Any]) -> dict[str, str]:
    return {t["name"]: t["state"] for t in job["tasks"]}


def _flow_run(
    platform: Platform, flow_run_id: str, settle: set[str], task_runs: int = 0
) -> tuple[str, list[Any]]:
    """The flow run's final state type and its task runs, once ``task_runs`` of them are
    recorded (task runs arrive as events, which Prefect's server writes in batches)."""
    deadline = time.monotonic() + 30
    with temporary_settings({PREFECT_API_URL: platform.settings.prefect_api_url}):
        client = get_client(sync_client=True)
    with client:
        while True:
            run = client.read_flow_run(flow_run_id)  # type: ignore[arg-type]
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
            )
            done = run.state_type and run.state_type.value in settle and len(tasks) >= task_runs
            if done and all(t.state_type and t.state_type.value != "RUNNING" for t in tasks):
                return run.state_type.value, tasks
            assert time.monotonic() < deadline, (run.state_type, [t.state_type for t in tasks])
            time.sleep(0.5)


def test_fan_out_fan_in_succeeds(platform: Platform) -> None:
    spec = {
        "tasks": [
            {"name": "start", "operator": "noop"},
            *[
                {"name": f"w{i}", "operator": "echo", "args": {"i": i}, "depends_on": ["start"]}
                for i in range(6)
            ],
            {"name": "join", "operator": "noop", "depends_on": [f"w{i}" for i in range(6)]},
        ]
    }
    job = platform.wait(platform.post(spec)["id"])
    assert job["state"] == "succeeded", job
    assert set(_states(job).values()) == {"succeeded"}
    assert [t["output"] for t in job["tasks"][1:7]] == [{"i": i} for i in range(6)]
    assert job["flow_run_id"]
    state, task_runs = _flow_run(platform, job["flow_run_id"], {"COMPLETED"}, len(job["tasks"]))
    assert state == "COMPLETED"
    assert sorted(t.name for t in task_runs) == sorted(f"{n} #1" for n in _states(job))
    assert {t.state_type.value for t in task_runs} == {"COMPLETED"}  # type: ignore[union-attr]
    start = next(t for t in job["tasks"] if t["name"] == "start")
    fan = [t for t in job["tasks"] if t["name"].startswith("w")]
    assert all(t["started_at"] >= start["finished_at"] for t in fan)


def test_failing_task_retries_then_downstream_is_upstream_failed(
    platform: Platform, tmp_path: Path
) -> None:
    spec = {
        "tasks": [
            {"name": "flaky", "operator": "fail", "retries": 2, "retry_delay_s": 0.2},
            {"name": "after", "operator": "noop", "depends_on": ["flaky"]},
            {"name": "later", "operator": "noop", "depends_on": ["after"]},
        ]
    }
    job = platform.wait(platform.post(spec)["id"])
    assert job["state"] == "failed"
    assert _states(job) == {
        "flaky": "failed",
        "after": "upstream_failed",
        "later": "upstream_failed",
    }
    flaky = job["tasks"][0]
    assert flaky["attempt"] == 3 and "fail operator always fails" in flaky["error"]
    claims = [e for e in platform.events(job["id"]) if e["rule"] == "ClaimTask"]
    assert [e["data"]["attempt"] for e in claims] == [1, 2, 3]
    retries = [e for e in platform.events(job["id"]) if e["rule"] == "RetryTask"]
    assert len(retries) == 2
    assert _flow_run(platform, job["flow_run_id"], {"FAILED"})[0] == "FAILED"


def test_retry_succeeds_on_a_later_attempt(platform: Platform, tmp_path: Path) -> None:
    args = {"path": str(tmp_path / "attempts"), "times": 2}
    spec = {"tasks": [{"name": "t", "operator": "test.fail_until", "args": args, "retries": 3,
                       "retry_delay_s": 0.1}]}  # fmt: skip
    job = platform.wait(platform.post(spec)["id"])
    assert job["state"] == "succeeded" and job["tasks"][0]["attempt"] == 3
    assert job["tasks"][0]["output"] == {"attempts": 3}


def test_all_done_and_one_failed_branches(platform: Platform) -> None:
    def spec(first: str) -> dict[str, Any]:
        return {
            "tasks": [
                {"name": "work", "operator": first},
                {"name": "cleanup", "operator": "noop", "depends_on": ["work"],
                 "trigger_rule": "all_done"},
                {"name": "alert", "operator": "echo", "args": {"alert": True},
                 "depends_on": ["work"], "trigger_rule": "one_failed"},
                {"name": "publish", "operator": "noop", "depends_on": ["work"]},
            ]
        }  # fmt: skip

    failed = platform.wait(platform.post(spec("fail"))["id"])
    assert _states(failed) == {
        "work": "failed",
        "cleanup": "succeeded",
        "alert": "succeeded",
        "publish": "upstream_failed",
    }
    assert failed["state"] == "failed"  # a leaf (publish) is upstream_failed
    ok = platform.wait(platform.post(spec("noop"))["id"])
    assert _states(ok) == {
        "work": "succeeded",
        "cleanup": "succeeded",
        "alert": "skipped",
        "publish": "succeeded",
    }
    assert ok["state"] == "succeeded"


def _ticks(path: Path) -> list[tuple[int, float]]:
    if not path.exists():
        return []
    return [
        (int(p), float(t))
        for p, t in (line.split() for line in path.read_text().split("\n") if line)
    ]


def _wait_for_ticks(path: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not _ticks(path):
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.1)


def test_cancel_stops_a_running_job(platform: Platform, tmp_path: Path) -> None:
    ticks = tmp_path / "ticks"
    spec = {
        "tasks": [
            {"name": "long", "operator": "test.tick", "args": {"path": str(ticks), "seconds": 60}},
            {"name": "queued", "operator": "sleep", "args": {"seconds": 60}},
            {"name": "never", "operator": "noop", "depends_on": ["long"]},
        ]
    }
    job_id = platform.post(spec)["id"]
    _wait_for_ticks(ticks)
    r = platform.job(job_id)
    assert r["state"] == "running"
    cancelled = platform.call("POST", f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "cancelled"
    assert set(_states(cancelled.json()).values()) == {"cancelled"}
    # the running attempt stops within a heartbeat (lease ttl 3 s / 3) and nothing restarts it
    time.sleep(platform.settings.lease_ttl_s)
    seen = len(_ticks(ticks))
    time.sleep(2)
    assert len(_ticks(ticks)) == seen, "the cancelled task is still running"
    assert _flow_run(platform, platform.job(job_id)["flow_run_id"], {"CANCELLED"})[0] == "CANCELLED"


def test_killed_worker_loses_no_work_and_attempts_never_overlap(
    platform: Platform, tmp_path: Path
) -> None:
    ticks = tmp_path / "ticks"
    spec = {
        "tasks": [
            {"name": "t", "operator": "test.tick", "args": {"path": str(ticks), "seconds": 4},
             "retries": 2, "retry_delay_s": 0.1},
            {"name": "after", "operator": "noop", "depends_on": ["t"]},
        ]
    }  # fmt: skip
    job_id = platform.post(spec)["id"]
    _wait_for_ticks(ticks)
    worker = next(p for p in platform.stack.parts if p.name.startswith("cpu worker") and p.alive)
    worker.kill()  # SIGKILL to the worker and its pool: no chance to report or ack
    killed_at = time.time()
    platform.stack.start_worker("cpu", concurrency=2)
    job = platform.wait(job_id, timeout_s=120)
    assert job["state"] == "succeeded", job
    assert job["tasks"][0]["attempt"] == 2
    runs = _ticks(ticks)
    first_pid = runs[0][0]
    first = [t for pid, t in runs if pid == first_pid]
    second = [t for pid, t in runs if pid != first_pid]
    assert first and second
    # The attempt's own process dies with its pool process (parent-death signal), a few ms
    # after the SIGKILL that `kill` waits for: its last tick may follow killed_at by that much.
    assert max(first) < min(second), "the two attempts overlapped"
    assert max(first) <= killed_at + DIES_WITH_WORKER_S, "the first attempt outlived its worker"
    assert killed_at < min(second)
    rules = [
        (e["rule"], e["data"].get("attempt"))
        for e in platform.events(job_id)
        if e["entity_id"] == job["tasks"][0]["id"]
    ]
    assert ("RetryTask", 1) in rules and ("SucceedTask", 2) in rules


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    children = {int(p) for p in out.split()}
    return children.union(*(_descendants(c) for c in children))


def test_flow_runs_start_in_a_process_warmed_before_the_job(platform: Platform) -> None:
    """The worker hands each flow run to a process made (forked from its fork server, which
    imported everything) ahead of time, and makes a replacement."""
    (worker,) = [p for p in platform.stack.parts if p.name == "prefect worker"]
    assert worker.proc is not None
    deadline = time.monotonic() + 60
    while not (before := _descendants(worker.proc.pid)):
        assert time.monotonic() < deadline, "the worker made no warm process"
        time.sleep(0.2)
    time.sleep(1)  # let a replacement made for an earlier test's flow run settle
    before = _descendants(worker.proc.pid)
    job = platform.wait(platform.post({"tasks": [{"name": "only", "operator": "noop"}]})["id"])
    assert job["state"] == "succeeded", job
    ran_in = re.findall(rf"driving job {job['id']} in process (\d+)", worker.log.read_text())
    assert len(ran_in) == 1 and int(ran_in[0]) in before, (ran_in, before)
    deadline = time.monotonic() + 60
    while not (_descendants(worker.proc.pid) - before):
        assert time.monotonic() < deadline, "no replacement warm process"
        time.sleep(0.2)


def test_flow_runs_start_when_scheduled_not_at_the_next_poll(platform: Platform) -> None:
    """With the worker's poll an hour apart, a job's flow run still goes from Scheduled to
    Pending (taken by the worker) within seconds: the Scheduled event woke the worker."""
    job = platform.wait(platform.post({"tasks": [{"name": "only", "operator": "noop"}]})["id"])
    assert job["state"] == "succeeded", job
    with temporary_settings({PREFECT_API_URL: platform.settings.prefect_api_url}):
        client = get_client(sync_client=True)
    with client:
        states = client.read_flow_run_states(job["flow_run_id"])
    at = {s.type.value: s.timestamp for s in reversed(states)}  # first of each type
    assert (at["PENDING"] - at["SCHEDULED"]).total_seconds() < 10, at

