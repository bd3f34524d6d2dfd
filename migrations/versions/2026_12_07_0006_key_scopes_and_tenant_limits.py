"""A key may be read-only (``api_keys.scope``), and a tenant may have its own rate limits and
quotas (``tenants.requests_per_minute``, ``tokens_per_minute``, ``max_active_jobs``,
``max_instances``; NULL: the platform's default).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 19:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIMITS = ("requests_per_minute", "tokens_per_minute", "max_active_jobs", "max_instances")


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(
            sa.Column("scope", sa.String(16), nullable=False, server_default="all")
        )
    with op.batch_alter_table("tenants") as batch:
        for name in LIMITS:
            batch.add_column(sa.Column(name, sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        for name in reversed(LIMITS):
            batch.drop_column(name)
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("scope")
