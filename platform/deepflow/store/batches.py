"""Batches (``/v1/batches``): the row beside a ``batch`` job, its shards' live progress, and
what OpenAI's Batch object needs that the job does not hold.

A batch's lifecycle is its job's: the job's state says whether it is done, failed or
cancelled; the batch row adds the moments it entered each phase, its files and its counts.
Shards write their counts as absolute numbers (``report_progress``) and only while the job
runs, so a cancelled batch's counts stop where the cancel found them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, aliased

from deepflow.dag import JobState
from deepflow.store.errors import Conflict, NotFound
from deepflow.store.jobs import cancel_job
from deepflow.store.orm import Batch, BatchShard, Event, Job, Task, TaskLog
from deepflow.store.paging import page_after
from deepflow.store.types import utcnow

STOPPING_BOUND_S = 60.0
"""After a cancel, how long a shard attempt that was running may take to report that it
stopped (its log). A worker stops a cancelled attempt within seconds; one whose worker died
never reports, and is counted as stopped after this."""


@dataclass(slots=True)
class Counts:
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class BatchView:
    """A batch with what its Batch object is derived from: its job's state and its counts."""

    batch: Batch
    job_state: JobState
    job_error: str | None
    job_finished_at: datetime | None
    counts: Counts = field(default_factory=Counts)
    stopping: bool = False
    """Cancelled, but a shard attempt that was running has not yet stopped."""


def create_batch(
    session: Session, batch: Batch, num_shards: int, completion_window_s: float
) -> Batch:
    """Insert the batch (its job already inserted in this transaction) and its shards' rows."""
    batch.created_at = utcnow()
    batch.expires_at = batch.created_at + timedelta(seconds=completion_window_s)
    session.add(batch)
    session.add_all(
        BatchShard(batch_id=batch.id, shard=i, completed=0, failed=0) for i in range(num_shards)
    )
    session.flush()
    return batch


def batch_of_job(session: Session, job_id: str) -> Batch:
    batch = session.execute(select(Batch).where(Batch.job_id == job_id)).scalar_one_or_none()
    if batch is None:
        raise NotFound("batch", f"of job {job_id}")
    return batch


def read_batch(session: Session, tenant_id: str, batch_id: str) -> BatchView:
    """The batch (expired first if its window has passed)."""
    return _views(session, [_mine(session, tenant_id, batch_id)])[0]


def _mine(session: Session, tenant_id: str, batch_id: str) -> Batch:
    batch = session.get(Batch, batch_id)
    if batch is None or batch.tenant_id != tenant_id:
        raise NotFound("batch", batch_id)
    return batch


@dataclass(slots=True)
class BatchPage:
    batches: list[BatchView]
    has_more: bool


def list_batches(
    session: Session, tenant_id: str, *, limit: int = 20, after: str | None = None
) -> BatchPage:
    """Newest first; ``after`` is the last id of the previous page."""
    if after is not None:
        _mine(session, tenant_id, after)  # NotFound names a batch (page_after: "batche")
    stmt = select(Batch).where(Batch.tenant_id == tenant_id)
    rows, has_more = page_after(session, stmt, Batch, tenant_id, after, limit)
    return BatchPage(_views(session, rows), has_more)


def cancel_batch(session: Session, tenant_id: str, batch_id: str) -> BatchView:
    """Cancel the batch's job (every shard attempt is stopped); Conflict once it has ended."""
    batch = read_batch(session, tenant_id, batch_id).batch
    cancel_job(session, tenant_id, batch.job_id, reason="batch cancelled by user")
    batch.cancelling_at = utcnow()
    session.flush()
    return _views(session, [batch])[0]


