"""Schema management: run the Alembic revisions under ``migrations/`` from code."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import deepflow.migrations


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(deepflow.migrations.__file__).parent))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


def check(database_url: str) -> None:
    """Raise if the models and the migrated schema differ (a migration is missing)."""
    command.check(alembic_config(database_url))
