"""Deployments: a served model's desired replicas and routing policy; instances belong to one
and record where their daemon runs (host, pid) and how it started.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 22:29:45.365425
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("model_path", sa.String(length=1000), nullable=False),
        sa.Column("replicas", sa.Integer(), nullable=False),
        sa.Column(
            "resource_class",
            sa.Enum("cpu", "cuda", "npu", name="resource_class", native_enum=False, length=40),
            nullable=False,
        ),
        sa.Column("policy", sa.String(length=40), nullable=False),
        sa.Column("engine_args", sa.JSON(), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=True),
        sa.Column(
            "state",
            sa.Enum(
                "creating",
                "ready",
                "degraded",
                "failed",
                "deleting",
                "deleted",
                name="deployment_state",
                native_enum=False,
                length=40,
            ),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_deployments_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_deployments_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployments")),
    )
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.create_index("ix_deployments_tenant_name", ["tenant_id", "name"], unique=False)

    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deployment_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("pid", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("host", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("start_path", sa.String(length=40), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_instances_deployment_id"), ["deployment_id"], unique=False
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_instances_deployment_id_deployments"),
            "deployments",
            ["deployment_id"],
            ["id"],
            ondelete="CASCADE",
        )


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_instances_deployment_id_deployments"), type_="foreignkey"
        )
        batch_op.drop_index(batch_op.f("ix_instances_deployment_id"))
        batch_op.drop_column("start_path")
        batch_op.drop_column("host")
        batch_op.drop_column("pid")
        batch_op.drop_column("deployment_id")

    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_index("ix_deployments_tenant_name")

    op.drop_table("deployments")
