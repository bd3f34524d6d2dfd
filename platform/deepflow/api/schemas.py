"""Request and response bodies of the jobs API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from deepflow.dag import JobState, ResourceClass, TaskState, TriggerRule
from deepflow.store import Event, Job, Task

MAX_SQL_INT = 2**63 - 1
"""The upper bound of an integer query value that reaches SQL (an offset, an id to page
after): SQLite and PostgreSQL integers are 64-bit, and a larger one fails its query (a 500)."""

NUL_MESSAGE = "must not contain NUL (\\u0000)"


def _without_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError(NUL_MESSAGE)
    return value


NO_NUL = AfterValidator(_without_nul)
"""For a string the API stores or looks up, after its length: PostgreSQL's text cannot hold
NUL, so a query binding one fails (a 500) where SQLite finds nothing; it is a 400 on both.
Path and query values get the same check from ``deps.no_nul_parameters``."""


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(
        min_length=1,
        max_length=40,
        description="dag (deploy jobs come from POST /v1/deployments; finetune and batch are "
        "not available yet)",
    )
    spec: dict[str, Any] = Field(description="The kind's spec; for dag: {'tasks': [...]}")
    idempotency_key: Annotated[str, Field(min_length=1, max_length=255), NO_NUL] | None = Field(
        default=None, description="The same key from the same tenant returns the first job."
    )


class TaskResponse(BaseModel):
    id: str
    object: Literal["job.task"] = "job.task"
    name: str
    operator: str
    args: dict[str, Any]
    depends_on: list[str]
    state: TaskState
    trigger_rule: TriggerRule
    attempt: int
    max_attempts: int
    priority: int
    resource_class: ResourceClass
    timeout_s: float
    output: Any | None
    error: str | None
    lease_owner: str | None
    next_attempt_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, task: Task, depends_on: list[str]) -> TaskResponse:
        return cls(
            id=task.id,
            name=task.name,
            operator=task.operator,
            args=task.args,
            depends_on=depends_on,
            state=task.state,
            trigger_rule=task.trigger_rule,
            attempt=task.attempt,
            max_attempts=task.retries + 1,
            priority=task.priority,
            resource_class=task.resource_class,
            timeout_s=task.timeout_s,
            output=task.output,
            error=task.error,
            lease_owner=task.lease_owner,
            next_attempt_at=task.next_attempt_at,
            started_at=task.started_at,
            finished_at=task.finished_at,
        )


class EdgeResponse(BaseModel):
    upstream: str
    downstream: str


class JobSummary(BaseModel):
    """A job in a list: its state and outcome, without its spec, tasks and edges (a dense
    DAG's spec alone is hundreds of KB, and clients poll lists)."""

    id: str
    object: Literal["job"] = "job"
    kind: str
    state: JobState
    result: dict[str, Any] | None
    error: str | None
    flow_run_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: Job) -> JobSummary:
        return cls(
            id=job.id,
            kind=job.kind,
            state=job.state,
            result=job.result,
            error=job.error,
            flow_run_id=job.flow_run_id,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class JobResponse(JobSummary):
    spec: dict[str, Any]
    tasks: list[TaskResponse]
    edges: list[EdgeResponse]

    @classmethod
    def of(cls, job: Job, edges_by_id: list[tuple[str, str]]) -> JobResponse:
        """``job`` with its tasks, and its edges as ``store.job_edges`` gives them."""
        names = {t.id: t.name for t in job.tasks}
        edges = [
            EdgeResponse(upstream=names[up], downstream=names[down]) for up, down in edges_by_id
        ]
        upstream: dict[str, list[str]] = {t.name: [] for t in job.tasks}
        for edge in edges:
            upstream[edge.downstream].append(edge.upstream)
        return cls(
            **JobSummary.of(job).model_dump(),
            spec=job.spec,
            tasks=[TaskResponse.of(t, upstream[t.name]) for t in job.tasks],
            edges=edges,
        )


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobSummary]
    has_more: bool
    first_id: str | None
    last_id: str | None


class EventResponse(BaseModel):
    id: int
    object: Literal["job.event"] = "job.event"
    entity_type: str
    entity_id: str
    from_state: str | None
    to_state: str
    rule: str
    reason: str | None
    data: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, event: Event) -> EventResponse:
        return cls(
            id=event.id,
            entity_type=event.entity_type,
            entity_id=event.entity_id,
            from_state=event.from_state,
            to_state=event.to_state,
            rule=event.rule,
            reason=event.reason,
            data=event.data,
            created_at=event.created_at,
        )


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventResponse]
    has_more: bool
