"""Database connections and transactions, PostgreSQL (psycopg 3) or SQLite.

SQLite is the embedded default and several processes (API, workers, reconciler) write to it
at once. Every transaction therefore starts with ``BEGIN IMMEDIATE``: a deferred transaction
that reads and then writes fails at once with "database is locked" when another writer
committed in between, whereas an immediate one waits its turn (``busy_timeout``). WAL keeps
readers of other connections from blocking.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from deepflow.config import normalize_database_url


def make_engine(url: str, *, durable: bool = True, **kwargs: Any) -> Engine:
    """``durable=False``: on PostgreSQL, commits return before the WAL reaches the disk
    (``synchronous_commit=off``; SQLite in WAL mode with ``synchronous=NORMAL`` does so
    already). A server crash can then lose the last moments of commits, never consistency;
    and any durable commit that read them (the driver's next pass) makes them durable too.
    Only for writes that are safe to redo: a task attempt's claim, heartbeats and outcome."""
    url = normalize_database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        if not durable:
            kwargs["connect_args"] = {"options": "-c synchronous_commit=off"}
        # No pre-ping: it costs a round trip per transaction (a quarter of a short task's time
        # on a worker). A connection the server dropped fails its transaction instead, which
        # every caller already survives (the API answers 5xx once, a task attempt is retried).
        return create_engine(url, pool_size=10, max_overflow=40, pool_recycle=1800, **kwargs)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy, not the driver, begins transactions
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class Database:
    """An engine and its sessions. ``transaction()`` is the unit of work: commit or roll back."""

    def __init__(self, url: str, *, durable: bool = True, **engine_kwargs: Any) -> None:
        self.url = normalize_database_url(url)
        self.engine = make_engine(self.url, durable=durable, **engine_kwargs)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


_databases: dict[tuple[str, bool], Database] = {}


def get_database(url: str, *, durable: bool = True) -> Database:
    """One Database per URL (and durability, see ``make_engine``) per process, so connection
    pools are shared."""
    key = (normalize_database_url(url), durable)
    if key not in _databases:
        _databases[key] = Database(key[0], durable=durable)
    return _databases[key]


def forget_inherited_connections() -> None:
    """In a forked child: drop the parent's pooled connections without closing them (they
    are the parent's sockets), so the child opens its own when it first needs one."""
    for database in _databases.values():
        database.engine.dispose(close=False)
