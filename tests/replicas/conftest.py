"""A platform of real processes with a registered tiny model, for serving tests."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deepflow.store import (
    Database,
    ModelVersionState,
    ensure_tenant,
    register_model_version,
    set_model_version_state,
)
from tests.integration.conftest import Platform, platform_up

MODEL = "tiny"
RECOVERY_S = 90.0
"""The most a killed instance's replacement may take to be ready, from the kill: noticing it
(a refused probe at once; a stuck daemon after MISSES_TO_FAIL probes of PROBE_TIMEOUT_S, ~8 s),
then a deploy job (dispatch, the weights check, a cold daemon start, its health check: 15 to
25 s on the 2-core VM under load), with room for one failed job and its retry 30 s later."""


def register_model(db: Database, folder: Path, tenant: str = "acme") -> None:
    """``folder`` as the tenant's ready model MODEL."""
    with db.transaction() as s:
        owner = ensure_tenant(s, tenant)
        version = register_model_version(s, owner.id, MODEL, str(folder))
        set_model_version_state(s, version.id, ModelVersionState.READY)


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    from deepflow.engine.testmodel import make_test_model

    folder = make_test_model(tmp_path_factory.mktemp("model") / MODEL, "llama", "tiny")
    with platform_up("embedded", tmp_path_factory.mktemp("serving"), workers=2) as platform:
        register_model(platform.db, folder)
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


def live_processes() -> Iterator[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every live process (zombies left out)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z":
            yield int(entry), int(fields[1]), int(fields[2])


def group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    return [pid for pid, _, group in live_processes() if group == pgid]


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:``port`` (a server could bind it again)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
