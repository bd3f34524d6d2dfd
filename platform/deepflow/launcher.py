"""``deepflow up``: the whole platform in one process tree on one machine.

Uses the embedded defaults from ``deepflow.config`` (SQLite under DEEPFLOW_HOME), migrates
the database, makes sure there is an API key to print, and runs the API with the lease
reconciler beside it until Ctrl-C.
"""

from __future__ import annotations

import os
import threading
import time

import uvicorn
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from deepflow.api import create_app
from deepflow.config import Settings
from deepflow.store import Reconciler, authenticate, create_api_key, get_database, schema

DEFAULT_TENANT = "default"


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


def up(settings: Settings, host: str | None = None, port: int | None = None) -> int:
    host = host or settings.api_host
    port = port or settings.api_port
    settings.ensure_home()
    schema.upgrade(settings.database_url)
    key = ensure_local_key(settings)
    db = get_database(settings.database_url)
    reconciler = Reconciler(db, settings.reconcile_interval_s)
    reconciler.start()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, db), host=host, port=port, log_level="warning")
    )
    url = f"http://{host}:{port}"

    def banner() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            parts = {"api": True, "lease reconciler": reconciler.healthy}
            print(f"DeepFlow is up (data in {settings.home})")
            print(f"  API          {url}   (OpenAPI: {url}/openapi.json, docs: {url}/docs)")
            print(f"  API key      {key}")
            for name, ok in parts.items():
                print(f"  {name:<12} {'healthy' if ok else 'NOT RUNNING'}")
            print(f"  try          curl -s -H 'Authorization: Bearer {key}' {url}/v1/jobs")
            print("Ctrl-C stops everything.", flush=True)

    threading.Thread(target=banner, daemon=True).start()
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it handled; stopping is the expected outcome
    finally:
        reconciler.stop()
        print("DeepFlow stopped.", flush=True)
    return 0
