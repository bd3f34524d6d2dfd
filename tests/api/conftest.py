"""API fixtures: the app over a real database, and keys for two tenants."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session
from starlette.types import ASGIApp

from deepflow.api import create_app
from deepflow.config import Settings
from deepflow.dag import ResourceClass
from deepflow.launcher import free_port
from deepflow.store import (
    Database,
    InstanceState,
    create_api_key,
    create_deployment,
    create_instance,
    set_instance_state,
)
from deepflow.store.orm import Deployment


@dataclass
class Api:
    client: TestClient
    db: Database
    key: str
    other_key: str

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}


@pytest.fixture
def api(db: Database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    settings = Settings(
        home=tmp_path_factory.mktemp("home"), database_url=db.url, broker_url="memory://"
    )
    with db.transaction() as s:
        _, key = create_api_key(s, "acme")
        _, other = create_api_key(s, "globex")
    with TestClient(create_app(settings, db), raise_server_exceptions=False) as client:
        yield Api(client, db, key, other)


def ready_deployment(session: Session, tenant_id: str, model: str, address: str) -> Deployment:
    """A deployment of ``model`` with one instance ready at ``address`` (a stand-in server):
    what the gateway routes to, without an engine."""
    dep = create_deployment(
        session,
        tenant_id,
        name=model,
        model_path=f"/models/{model}",
        replicas=1,
        resource_class=ResourceClass.CPU,
        policy="round_robin",
    )
    ready = create_instance(
        session, tenant_id, model_name=model, device="cpu", deployment_id=dep.id, address=address
    )
    session.flush()
    set_instance_state(session, ready.id, InstanceState.READY)
    return dep


@contextmanager
def serve(app: ASGIApp) -> Iterator[str]:
    """``app`` behind a real HTTP server on a free port, yielding its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def live_api(api: Api) -> Iterator[str]:
    """The same app behind a real HTTP server (for concurrency), yielding its base URL."""
    with serve(api.client.app) as url:
        yield url
    httpx.Client().close()
