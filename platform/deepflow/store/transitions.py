"""The only writers of state: one ``set_*_state`` per entity.

Each locks the row (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's write lock is already
held by the transaction), checks the change against its policy, applies it with its
timestamps, and appends the Event in the same transaction. An illegal change raises
``IllegalTransition`` and writes nothing.

Lock order, which keeps writers from deadlocking: a job before its tasks. Workers touch only
their task's row once the job runs (claim, heartbeat, report); everything that changes
several tasks of a job (the driver's pass, cancellation, the reconciler) locks the job first.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from deepflow.dag.states import JobState, TaskState
from deepflow.store.orm import (
    Deployment,
    DeploymentState,
    Event,
    Instance,
    InstanceState,
    Job,
    ModelVersion,
    ModelVersionState,
    Task,
)
from deepflow.store.policy import (
    DEPLOYMENT_POLICY,
    INSTANCE_POLICY,
    JOB_POLICY,
    MODEL_VERSION_POLICY,
    TASK_POLICY,
    Rule,
    find_rule,
)
from deepflow.store.types import utcnow


class IllegalTransition(ValueError):
    def __init__(self, entity: str, entity_id: str, current: StrEnum, target: StrEnum) -> None:
        super().__init__(f"{entity} {entity_id} cannot go from {current} to {target}")
        self.current = current
        self.target = target


Row = TypeVar("Row", Job, Task, Instance, ModelVersion, Deployment)


def lock(session: Session, cls: type[Row], row_id: str) -> Row:
    """Read a row for update, refreshing any copy the session already holds."""
    stmt = select(cls).where(cls.id == row_id).with_for_update()
    return session.execute(stmt, execution_options={"populate_existing": True}).scalar_one()


def lock_task(session: Session, task_id: str) -> Task:
    """Lock a task after its job (see the lock order above)."""
    job_id = session.execute(select(Task.job_id).where(Task.id == task_id)).scalar_one()
    lock(session, Job, job_id)
    return lock(session, Task, task_id)


def record_event(
    session: Session,
    *,
    tenant_id: str,
    entity_type: str,
    entity_id: str,
    to_state: str,
    rule: str,
    from_state: str | None = None,
    job_id: str | None = None,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
) -> Event:
    event = Event(
        tenant_id=tenant_id,
        entity_type=entity_type,
        entity_id=entity_id,
        job_id=job_id,
        from_state=from_state,
        to_state=to_state,
        rule=rule,
        reason=reason,
        data=data or {},
    )
    session.add(event)
    return event


def _change(
    session: Session,
    row: Job | Task | Instance | ModelVersion | Deployment,
    policy: tuple[Rule, ...],
    entity_type: str,
    target: StrEnum,
    job_id: str | None,
    reason: str | None,
    data: dict[str, Any] | None,
) -> Rule:
    current = row.state
    rule = find_rule(policy, current, target)
    if rule is None:
        raise IllegalTransition(entity_type, row.id, current, target)
    row.state = target  # type: ignore[assignment]
    row.updated_at = utcnow()
    record_event(
        session,
        tenant_id=row.tenant_id,
        entity_type=entity_type,
        entity_id=row.id,
        job_id=job_id,
        from_state=current,
        to_state=target,
        rule=rule.name,
        reason=reason,
        data=data,
    )
    return rule


def set_job_state(
    session: Session,
    job: str | Job,
    target: JobState,
    *,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
) -> Job:
    """Move a job (an id, or a row this transaction already locked) to ``target``."""
    if isinstance(job, str):
        job = lock(session, Job, job)
    _change(session, job, JOB_POLICY, "job", target, job.id, reason, data)
    if target is JobState.RUNNING:
        job.started_at = job.updated_at
    elif target.is_terminal:
        job.finished_at = job.updated_at
        if target is not JobState.SUCCEEDED and reason:
            job.error = reason
    return job


def set_task_state(
    session: Session,
    task: str | Task,
    target: TaskState,
    *,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
) -> Task:
    """Move a task (an id, or a row this transaction already holds: locked itself, or its
    job locked by the caller, which guards every task of the job) to ``target``."""
    if isinstance(task, str):
        task = lock(session, Task, task)
    _change(
        session,
        task,
        TASK_POLICY,
        "task",
        target,
        task.job_id,
        reason,
        {"attempt": task.attempt, **(data or {})},
    )
    if target is TaskState.RUNNING:
        task.started_at = task.updated_at
    if target is not TaskState.RUNNING:
        task.lease_owner = None
        task.lease_expires_at = None
        task.deadline_at = None
    if target.is_terminal:
        task.finished_at = task.updated_at
    return task


def set_instance_state(
    session: Session,
    instance_id: str,
    target: InstanceState,
    *,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
) -> Instance:
    instance = lock(session, Instance, instance_id)
    _change(session, instance, INSTANCE_POLICY, "instance", target, instance.job_id, reason, data)
    return instance


def set_deployment_state(
    session: Session,
    deployment: str | Deployment,
    target: DeploymentState,
    *,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
) -> Deployment:
    if isinstance(deployment, str):
        deployment = lock(session, Deployment, deployment)
    _change(session, deployment, DEPLOYMENT_POLICY, "deployment", target, None, reason, data)
    return deployment


def set_model_version_state(
    session: Session,
    version_id: str,
    target: ModelVersionState,
    *,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
) -> ModelVersion:
    version = lock(session, ModelVersion, version_id)
    _change(session, version, MODEL_VERSION_POLICY, "model_version", target, None, reason, data)
    return version
