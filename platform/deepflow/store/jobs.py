"""Jobs: creation from a validated plan (idempotent), reads, cancellation and progress."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from deepflow.dag import Dag, Decision, JobState, Node, Plan, TaskState, evaluate
from deepflow.store.drivers import hold_driver
from deepflow.store.errors import Conflict, NotFound
from deepflow.store.orm import Event, Job, Request, Task, TaskEdge
from deepflow.store.paging import page_after
from deepflow.store.tasks import queue_task
from deepflow.store.transitions import lock, set_job_state, set_task_states
from deepflow.store.types import new_id, utcnow


def _body_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _job_for_key(session: Session, tenant_id: str, key: str) -> tuple[Job, str] | None:
    stmt = (
        select(Job, Request.body_hash)
        .join(Request, Job.request_id == Request.id)
        .where(Request.tenant_id == tenant_id, Request.idempotency_key == key)
    )
    row = session.execute(stmt).first()
    return (row[0], row[1]) if row else None


def _replay(found: tuple[Job, str], body_hash: str, key: str) -> Job:
    job, first_hash = found
    if first_hash != body_hash:
        raise Conflict(
            f"idempotency key {key!r} was already used for a different request",
            "idempotency_key_reused",
        )
    return job


def create_job(
    session: Session, tenant_id: str, plan: Plan, kind: str, idempotency_key: str | None = None
) -> tuple[Job, bool]:
    """Persist the request, its job, tasks and edges, each job and task entering its first
    state through the writer (their creation events); returns (job, created).

    The same idempotency key from the same tenant returns the first job, also when two
    requests race: the loser's insert hits the unique constraint inside a savepoint, and it
    reads the winner's job instead.
    """
    body = {"kind": kind, "spec": plan.spec}
    body_hash = _body_hash(body)
    if idempotency_key is not None:
        found = _job_for_key(session, tenant_id, idempotency_key)
        if found:
            return _replay(found, body_hash, idempotency_key), False
    try:
        with session.begin_nested():
            job = _insert_job(session, tenant_id, plan, kind, body, body_hash, idempotency_key)
    except IntegrityError:
        if idempotency_key is None:
            raise
        found = _job_for_key(session, tenant_id, idempotency_key)
        if found is None:
            raise
        return _replay(found, body_hash, idempotency_key), False
    return job, True


def _insert_job(
    session: Session,
    tenant_id: str,
    plan: Plan,
    kind: str,
    body: dict[str, Any],
    body_hash: str,
    idempotency_key: str | None,
) -> Job:
    request = Request(
        id=new_id("req"),
        tenant_id=tenant_id,
        kind="jobs.create",
        body=body,
        body_hash=body_hash,
        idempotency_key=idempotency_key,
    )
    session.add(request)
    session.flush()  # the unique key is checked here, before the larger inserts
    job = Job(
        id=new_id("job"), tenant_id=tenant_id, request_id=request.id, kind=kind, spec=plan.spec
    )
    ids = {spec.name: new_id("task") for spec in plan.tasks}
    job.tasks = [
        Task(
            id=ids[spec.name],
            job_id=job.id,
            tenant_id=tenant_id,
            position=i,
            attempt=0,
            **spec.model_dump(exclude={"depends_on"}),
        )
        for i, spec in enumerate(plan.tasks)
    ]
    data = {"kind": kind, "tasks": len(plan.tasks), "request_id": request.id}
    set_job_state(session, job, JobState.PENDING, data=data)
    set_task_states(session, job.tasks, TaskState.PENDING)
    edges = [
        {"job_id": job.id, "upstream_id": ids[up], "downstream_id": ids[node.name]}
        for node in plan.dag.tasks.values()
        for up in node.upstream
    ]
    if edges:  # Core, not ORM: a dense DAG has thousands, and ORM bookkeeping was 20 us apiece
        session.execute(insert(cast(Table, TaskEdge.__table__)), edges)
    return job


def read_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """The job with its tasks (its edges: ``job_edges``)."""
    stmt = (
        select(Job)
        .where(Job.id == job_id, Job.tenant_id == tenant_id)
        .options(selectinload(Job.tasks))
    )
    job = session.execute(stmt).scalar_one_or_none()
    if job is None:
        raise NotFound("job", job_id)
    return job


def job_edges(session: Session, job_id: str) -> list[tuple[str, str]]:
    """The job's edges as (upstream task id, downstream task id), read as plain rows: a dense
    DAG has thousands, which as ORM objects took longer than the rest of the job."""
    stmt = select(TaskEdge.upstream_id, TaskEdge.downstream_id).where(TaskEdge.job_id == job_id)
    return [(up, down) for up, down in session.execute(stmt)]


@dataclass(slots=True)
class JobPage:
    jobs: list[Job]
    has_more: bool


def list_jobs(
    session: Session,
    tenant_id: str,
    *,
    state: JobState | None = None,
    kind: str | None = None,
    limit: int = 20,
    after: str | None = None,
) -> JobPage:
    """Newest first; ``after`` is the last id of the previous page (OpenAI's cursor)."""
    stmt = select(Job).where(Job.tenant_id == tenant_id)
    if state is not None:
        stmt = stmt.where(Job.state == state)
    if kind is not None:
        stmt = stmt.where(Job.kind == kind)
    jobs, has_more = page_after(session, stmt, Job, tenant_id, after, limit)
    return JobPage(jobs, has_more)


def read_job_events(
    session: Session, tenant_id: str, job_id: str, *, after: int | None = None, limit: int = 1000
) -> list[Event]:
    """A job's events in the order they happened (its own and its tasks')."""
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound("job", job_id)
    stmt = select(Event).where(Event.job_id == job_id, Event.tenant_id == tenant_id)
    if after is not None:
        stmt = stmt.where(Event.id > after)
    return list(session.execute(stmt.order_by(Event.id).limit(limit)).scalars())


def cancel_job(
    session: Session, tenant_id: str, job_id: str, reason: str = "cancelled by user"
) -> Job:
    """Cancel the job and every task not yet terminal. Finished jobs cannot be cancelled."""
    mine = select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)
    job = session.execute(mine.with_for_update(key_share=True)).scalar_one_or_none()
    if job is None:
        raise NotFound("job", job_id)
    if job.state.is_terminal:
        raise Conflict(
            f"job {job_id} already {job.state}; it cannot be cancelled", "job_not_cancellable"
        )
    tasks = session.execute(select(Task).where(Task.job_id == job_id)).scalars()
    open_tasks = [task for task in tasks if not task.state.is_terminal]
    set_task_states(session, open_tasks, TaskState.CANCELLED, reason=reason)
    return set_job_state(session, job, JobState.CANCELLED, reason=reason)


