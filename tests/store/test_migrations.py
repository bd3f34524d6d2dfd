"""Migrations build the schema from empty, match the models, and downgrade to nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from deepflow.store import Base, schema
from tests.conftest import create_pg_database, drop_pg_database


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _round_trip(url: str) -> None:
    schema.upgrade(url)
    assert _tables(url) == {t.name for t in Base.metadata.sorted_tables} | {"alembic_version"}
    schema.check(url)  # raises when models and migrations drift apart
    schema.downgrade(url, "base")
    assert _tables(url) == {"alembic_version"}
    schema.upgrade(url)
    schema.check(url)


def test_sqlite_round_trip(tmp_path: Path) -> None:
    _round_trip(f"sqlite:///{tmp_path / 'm.db'}")


@pytest.mark.postgres
def test_postgres_round_trip() -> None:
    url = create_pg_database("deepflow_migrate")
    try:
        _round_trip(url)
    finally:
        drop_pg_database(url)
