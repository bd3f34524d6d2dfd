"""Engine instances: registration, load reports (heartbeats) and reads."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from deepflow.store.errors import NotFound
from deepflow.store.orm import Instance, InstanceState
from deepflow.store.transitions import set_instance_state
from deepflow.store.types import new_id, utcnow


def create_instance(
    session: Session,
    tenant_id: str,
    *,
    model_name: str,
    device: str,
    job_id: str | None = None,
    model_version_id: str | None = None,
    address: str | None = None,
    role: str = "both",
    deployment_id: str | None = None,
    host: str | None = None,
    pid: int | None = None,
    start_path: str | None = None,
    model_path: str | None = None,
) -> Instance:
    if role not in ("prefill", "decode", "both"):
        raise ValueError(f"role must be prefill, decode or both, not {role!r}")
    instance = Instance(
        id=new_id("inst"),
        tenant_id=tenant_id,
        job_id=job_id,
        model_version_id=model_version_id,
        model_name=model_name,
        device=device,
        address=address,
        role=role,
        deployment_id=deployment_id,
        host=host,
        pid=pid,
        start_path=start_path,
        model_path=model_path,
    )
    data = {"model": model_name, "device": device, "role": role, "deployment": deployment_id}
    set_instance_state(session, instance, InstanceState.STARTING, data=data)
    session.flush()
    return instance


def report_instance_load(
    session: Session, instance_id: str, *, running: int, waiting: int, kv_cache_usage: float
) -> Instance:
    """A heartbeat with the instance's load; not a state change, so no event."""
    instance = session.get(Instance, instance_id)
    if instance is None:
        raise NotFound("instance", instance_id)
    instance.running, instance.waiting = running, waiting
    instance.kv_cache_usage = kv_cache_usage
    instance.heartbeat_at = instance.updated_at = utcnow()
    return instance


def list_instances(
    session: Session, tenant_id: str, *, model_name: str | None = None, live_only: bool = False
) -> list[Instance]:
    stmt = select(Instance).where(Instance.tenant_id == tenant_id)
    if model_name is not None:
        stmt = stmt.where(Instance.model_name == model_name)
    if live_only:
        stmt = stmt.where(Instance.state.in_([InstanceState.STARTING, InstanceState.READY]))
    return list(session.execute(stmt.order_by(Instance.created_at)).scalars())


def stale_instances(
    session: Session, older_than_s: float, now: datetime | None = None
) -> list[Instance]:
    """Ready instances whose last heartbeat is older than ``older_than_s``."""
    cutoff = (now or utcnow()) - timedelta(seconds=older_than_s)
    stmt = select(Instance).where(
        Instance.state == InstanceState.READY, Instance.heartbeat_at < cutoff
    )
    return list(session.execute(stmt).scalars())