def attach_flow_run(session: Session, job_id: str, flow_run_id: str) -> Job:
    """Record the Prefect flow run that drives the job; a pending job becomes queued. Once a
    driver has started (``store.drivers``), another flow run is one the reconciler handed the
    job to: it takes over."""
    job = lock(session, Job, job_id)
    if job.flow_run_id not in (None, flow_run_id) and job.driver == 0:
        raise Conflict(
            f"job {job_id} is already driven by flow run {job.flow_run_id}", "job_has_flow_run"
        )
    job.flow_run_id = flow_run_id
    if job.state is JobState.PENDING:
        set_job_state(session, job_id, JobState.QUEUED, data={"flow_run_id": flow_run_id})
    return job


def job_dag(session: Session, job_id: str) -> tuple[Dag, list[Task]]:
    """The job's DAG as stored, with its tasks in declaration order."""
    tasks = list(
        session.execute(select(Task).where(Task.job_id == job_id).order_by(Task.position)).scalars()
    )
    names = {t.id: t.name for t in tasks}
    upstream: dict[str, list[str]] = {t.id: [] for t in tasks}
    for up, down in job_edges(session, job_id):
        upstream[down].append(names[up])
    nodes = [Node(t.name, tuple(upstream[t.id]), t.trigger_rule, t.priority) for t in tasks]
    return Dag.from_nodes(nodes), tasks


