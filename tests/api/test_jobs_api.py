"""The jobs API over real databases: shapes, filters, tenants, idempotency, cancellation."""

from __future__ import annotations

from typing import Any

import pytest

from deepflow import dag
from deepflow.store import create_job, ensure_tenant
from tests.api.conftest import Api

FAN = {
    "tasks": [
        {"name": "start", "operator": "noop"},
        {"name": "a", "operator": "echo", "args": {"n": 1}, "depends_on": ["start"]},
        {"name": "b", "operator": "sleep", "args": {"seconds": 0}, "depends_on": ["start"]},
        {"name": "end", "operator": "noop", "depends_on": ["a", "b"], "trigger_rule": "all_done"},
    ]
}


def _post(api: Api, body: dict[str, Any], key: str | None = None) -> Any:
    return api.client.post("/v1/jobs", json=body, headers=api.headers(key))


def test_create_returns_job_with_tasks_and_edges(api: Api) -> None:
    r = _post(api, {"kind": "dag", "spec": FAN})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["object"] == "job" and job["id"].startswith("job_")
    assert job["kind"] == "dag" and job["state"] == "pending"
    assert [t["name"] for t in job["tasks"]] == ["start", "a", "b", "end"]
    end = job["tasks"][3]
    assert end["depends_on"] == ["a", "b"] and end["trigger_rule"] == "all_done"
    assert end["state"] == "pending" and end["max_attempts"] == 1
    assert {(e["upstream"], e["downstream"]) for e in job["edges"]} == {
        ("start", "a"),
        ("start", "b"),
        ("a", "end"),
        ("b", "end"),
    }
    got = api.client.get(f"/v1/jobs/{job['id']}", headers=api.headers())
    assert got.status_code == 200 and got.json() == job


def test_list_filters_and_paginates(api: Api) -> None:
    ids = [_post(api, {"kind": "dag", "spec": FAN}).json()["id"] for _ in range(3)]
    with api.db.transaction() as s:  # as the deployments API's convergence makes one
        plan = dag.plan("deploy", {"deployment_id": "dep_1", "launch": 1})
        deploy, _ = create_job(s, ensure_tenant(s, "acme").id, plan, "deploy")
        deploy_id = deploy.id
    api.client.post(f"/v1/jobs/{ids[0]}/cancel", headers=api.headers())

    def page(**params: Any) -> Any:
        r = api.client.get("/v1/jobs", params=params, headers=api.headers())
        assert r.status_code == 200, r.text
        return r.json()

    first = page(limit=2)
    assert first["object"] == "list" and first["has_more"] is True
    assert [j["id"] for j in first["data"]] == [deploy_id, ids[2]]
    second = page(limit=2, after=first["last_id"])
    assert [j["id"] for j in second["data"]] == [ids[1], ids[0]] and not second["has_more"]
    assert [j["id"] for j in page(state="cancelled")["data"]] == [ids[0]]
    assert [j["id"] for j in page(kind="deploy")["data"]] == [deploy_id]
    assert page(kind="dag", state="pending")["first_id"] == ids[2]


@pytest.mark.parametrize(
    ("kind", "spec", "code", "says"),
    [
        ("deploy", {"deployment_id": "d", "launch": 1}, "use_deployments", "POST /v1/deployments"),
        ("finetune", {"model": "tiny", "training_file": "f"}, "use_fine_tuning", "fine_tuning"),
        ("batch", {"model": "tiny", "input_file": "f"}, "use_batches", "POST /v1/batches"),
    ],
)
def test_kinds_users_may_not_submit_are_refused(
    api: Api, kind: str, spec: dict[str, Any], code: str, says: str
) -> None:
    """A kind the platform cannot run for a user (or makes itself) is a 400 on ``kind``,
    before its spec is looked at, and nothing is stored."""
    for body in ({"kind": kind, "spec": spec}, {"kind": kind, "spec": {"bogus": 1}}):
        r = _post(api, body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert (error["param"], error["code"]) == ("kind", code)
        assert kind in error["message"] and says in error["message"]
    assert api.client.get("/v1/jobs", headers=api.headers()).json()["data"] == []


def test_cancel_and_events(api: Api) -> None:
    job = _post(api, {"kind": "dag", "spec": FAN}).json()
    r = api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers())
    assert r.status_code == 200
    assert r.json()["state"] == "cancelled"
    assert {t["state"] for t in r.json()["tasks"]} == {"cancelled"}
    again = api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers())
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_not_cancellable"
    events = api.client.get(f"/v1/jobs/{job['id']}/events", headers=api.headers()).json()
    rules = [e["rule"] for e in events["data"]]
    assert rules[0] == "CreateJob" and rules[-1] == "CancelJob" and rules.count("CancelTask") == 4
    after = events["data"][0]["id"]
    rest = api.client.get(
        f"/v1/jobs/{job['id']}/events", params={"after": after, "limit": 2}, headers=api.headers()
    ).json()
    assert [e["id"] for e in rest["data"]] == [e["id"] for e in events["data"][1:3]]
    assert rest["has_more"] is True


def test_tenant_never_sees_or_touches_anothers_job(api: Api) -> None:
    job = _post(api, {"kind": "dag", "spec": FAN}).json()
    other = api.headers(api.other_key)
    for method, path in [
        ("GET", f"/v1/jobs/{job['id']}"),
        ("POST", f"/v1/jobs/{job['id']}/cancel"),
        ("GET", f"/v1/jobs/{job['id']}/events"),
    ]:
        r = api.client.request(method, path, headers=other)
        assert r.status_code == 404, (method, path)
        assert r.json()["error"]["code"] == "job_not_found"
    assert api.client.get("/v1/jobs", headers=other).json()["data"] == []
    assert (
        api.client.get(f"/v1/jobs/{job['id']}", headers=api.headers()).json()["state"] == "pending"
    )


def test_idempotency_key_replays_the_first_job(api: Api) -> None:
    body = {"kind": "dag", "spec": FAN, "idempotency_key": "order-42"}
    first = _post(api, body)
    second = _post(api, body)
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.json()["id"] == first.json()["id"]
    other_body = {"kind": "dag", "spec": {"tasks": [{"name": "x", "operator": "noop"}]}}
    conflict = _post(api, {**other_body, "idempotency_key": "order-42"})
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "idempotency_key_reused"
    # the key is per tenant
    theirs = _post(api, body, key=api.other_key)
    assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]


def test_openapi_schema_is_served(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()
    assert {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/events",
    } <= set(schema["paths"])
    assert "JobCreate" in schema["components"]["schemas"]
