"""Who drives a job. A job's driver is the flow run running ``flows.driver.JobDriver`` for
it; a driver can die with its process (a killed Prefect worker, a killed ``deepflow up``)
and nothing else would move the job on. So each driver, on starting, takes the job by
number (``claim_driver``) and marks each pass (``hold_driver``); the reconciler finds jobs
whose driver stopped passing (``orphaned_jobs``), or whose flow run never started driving
(``undriven_jobs``, for it to ask Prefect whether the run ended), and hands them to a new
flow run (``hand_over``). A driver that was only slow finds a newer number on its next pass and
stops: two drivers never advance one job past each other, and attempts they both send are
fenced by attempt number anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from deepflow.dag import JobState
from deepflow.store.orm import Job
from deepflow.store.transitions import lock
from deepflow.store.types import utcnow

BEAT_S = 1.0
"""A driver's passes write ``driver_seen_at`` at most this often."""


class DriverSuperseded(Exception):
    """A newer flow run drives the job now; this driver must stop."""


def claim_driver(session: Session, job_id: str) -> int:
    """Take the job for a starting driver; returns the driver's number."""
    job = lock(session, Job, job_id)
    job.driver += 1
    job.driver_seen_at = utcnow()
    return job.driver


def hold_driver(job: Job, driver: int, now: datetime) -> None:
    """A driver's pass, under the job's lock: DriverSuperseded if a newer one holds it."""
    if job.driver != driver:
        raise DriverSuperseded(f"job {job.id} is driven by flow run {job.flow_run_id} now")
    if job.driver_seen_at is None or now - job.driver_seen_at > timedelta(seconds=BEAT_S):
        job.driver_seen_at = now


@dataclass(frozen=True, slots=True)
class Orphan:
    job_id: str
    kind: str
    flow_run_id: str | None
    driver: int


def orphaned_jobs(session: Session, stale_before: datetime, limit: int = 100) -> list[Orphan]:
    """Jobs still to finish whose driver last passed before ``stale_before``. A job whose
    flow run has not started yet (no driver seen) is not one: Prefect still holds its run."""
    rows = session.execute(
        select(Job.id, Job.kind, Job.flow_run_id, Job.driver)
        .where(
            Job.state.in_((JobState.QUEUED, JobState.RUNNING)),
            Job.driver_seen_at < stale_before,
        )
        .limit(limit)
    ).all()
    return [Orphan(*row) for row in rows]


def undriven_jobs(session: Session, created_before: datetime, limit: int = 100) -> list[Orphan]:
    """Jobs with a flow run that has never started driving them, created before
    ``created_before``: their run may still be waiting for a worker, or Prefect may have
    ended it without starting it (a worker that failed to submit it); the caller asks."""
    rows = session.execute(
        select(Job.id, Job.kind, Job.flow_run_id, Job.driver)
        .where(
            Job.state == JobState.QUEUED,
            Job.flow_run_id.is_not(None),
            Job.driver_seen_at.is_(None),
            Job.created_at < created_before,
        )
        .limit(limit)
    ).all()
    return [Orphan(*row) for row in rows]


def hand_over(session: Session, orphan: Orphan, flow_run_id: str, stale_before: datetime) -> bool:
    """Record ``flow_run_id`` as the job's next driver if it is still the orphan found (same
    driver, still silent, not finished). Its silence restarts now, so the job is not handed
    over again before the new flow run could start (a repeat would find the same run:
    its creation is keyed by the silent run it replaces)."""
    job = lock(session, Job, orphan.job_id)
    silent = job.driver_seen_at is None or job.driver_seen_at < stale_before
    if job.state.is_terminal or job.driver != orphan.driver or not silent:
        return False
    job.flow_run_id = flow_run_id
    job.driver_seen_at = utcnow()
    return True