def advance_job(
    session: Session, job_id: str, now: datetime | None = None, dag: Dag | None = None
) -> Decision:
    """Apply the ready-set function to a job: write skips, upstream failures and the job's
    final state; return the decision (its ``ready`` tasks are for the orchestrator to queue).
    A caller that advances the same job often passes its ``dag`` (it never changes)."""
    job = lock(session, Job, job_id)
    if job.state.is_terminal:
        return Decision()
    if dag is None:
        dag, tasks = job_dag(session, job_id)
    else:
        tasks = _tasks(session, job_id)
    return _apply(session, job, dag, tasks, now or utcnow())


@dataclass(slots=True)
class Pass:
    """One pass of a job's driver: the job and its tasks after the pass, and the attempts it
    queued (each to be sent to its queue)."""

    job: Job
    tasks: list[Task]
    queued: list[Task]


ACTIVE = (TaskState.QUEUED, TaskState.RUNNING)


def drive_job(
    session: Session,
    job_id: str,
    dag: Dag,
    now: datetime | None = None,
    max_active: int | None = None,
    driver: int | None = None,
) -> Pass:
    """``advance_job`` and queue a new attempt of ready tasks, highest priority first, in one
    transaction that holds the job's lock (which guards all its tasks), reading each row once.

    ``max_active`` caps the job's tasks queued or running at once (Airflow's
    ``max_active_tasks``): the broker's queues then hold at most that many of one job, so a
    job of thousands of tasks does not stand in front of every job submitted after it. The
    ready tasks left over stay pending and are queued on later passes.

    ``driver``: the calling driver's number (``store.drivers``); DriverSuperseded if a newer
    driver holds the job, else the pass is marked as the driver's."""
    job = lock(session, Job, job_id)
    now = now or utcnow()
    if driver is not None:
        hold_driver(job, driver, now)
    tasks = _tasks(session, job_id)
    if job.state.is_terminal:
        return Pass(job, tasks, [])
    decision = _apply(session, job, dag, tasks, now)
    ready = decision.ready
    if max_active is not None:
        ready = ready[: max(max_active - sum(t.state in ACTIVE for t in tasks), 0)]
    by_name = {t.name: t for t in tasks}
    return Pass(job, tasks, [queue_task(session, by_name[name]) for name in ready])


def _tasks(session: Session, job_id: str) -> list[Task]:
    stmt = select(Task).where(Task.job_id == job_id).order_by(Task.position)
    return list(session.execute(stmt, execution_options={"populate_existing": True}).scalars())


def _apply(session: Session, job: Job, dag: Dag, tasks: list[Task], now: datetime) -> Decision:
    by_name = {t.name: t for t in tasks}
    decision = evaluate(
        dag,
        {t.name: t.state for t in tasks},
        now=now,
        retry_at={t.name: t.next_attempt_at for t in tasks},
    )
    skipped = [by_name[name] for name in decision.skipped]
    set_task_states(session, skipped, TaskState.SKIPPED, reason="trigger rule")
    doomed = [by_name[name] for name in decision.upstream_failed]
    set_task_states(session, doomed, TaskState.UPSTREAM_FAILED, reason="upstream failed")
    if decision.job_state is JobState.SUCCEEDED:
        job.result = {"outputs": {leaf: by_name[leaf].output for leaf in dag.leaves}}
        # From pending or queued when no task ever ran (SucceedJobWithoutRunning).
        set_job_state(session, job, JobState.SUCCEEDED)
    elif decision.job_state is JobState.FAILED:
        failed = [t.name for t in tasks if t.state is TaskState.FAILED]
        set_job_state(session, job, JobState.FAILED, reason=f"failed tasks: {', '.join(failed)}")
    return decision
