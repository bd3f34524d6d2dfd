"""The web dashboard: the data routes it needs beyond the jobs API, and the page itself.

Routes (all tenant-scoped by the Bearer key; another tenant's rows are 404):
``GET /ui/api/session`` (who the key is; the login check), ``GET /ui/api/jobs`` (a page of
jobs with search, counts per state and task progress), ``GET /ui/api/jobs/{id}`` (the job
page: the job and its tasks), ``GET /v1/jobs/{id}/tasks`` (tasks with their attempts rebuilt
from the audit trail), ``GET /v1/jobs/{id}/tasks/{name}/logs``,
``POST /v1/jobs/{id}/retry`` (a new job from the same kind and spec: a finished job's tasks
keep their history, and the new job gets a fresh DAG), ``GET /ui/api/deployments/{id}/events``
(a deployment's scaling history) and ``GET /v1/deployments/{id}/metrics`` (the sampler's
history, ``metrics_history``). Deployments themselves come from ``/v1/deployments``.

``install`` adds them, starts the metrics sampler with the app, and serves ``ui/`` at ``/``
behind every API route.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session
from starlette.routing import Match, Mount
from starlette.types import Scope

from deepflow import __version__, dag, store
from deepflow.api.dashboard_schemas import (
    AttemptResponse,
    JobPage,
    JobRow,
    JobSearchResponse,
    MetricsResponse,
    SessionInfo,
    TaskDetail,
    TaskList,
    TaskLogList,
    TaskLogResponse,
    TenantInfo,
)
from deepflow.api.deps import DB, CurrentTenant
from deepflow.api.errors import APIError
from deepflow.api.jobs import job_response
from deepflow.api.metrics_history import MetricsHistory, Target
from deepflow.api.schemas import MAX_SQL_INT, EventList, EventResponse, JobResponse
from deepflow.dag import JobState
from deepflow.store import Job
from deepflow.store import dashboard as views
from deepflow.store.logs import logged_attempts, read_task_logs

log = logging.getLogger(__name__)

UI_DIR = Path(__file__).resolve().parents[3] / "ui"
"""``ui/`` at the repository root: found from a source checkout and an editable install."""
API_PREFIXES = ("v1", "ui", "health", "openapi.json", "docs", "redoc")
METRICS_INTERVAL_S = 5.0

router = APIRouter(tags=["dashboard"])


@router.get("/ui/api/session", response_model=SessionInfo)
def read_session(request: Request, tenant: CurrentTenant) -> SessionInfo:
    """The login check: 200 with the key's tenant, 401 for a bad key."""
    prefect = request.app.state.settings.prefect_api_url
    return SessionInfo(
        tenant=TenantInfo(id=tenant.id, name=tenant.name),
        version=__version__,
        prefect_ui_url=prefect.removesuffix("/").removesuffix("/api") if prefect else None,
    )


@router.get("/ui/api/jobs", response_model=JobSearchResponse)
def search_jobs(
    tenant: CurrentTenant,
    db: DB,
    state: JobState | None = None,
    kind: Annotated[str | None, Query(max_length=40)] = None,
    q: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_SQL_INT)] = 0,
) -> JobSearchResponse:
    """A page of jobs, newest first, with the counts the list's filters show."""
    with db.transaction() as session:
        found = views.search_jobs(
            session, tenant.id, state=state, kind=kind, q=q, limit=limit, offset=offset
        )
        data = [JobRow.of(j, found.task_states.get(j.id, {})) for j in found.jobs]
    return JobSearchResponse(
        data=data,
        total=found.total,
        offset=offset,
        limit=limit,
        states=found.states,
        kinds=found.kinds,
        tenant=tenant.name,
    )


def _task_details(session: Session, tenant_id: str, job: Job) -> list[TaskDetail]:
    """The job's tasks with each attempt's worker, times, outcome and log size."""
    runs = views.task_attempts(session, tenant_id, job.id)
    logs = logged_attempts(session, job.id)
    names = {t.id: t.name for t in job.tasks}
    upstream: dict[str, list[str]] = {t.id: [] for t in job.tasks}
    for up, down in store.job_edges(session, job.id):
        upstream[down].append(names[up])
    return [
        TaskDetail.detail(
            task,
            upstream[task.id],
            [AttemptResponse.of(r, logs.get((task.id, r.attempt))) for r in runs.get(task.id, [])],
        )
        for task in job.tasks
    ]


@router.get("/v1/jobs/{job_id}/tasks", response_model=TaskList)
def list_tasks(job_id: str, tenant: CurrentTenant, db: DB) -> TaskList:
    """The job's tasks with each attempt's worker, times, outcome and log size."""
    with db.transaction() as session:
        job = store.read_job(session, tenant.id, job_id)
        return TaskList(data=_task_details(session, tenant.id, job))


