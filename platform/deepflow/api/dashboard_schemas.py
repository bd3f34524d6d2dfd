"""Response bodies of the dashboard's routes (``api/dashboard.py``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from deepflow.api.schemas import TaskResponse
from deepflow.dag import JobState
from deepflow.store import Job, Task
from deepflow.store.dashboard import Attempt
from deepflow.store.orm import TaskLog


def seconds(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start and end else None


class TenantInfo(BaseModel):
    id: str
    name: str


class SessionInfo(BaseModel):
    """Who the key belongs to and what this platform offers the dashboard."""

    object: Literal["dashboard.session"] = "dashboard.session"
    tenant: TenantInfo
    version: str
    prefect_ui_url: str | None


class JobRow(BaseModel):
    id: str
    object: Literal["job"] = "job"
    kind: str
    state: JobState
    error: str | None
    flow_run_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    tasks: dict[str, int]
    """The job's tasks per state."""

    @classmethod
    def of(cls, job: Job, tasks: dict[str, int]) -> JobRow:
        return cls(
            id=job.id,
            kind=job.kind,
            state=job.state,
            error=job.error,
            flow_run_id=job.flow_run_id,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            duration_s=seconds(job.started_at, job.finished_at),
            tasks=tasks,
        )


class JobSearchResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobRow]
    total: int
    offset: int
    limit: int
    states: dict[str, int]
    kinds: list[str]
    tenant: str


class AttemptResponse(BaseModel):
    attempt: int
    state: str
    worker: str | None
    started_at: datetime
    finished_at: datetime | None
    duration_s: float | None
    error: str | None
    log_chars: int | None
    """Length of the attempt's stored log; None when it has none (its worker died)."""

    @classmethod
    def of(cls, run: Attempt, log_chars: int | None) -> AttemptResponse:
        return cls(
            attempt=run.attempt,
            state=run.state,
            worker=run.worker,
            started_at=run.started_at,
            finished_at=run.finished_at,
            duration_s=seconds(run.started_at, run.finished_at),
            error=run.error,
            log_chars=log_chars,
        )


class TaskDetail(TaskResponse):
    duration_s: float | None
    attempts: list[AttemptResponse]

    @classmethod
    def detail(
        cls, task: Task, depends_on: list[str], attempts: list[AttemptResponse]
    ) -> TaskDetail:
        base = TaskResponse.of(task, depends_on).model_dump()
        return cls(**base, duration_s=seconds(task.started_at, task.finished_at), attempts=attempts)


class TaskList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TaskDetail]


class JobPage(BaseModel):
    object: Literal["dashboard.job"] = "dashboard.job"
    job: JobRow
    tasks: list[TaskDetail]


class TaskLogResponse(BaseModel):
    object: Literal["job.task.log"] = "job.task.log"
    task: str
    attempt: int
    outcome: str
    text: str
    dropped_chars: int
    started_at: datetime
    finished_at: datetime

    @classmethod
    def of(cls, task_name: str, row: TaskLog) -> TaskLogResponse:
        return cls(
            task=task_name,
            attempt=row.attempt,
            outcome=row.outcome,
            text=row.text,
            dropped_chars=row.dropped_chars,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


class TaskLogList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TaskLogResponse]


class MetricsResponse(BaseModel):
    object: Literal["deployment.metrics"] = "deployment.metrics"
    deployment_id: str
    interval_s: float
    data: list[dict[str, Any]]
    """Points oldest first: t (unix s), instances, ttft_p50, ttft_mean, tpot_p50, tpot_mean,
    e2e_mean (s; null when no request finished), requests_per_s, output_tokens_per_s,
    prompt_tokens_per_s, running, waiting, kv_cache_usage."""
