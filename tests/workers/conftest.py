"""A real Prefect server for tests: `start_prefect_server` and the session fixture `prefect_server`.

Written to be lifted into tests/conftest.py as is: nothing here knows about Celery or workers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

SERVER_START_TIMEOUT_S = 90  # imports and migrations take ~10 s on two cores; CI can be slower


def prefect_env(url: str, home: Path) -> dict[str, str]:
    """Environment for a process that talks to the server at `url` (a worker, a flow runner)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_API_URL": url,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    return env


def start_prefect_server(tmp_dir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """Start `prefect server start` on a free port with its SQLite database in `tmp_dir`.

    Returns the API URL (…/api) once /api/health answers, and the process (its own session,
    so `stop_prefect_server` can end it with anything it started).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = prefect_env(url, tmp_dir / "server-home")
    del env["PREFECT_API_URL"]
    env |= {
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_dir / 'prefect.db'}",
        "PREFECT_UI_ENABLED": "false",
    }
    prefect = Path(sys.executable).with_name("prefect")
    log = (tmp_dir / "prefect-server.log").open("wb")
    process = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port),
         "--no-scheduler", "--no-late-runs"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited: {_tail(tmp_dir / 'prefect-server.log')}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url, process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_prefect_server(process)
    raise RuntimeError(f"prefect server not healthy: {_tail(tmp_dir / 'prefect-server.log')}")


def stop_prefect_server(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prefect server for the session; this process's Prefect client points at it."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    tmp_dir = tmp_path_factory.mktemp("prefect")
    url, process = start_prefect_server(tmp_dir)
    try:
        with temporary_settings({PREFECT_API_URL: url, PREFECT_HOME: str(tmp_dir / "home")}):
            yield url
            # send what this process still holds while the server is up
            EventsWorker.drain_all(timeout=10)
            APILogWorker.drain_all(timeout=10)
    finally:
        stop_prefect_server(process)
