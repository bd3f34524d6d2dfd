"""The job kind that converges a deployment is named ``deploy`` (it was ``serve``, a word that
also named the engine daemon, its CLI command and two packages); its operators become
``deploy.*``. Data only: the columns are unchanged.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 02:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _rename(old: str, new: str) -> None:
    op.execute(f"UPDATE jobs SET kind = '{new}' WHERE kind = '{old}'")
    op.execute(f"UPDATE requests SET kind = '{new}' WHERE kind = '{old}'")
    op.execute(
        f"UPDATE tasks SET operator = '{new}.' || substr(operator, {len(old) + 2}) "
        f"WHERE operator LIKE '{old}.%'"
    )


def upgrade() -> None:
    _rename("serve", "deploy")


def downgrade() -> None:
    _rename("deploy", "serve")
