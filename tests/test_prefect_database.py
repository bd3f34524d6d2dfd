"""The Prefect server's database beside ours: SQLite under the home on the embedded default,
a database of its own on our PostgreSQL server otherwise (created once, by any racer)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from deepflow.prefect_database import ensure_prefect_database, prefect_database_url
from tests.conftest import PG_SERVER, create_pg_database, drop_pg_database


def test_embedded_default_is_a_sqlite_file_under_the_home(tmp_path: Path) -> None:
    url = prefect_database_url(f"sqlite:///{tmp_path / 'deepflow.db'}", tmp_path)
    assert url == f"sqlite+aiosqlite:///{tmp_path / 'prefect' / 'prefect.db'}"


def test_postgresql_gets_a_database_beside_ours_and_an_explicit_url_wins(
    tmp_path: Path,
) -> None:
    ours = "postgresql+psycopg://app:secret@db.example:5433/deepflow"
    url = make_url(prefect_database_url(ours, tmp_path))
    assert url.drivername == "postgresql+asyncpg"
    assert (url.username, url.password, url.host, url.port) == ("app", "secret", "db.example", 5433)
    assert url.database == "deepflow_prefect"
    assert (
        prefect_database_url(ours, tmp_path, "sqlite+aiosqlite:///x.db")
        == "sqlite+aiosqlite:///x.db"
    )


@pytest.mark.postgres
def test_ensure_creates_the_database_once_under_a_race(tmp_path: Path) -> None:
    ours = create_pg_database("deepflow_prefdb")
    url = prefect_database_url(ours, tmp_path)
    name = make_url(url).database
    try:
        errors: list[BaseException] = []

        def ensure() -> None:
            try:
                ensure_prefect_database(url)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=ensure) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        admin = create_engine(PG_SERVER)
        with admin.connect() as conn:
            found = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
            assert found.first() is not None
        admin.dispose()
        ensure_prefect_database(url)  # again: nothing to do
    finally:
        drop_pg_database(ours)
