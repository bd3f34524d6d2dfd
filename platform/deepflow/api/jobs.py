"""The jobs API: create (idempotent), list, read, cancel, and a job's events."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session

from deepflow import dag, store
from deepflow.api import limits
from deepflow.api.deps import DB, CurrentTenant
from deepflow.api.schemas import (
    MAX_SQL_INT,
    EventList,
    EventResponse,
    JobCreate,
    JobList,
    JobResponse,
    JobSummary,
)
from deepflow.dag import JobState
from deepflow.store import Tenant

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


REPLAYED = {200: {"model": JobResponse, "description": "The job an idempotency key made before"}}


@router.post("", status_code=201, response_model=JobResponse, responses=REPLAYED)
def create_job(
    body: JobCreate, request: Request, response: Response, tenant: CurrentTenant, db: DB
) -> JobResponse:
    """Create a job and start its flow run; 201 with its tasks and edges, or 200 when an
    idempotency key replays an earlier request. A kind users may not submit is a 400 on
    ``kind`` (``use_deployments``, ``use_fine_tuning``, ``use_batches``)."""
    settings = request.app.state.settings
    limits.check_spec_size(settings, body.spec)
    plan = dag.plan_user_job(body.kind, body.spec)
    limits.check_task_count(settings, plan)
    job_id, created = submit_job(request, tenant, plan, body.kind, body.idempotency_key)
    with db.transaction() as session:
        out = job_response(session, tenant.id, job_id)
    if not created:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return out


@router.get("", response_model=JobList)
def list_jobs(
    tenant: CurrentTenant,
    db: DB,
    state: JobState | None = None,
    kind: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> JobList:
    """Jobs newest first, filtered by state and kind; page with ``after`` = the last id."""
    with db.transaction() as session:
        page = store.list_jobs(session, tenant.id, state=state, kind=kind, limit=limit, after=after)
        data = [JobSummary.of(j) for j in page.jobs]
    return JobList(
        data=data,
        has_more=page.has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/{job_id}", response_model=JobResponse)
def read_job(job_id: str, tenant: CurrentTenant, db: DB) -> JobResponse:
    with db.transaction() as session:
        return job_response(session, tenant.id, job_id)


@router.post("/{job_id}/cancel", response_model=JobResponse)
def cancel_job(job_id: str, tenant: CurrentTenant, db: DB) -> JobResponse:
    """Cancel a job that has not finished; every unfinished task ends ``cancelled``."""
    with db.transaction() as session:
        store.cancel_job(session, tenant.id, job_id)
        return job_response(session, tenant.id, job_id)


@router.get("/{job_id}/events", response_model=EventList)
def read_job_events(
    job_id: str,
    tenant: CurrentTenant,
    db: DB,
    after: Annotated[int | None, Query(ge=0, le=MAX_SQL_INT)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventList:
    """The job's audit trail in order; poll with ``after`` = the last event id seen."""
    with db.transaction() as session:
        events = store.read_job_events(session, tenant.id, job_id, after=after, limit=limit + 1)
        data = [EventResponse.of(e) for e in events[:limit]]
    return EventList(data=data, has_more=len(events) > limit)


def submit_job(
    request: Request,
    tenant: Tenant,
    plan: dag.Plan,
    kind: str,
    idempotency_key: str | None,
    with_job: Callable[[Session, str], object] | None = None,
) -> tuple[str, bool]:
    """Store a planned job (within the tenant's active-job quota) and start its flow run;
    (its id, whether it is new). The one way every API that makes a job makes it.
    ``with_job(session, job_id)`` adds what belongs to a new job (a batch's row) in the same
    transaction, so its flow run never starts without it."""
    with request.app.state.db.transaction() as session:
        job, created = store.create_job(session, tenant.id, plan, kind, idempotency_key)
        if created:
            request.app.state.quotas.check_active_jobs(session, tenant)
            if with_job is not None:
                with_job(session, job.id)
        job_id = job.id
    dispatcher = request.app.state.dispatcher
    if created and dispatcher is not None:
        dispatcher.try_dispatch(job_id, kind)
    return job_id, created


def job_response(session: Session, tenant_id: str, job_id: str) -> JobResponse:
    """What every job endpoint answers: the job, its tasks and its edges."""
    job = store.read_job(session, tenant_id, job_id)
    return JobResponse.of(job, store.job_edges(session, job_id))
