"""The Batch API (``/v1/batches``: create, list, read, cancel) in OpenAI's shape.

Create refuses, before anything is stored, what the batch could not run: an endpoint other
than chat completions or completions, a window other than 24h, an input file whose purpose
is not ``batch`` or whose lines do not all call the endpoint (a 400 naming the line), and a
model (the first line's) with no ready version. Then the batch's job and its row are stored
in one transaction and the job's flow run is started (``jobs.submit_job``). Its results come
back through the Files API: the output and error files' ids on the batch.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.orm import Session

from deepflow import dag, files, store
from deepflow.api.deps import DB, CurrentTenant
from deepflow.api.jobs import submit_job
from deepflow.api.schemas import NO_NUL
from deepflow.batches import InputSummary, InvalidBatch, Status, batch_status, check_input
from deepflow.batches.constants import (
    COMPLETION_WINDOWS,
    ENDPOINTS,
    METADATA_KEY_CHARS,
    METADATA_KEYS,
    METADATA_VALUE_CHARS,
    shard_count,
)
from deepflow.dag.spec import ResourceClass
from deepflow.openai_errors import OpenAIError
from deepflow.store import Batch, BatchView, Database, ModelVersion, Tenant
from deepflow.store import files as file_rows
from deepflow.store.types import new_id

router = APIRouter(prefix="/v1/batches", tags=["batches"])


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: Annotated[str, Field(min_length=1, max_length=40), NO_NUL]
    endpoint: str
    """``/v1/chat/completions`` or ``/v1/completions``; every line's ``url`` must be it."""
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = None
    """Accepted for the client's sake; output files are kept until deleted."""
    resource_class: ResourceClass = ResourceClass.CPU
    """Ours: the workers whose offline engines run the shards."""

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > METADATA_KEYS:
            raise ValueError(f"at most {METADATA_KEYS} keys")
        for key, item in value.items():
            if len(key) > METADATA_KEY_CHARS or len(item) > METADATA_VALUE_CHARS:
                raise ValueError(
                    f"keys take at most {METADATA_KEY_CHARS} characters, values "
                    f"{METADATA_VALUE_CHARS}"
                )
            if "\x00" in key or "\x00" in item:
                raise ValueError("must not contain NUL")
        return value


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchError(BaseModel):
    code: str | None
    message: str | None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class BatchObject(BaseModel):
    """OpenAI's Batch: times in Unix seconds, each phase's time once it was entered."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: Status
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    usage: BatchUsage
    metadata: dict[str, str] | None

    @classmethod
    def of(cls, view: BatchView) -> BatchObject:
        b, counts, status = view.batch, view.counts, batch_status(view)
        ended = _unix(view.job_finished_at)
        errors = None
        if status == "failed":
            error = BatchError(code="batch_failed", message=view.job_error)
            errors = BatchErrors(data=[error])
        return cls(
            id=b.id,
            endpoint=b.endpoint,
            model=b.model,
            errors=errors,
            input_file_id=b.input_file_id,
            completion_window=b.completion_window,
            status=status,
            output_file_id=b.output_file_id,
            error_file_id=b.error_file_id,
            created_at=int(b.created_at.timestamp()),
            in_progress_at=_unix(b.in_progress_at),
            expires_at=int(b.expires_at.timestamp()),
            finalizing_at=_unix(b.finalizing_at),
            completed_at=ended if status == "completed" else None,
            failed_at=ended if status == "failed" else None,
            expired_at=_unix(b.expired_at),
            cancelling_at=_unix(b.cancelling_at),
            cancelled_at=ended if status == "cancelled" else None,
            request_counts=RequestCounts(
                total=b.total, completed=counts.completed, failed=counts.failed
            ),
            usage=BatchUsage(
                input_tokens=counts.prompt_tokens,
                input_tokens_details={"cached_tokens": 0},
                output_tokens=counts.completion_tokens,
                output_tokens_details={"reasoning_tokens": 0},
                total_tokens=counts.prompt_tokens + counts.completion_tokens,
            ),
            metadata=b.meta,
        )


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


def _unix(t: datetime | None) -> int | None:
    return None if t is None else int(t.timestamp())


def _refuse(message: str, param: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


@router.post("", response_model=BatchObject)
def create_batch(body: BatchCreate, request: Request, tenant: CurrentTenant, db: DB) -> BatchObject:
    """Check the batch whole, then store and start it; a 400 naming what is wrong (the line,
    for the file) leaves nothing behind."""
    if body.endpoint not in ENDPOINTS:
        served = ", ".join(ENDPOINTS)
        raise _refuse(f"endpoint {body.endpoint!r} is not one of {served}", "endpoint")
    window_s = COMPLETION_WINDOWS.get(body.completion_window)
    if window_s is None:
        windows = ", ".join(COMPLETION_WINDOWS)
        raise _refuse(f"completion_window must be {windows}", "completion_window")
    summary = _check_file(request, tenant, db, body)
    with db.transaction() as session:
        version = _ready_version(session, tenant, summary)
        model_uri = version.uri
    num_shards = shard_count(summary.records)
    spec = {
        "model": summary.model,
        "input_file": body.input_file_id,
        "num_shards": num_shards,
        "resource_class": body.resource_class,
    }
    batch = Batch(
        id=new_id("batch"),
        tenant_id=tenant.id,
        input_file_id=body.input_file_id,
        endpoint=body.endpoint,
        completion_window=body.completion_window,
        model=summary.model,
        model_uri=model_uri,
        meta=body.metadata,
        total=summary.records,
    )

    def add_batch(session: Session, job_id: str) -> None:
        batch.job_id = job_id
        store.create_batch(session, batch, num_shards, window_s)

    submit_job(request, tenant, dag.plan("batch", spec), "batch", None, with_job=add_batch)
    with db.transaction() as session:
        return BatchObject.of(store.read_batch(session, tenant.id, batch.id))


def _check_file(request: Request, tenant: Tenant, db: Database, body: BatchCreate) -> InputSummary:
    with db.transaction() as session:
        row = file_rows.read_file(session, tenant.id, body.input_file_id)
        purpose, name = row.purpose, row.filename
    if purpose != "batch":
        raise _refuse(
            f"file {body.input_file_id} has purpose {purpose!r}; a batch's input file must have "
            "purpose 'batch'",
            "input_file_id",
            "invalid_file_purpose",
        )
    data = files.path(request.app.state.settings.home, tenant.id, body.input_file_id).read_bytes()
    try:
        return check_input(data, body.endpoint)
    except InvalidBatch as exc:
        raise _refuse(f"{name}: {exc}", "input_file_id", "invalid_file") from None


def _ready_version(session: Session, tenant: Tenant, summary: InputSummary) -> ModelVersion:
    where = f"line {summary.model_line}: the model {summary.model!r}"
    try:
        version = store.newest_ready_version(session, tenant.id, summary.model)
    except store.NotFound:
        raise _refuse(f"{where} does not exist", "input_file_id", "model_not_found") from None
    if version is None:
        raise _refuse(f"{where} has no ready version", "input_file_id", "model_not_ready")
    return version


@router.get("", response_model=BatchList)
def list_batches(
    tenant: CurrentTenant,
    db: DB,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> BatchList:
    """A tenant's batches, newest first; page with ``after`` = the last id seen."""
    with db.transaction() as session:
        page = store.list_batches(session, tenant.id, limit=limit, after=after)
        data = [BatchObject.of(view) for view in page.batches]
    return BatchList(
        data=data,
        has_more=page.has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/{batch_id}", response_model=BatchObject)
def read_batch(batch_id: str, tenant: CurrentTenant, db: DB) -> BatchObject:
    with db.transaction() as session:
        return BatchObject.of(store.read_batch(session, tenant.id, batch_id))


@router.post("/{batch_id}/cancel", response_model=BatchObject)
def cancel_batch(batch_id: str, tenant: CurrentTenant, db: DB) -> BatchObject:
    """Stop the batch: its job is cancelled and every shard attempt stopped (``cancelling``
    until they have, then ``cancelled``). A batch that has ended is a 409."""
    with db.transaction() as session:
        return BatchObject.of(store.cancel_batch(session, tenant.id, batch_id))
