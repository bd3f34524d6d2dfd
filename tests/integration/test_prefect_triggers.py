"""Jobs started and cancelled from Prefect's side: its API, a cron schedule, a cancellation."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import httpx
import pytest
from prefect import get_client
from prefect.client.schemas.actions import DeploymentScheduleCreate
from prefect.client.schemas.schedules import CronSchedule
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelling

from deepflow.dispatch import REQUEST_DISPATCH_S, deployment_name
from tests.integration.conftest import Platform

pytestmark = pytest.mark.timeout(240)

SPEC = {"tasks": [{"name": "hello", "operator": "echo", "args": {"from": "prefect"}}]}


def _deployment_id(platform: Platform, kind: str = "dag") -> str:
    url = f"{platform.settings.prefect_api_url}/deployments/name/{deployment_name(kind)}"
    return httpx.get(url).json()["id"]  # type: ignore[no-any-return]


def _jobs(platform: Platform) -> list[dict[str, Any]]:
    r = httpx.get(f"{platform.url}/v1/jobs", params={"limit": 100}, headers=platform.headers())
    return r.json()["data"]  # type: ignore[no-any-return]


def test_flow_run_from_prefects_http_api_creates_our_job(platform: Platform) -> None:
    deployment = _deployment_id(platform)
    url = f"{platform.settings.prefect_api_url}/deployments/{deployment}/create_flow_run"
    for _ in range(10):  # 503 means "retry" in Prefect's API (SQLite busy); its client retries
        r = httpx.post(url, json={"parameters": {"spec": SPEC, "tenant": "acme"}}, timeout=30)
        if r.status_code != 503:
            break
        time.sleep(0.5)
    assert r.status_code == 201, r.text
    flow_run_id = r.json()["id"]
    deadline = time.monotonic() + 90
    while not (mine := [j for j in _jobs(platform) if j["flow_run_id"] == flow_run_id]):
        assert time.monotonic() < deadline, "no job appeared for the flow run"
        time.sleep(0.5)
    job = platform.wait(mine[0]["id"])
    assert job["state"] == "succeeded" and job["kind"] == "dag"
    assert job["tasks"][0]["output"] == {"from": "prefect"}


def test_cron_schedule_creates_jobs_on_time(platform: Platform) -> None:
    if platform.name != "embedded":
        pytest.skip("one flavour is enough: the schedule lives in Prefect, not in our broker")
    deployment = _deployment_id(platform)
    spec = {"tasks": [{"name": "tick", "operator": "noop"}]}
    with temporary_settings({PREFECT_API_URL: platform.settings.prefect_api_url}):
        client = get_client(sync_client=True)
    with client:
        before = {j["id"] for j in _jobs(platform)}
        (schedule,) = client.create_deployment_schedules(
            deployment,  # type: ignore[arg-type]
            [
                DeploymentScheduleCreate(
                    schedule=CronSchedule(
                        cron="* * * * * */5"
                    ),  # croniter: seconds last; every 5 s
                    active=True,
                    parameters={"spec": spec, "tenant": "acme"},
                )
            ],
        )
        try:
            deadline = time.monotonic() + 120
            while len(new := [j for j in _jobs(platform) if j["id"] not in before]) < 2:
                assert time.monotonic() < deadline, f"only {len(new)} scheduled job(s) appeared"
                time.sleep(0.5)
        finally:
            client.delete_deployment_schedule(deployment, schedule.id)  # type: ignore[arg-type]
        for job in new[:2]:
            run = client.read_flow_run(job["flow_run_id"])
            assert run.auto_scheduled and run.expected_start_time is not None
            created = httpx.get(
                f"{platform.url}/v1/jobs/{job['id']}", headers=platform.headers()
            ).json()["created_at"]
            lag = _seconds(created) - run.expected_start_time.timestamp()
            assert -1 < lag < 30, f"job created {lag:.1f}s after its scheduled time"
            assert platform.wait(job["id"])["state"] == "succeeded"


def _seconds(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_cancelling_the_flow_run_in_prefect_cancels_the_job(platform: Platform) -> None:
    """Prefect's UI or API cancels a job's flow run: the worker stops its process and the
    job, with its running task, ends ``cancelled`` in our store."""
    if platform.name != "embedded":
        pytest.skip("one flavour is enough: cancellation goes through Prefect, not the broker")
    job = platform.post({"tasks": [{"name": "long", "operator": "sleep", "args": {"seconds": 60}}]})
    deadline = time.monotonic() + 60
    while platform.job(job["id"])["tasks"][0]["state"] != "running":
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.2)
    with temporary_settings({PREFECT_API_URL: platform.settings.prefect_api_url}):
        client = get_client(sync_client=True)
    flow_run_id = platform.job(job["id"])["flow_run_id"]
    with client:
        client.set_flow_run_state(flow_run_id, Cancelling())
        done = platform.wait(job["id"], timeout_s=60)
        assert done["state"] == "cancelled", done
        assert done["tasks"][0]["state"] == "cancelled"
        deadline = time.monotonic() + 30
        while not (state := client.read_flow_run(flow_run_id).state) or not state.is_cancelled():
            assert time.monotonic() < deadline, f"flow run still {state}"
            time.sleep(0.5)


def test_a_stalled_prefect_holds_up_no_request_and_loses_no_job(platform: Platform) -> None:
    """Prefect frozen (SIGSTOP): ``POST /v1/jobs`` still answers within the dispatch bound,
    the job accepted and pending; once Prefect runs again the reconciler hands it over."""
    server = next(p for p in platform.stack.parts if p.name == "prefect server")
    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        job = platform.post(SPEC)
        took = time.monotonic() - start
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)
    assert took < REQUEST_DISPATCH_S + 5, f"the request waited {took:.1f} s on Prefect"
    assert (job["state"], job["flow_run_id"]) == ("pending", None)
    done = platform.wait(job["id"], timeout_s=120)
    assert done["state"] == "succeeded" and done["flow_run_id"], done
