"""The dashboard's routes over real databases: job search, tasks with attempts and logs
(written by the real worker code), retry, deployments, metrics, tenants, and the page."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from deepflow import dag, store
from deepflow.config import Settings
from deepflow.dag.operators import Operator, OperatorFailed, register
from deepflow.dag.spec import ResourceClass
from deepflow.store import (
    InstanceState,
    create_deployment,
    create_instance,
    queue_task,
    set_instance_state,
)
from deepflow.workers.execute import execute_task
from tests.api.conftest import Api
from tests.browser.metrics_source import MetricsSource


def _noisy(args: dict[str, Any]) -> dict[str, Any]:
    import logging

    print(f"stdout line for {args['tag']}")
    logging.getLogger("noisy").warning("log record for %s", args["tag"])
    if args.get("fail"):
        raise OperatorFailed(f"planned failure of {args['tag']}")
    return {"tag": args["tag"]}


register(Operator("test.noisy", _noisy, description="Prints, logs, and fails on request."))

DAG = {
    "tasks": [
        {"name": "ok", "operator": "test.noisy", "args": {"tag": "ok"}},
        {"name": "bad", "operator": "test.noisy", "args": {"tag": "bad", "fail": True}},
        {"name": "flaky", "operator": "test.noisy", "args": {"tag": "flaky", "fail": True}},
    ]
}
DAG["tasks"][2]["retries"] = 1


def _post(api: Api, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    r = api.client.post("/v1/jobs", json=body, headers=api.headers(key))
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def _get(api: Api, path: str, key: str | None = None, **params: Any) -> Any:
    r = api.client.get(path, params=params, headers=api.headers(key))
    assert r.status_code == 200, r.text
    return r.json()


def test_session_names_the_tenant_and_rejects_bad_keys(api: Api) -> None:
    body = _get(api, "/ui/api/session")
    assert body["tenant"]["name"] == "acme"
    r = api.client.get("/ui/api/session", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_search_filters_counts_pages_and_tenants(api: Api) -> None:
    jobs = [_post(api, {"kind": "dag", "spec": DAG}) for _ in range(5)]
    api.client.post(f"/v1/jobs/{jobs[0]['id']}/cancel", headers=api.headers())

    everything = _get(api, "/ui/api/jobs")
    assert everything["total"] == 5 and everything["tenant"] == "acme"
    assert everything["states"] == {"pending": 4, "cancelled": 1}
    assert everything["kinds"] == ["dag"]
    assert everything["data"][-1]["id"] == jobs[0]["id"]
    assert everything["data"][-1]["tasks"] == {"cancelled": 3}

    cancelled = _get(api, "/ui/api/jobs", state="cancelled")
    assert [j["id"] for j in cancelled["data"]] == [jobs[0]["id"]] and cancelled["total"] == 1
    assert cancelled["states"]["pending"] == 4  # the chips count the other states too
    assert _get(api, "/ui/api/jobs", kind="dag")["total"] == 5
    assert _get(api, "/ui/api/jobs", kind="deploy")["total"] == 0
    fragment = jobs[2]["id"][-10:]
    assert [j["id"] for j in _get(api, "/ui/api/jobs", q=fragment)["data"]] == [jobs[2]["id"]]
    assert _get(api, "/ui/api/jobs", q="%")["total"] == 0  # no LIKE wildcards from the user

    pages = [_get(api, "/ui/api/jobs", limit=2, offset=o)["data"] for o in (0, 2, 4)]
    assert [len(p) for p in pages] == [2, 2, 1]
    assert len({j["id"] for p in pages for j in p}) == 5

    other = _get(api, "/ui/api/jobs", key=api.other_key)
    assert other["total"] == 0 and other["data"] == [] and other["tenant"] == "globex"
    assert (
        api.client.get("/ui/api/jobs", params={"state": "nope"}, headers=api.headers()).status_code
        == 400
    )


def _run_attempt(api: Api, job_id: str, name: str) -> None:
    """Queue the task's next attempt and run it with the worker's own code, in this process."""
    with api.db.transaction() as s:
        task = next(t for t in store.read_job(s, _tenant(api), job_id).tasks if t.name == name)
        queued = queue_task(s, task.id)
        task_id, attempt = queued.id, queued.attempt
    settings: Settings = api.client.app.state.settings  # type: ignore[attr-defined]
    with contextlib.suppress(OperatorFailed):
        execute_task(task_id, attempt, settings)


def _tenant(api: Api) -> str:
    with api.db.transaction() as s:
        tenant = store.authenticate(s, api.key).tenant  # type: ignore[union-attr]
        assert tenant is not None
        return tenant.id


def test_tasks_show_attempts_and_their_logs(api: Api) -> None:
    job = _post(api, {"kind": "dag", "spec": DAG})
    for name in ("ok", "bad", "flaky", "flaky"):
        _run_attempt(api, job["id"], name)

    tasks = {t["name"]: t for t in _get(api, f"/v1/jobs/{job['id']}/tasks")["data"]}
    assert tasks["ok"]["state"] == "succeeded" and tasks["ok"]["output"] == {"tag": "ok"}
    assert tasks["ok"]["depends_on"] == [] and tasks["ok"]["duration_s"] >= 0
    [ok] = tasks["ok"]["attempts"]
    assert ok["state"] == "succeeded" and ok["error"] is None and ok["log_chars"] > 0
    assert ok["worker"] and ok["duration_s"] >= 0
    flaky = tasks["flaky"]["attempts"]
    assert [(a["attempt"], a["state"]) for a in flaky] == [(1, "up_for_retry"), (2, "failed")]
    assert "planned failure of flaky" in flaky[1]["error"]

    [log] = _get(api, f"/v1/jobs/{job['id']}/tasks/bad/logs")["data"]
    assert log["attempt"] == 1 and log["outcome"] == "failed" and log["dropped_chars"] == 0
    assert "stdout line for bad" in log["text"]
    assert "WARNING noisy: log record for bad" in log["text"]
    assert "Traceback" in log["text"] and "OperatorFailed: planned failure of bad" in log["text"]
    assert "log record for ok" not in log["text"]
    both = _get(api, f"/v1/jobs/{job['id']}/tasks/flaky/logs")["data"]
    assert [x["attempt"] for x in both] == [1, 2]
    assert [
        x["attempt"] for x in _get(api, f"/v1/jobs/{job['id']}/tasks/flaky/logs", attempt=2)["data"]
    ] == [2]
    [good] = _get(api, f"/v1/jobs/{job['id']}/tasks/ok/logs")["data"]
    assert good["outcome"] == "succeeded" and "Traceback" not in good["text"]

    for path in (f"/v1/jobs/{job['id']}/tasks", f"/v1/jobs/{job['id']}/tasks/bad/logs"):
        r = api.client.get(path, headers=api.headers(api.other_key))
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    r = api.client.get(f"/v1/jobs/{job['id']}/tasks/nope/logs", headers=api.headers())
    assert r.status_code == 404 and r.json()["error"]["code"] == "task_not_found"


def test_retry_makes_a_new_job_from_the_same_spec(api: Api) -> None:
    job = _post(api, {"kind": "dag", "spec": DAG})
    r = api.client.post(f"/v1/jobs/{job['id']}/retry", headers=api.headers())
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_finished"
    api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers())
    r = api.client.post(f"/v1/jobs/{job['id']}/retry", headers=api.headers(api.other_key))
    assert r.status_code == 404
    r = api.client.post(f"/v1/jobs/{job['id']}/retry", headers=api.headers())
    assert r.status_code == 201, r.text
    again = r.json()
    assert again["id"] != job["id"] and again["state"] == "pending"
    assert again["spec"] == job["spec"] and [t["name"] for t in again["tasks"]] == [
        "ok",
        "bad",
        "flaky",
    ]


def test_retry_refuses_kinds_users_may_not_submit(api: Api) -> None:
    """A deploy job is made by converging a deployment; retrying one by hand would launch
    replicas nobody asked for. The retry route applies POST /v1/jobs's refusals."""
    with api.db.transaction() as s:
        tenant = store.authenticate(s, api.key).tenant  # type: ignore[union-attr]
        assert tenant is not None
        spec = {"deployment_id": "dep_x", "launch": 1}
        job, _ = store.create_job(s, tenant.id, dag.plan("deploy", spec), "deploy")
        job_id = job.id
    api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers())
    r = api.client.post(f"/v1/jobs/{job_id}/retry", headers=api.headers())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "use_deployments"
    assert r.json()["error"]["param"] == "kind"