def report_progress(session: Session, batch_id: str, shard: int, counts: Counts) -> bool:
    """Write a shard's counts so far; False (nothing written) once the batch's job has ended:
    the shard should stop."""
    live = (
        select(Job.id)
        .join(Batch, Batch.job_id == Job.id)
        .where(Batch.id == batch_id, Job.state.not_in(_TERMINAL))
    )
    done = session.execute(
        update(BatchShard)
        .where(BatchShard.batch_id == batch_id, BatchShard.shard == shard, live.exists())
        .values(
            completed=counts.completed,
            failed=counts.failed,
            prompt_tokens=counts.prompt_tokens,
            completion_tokens=counts.completion_tokens,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    return bool(done.rowcount)  # type: ignore[attr-defined]


def mark_in_progress(session: Session, batch_id: str) -> Batch:
    batch = _lock(session, batch_id)
    batch.in_progress_at = batch.in_progress_at or utcnow()
    return batch


def mark_finalizing(session: Session, batch_id: str) -> Batch:
    batch = _lock(session, batch_id)
    batch.finalizing_at = batch.finalizing_at or utcnow()
    return batch


def set_result_files(
    session: Session, batch_id: str, output_file_id: str | None, error_file_id: str | None
) -> Batch:
    batch = _lock(session, batch_id)
    batch.output_file_id, batch.error_file_id = output_file_id, error_file_id
    return batch


_TERMINAL = [s for s in JobState if s.is_terminal]


def _lock(session: Session, batch_id: str) -> Batch:
    """The row for update (``FOR NO KEY UPDATE``, as ``transitions.lock`` takes jobs)."""
    stmt = select(Batch).where(Batch.id == batch_id).with_for_update(key_share=True)
    return session.execute(stmt, execution_options={"populate_existing": True}).scalar_one()


def _views(session: Session, batches: list[Batch]) -> list[BatchView]:
    if not batches:
        return []
    ids = [b.id for b in batches]
    jobs = {
        job_id: (state, error, finished)
        for job_id, state, error, finished in session.execute(
            select(Job.id, Job.state, Job.error, Job.finished_at).where(
                Job.id.in_([b.job_id for b in batches])
            )
        )
    }
    counts = {
        batch_id: Counts(int(c or 0), int(f or 0), int(p or 0), int(t or 0))
        for batch_id, c, f, p, t in session.execute(
            select(
                BatchShard.batch_id,
                func.sum(BatchShard.completed),
                func.sum(BatchShard.failed),
                func.sum(BatchShard.prompt_tokens),
                func.sum(BatchShard.completion_tokens),
            )
            .where(BatchShard.batch_id.in_(ids))
            .group_by(BatchShard.batch_id)
        )
    }
    views = []
    for batch in batches:
        state, error, finished = jobs[batch.job_id]
        if not state.is_terminal and utcnow() >= batch.expires_at:
            state, error, finished = _expire(session, batch)
        view = BatchView(batch, state, error, finished, counts.get(batch.id, Counts()))
        view.stopping = state is JobState.CANCELLED and _stopping(session, batch, finished)
        views.append(view)
    return views


def _expire(session: Session, batch: Batch) -> tuple[JobState, str | None, datetime | None]:
    """OpenAI's 24h window: a batch not done by ``expires_at`` is stopped as ``expired``."""
    reason = "the batch expired: it was not done within its completion window"
    try:
        job = cancel_job(session, batch.tenant_id, batch.job_id, reason=reason)
    except Conflict:  # it ended meanwhile (another reader expired it, say): as it is now
        session.refresh(batch)
        job = session.get_one(Job, batch.job_id, populate_existing=True)
        return job.state, job.error, job.finished_at
    batch.expired_at = job.finished_at
    session.flush()
    return job.state, job.error, job.finished_at


def _stopping(session: Session, batch: Batch, cancelled_at: datetime | None) -> bool:
    """Whether a task that was running when the job was cancelled has not yet logged the end
    of that attempt (the worker writes the log once the attempt's process is gone)."""
    if cancelled_at is None or utcnow() - cancelled_at > timedelta(seconds=STOPPING_BOUND_S):
        return False
    task = aliased(Task)
    stmt: Any = (
        select(func.count())
        .select_from(Event)
        .join(task, task.id == Event.entity_id)
        .outerjoin(TaskLog, (TaskLog.task_id == task.id) & (TaskLog.attempt == task.attempt))
        .where(
            Event.job_id == batch.job_id,
            Event.entity_type == "task",
            Event.from_state == "running",
            Event.to_state == "cancelled",
            TaskLog.id.is_(None),
        )
    )
    return bool(session.execute(stmt).scalar())
