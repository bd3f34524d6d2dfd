"""A task's attempts: queue, claim (take the lease), heartbeat, succeed or fail.

Workers get at-least-once delivery, so every call after ``queue_task`` names the attempt
it is about, and the lease holder. A redelivered or stale message (an older attempt, or a
task someone else already runs) is refused rather than run twice: ``claim_task`` returns
None and the worker drops the message.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from deepflow.dag import JobState, TaskState
from deepflow.store.orm import Job, Task, TaskEdge
from deepflow.store.transitions import lock, lock_task, set_job_state, set_task_state
from deepflow.store.types import utcnow


class LeaseLost(RuntimeError):
    """The caller no longer holds the task's lease (it expired, or the task was cancelled)."""


def queue_task(session: Session, task: str | Task) -> Task:
    """Start a new attempt: pending or up_for_retry -> queued. The caller then sends
    (task id, ``task.attempt``) to the task's resource-class queue. ``task`` is an id, or a
    row whose job the caller has locked."""
    if isinstance(task, str):
        task = lock_task(session, task)
    task.attempt += 1
    task.next_attempt_at = None
    return set_task_state(session, task, TaskState.QUEUED)


def claim_task(
    session: Session,
    task_id: str,
    worker_id: str,
    attempt: int,
    lease_ttl_s: float,
    now: datetime | None = None,
) -> Task | None:
    """Take the lease of a queued attempt; None if the message is stale or a duplicate.

    Only a job's first claim locks the job (to start it); later claims lock just the task,
    so workers do not queue up behind each other on their job's row."""
    job_state = session.execute(
        select(Job.state).join(Task, Task.job_id == Job.id).where(Task.id == task_id)
    ).scalar_one()
    if job_state in (JobState.PENDING, JobState.QUEUED):
        task = lock_task(session, task_id)
    else:
        task = lock(session, Task, task_id)
    if task.state is not TaskState.QUEUED or task.attempt != attempt:
        return None
    now = now or utcnow()
    set_task_state(session, task, TaskState.RUNNING, data={"worker": worker_id})
    task.lease_owner = worker_id
    task.lease_expires_at = now + timedelta(seconds=lease_ttl_s)
    task.deadline_at = now + timedelta(seconds=task.timeout_s)
    if job_state in (JobState.PENDING, JobState.QUEUED):
        job = session.get(Job, task.job_id)  # locked above, by lock_task
        assert job is not None
        if job.state in (JobState.PENDING, JobState.QUEUED):
            set_job_state(session, job, JobState.RUNNING)
    return task


def _held(session: Session, task_id: str, worker_id: str, attempt: int) -> Task:
    task = lock(session, Task, task_id)
    if (
        task.state is not TaskState.RUNNING
        or task.lease_owner != worker_id
        or task.attempt != attempt
    ):
        raise LeaseLost(f"{worker_id} does not hold attempt {attempt} of task {task_id}")
    return task


def heartbeat_task(
    session: Session,
    task_id: str,
    worker_id: str,
    attempt: int,
    lease_ttl_s: float,
    now: datetime | None = None,
) -> datetime:
    """Extend the lease; raises LeaseLost when the worker should stop working on it."""
    task = _held(session, task_id, worker_id, attempt)
    task.lease_expires_at = (now or utcnow()) + timedelta(seconds=lease_ttl_s)
    return task.lease_expires_at


def succeed_task(
    session: Session, task_id: str, worker_id: str, attempt: int, output: Any = None
) -> Task:
    task = _held(session, task_id, worker_id, attempt)
    task.output = output
    task.error = None
    return set_task_state(session, task, TaskState.SUCCEEDED)


def fail_task(
    session: Session,
    task_id: str,
    worker_id: str,
    attempt: int,
    error: str,
    now: datetime | None = None,
) -> Task:
    """End a failed attempt: up_for_retry with backoff while attempts remain, else failed."""
    _held(session, task_id, worker_id, attempt)
    return end_attempt(session, task_id, error, now or utcnow())


def retry_delay_s(task: Task) -> float:
    """Exponential backoff after failed attempt number ``task.attempt``."""
    delay = task.retry_delay_s * task.retry_backoff ** max(task.attempt - 1, 0)
    return min(delay, task.max_retry_delay_s)


def end_attempt(session: Session, task_id: str, error: str, now: datetime) -> Task:
    """The running attempt is over without success; retry it or fail the task."""
    task = lock(session, Task, task_id)
    task.error = error
    if task.attempt <= task.retries:
        task.next_attempt_at = now + timedelta(seconds=retry_delay_s(task))
        return set_task_state(session, task, TaskState.UP_FOR_RETRY, reason=error)
    return set_task_state(session, task, TaskState.FAILED, reason=error)


def task_context(session: Session, task: Task) -> dict[str, Any]:
    """What an operator that ``takes_context`` gets: its job, tenant, name and the outputs of
    the tasks it depends on, by name."""
    upstream = aliased(Task)
    rows = session.execute(
        select(upstream.name, upstream.output)
        .join(TaskEdge, TaskEdge.upstream_id == upstream.id)
        .where(TaskEdge.downstream_id == task.id)
    ).all()
    return {
        "job_id": task.job_id,
        "tenant_id": task.tenant_id,
        "task": task.name,
        "attempt": task.attempt,
        "upstream": {name: output for name, output in rows},
    }