@pytest.fixture
def source() -> Iterator[MetricsSource]:
    src = MetricsSource()
    yield src
    src.close()


def test_deployment_history_and_metrics_from_a_real_exporter(
    api: Api, source: MetricsSource
) -> None:
    """A deployment with a ready replica scraped from a real Prometheus exporter and one
    stopped earlier: its scaling history, its metrics over time, and tenants kept apart."""
    with api.db.transaction() as s:
        tenant = _tenant(api)
        dep = create_deployment(
            s,
            tenant,
            name="tiny-llama",
            model_path="/models/tiny-llama",
            replicas=1,
            resource_class=ResourceClass.CPU,
            policy="round_robin",
        )
        common = {"model_name": "tiny-llama", "device": "cpu", "deployment_id": dep.id}
        old = create_instance(s, tenant, **common)
        ready = create_instance(s, tenant, address=source.address, **common)
        s.flush()
        set_instance_state(s, old.id, InstanceState.STOPPED)
        set_instance_state(s, ready.id, InstanceState.READY)
        dep_id = dep.id

    events = _get(api, f"/ui/api/deployments/{dep_id}/events")["data"]
    assert [(e["entity_type"], e["rule"]) for e in events] == [
        ("deployment", "CreateDeployment"),
        ("instance", "CreateInstance"),
        ("instance", "CreateInstance"),
        ("instance", "StopInstance"),
        ("instance", "MarkInstanceReady"),
    ]
    r = api.client.get(f"/ui/api/deployments/{dep_id}/events", headers=api.headers(api.other_key))
    assert r.status_code == 404 and r.json()["error"]["code"] == "deployment_not_found"
    assert _get(api, f"/v1/deployments/{dep_id}/metrics")["data"] == []  # nothing sampled yet
    r = api.client.get(f"/v1/deployments/{dep_id}/metrics", headers=api.headers(api.other_key))
    assert r.status_code == 404

    history = api.client.app.state.metrics_history  # type: ignore[attr-defined]
    source.load(running=3, waiting=1, kv=0.25)
    history.sample()
    source.serve(20, ttft_s=0.08, tpot_s=0.015, tokens=10)
    history.sample()
    points = _get(api, f"/v1/deployments/{dep_id}/metrics")["data"]
    assert len(points) == 2
    first, second = points
    assert first["ttft_p50"] is None and first["requests_per_s"] == 0  # no interval yet
    assert second["running"] == 3 and second["waiting"] == 1 and second["kv_cache_usage"] == 0.25
    assert 0.05 < second["ttft_p50"] <= 0.1 and 0.064 < second["ttft_mean"] < 0.096
    assert 0.01 < second["tpot_p50"] <= 0.02
    assert second["requests_per_s"] > 0 and second["output_tokens_per_s"] > second["requests_per_s"]
    later = _get(api, f"/v1/deployments/{dep_id}/metrics", since=first["t"])["data"]
    assert [p["t"] for p in later] == [second["t"]]

    r = api.client.get(f"/v1/deployments/{dep_id}/metrics", headers=api.headers(api.other_key))
    assert r.status_code == 404 and r.json()["error"]["code"] == "deployment_not_found"
    assert api.client.get("/v1/deployments/nope/metrics", headers=api.headers()).status_code == 404


def test_the_page_is_served_behind_the_api(api: Api) -> None:
    page = api.client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert api.client.get("/js/app.js").status_code == 200
    r = api.client.get("/v1/nothing", headers=api.headers())
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert api.client.post("/v1/nothing", headers=api.headers()).status_code == 404
    assert api.client.get("/health").json() == {"status": "ok"}