@router.get("/ui/api/jobs/{job_id}", response_model=JobPage)
def read_job_page(job_id: str, tenant: CurrentTenant, db: DB) -> JobPage:
    """The job page's one read: the job without its spec and edges, and its tasks as
    ``/v1/jobs/{id}/tasks`` lists them (``GET /v1/jobs/{id}`` repeats every task in the spec
    and the edges: 3.5 MB for 5,000 tasks, and a second read of them all)."""
    with db.transaction() as session:
        job = store.read_job(session, tenant.id, job_id)
        row = JobRow.of(job, dict(Counter(str(t.state) for t in job.tasks)))
        return JobPage(job=row, tasks=_task_details(session, tenant.id, job))


@router.get("/v1/jobs/{job_id}/tasks/{task_name}/logs", response_model=TaskLogList)
def read_logs(
    job_id: str,
    task_name: str,
    tenant: CurrentTenant,
    db: DB,
    attempt: Annotated[int | None, Query(ge=1, le=MAX_SQL_INT)] = None,
) -> TaskLogList:
    """The task's stored attempt logs, oldest attempt first (or the one ``attempt``)."""
    with db.transaction() as session:
        rows = read_task_logs(session, tenant.id, job_id, task_name, attempt)
        return TaskLogList(data=[TaskLogResponse.of(task_name, r) for r in rows])


@router.post("/v1/jobs/{job_id}/retry", status_code=201, response_model=JobResponse)
def retry_job(job_id: str, request: Request, tenant: CurrentTenant, db: DB) -> JobResponse:
    """Run a finished job again: a new job with the same kind and spec (201)."""
    with db.transaction() as session:
        old = store.read_job(session, tenant.id, job_id)
        if not old.state.is_terminal:
            raise APIError(
                409,
                f"job {job_id} is {old.state}; only a finished job can be retried",
                code="job_not_finished",
            )
        kind, spec = old.kind, dict(old.spec)
    plan = dag.plan_user_job(kind, spec)  # a deploy job is retried by converging, not here
    with db.transaction() as session:
        job, _ = store.create_job(session, tenant.id, plan, kind)
        request.app.state.quotas.check_active_jobs(session, tenant)
    dispatcher = request.app.state.dispatcher
    if dispatcher is not None:
        dispatcher.try_dispatch(job.id, kind)
    with db.transaction() as session:
        return job_response(session, tenant.id, job.id)


@router.get("/ui/api/deployments/{deployment_id}/events", response_model=EventList)
def list_deployment_events(deployment_id: str, tenant: CurrentTenant, db: DB) -> EventList:
    """The deployment's scaling history (its, its instances' and its deploy jobs' events)."""
    with db.transaction() as session:
        events = views.deployment_events(session, tenant.id, deployment_id)
        return EventList(data=[EventResponse.of(e) for e in events], has_more=False)


@router.get("/v1/deployments/{deployment_id}/metrics", response_model=MetricsResponse)
def read_metrics(
    deployment_id: str,
    request: Request,
    tenant: CurrentTenant,
    db: DB,
    since: Annotated[float | None, Query(ge=0)] = None,
) -> MetricsResponse:
    """TTFT, TPOT, throughput and load over time (newer than unix time ``since``)."""
    history: MetricsHistory = request.app.state.metrics_history
    owner = history.tenant_of(deployment_id)
    if owner is None:  # no sample yet: a 404 only for what is not the tenant's deployment
        with db.transaction() as session:
            store.read_deployment(session, tenant.id, deployment_id)
    elif owner != tenant.id:
        raise store.NotFound("deployment", deployment_id)
    return MetricsResponse(
        deployment_id=deployment_id,
        interval_s=history.interval_s,
        data=history.read(deployment_id, since),
    )


def scrape_targets(db: store.Database) -> list[Target]:
    """Ready instances with an address, each under its deployment."""
    with db.transaction() as session:
        rows = views.scrape_targets(session)
        return [Target(r.id, r.deployment_id or "", r.tenant_id, r.address or "") for r in rows]


class _UiMount(Mount):
    """The dashboard's files at ``/``, matching no API path: an API path that no route takes
    stays the API's 404 (or 405 for a known path with another method)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if path.lstrip("/").split("/", 1)[0] in API_PREFIXES:
            return Match.NONE, {}
        return super().matches(scope)


def install(app: FastAPI, metrics_interval_s: float = METRICS_INTERVAL_S) -> None:
    """Add the dashboard's routes, its metrics sampler and (when ``ui/`` is there) its page."""
    app.include_router(router)
    db = app.state.db
    history = MetricsHistory(lambda: scrape_targets(db), interval_s=metrics_interval_s)
    app.state.metrics_history = history
    app.router.add_event_handler("startup", history.start)
    app.router.add_event_handler("shutdown", history.stop)
    if not (UI_DIR / "index.html").is_file():
        log.warning("no dashboard at %s: the API serves no page at /", UI_DIR)
        return
    mount = _UiMount("/", app=StaticFiles(directory=UI_DIR, html=True), name="ui")
    app.router.routes.append(mount)

    def keep_ui_last() -> None:
        """Routers included after ``install`` must not sit behind the catch-all mount."""
        app.router.routes.remove(mount)
        app.router.routes.append(mount)

    app.router.add_event_handler("startup", keep_ui_last)
