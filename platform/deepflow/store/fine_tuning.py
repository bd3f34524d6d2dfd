"""A fine-tuning job's loss curve, checkpoints and pause.

The curve has one row per optimizer step. A worker killed between checkpoints leaves rows
for steps its checkpoint does not hold; the next attempt resumes from that checkpoint and
drops them first (``resume_from``), so once the job ends the curve has each step exactly once.
"""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from deepflow.store.errors import Conflict, NotFound
from deepflow.store.orm import Checkpoint, Job, TrainingStep
from deepflow.store.transitions import lock
from deepflow.store.types import new_id, utcnow


def record_step(
    session: Session,
    job_id: str,
    tenant_id: str,
    *,
    step: int,
    epoch: int,
    train_loss: float,
    tokens: int,
    learning_rate: float,
    valid_loss: float | None = None,
) -> None:
    session.merge(
        TrainingStep(
            job_id=job_id,
            step=step,
            tenant_id=tenant_id,
            epoch=epoch,
            train_loss=train_loss,
            tokens=tokens,
            learning_rate=learning_rate,
            valid_loss=valid_loss,
            created_at=utcnow(),
        )
    )


def record_checkpoint(
    session: Session,
    job_id: str,
    tenant_id: str,
    *,
    step: int,
    path: str,
    train_loss: float,
    valid_loss: float | None,
) -> Checkpoint:
    """Add the checkpoint saved (whole) at ``path``; one saved again at the same step by a
    later attempt replaces the earlier row's path."""
    row = session.execute(
        select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step)
    ).scalar_one_or_none()
    if row is None:
        row = Checkpoint(id=new_id("ftckpt"), job_id=job_id, tenant_id=tenant_id, step=step)
        session.add(row)
    row.path, row.train_loss, row.valid_loss = path, train_loss, valid_loss
    session.flush()
    return row


def prune_checkpoints(session: Session, job_id: str, keep: int) -> list[str]:
    """Drop all but the newest ``keep`` checkpoints' rows; returns the dropped ones' paths,
    for the caller to delete once this commits (a row never names a missing folder)."""
    stale = checkpoints(session, job_id)[:-keep]
    for row in stale:
        session.delete(row)
    return [row.path for row in stale]


def latest_checkpoint(session: Session, job_id: str) -> Checkpoint | None:
    stmt = select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc())
    return session.execute(stmt.limit(1)).scalar_one_or_none()


def resume_from(session: Session, job_id: str) -> Checkpoint | None:
    """The checkpoint a training attempt starts from (None: from the base weights); the
    steps after it that an earlier attempt recorded are dropped, to be redone."""
    checkpoint = latest_checkpoint(session, job_id)
    done = checkpoint.step if checkpoint is not None else 0
    session.execute(
        delete(TrainingStep).where(TrainingStep.job_id == job_id, TrainingStep.step > done)
    )
    return checkpoint


def training_steps(session: Session, job_id: str) -> list[TrainingStep]:
    stmt = select(TrainingStep).where(TrainingStep.job_id == job_id).order_by(TrainingStep.step)
    return list(session.execute(stmt).scalars())


def checkpoints(session: Session, job_id: str) -> list[Checkpoint]:
    stmt = select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)
    return list(session.execute(stmt).scalars())


def set_paused(session: Session, tenant_id: str, job_id: str, paused: bool) -> Job:
    """Pause or resume a job that has not ended; the training loop reads ``paused_at``."""
    found = session.get(Job, job_id)
    if found is None or found.tenant_id != tenant_id:
        raise NotFound("job", job_id)
    job = lock(session, Job, job_id)
    if job.state.is_terminal:
        verb = "paused" if paused else "resumed"
        raise Conflict(f"job {job_id} already {job.state}; it cannot be {verb}", "job_ended")
    if paused and job.paused_at is None:
        job.paused_at = utcnow()
    elif not paused:
        job.paused_at = None
    return job


def is_paused(session: Session, job_id: str) -> bool:
    return session.execute(select(Job.paused_at).where(Job.id == job_id)).scalar() is not None
