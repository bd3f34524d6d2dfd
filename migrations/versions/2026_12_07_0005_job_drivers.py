"""A job knows its driver: ``driver`` counts the flow runs that have driven it (the newest
holds it) and ``driver_seen_at`` is that driver's last pass, so a job whose driver died (a
killed Prefect worker or ``deepflow up``) is noticed and driven again.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 15:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("driver", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("driver_seen_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("driver_seen_at")
        batch.drop_column("driver")
