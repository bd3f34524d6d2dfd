"""Size limits: an oversized body, spec or task list is refused in OpenAI's shape, and
nothing of it is stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from deepflow.api import create_app
from deepflow.config import Settings
from deepflow.store import Database, Job
from tests.api.conftest import Api


def _jobs(db: Database) -> int:
    with db.transaction() as s:
        return s.execute(select(func.count()).select_from(Job)).scalar_one()


def _tasks(n: int) -> list[dict[str, str]]:
    return [{"name": f"t{i}", "operator": "noop"} for i in range(n)]


def test_a_body_over_the_limit_is_a_413_and_stores_nothing(api: Api, live_api: str) -> None:
    limit = Settings.from_env().max_body_bytes
    padding = "x" * (limit + 1)
    body = {"kind": "dag", "spec": {"tasks": _tasks(1), "note": padding}}
    r = httpx.post(f"{live_api}/v1/jobs", json=body, headers=api.headers(), timeout=60)
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "request_too_large" and "DEEPFLOW_MAX_BODY_BYTES" in error["message"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"kind": "dag", "spec": {"note": "'
        for _ in range(limit // 2**16 + 2):
            yield b"x" * 2**16
        yield b'"}}'

    r = httpx.post(
        f"{live_api}/v1/jobs",
        content=chunked(),
        headers={**api.headers(), "content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert _jobs(api.db) == 0


def test_a_spec_or_task_list_over_the_limit_is_refused(api: Api, tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        database_url=api.db.url,
        broker_url="memory://",
        max_job_tasks=3,
        max_spec_bytes=2000,
    )
    with TestClient(create_app(settings, api.db), raise_server_exceptions=False) as client:
        post = lambda spec: client.post(  # noqa: E731
            "/v1/jobs", json={"kind": "dag", "spec": spec}, headers=api.headers()
        )
        r = post({"tasks": _tasks(4)})
        assert r.status_code == 400, r.text
        assert (r.json()["error"]["code"], r.json()["error"]["param"]) == (
            "too_many_tasks",
            "spec.tasks",
        )
        r = post({"tasks": _tasks(1), "note": "y" * 3000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "spec_too_large"
        assert post({"tasks": _tasks(3)}).status_code == 201  # at the limit: taken
    assert _jobs(api.db) == 1
