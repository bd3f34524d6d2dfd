"""A platform of real processes with a registered tiny model, for serving tests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deepflow.store import (
    ModelVersionState,
    ensure_tenant,
    register_model_version,
    set_model_version_state,
)
from tests.integration.conftest import Platform, platform_up

MODEL = "tiny"


def register_model(platform: Platform, folder: Path, tenant: str = "acme") -> None:
    with platform.db.transaction() as s:
        owner = ensure_tenant(s, tenant)
        version = register_model_version(s, owner.id, MODEL, str(folder))
        set_model_version_state(s, version.id, ModelVersionState.READY)


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    from deepflow.engine.testmodel import make_test_model

    folder = make_test_model(tmp_path_factory.mktemp("model") / MODEL, "llama", "tiny")
    with platform_up("embedded", tmp_path_factory.mktemp("serving"), workers=2) as platform:
        register_model(platform, folder)
        yield platform


def deployment(platform: Platform, deployment_id: str) -> dict[str, Any]:
    r = httpx.get(f"{platform.url}/v1/deployments/{deployment_id}", headers=platform.headers())
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def wait_deployment(
    platform: Platform,
    deployment_id: str,
    state: str,
    ready: int | None = None,
    timeout_s: float = 120,
) -> dict[str, Any]:
    """Until the deployment is in ``state`` with ``ready`` ready instances (if given)."""
    deadline = time.monotonic() + timeout_s
    while True:
        d = deployment(platform, deployment_id)
        n = sum(i["state"] == "ready" for i in d["instances"])
        if d["state"] == state and (ready is None or n == ready):
            return d
        assert time.monotonic() < deadline, f"deployment stayed {d['state']} with {n} ready: {d}"
        time.sleep(0.3)
