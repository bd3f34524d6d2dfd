"""The only writers of state: one ``set_*_state`` per entity.

Each locks the row (``SELECT ... FOR NO KEY UPDATE`` on PostgreSQL; SQLite's write lock is
already held by the transaction), checks the change against its policy, applies it with its
timestamps, and appends the Event in the same transaction. An illegal change raises
``IllegalTransition`` and writes nothing.

Creation goes through the same writer: the ``create_*`` functions build a row without a
state and hand it to ``set_*_state`` with its first state, which the policy's creation rule
(from ``NEW``) must allow; that writes the creation event. The ORM gives ``state`` no
default, so a row that skipped the writer fails its insert.

Lock order, which keeps writers from deadlocking: a job before its tasks. Workers touch only
their task's row once the job runs (claim, heartbeat, report); everything that changes
several tasks of a job (the driver's pass, cancellation, the reconciler) locks the job first.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from deepflow.dag.states import JobState, TaskState
from deepflow.store.orm import (
    Base,
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
    NEW,
    TASK_POLICY,
    Rule,
    State,
    find_rule,
)
from deepflow.store.types import utcnow


class IllegalTransition(ValueError):
    def __init__(self, entity: str, entity_id: str, current: State, target: StrEnum) -> None:
        where = "start in" if current is NEW else f"go from {current} to"
        super().__init__(f"{entity} {entity_id} cannot {where} {target}")
        self.current = current
        self.target = target


Row = TypeVar("Row", Job, Task, Instance, ModelVersion, Deployment)


def lock(session: Session, cls: type[Row], row_id: str) -> Row:
    """Read a row for update, refreshing any copy the session already holds.

    ``FOR NO KEY UPDATE``, not ``FOR UPDATE``: no writer changes a primary key, and the
    weaker lock still excludes every other writer of the row but lets inserts that merely
    reference it (an event's or a task log's foreign key to its job takes ``FOR KEY SHARE``)
    go on. Under ``FOR UPDATE`` every worker's report waited for the driver's pass over the
    job."""
    stmt = select(cls).where(cls.id == row_id).with_for_update(key_share=True)
    return session.execute(stmt, execution_options={"populate_existing": True}).scalar_one()


def lock_task(session: Session, task_id: str) -> Task:
    """Lock a task after its job (see the lock order above)."""
    job_id = session.execute(select(Task.job_id).where(Task.id == task_id)).scalar_one()
    lock(session, Job, job_id)
    return lock(session, Task, task_id)


def _change(
    row: Job | Task | Instance | ModelVersion | Deployment,
    policy: tuple[Rule, ...],
    entity_type: str,
    target: StrEnum,
    job_id: str | None,
    reason: str | None,
    data: dict[str, Any] | None,
) -> dict[str, Any]:
    """Apply ``target`` to ``row`` if its policy allows it; returns its event's values."""
    current: State = row.state
    rule = find_rule(policy, current, target)
    if rule is None:
        raise IllegalTransition(entity_type, row.id, current, target)
    row.state = target  # type: ignore[assignment]
    row.updated_at = utcnow()
    if current is NEW:
        row.created_at = row.updated_at
    return {
        "tenant_id": row.tenant_id,
        "entity_type": entity_type,
        "entity_id": row.id,
        "job_id": job_id,
        "from_state": current,
        "to_state": target,
        "rule": rule.name,
        "reason": reason,
        "data": data or {},
        "created_at": row.updated_at,
    }


def _write(session: Session, row: Base, event: dict[str, Any]) -> None:
    session.add(row)  # a no-op unless the row is new
    session.add(Event(**event))


def set_job_state(
    session: Session,
    job: str | Job,
    target: JobState,
    *,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
) -> Job:
    """Move a job (an id, a row this transaction already locked, or a new row) to ``target``."""
    if isinstance(job, str):
        job = lock(session, Job, job)
    _write(session, job, _change(job, JOB_POLICY, "job", target, job.id, reason, data))
    if target is JobState.RUNNING:
        job.started_at = job.updated_at
    elif target.is_terminal:
        job.finished_at = job.updated_at
        if target is not JobState.SUCCEEDED and reason:
            job.error = reason
    return job


def _change_task(
    task: Task, target: TaskState, reason: str | None, data: dict[str, Any] | None
) -> dict[str, Any]:
    event = _change(
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
    return event


def set_task_state(
    session: Session,
    task: str | Task,
    target: TaskState,
    *,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
) -> Task:
    """Move a task (an id, a new row, or a row this transaction already holds: locked
    itself, or its job locked by the caller, which guards every task of the job) to
    ``target``."""
    if isinstance(task, str):
        task = lock(session, Task, task)
    _write(session, task, _change_task(task, target, reason, data))
    return task


def set_task_states(
    session: Session,
    tasks: Sequence[Task],
    target: TaskState,
    *,
    reason: str | None = None,
) -> None:
    """``set_task_state`` for many rows at once (new rows, or rows whose job the caller
    locked): every change is checked before any is applied, and their events are written by
    one statement (a job creates or cancels thousands of tasks; as ORM objects, with their
    ids read back, each event cost more than its task)."""
    for task in tasks:
        if find_rule(TASK_POLICY, task.state, target) is None:
            raise IllegalTransition("task", task.id, task.state, target)
    if not tasks:
        return
    events = [_change_task(task, target, reason, None) for task in tasks]
    session.add_all(tasks)
    session.execute(insert(Event), events)  # autoflushes first: the rows, earlier events


def set_instance_state(
    session: Session,
    instance: str | Instance,
    target: InstanceState,
    *,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
) -> Instance:
    if isinstance(instance, str):
        instance = lock(session, Instance, instance)
    event = _change(instance, INSTANCE_POLICY, "instance", target, instance.job_id, reason, data)
    _write(session, instance, event)
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
    event = _change(deployment, DEPLOYMENT_POLICY, "deployment", target, None, reason, data)
    _write(session, deployment, event)
    return deployment


def set_model_version_state(
    session: Session,
    version: str | ModelVersion,
    target: ModelVersionState,
    *,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
) -> ModelVersion:
    if isinstance(version, str):
        version = lock(session, ModelVersion, version)
    event = _change(version, MODEL_VERSION_POLICY, "model_version", target, None, reason, data)
    _write(session, version, event)
    return version
