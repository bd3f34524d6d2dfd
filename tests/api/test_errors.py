"""Bad input gets a 4xx in OpenAI's error shape, and the database keeps nothing of it."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from deepflow.store import Event, Job, Request, Task, TaskEdge
from tests.api.conftest import Api


def _rows(api: Api) -> tuple[int, ...]:
    with api.db.transaction() as s:
        return tuple(
            s.execute(select(func.count()).select_from(m)).scalar_one()
            for m in (Request, Job, Task, TaskEdge, Event)
        )


def _assert_error(r: Any, status: int, code: str, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["message"]
    assert err["type"] == ("authentication_error" if status == 401 else "invalid_request_error")
    if param is not None:
        assert err["param"] == param


def _task(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "operator": "noop", **kw}


BAD_BODIES = [
    ({"kind": "dag"}, "missing_field", "spec"),
    ({"kind": "dag", "spec": {"tasks": [_task("a")]}, "colour": "red"}, "unknown_field", "colour"),
    (
        {"kind": "dag", "spec": {"tasks": [_task("a", bogus=1)]}},
        "invalid_spec",
        "spec.tasks[0].bogus",
    ),
    ({"kind": "dag", "spec": {"tasks": []}}, "invalid_spec", "spec.tasks"),
    ({"kind": "nope", "spec": {}}, "unknown_kind", "kind"),
    (
        {
            "kind": "dag",
            "spec": {"tasks": [_task("a", depends_on=["b"]), _task("b", depends_on=["a"])]},
        },
        "dag_cycle",
        "spec.tasks",
    ),
    ({"kind": "dag", "spec": {"tasks": [_task("a", depends_on=["a"])]}}, "dag_cycle", None),
    (
        {"kind": "dag", "spec": {"tasks": [_task("a", depends_on=["zz"])]}},
        "unknown_dependency",
        None,
    ),
    (
        {"kind": "dag", "spec": {"tasks": [{"name": "a", "operator": "teleport"}]}},
        "unknown_operator",
        "spec.tasks[0].operator",
    ),
    (
        {"kind": "dag", "spec": {"tasks": [_task("a"), _task("a")]}},
        "duplicate_task",
        "spec.tasks[1].name",
    ),
    (
        {"kind": "dag", "spec": {"tasks": [_task("a", trigger_rule="sometimes")]}},
        "invalid_spec",
        None,
    ),
    ({"kind": "dag", "spec": {"tasks": [_task("a", retries=-1)]}}, "invalid_spec", None),
    ({"kind": "finetune", "spec": {"model": "m"}}, "use_fine_tuning", "kind"),
    ({"kind": "batch", "spec": {"model": "m"}}, "use_batches", "kind"),
    ({"kind": "deploy", "spec": {"deployment_id": "d", "launch": 1}}, "use_deployments", "kind"),
]


@pytest.mark.parametrize(("body", "code", "param"), BAD_BODIES)
def test_bad_jobs_are_rejected_and_leave_nothing(
    api: Api, body: dict[str, Any], code: str, param: str | None
) -> None:
    before = _rows(api)
    r = api.client.post("/v1/jobs", json=body, headers=api.headers())
    _assert_error(r, 400, code, param)
    assert _rows(api) == before


def test_malformed_json(api: Api) -> None:
    before = _rows(api)
    headers = {**api.headers(), "Content-Type": "application/json"}
    r = api.client.post("/v1/jobs", content=b'{"kind": "dag", "spec": ', headers=headers)
    _assert_error(r, 400, "invalid_json")
    r = api.client.post("/v1/jobs", content=b"[1, 2]", headers=headers)
    _assert_error(r, 400, "invalid_json")
    assert _rows(api) == before


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "missing_api_key"),
        ("Bearer df-wrong", "invalid_api_key"),
        ("Basic abc", "invalid_api_key"),
        ("Bearer ", "invalid_api_key"),
    ],
)
def test_missing_or_wrong_key(api: Api, header: str | None, code: str) -> None:
    before = _rows(api)
    headers = {"Authorization": header} if header else {}
    body = {"kind": "dag", "spec": {"tasks": [_task("a")]}}
    r = api.client.post("/v1/jobs", json=body, headers=headers)
    _assert_error(r, 401, code)
    assert r.headers["WWW-Authenticate"] == "Bearer"
    _assert_error(api.client.get("/v1/jobs", headers=headers), 401, code)
    assert _rows(api) == before


def test_unknown_things(api: Api) -> None:
    _assert_error(api.client.get("/v1/jobs/job_nope", headers=api.headers()), 404, "job_not_found")
    _assert_error(api.client.get("/v1/nothing", headers=api.headers()), 404, "not_found")
    _assert_error(api.client.delete("/v1/jobs", headers=api.headers()), 405, "method_not_allowed")
    r = api.client.get("/v1/jobs", params={"state": "bogus"}, headers=api.headers())
    _assert_error(r, 400, "invalid_value", "state")
    r = api.client.get("/v1/jobs", params={"limit": 0}, headers=api.headers())
    _assert_error(r, 400, "invalid_value", "limit")


def test_a_route_not_served_names_what_is(api: Api) -> None:
    """An OpenAI client asking for what the platform does not serve hears what it does."""
    r = api.client.post("/v1/embeddings", json={"model": "m", "input": "x"}, headers=api.headers())
    _assert_error(r, 404, "not_found")
    message = r.json()["error"]["message"]
    assert message.startswith("POST /v1/embeddings is not served here; this API serves ")
    for served in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/jobs"):
        assert served in message, message
    assert "/v1/jobs/" not in message  # resources, not every path under them


@pytest.mark.parametrize(
    ("method", "path", "kw", "param"),
    [
        ("GET", "/v1/jobs/job_%00", {}, "job_id"),
        ("POST", "/v1/jobs/job_%00/cancel", {}, "job_id"),
        ("GET", "/v1/jobs", {"params": {"kind": "dag\x00"}}, "kind"),
        ("GET", "/v1/jobs", {"params": {"after": "\x00"}}, "after"),
        ("GET", "/ui/api/jobs", {"params": {"q": "\x00"}}, "q"),
        ("GET", "/v1/jobs/job_1/tasks/a%00/logs", {}, "task_name"),
        ("PATCH", "/v1/deployments/%00", {"json": {"replicas": 1}}, "deployment_id"),
        ("POST", "/v1/deployments", {"json": {"model": "m\x00"}}, "model"),
        (
            "POST",
            "/v1/jobs",
            {"json": {"kind": "dag", "spec": {"tasks": [_task("a")]}, "idempotency_key": "\x00"}},
            "idempotency_key",
        ),
    ],
)
def test_a_nul_is_a_bad_request_on_every_database(
    api: Api, method: str, path: str, kw: dict[str, Any], param: str
) -> None:
    """PostgreSQL's text cannot hold NUL: binding one in a query raised there (a 500, where
    SQLite found nothing)."""
    before = _rows(api)
    r = api.client.request(method, path, headers=api.headers(), **kw)
    _assert_error(r, 400, "invalid_value", param)
    assert _rows(api) == before


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/ui/api/jobs?offset={}", "offset"),
        ("/v1/jobs/job_1/events?after={}", "after"),
        ("/v1/jobs/job_1/tasks/a/logs?attempt={}", "attempt"),
    ],
)
def test_a_query_integer_past_64_bits_is_a_bad_request(api: Api, path: str, param: str) -> None:
    """SQL integers are 64-bit: a larger offset or id raised in the query (a 500)."""
    largest = api.client.get(path.format(2**63 - 1), headers=api.headers())
    assert largest.status_code in (200, 404), largest.text
    r = api.client.get(path.format(2**63), headers=api.headers())
    _assert_error(r, 400, "invalid_value", param)
