"""Fifty clients racing with one idempotency key create exactly one job."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
from sqlalchemy import func, select

from deepflow.store import Job, Request
from tests.api.conftest import Api

BODY = {
    "kind": "dag",
    "spec": {"tasks": [{"name": f"t{i}", "operator": "noop"} for i in range(5)]},
    "idempotency_key": "one-and-only",
}


def test_fifty_concurrent_posts_create_one_job(api: Api, live_api: str) -> None:
    def post(_: int) -> httpx.Response:
        with httpx.Client(base_url=live_api, timeout=60) as client:
            return client.post("/v1/jobs", json=BODY, headers=api.headers())

    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(post, range(50)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 49 + [201], [r.text for r in responses if r.status_code >= 300]
    assert len({r.json()["id"] for r in responses}) == 1
    with api.db.transaction() as s:
        assert s.execute(select(func.count()).select_from(Job)).scalar_one() == 1
        assert s.execute(select(func.count()).select_from(Request)).scalar_one() == 1
