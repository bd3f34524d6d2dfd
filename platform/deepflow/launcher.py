"""``deepflow up``: the whole platform on one machine, on the embedded defaults.

Starts, in order: a Prefect server (``prefect server start``, SQLite, telemetry off), the
Prefect runner that serves our job-kind deployments, a Celery worker for the ``cpu`` queue
on the configured broker (kombu's filesystem transport by default), then the API with the
lease reconciler and job dispatcher beside it. It prints the URLs, an API key and each
part's health, and stops everything on Ctrl-C. Each child's output goes to
``DEEPFLOW_HOME/logs/<part>.log``. With DEEPFLOW_PREFECT_API_URL set, an existing Prefect
server is used instead of starting one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from deepflow.api import create_app
from deepflow.config import Settings
from deepflow.dispatch import Dispatcher
from deepflow.store import Reconciler, authenticate, create_api_key, get_database, schema

DEFAULT_TENANT = "default"
PREFECT_START_TIMEOUT_S = 120.0


class SchemaNotCurrent(RuntimeError):
    pass


def require_current_schema(database_url: str) -> None:
    """Refuse to serve a database that is not at the newest revision."""
    script = ScriptDirectory.from_config(schema.alembic_config(database_url))
    with get_database(database_url).engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if current != script.get_current_head():
        raise SchemaNotCurrent(
            f"the database is at revision {current or 'empty'}, not "
            f"{script.get_current_head()}: run 'deepflow db upgrade'"
        )


def ensure_local_key(settings: Settings) -> str:
    """The key ``up`` prints: kept in DEEPFLOW_HOME/api_key, made on first start."""
    path = settings.ensure_home() / "api_key"
    db = get_database(settings.database_url)
    if path.exists():
        key = path.read_text().strip()
        with db.transaction() as session:
            if authenticate(session, key) is not None:
                return key
    with db.transaction() as session:
        _, key = create_api_key(session, DEFAULT_TENANT)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def prefect_env(settings: Settings, api_url: str) -> dict[str, str]:
    """Environment for the Prefect server and every process that talks to it."""
    home = settings.home / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "DEEPFLOW_PREFECT_API_URL": api_url,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }


@dataclass
class Part:
    """A child process of ``up``."""

    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, env: dict[str, str]) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 15.0) -> None:
        if not self.alive:
            return
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


def wait_healthy(url: str, part: Part | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if part is not None and not part.alive:
            raise RuntimeError(f"{part.name} exited while starting; see {part.log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f}s")


def _deepflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "deepflow.cli", *args]


def up(settings: Settings, host: str | None = None, port: int | None = None) -> int:
    host = host or settings.api_host
    port = port or settings.api_port
    home = settings.ensure_home()
    schema.upgrade(settings.database_url)
    key = ensure_local_key(settings)
    logs = home / "logs"
    parts: list[Part] = []
    external_prefect = settings.prefect_api_url
    prefect_url = external_prefect or f"http://127.0.0.1:{settings.prefect_port}/api"
    env = {**os.environ, **prefect_env(settings, prefect_url), "DEEPFLOW_HOME": str(home)}
    os.environ.update({k: env[k] for k in ("PREFECT_API_URL", "DEEPFLOW_PREFECT_API_URL")})
    settings = Settings.from_env()
    try:
        if external_prefect:
            wait_healthy(f"{prefect_url}/health", None, 10)
        else:
            server = Part(
                "prefect server",
                [
                    str(Path(sys.executable).with_name("prefect")),
                    *("server", "start", "--host", "127.0.0.1"),
                    *("--port", str(settings.prefect_port)),
                ],
                logs / "prefect-server.log",
            )
            parts.append(server)
            server.start(env)
            print(f"starting Prefect server (log: {server.log}) ...", flush=True)
            wait_healthy(f"{prefect_url}/health", server, PREFECT_START_TIMEOUT_S)
        for part in (
            Part("flow runner", _deepflow("flows", "serve"), logs / "flow-runner.log"),
            Part("cpu worker", _deepflow("worker", "--queues", "cpu"), logs / "worker-cpu.log"),
        ):
            parts.append(part)
            part.start(env)
        return _serve_api(settings, host, port, key, parts)
    finally:
        for part in reversed(parts):
            part.stop()
        print("DeepFlow stopped.", flush=True)


def _serve_api(settings: Settings, host: str, port: int, key: str, parts: list[Part]) -> int:
    db = get_database(settings.database_url)
    dispatcher = Dispatcher(db, settings.prefect_api_url) if settings.prefect_api_url else None
    passes = [dispatcher.dispatch_pending] if dispatcher else []
    reconciler = Reconciler(db, settings.reconcile_interval_s, passes)
    reconciler.start()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, db), host=host, port=port, log_level="warning")
    )
    url = f"http://{host}:{port}"

    def report() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if not server.started:
            return
        ui = (settings.prefect_api_url or "").removesuffix("/api")
        print(f"DeepFlow is up (data in {settings.home})")
        print(f"  API          {url}   (OpenAPI: {url}/openapi.json, docs: {url}/docs)")
        print(f"  Prefect UI   {ui}")
        print(f"  API key      {key}")
        health = {"api": True, "lease reconciler": reconciler.healthy}
        health |= {p.name: p.alive for p in parts}
        for name, ok in health.items():
            print(f"  {name:<16} {'healthy' if ok else 'NOT RUNNING'}")
        print(f"  try          curl -s -H 'Authorization: Bearer {key}' {url}/v1/jobs")
        print("Ctrl-C stops everything.", flush=True)
        dead: set[str] = set()
        while not server.should_exit:
            for p in parts:
                if not p.alive and p.name not in dead:
                    dead.add(p.name)
                    print(f"!! {p.name} exited; see {p.log}", flush=True)
            time.sleep(1)

    threading.Thread(target=report, daemon=True).start()
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it handled; stopping is the expected outcome
    finally:
        reconciler.stop()
    return 0
