"""Deployments: create, read, list, and what they have running."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from deepflow.dag.spec import ResourceClass
from deepflow.store.errors import Conflict, NotFound
from deepflow.store.orm import Deployment, DeploymentState, Instance, InstanceState
from deepflow.store.transitions import set_deployment_state
from deepflow.store.types import new_id

GONE = (DeploymentState.DELETING, DeploymentState.DELETED)
LIVE_INSTANCE = (InstanceState.STARTING, InstanceState.READY)


def create_deployment(
    session: Session,
    tenant_id: str,
    *,
    name: str,
    model_path: str,
    replicas: int,
    resource_class: ResourceClass,
    policy: str,
    engine_args: dict[str, Any] | None = None,
) -> Deployment:
    """A new deployment, state creating. A tenant serves one deployment per model name."""
    taken = session.execute(
        select(Deployment.id).where(
            Deployment.tenant_id == tenant_id,
            Deployment.name == name,
            Deployment.state.not_in(GONE),
        )
    ).first()
    if taken is not None:
        raise Conflict(f"model {name!r} is already deployed ({taken[0]})", "deployment_exists")
    deployment = Deployment(
        id=new_id("dep"),
        tenant_id=tenant_id,
        name=name,
        model_path=model_path,
        replicas=replicas,
        resource_class=resource_class,
        policy=policy,
        engine_args=engine_args or {},
    )
    data = {"model": name, "replicas": replicas, "policy": policy}
    set_deployment_state(session, deployment, DeploymentState.CREATING, data=data)
    session.flush()
    return deployment


def read_deployment(session: Session, tenant_id: str, deployment_id: str) -> Deployment:
    deployment = session.get(Deployment, deployment_id)
    if deployment is None or deployment.tenant_id != tenant_id:
        raise NotFound("deployment", deployment_id)
    return deployment


def list_deployments(
    session: Session, tenant_id: str | None, *, include_deleted: bool = False
) -> list[Deployment]:
    """A tenant's deployments (every tenant's with ``tenant_id=None``: the platform's view)."""
    stmt = select(Deployment).order_by(Deployment.created_at)
    if tenant_id is not None:
        stmt = stmt.where(Deployment.tenant_id == tenant_id)
    if not include_deleted:
        stmt = stmt.where(Deployment.state != DeploymentState.DELETED)
    return list(session.execute(stmt).scalars())


def deployment_instances(
    session: Session, deployment_id: str, *, live_only: bool = False
) -> list[Instance]:
    stmt = select(Instance).where(Instance.deployment_id == deployment_id)
    if live_only:
        stmt = stmt.where(Instance.state.in_(LIVE_INSTANCE))
    return list(session.execute(stmt.order_by(Instance.created_at)).scalars())
