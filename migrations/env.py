"""Alembic environment for DeepFlow's store (PostgreSQL and SQLite alike).

The URL comes from ``config.attributes["database_url"]`` when a caller set one
(``deepflow db upgrade``, tests), or ``alembic -x url=...``, else from
``DEEPFLOW_DATABASE_URL`` via the platform's settings.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection

from deepflow.config import Settings, normalize_database_url
from deepflow.store.db import make_engine
from deepflow.store.orm import Base
from deepflow.store.types import UTCDateTime

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("database_url") or context.get_x_argument(True).get("url")
    return normalize_database_url(url) if url else Settings.from_env().database_url


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Write our UTCDateTime as the plain column type it stores, so migrations stand alone."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    dialect = connection.dialect.name if connection is not None else url.split(":")[0]  # type: ignore[union-attr]
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        render_as_batch=dialect.startswith("sqlite"),
        compare_type=True,
        render_item=_render_item,
        literal_binds=connection is None,
    )


def run_migrations_offline() -> None:
    _configure(url=_url())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    with engine.connect() as connection:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
