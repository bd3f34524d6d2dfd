"""Task logs: what each attempt wrote, stored when the attempt ends and read per task.

A worker writes one row per (task, attempt) after the operator returns, fails or is stopped,
and before it reports the outcome, so a failed state is never visible without its log. A
second write for the same attempt (a redelivered message) keeps the first (one INSERT ... ON
CONFLICT DO NOTHING: no savepoint, no second round trip).
"""

from __future__ import annotations

from datetime import datetime
from functools import cache

from sqlalchemy import Insert, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from deepflow.store.errors import NotFound
from deepflow.store.orm import Job, Task, TaskLog


def write_task_log(
    session: Session,
    task: Task,
    attempt: int,
    *,
    outcome: str,
    text: str,
    dropped_chars: int,
    started_at: datetime,
    finished_at: datetime,
) -> None:
    """Store attempt ``attempt``'s log of ``task``, unless that attempt has one already."""
    values = {
        "task_id": task.id,
        "job_id": task.job_id,
        "tenant_id": task.tenant_id,
        "attempt": attempt,
        "outcome": outcome,
        "text": text,
        "dropped_chars": dropped_chars,
        "started_at": started_at,
        "finished_at": finished_at,
    }
    session.execute(_insert_once(session.get_bind().dialect.name), values)


@cache
def _insert_once(dialect: str) -> Insert:
    """One statement per dialect, so SQLAlchemy compiles it once, not on every attempt."""
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    table = TaskLog.__table__
    return insert(table).on_conflict_do_nothing(index_elements=[table.c.task_id, table.c.attempt])


def read_task_logs(
    session: Session, tenant_id: str, job_id: str, task_name: str, attempt: int | None = None
) -> list[TaskLog]:
    """The logs of a job's task by name, in attempt order (one attempt when given)."""
    task_id = session.execute(
        select(Task.id)
        .join(Job, Task.job_id == Job.id)
        .where(Job.id == job_id, Job.tenant_id == tenant_id, Task.name == task_name)
    ).scalar_one_or_none()
    if task_id is None:
        if session.execute(
            select(Job.id).where(Job.id == job_id, Job.tenant_id == tenant_id)
        ).first():
            raise NotFound("task", task_name)
        raise NotFound("job", job_id)
    stmt = select(TaskLog).where(TaskLog.task_id == task_id)
    if attempt is not None:
        stmt = stmt.where(TaskLog.attempt == attempt)
    return list(session.execute(stmt.order_by(TaskLog.attempt)).scalars())


def logged_attempts(session: Session, job_id: str) -> dict[tuple[str, int], int]:
    """(task id, attempt) -> log length, for every attempt of the job that has a log."""
    rows = session.execute(
        select(TaskLog.task_id, TaskLog.attempt, func.length(TaskLog.text)).where(
            TaskLog.job_id == job_id
        )
    )
    return {(task_id, attempt): int(size or 0) for task_id, attempt, size in rows}
