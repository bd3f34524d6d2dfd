"""A whole platform of real processes per test module: a Prefect server, the Prefect worker,
Celery workers, and the API with its reconciler and dispatcher (in this process).

Two flavours: ``embedded`` (SQLite and kombu's filesystem broker, what ``deepflow up`` runs)
and ``redis`` (PostgreSQL and Redis, as in production).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from deepflow.config import Settings
from deepflow.launcher import ApiServer, Stack, free_port
from deepflow.replicas.supervisor import stop_local_instances
from deepflow.store import Database, create_api_key, schema
from tests.conftest import create_pg_database, drop_pg_database

REPO = Path(__file__).resolve().parents[2]
REDIS_DB = 6
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Platform:
    name: str
    settings: Settings
    stack: Stack
    db: Database
    url: str
    key: str

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def call(self, method: str, path: str, json: Any = None) -> httpx.Response:
        """``method path`` on the API as the test tenant. A request that creates a job (a
        job, a deployment, a scale change, a cancel) waits up to ``REQUEST_DISPATCH_S`` for
        Prefect to create its flow run, so httpx's default 5 s is too short on a loaded
        machine."""
        return httpx.request(
            method, f"{self.url}{path}", json=json, headers=self.headers(), timeout=30
        )

    def post(self, spec: dict[str, Any], kind: str = "dag") -> dict[str, Any]:
        r = self.call("POST", "/v1/jobs", {"kind": kind, "spec": spec})
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def job(self, job_id: str, key: str | None = None) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/v1/jobs/{job_id}", headers=self.headers(key), timeout=30)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def wait(self, job_id: str, timeout_s: float = 90, key: str | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while (job := self.job(job_id, key))["state"] not in TERMINAL:
            assert time.monotonic() < deadline, f"job still {job['state']}: {job}"
            time.sleep(0.2)
        return job

    def events(self, job_id: str) -> list[dict[str, Any]]:
        r = httpx.get(
            f"{self.url}/v1/jobs/{job_id}/events", params={"limit": 1000}, headers=self.headers()
        )
        return r.json()["data"]  # type: ignore[no-any-return]


@contextmanager
def platform_up(
    flavour: str,
    home: Path,
    workers: int = 2,
    worker_poll_s: int = 1,
    operator_modules: tuple[str, ...] = (),
) -> Iterator[Platform]:
    """A platform of real processes: ``embedded`` (SQLite, filesystem broker) or ``redis``
    (PostgreSQL, Redis). ``worker_poll_s``: how often the Prefect worker polls its pool
    for flow runs besides being woken by their events. ``operator_modules``: more
    test operators, loaded by every process as ``tests.integration.operators`` is."""
    if flavour == "embedded":
        database_url, broker_url = f"sqlite:///{home / 'deepflow.db'}", "filesystem://"
    else:
        database_url = create_pg_database("deepflow_it")
        broker_url = f"redis://127.0.0.1:6379/{REDIS_DB}"
        redis.Redis.from_url(broker_url).flushdb()
    settings = Settings(
        home=home,
        database_url=database_url,
        broker_url=broker_url,
        prefect_port=free_port(),
        lease_ttl_s=3.0,
        reconcile_interval_s=0.5,
        operator_modules=",".join(("tests.integration.operators", *operator_modules)),
    )
    schema.upgrade(settings.database_url)
    extra_env = {
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_WORKER_QUERY_SECONDS": str(worker_poll_s),
        "PREFECT_UI_ENABLED": "false",
    }
    stack = Stack(settings, extra_env)
    api = None
    try:
        stack.start_prefect_server()
        settings = stack.settings
        stack.start_prefect_worker()
        stack.start_worker("cpu", concurrency=workers)
        db = Database(settings.database_url)
        with db.transaction() as s:
            _, key = create_api_key(s, "acme")
        api = ApiServer(settings, db).start()
        yield Platform(flavour, settings, stack, db, api.url, key)
    finally:
        if api is not None:
            api.stop()
            stop_local_instances(api.db)
        stack.stop()
        if api is not None:  # a launch still going at the first sweep may have started one
            stop_local_instances(api.db)
        if flavour == "redis":
            drop_pg_database(database_url)


@pytest.fixture(scope="module", params=["embedded", pytest.param("redis", marks=pytest.mark.redis)])
def platform(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    with platform_up(request.param, tmp_path_factory.mktemp(f"platform-{request.param}")) as p:
        yield p
