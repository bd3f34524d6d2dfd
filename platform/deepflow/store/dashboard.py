"""Reads for the dashboard: a searchable page of jobs with counts, each task's attempts
(rebuilt from the audit trail), the instances the metrics sampler scrapes, and a
deployment's scaling history.

Nothing here writes; every read that takes a tenant filters by it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from deepflow.dag import JobState, TaskState
from deepflow.store.deployments import deployment_instances, read_deployment
from deepflow.store.errors import NotFound
from deepflow.store.orm import Event, Instance, InstanceState, Job, Task


@dataclass(slots=True)
class JobSearch:
    jobs: list[Job]
    total: int
    """Jobs matching every filter (the page is a slice of them)."""
    states: dict[str, int]
    """Jobs per state matching the other filters (for the state chips)."""
    kinds: list[str]
    """Every kind the tenant has jobs of."""
    task_states: dict[str, dict[str, int]]
    """Job id -> its tasks per state, for the jobs on the page."""


def search_jobs(
    session: Session,
    tenant_id: str,
    *,
    state: JobState | None = None,
    kind: str | None = None,
    q: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> JobSearch:
    """Newest first; ``q`` matches part of a job's id, kind or error."""
    base = select(Job).where(Job.tenant_id == tenant_id)
    if kind:
        base = base.where(Job.kind == kind)
    if q:
        base = base.where(
            or_(
                Job.id.contains(q, autoescape=True),
                Job.kind.contains(q, autoescape=True),
                Job.error.contains(q, autoescape=True),
            )
        )
    counts = base.with_only_columns(Job.state, func.count()).group_by(Job.state)
    states = {str(s): n for s, n in session.execute(counts)}
    if state is not None:
        base = base.where(Job.state == state)
    total = states.get(str(state), 0) if state is not None else sum(states.values())
    page = base.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit).offset(offset)
    jobs = list(session.execute(page).scalars())
    kinds = session.execute(
        select(Job.kind).where(Job.tenant_id == tenant_id).distinct().order_by(Job.kind)
    ).scalars()
    task_states: dict[str, dict[str, int]] = defaultdict(dict)
    if jobs:
        rows = session.execute(
            select(Task.job_id, Task.state, func.count())
            .where(Task.job_id.in_([j.id for j in jobs]))
            .group_by(Task.job_id, Task.state)
        )
        for job_id, task_state, n in rows:
            task_states[job_id][str(task_state)] = n
    return JobSearch(jobs, total, states, list(kinds), dict(task_states))


@dataclass(slots=True)
class Attempt:
    """One run of a task, from its claim (running) to what ended it."""

    attempt: int
    state: str
    """running, or the state the attempt ended in (succeeded, up_for_retry, failed, ...)."""
    worker: str | None
    started_at: datetime
    finished_at: datetime | None
    error: str | None


def task_attempts(session: Session, tenant_id: str, job_id: str) -> dict[str, list[Attempt]]:
    """Task id -> its attempts in order, for every task of the job that ever ran."""
    if session.execute(select(Job.id).where(Job.id == job_id, Job.tenant_id == tenant_id)).first():
        events = session.execute(
            select(Event)
            .where(
                Event.job_id == job_id,
                Event.tenant_id == tenant_id,
                Event.entity_type == "task",
                or_(Event.to_state == TaskState.RUNNING, Event.from_state == TaskState.RUNNING),
            )
            .order_by(Event.id)
        ).scalars()
    else:
        raise NotFound("job", job_id)
    attempts: dict[str, list[Attempt]] = defaultdict(list)
    for event in events:
        runs = attempts[event.entity_id]
        if event.to_state == TaskState.RUNNING:
            runs.append(
                Attempt(
                    attempt=int(event.data.get("attempt", len(runs) + 1)),
                    state=TaskState.RUNNING,
                    worker=event.data.get("worker"),
                    started_at=event.created_at,
                    finished_at=None,
                    error=None,
                )
            )
        elif runs and runs[-1].finished_at is None:
            runs[-1].state = event.to_state
            runs[-1].finished_at = event.created_at
            runs[-1].error = event.reason if event.to_state != TaskState.SUCCEEDED else None
    return dict(attempts)


def scrape_targets(session: Session) -> list[Instance]:
    """Every ready instance of a deployment with an address, of every tenant (the metrics
    sampler's targets)."""
    stmt = select(Instance).where(
        Instance.state == InstanceState.READY,
        Instance.address.is_not(None),
        Instance.deployment_id.is_not(None),
    )
    return list(session.execute(stmt).scalars())


def deployment_events(
    session: Session, tenant_id: str, deployment_id: str, limit: int = 200
) -> list[Event]:
    """A deployment's scaling history, oldest first: its own events, its instances' (created,
    ready, draining, stopped, failed) and those of the deploy jobs that launched them or
    change it now. Raises NotFound for another tenant's deployment."""
    deployment = read_deployment(session, tenant_id, deployment_id)
    instances = deployment_instances(session, deployment_id)
    job_ids = {i.job_id for i in instances if i.job_id} | (
        {deployment.job_id} if deployment.job_id else set()
    )
    stmt = (
        select(Event)
        .where(
            Event.tenant_id == tenant_id,
            or_(
                and_(Event.entity_type == "deployment", Event.entity_id == deployment_id),
                and_(
                    Event.entity_type == "instance", Event.entity_id.in_([i.id for i in instances])
                ),
                and_(Event.entity_type == "job", Event.entity_id.in_(job_ids)),
            ),
        )
        .order_by(Event.id.desc())
        .limit(limit)
    )
    return list(reversed(session.execute(stmt).scalars().all()))
