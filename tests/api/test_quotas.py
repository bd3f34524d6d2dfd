"""Read-only keys, and per-tenant rate limits and quotas: each refusal in OpenAI's shape (403,
or 429 with Retry-After), nothing written by a refused request, other tenants untouched."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from deepflow.quotas import Buckets, Limits, Quotas
from deepflow.store import (
    KeyScope,
    create_api_key,
    set_tenant_limits,
)
from tests.api.conftest import Api, ready_deployment, serve

DAG = {"kind": "dag", "spec": {"tasks": [{"name": "a", "operator": "noop"}]}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(api: Api) -> Clock:
    """The app's quotas on a clock the test moves."""
    clock = Clock()
    app: Any = api.client.app
    app.state.quotas = Quotas(app.state.quotas.defaults, clock)
    return clock


def _limits(api: Api, tenant: str, **limits: int | None) -> None:
    with api.db.transaction() as s:
        set_tenant_limits(s, tenant, **limits)


def _refused(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code
    assert error["type"] == {403: "permission_error", 429: "rate_limit_error"}[status]
    return error  # type: ignore[no-any-return]


def test_a_read_only_key_reads_and_changes_nothing(api: Api) -> None:
    with api.db.transaction() as s:
        _, reader = create_api_key(s, "acme", KeyScope.READ)
    job = api.client.post("/v1/jobs", json=DAG, headers=api.headers()).json()
    assert (
        api.client.get("/v1/jobs", headers=api.headers(reader)).json()["data"][0]["id"]
        == (job["id"])
    )
    assert api.client.get(f"/v1/jobs/{job['id']}", headers=api.headers(reader)).status_code == 200
    writes = [
        ("POST", "/v1/jobs", DAG),
        ("POST", f"/v1/jobs/{job['id']}/cancel", None),
        ("POST", f"/v1/jobs/{job['id']}/retry", None),
        ("POST", "/v1/deployments", {"model": "m"}),
        ("PATCH", "/v1/deployments/dep-x", {"replicas": 2}),
        ("DELETE", "/v1/deployments/dep-x", None),
        ("POST", "/v1/chat/completions", {"model": "m", "messages": []}),
        ("POST", "/v1/completions", {"model": "m", "prompt": "hi"}),
    ]
    for method, path, body in writes:
        r = api.client.request(method, path, json=body, headers=api.headers(reader))
        assert "read-only" in _refused(r, 403, "read_only_key")["message"], (method, path)
    jobs = api.client.get("/v1/jobs", headers=api.headers()).json()["data"]
    assert [j["id"] for j in jobs] == [job["id"]]
    assert jobs[0]["state"] != "cancelled"


def test_requests_per_minute_refuse_with_retry_after_and_refill(api: Api, clock: Clock) -> None:
    _limits(api, "acme", requests_per_minute=3)
    for _ in range(3):
        assert api.client.get("/v1/jobs", headers=api.headers()).status_code == 200
    r = api.client.get("/v1/jobs", headers=api.headers())
    _refused(r, 429, "rate_limit_exceeded")
    assert r.headers["Retry-After"] == "20"  # one request of 3 a minute refills in 20 s
    assert api.client.get("/v1/models", headers=api.headers()).status_code == 429  # gateway too
    assert api.client.get("/v1/jobs", headers=api.headers(api.other_key)).status_code == 200
    clock.now += 20
    assert api.client.get("/v1/jobs", headers=api.headers()).status_code == 200
    assert api.client.get("/v1/jobs", headers=api.headers()).status_code == 429


def test_a_tenant_limit_overrides_the_platform_default_and_default_restores_it(
    api: Api, clock: Clock
) -> None:
    app: Any = api.client.app
    app.state.quotas = Quotas(Limits(requests_per_minute=2), clock)
    _limits(api, "globex", requests_per_minute=0)  # none for globex
    for _ in range(5):
        assert api.client.get("/v1/jobs", headers=api.headers(api.other_key)).status_code == 200
    assert [api.client.get("/v1/jobs", headers=api.headers()).status_code for _ in range(3)] == [
        200,
        200,
        429,
    ]
    _limits(api, "globex", requests_per_minute=None)
    statuses = [api.client.get("/v1/jobs", headers=api.headers(api.other_key)).status_code]
    statuses += [api.client.get("/v1/jobs", headers=api.headers(api.other_key)).status_code]
    statuses += [api.client.get("/v1/jobs", headers=api.headers(api.other_key)).status_code]
    assert statuses == [200, 200, 429]


def test_active_jobs_quota_refuses_the_next_job_and_writes_nothing(api: Api) -> None:
    _limits(api, "acme", max_active_jobs=2)
    made = [api.client.post("/v1/jobs", json=DAG, headers=api.headers()) for _ in range(2)]
    assert [r.status_code for r in made] == [201, 201]
    r = api.client.post("/v1/jobs", json=DAG, headers=api.headers())
    assert "2 jobs" in _refused(r, 429, "active_jobs_quota_exceeded")["message"]
    assert r.headers["Retry-After"].isdigit()
    assert len(api.client.get("/v1/jobs", headers=api.headers()).json()["data"]) == 2
    # an idempotent replay of an accepted job is not a new job
    keyed = {**DAG, "idempotency_key": "k1"}
    api.client.post(f"/v1/jobs/{made[0].json()['id']}/cancel", headers=api.headers())
    assert api.client.post("/v1/jobs", json=keyed, headers=api.headers()).status_code == 201
    assert api.client.post("/v1/jobs", json=keyed, headers=api.headers()).status_code == 200
    # a cancelled job frees its place; the other tenant never had a limit
    assert api.client.post(
        "/v1/jobs", json=DAG, headers=api.headers(api.other_key)
    ).status_code == (201)


def test_instances_quota_refuses_a_deployment_or_scale_out_beyond_it(api: Api) -> None:
    from deepflow.store import ModelVersionState, register_model_version, set_model_version_state

    with api.db.transaction() as s:
        owner = set_tenant_limits(s, "acme", max_instances=3)
        for name in ("m1", "m2"):
            version = register_model_version(s, owner.id, name, f"/models/{name}")
            set_model_version_state(s, version.id, ModelVersionState.READY)

    def deploy(model: str, replicas: int) -> Any:
        body = {"model": model, "replicas": replicas}
        return api.client.post("/v1/deployments", json=body, headers=api.headers())

    first = deploy("m1", 2)
    assert first.status_code == 201, first.text
    assert "would make 4" in _refused(deploy("m2", 2), 429, "instances_quota_exceeded")["message"]
    listed = api.client.get("/v1/deployments", headers=api.headers()).json()["data"]
    assert [d["model"] for d in listed] == ["m1"]
    dep = first.json()["id"]

    def scale(replicas: int) -> Any:
        body = {"replicas": replicas}
        return api.client.patch(f"/v1/deployments/{dep}", json=body, headers=api.headers())

    _refused(scale(4), 429, "instances_quota_exceeded")
    assert api.client.get(f"/v1/deployments/{dep}", headers=api.headers()).json()["replicas"] == 2
    assert scale(3).status_code == 200
    with api.db.transaction() as s:
        set_tenant_limits(s, "acme", max_instances=1)
    assert scale(2).status_code == 200  # scaling in is never refused, even over a new limit


def test_tokens_per_minute_limit_inference_through_the_gateway(api: Api, clock: Clock) -> None:
    """Estimated tokens (prompt + max_tokens) are taken before forwarding; a request over the
    minute's remainder is refused without reaching the instance."""
    seen: list[dict[str, Any]] = []

    async def answer(request: Request) -> JSONResponse:
        seen.append(await request.json())
        return JSONResponse({"object": "chat.completion", "choices": []})

    instance = Starlette(routes=[Route("/v1/chat/completions", answer, methods=["POST"])])
    with serve(instance) as address:
        with api.db.transaction() as s:
            owner = set_tenant_limits(s, "acme", tokens_per_minute=1000)
            ready_deployment(s, owner.id, "tiny", address)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400}

        def chat() -> Any:
            return api.client.post("/v1/chat/completions", json=body, headers=api.headers())

        answers = [chat() for _ in range(3)]
        assert [r.status_code for r in answers[:2]] == [200, 200], [r.text for r in answers]
        _refused(answers[2], 429, "rate_limit_exceeded")
        assert answers[2].headers["Retry-After"] == "13"  # 400 - 200 left, at 1000 a minute
        assert len(seen) == 2
        assert (
            api.client.post(
                "/v1/chat/completions", json=body, headers=api.headers(api.other_key)
            ).status_code
            == 404
        )  # globex has no such model, and no token limit either
        clock.now += 60
        assert chat().status_code == 200
        assert len(seen) == 3


def test_buckets_refill_continuously_and_cap_at_a_minute() -> None:
    clock = Clock()
    buckets = Buckets(clock)
    assert buckets.take("t", 60, 60) == 0.0
    assert buckets.take("t", 1, 60) == pytest.approx(1.0)
    clock.now += 30
    assert buckets.take("t", 30, 60) == 0.0
    clock.now += 3600
    assert buckets.take("t", 61, 60) == 0.0  # more than a minute's worth needs a full bucket
    assert buckets.take("t", 1, 0) == 0.0  # 0: no limit
