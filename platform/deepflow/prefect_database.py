"""Where the Prefect server that ``up`` starts keeps its state.

On the embedded default (SQLite) Prefect gets a SQLite file of its own under the home. On
PostgreSQL it gets a database of its own on the same server (``<ours>_prefect``), created
when missing: Prefect's server on SQLite holds one writer at a time, and under a steady job a
second it stalled for minutes on "database is locked" (BENCHMARKS.md, "Soak"), so a platform
that has a PostgreSQL should not keep its busiest writer on SQLite.
``DEEPFLOW_PREFECT_DATABASE_URL`` names another (any URL Prefect's server takes).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

PREFECT_DATABASE_SUFFIX = "_prefect"


def prefect_database_url(database_url: str, home: Path, explicit: str | None = None) -> str:
    """The database URL for Prefect's server, from the platform's own ``database_url``."""
    if explicit:
        return explicit
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        return f"sqlite+aiosqlite:///{home / 'prefect' / 'prefect.db'}"
    name = f"{url.database or 'postgres'}{PREFECT_DATABASE_SUFFIX}"
    return url.set(drivername="postgresql+asyncpg", database=name).render_as_string(
        hide_password=False
    )


def ensure_prefect_database(url: str) -> None:
    """Create the PostgreSQL database ``url`` names if it is missing (Prefect's server makes
    its tables, not its database). Other backends need nothing."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql" or not parsed.database:
        return
    maintenance = parsed.set(drivername="postgresql", database="postgres")
    conninfo = maintenance.render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        found = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (parsed.database,)
        ).fetchone()
        raced = (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation)
        if found is None:
            with contextlib.suppress(*raced):  # another `up` on this server made it first
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(parsed.database)))
