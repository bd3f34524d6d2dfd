"""The fine-tuning API (``/v1/fine_tuning/jobs``), OpenAI's shape: create, list, read, cancel,
pause, resume, events and checkpoints.

A fine-tuning job is a ``finetune`` job of our store (same id): its DAG does the work
(``deepflow.finetune.operators``). Creation checks what would fail the job's first tasks,
before anything is stored: the base model is ready, the files are the tenant's and for
fine-tuning, and every example renders, tokenizes and fits the context (a refusal names the
line). LoRA is our extension of OpenAI's ``method``:
``{"type": "supervised", "supervised": {"hyperparameters": {...}, "lora": {"rank", "alpha"}}}``.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from deepflow import dag, files, store
from deepflow.api.deps import DB, CurrentTenant
from deepflow.api.jobs import submit_job
from deepflow.dag.kinds import FinetuneSpec, Hyperparameters
from deepflow.dag.spec import ResourceClass
from deepflow.finetune import data
from deepflow.finetune.operators import context_length, fine_tuned_name
from deepflow.openai_errors import OpenAIError
from deepflow.store import files as file_rows
from deepflow.store import fine_tuning as runs
from deepflow.store.orm import Job

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

Auto = Literal["auto"]


class HyperparametersIn(BaseModel):
    """OpenAI's, where each may be ``"auto"`` (our default)."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Auto | None = None
    batch_size: int | Auto | None = None
    learning_rate_multiplier: float | Auto | None = None

    def resolved(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v not in (None, "auto")}


class FineTuningJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    training_file: str = Field(min_length=1, max_length=40)
    validation_file: str | None = Field(default=None, max_length=40)
    hyperparameters: HyperparametersIn | None = None
    """Deprecated by OpenAI in favour of ``method``; taken when ``method`` gives none."""
    method: dict[str, Any] | None = None
    suffix: str | None = Field(default=None, max_length=64)
    seed: int | None = None
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = Field(default=None, max_length=0)
    """None offered (a non-empty list is refused)."""
    # Our extensions (the openai client sends them through ``extra_body``).
    checkpoint_every: int | None = None
    max_seq_len: int | None = None
    deploy: bool = False
    resource_class: ResourceClass = ResourceClass.CPU

    def spec(self) -> dict[str, Any]:
        method = dict(self.method or {"type": "supervised"})
        supervised = dict(method.get("supervised") or {})
        hyper = supervised.get("hyperparameters") or (
            self.hyperparameters.model_dump() if self.hyperparameters else {}
        )
        supervised["hyperparameters"] = HyperparametersIn.model_validate(hyper).resolved()
        method["supervised"] = supervised
        out = {
            "model": self.model,
            "training_file": self.training_file,
            "validation_file": self.validation_file,
            "method": method,
            "suffix": self.suffix,
            "deploy": self.deploy,
            "resource_class": self.resource_class,
        }
        extras = ("seed", "checkpoint_every", "max_seq_len")
        return out | {k: getattr(self, k) for k in extras if getattr(self, k) is not None}


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: str
    """validating_files, queued, running, paused, succeeded, failed or cancelled."""
    hyperparameters: Hyperparameters
    method: dict[str, Any]
    training_file: str
    validation_file: str | None
    result_files: list[str] = Field(default_factory=list)
    trained_tokens: int | None
    seed: int
    suffix: str | None
    error: JobError | None
    estimated_finish: int | None = None
    integrations: list[Any] = Field(default_factory=list)
    metadata: dict[str, str] | None = None
    # Ours: what the job produced beyond OpenAI's fields.
    model_version: int | None = None
    """The registered version of ``fine_tuned_model``."""
    metrics: dict[str, Any] | None = None
    """Held-out loss of the base and the trained model, sample answers (once evaluated)."""
    deployment_id: str | None = None


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningEvent]
    has_more: bool


class CheckpointMetrics(BaseModel):
    step: int
    train_loss: float
    valid_loss: float | None


class FineTuningCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningCheckpoint]
    has_more: bool
    first_id: str | None
    last_id: str | None


def _unix(t: datetime | None) -> int | None:
    return int(t.timestamp()) if t is not None else None


def _status(job: Job) -> str:
    if job.state.is_terminal:
        return str(job.state)
    if job.paused_at is not None:
        return "paused"
    states = {t.name: str(t.state) for t in job.tasks}
    if states.get("validate_data") != "succeeded" or states.get("tokenize") != "succeeded":
        return "validating_files"
    return "running" if states.get("train") != "queued" else "queued"


def _view(job: Job) -> FineTuningJob:
    spec = FinetuneSpec.model_validate(job.spec)
    outputs = {t.name: t.output for t in job.tasks if str(t.state) == "succeeded"}
    registered = outputs.get("register_model") or {}
    succeeded = str(job.state) == "succeeded"
    error = None
    if str(job.state) == "failed":
        error = JobError(code="job_failed", message=job.error or "the job failed")
    return FineTuningJob(
        id=job.id,
        created_at=_unix(job.created_at) or 0,
        finished_at=_unix(job.finished_at),
        model=spec.model,
        fine_tuned_model=registered.get("model"),
        organization_id=job.tenant_id,
        status=_status(job),
        hyperparameters=spec.method.supervised.hyperparameters,
        method=spec.method.model_dump(mode="json"),
        training_file=spec.training_file,
        validation_file=spec.validation_file,
        trained_tokens=(outputs.get("tokenize") or {}).get("trained_tokens") if succeeded else None,
        seed=spec.seed,
        suffix=spec.suffix,
        error=error,
        model_version=registered.get("version"),
        metrics=outputs.get("evaluate"),
        deployment_id=(outputs.get("deploy") or {}).get("deployment_id"),
    )


def _job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = store.read_job(session, tenant_id, job_id)
    if job.kind != "finetune":
        raise store.NotFound("fine-tuning job", job_id)
    return job


def _check_file(session: Session, tenant_id: str, file_id: str, param: str) -> None:
    try:
        row = file_rows.read_file(session, tenant_id, file_id)
    except store.NotFound:
        raise OpenAIError(
            400, f"{param}: no file with id {file_id!r}", param=param, code="file_not_found"
        ) from None
    if row.purpose != "fine-tune":
        raise OpenAIError(
            400,
            f"{param}: file {file_id} has purpose {row.purpose!r}; upload it with purpose "
            "fine-tune",
            param=param,
            code="invalid_file_purpose",
        )


def _admit(request: Request, tenant_id: str, spec: FinetuneSpec) -> None:
    """What the job's validate and tokenize tasks would refuse, refused now (400)."""
    home = request.app.state.settings.home
    with request.app.state.db.transaction() as session:
        try:
            version = store.newest_ready_version(session, tenant_id, spec.model)
        except store.NotFound:
            version = None
        if version is None:
            raise OpenAIError(
                400,
                f"model {spec.model!r} has no ready version to fine-tune",
                param="model",
                code="model_not_found",
            )
        base = version.uri
        checked = [("training_file", spec.training_file)]
        if spec.validation_file:
            checked.append(("validation_file", spec.validation_file))
        for param, file_id in checked:
            _check_file(session, tenant_id, file_id, param)
    from deepflow.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(base)
    limit = context_length(base, spec.max_seq_len)
    for param, file_id in checked:
        try:
            data.encode_file(tokenizer, files.path(home, tenant_id, file_id), limit)
        except files.InvalidFile as exc:
            raise OpenAIError(400, f"{param}: {exc}", param=param, code="invalid_file") from None


@router.post("", response_model=FineTuningJob)
async def create_fine_tuning_job(
    body: FineTuningJobCreate, request: Request, tenant: CurrentTenant
) -> FineTuningJob:
    """Check the files against the model, then start the job (its DAG)."""
    try:
        plan = dag.plan("finetune", body.spec())
    except dag.DagError as exc:
        param = (exc.param or "").removeprefix("spec.") or None
        message = exc.message.removeprefix("spec.")
        raise OpenAIError(400, message, param=param, code=exc.code) from None
    spec = FinetuneSpec.model_validate(plan.spec)
    # Tokenizing a file and the job's inserts block: off the loop the gateway shares.
    await asyncio.to_thread(_admit, request, tenant.id, spec)
    job_id, _ = await asyncio.to_thread(submit_job, request, tenant, plan, "finetune", None)
    return await asyncio.to_thread(_read, request.app.state.db, tenant.id, job_id)


def _read(db: Any, tenant_id: str, job_id: str) -> FineTuningJob:
    with db.transaction() as session:
        return _view(_job(session, tenant_id, job_id))


@router.get("", response_model=FineTuningJobList)
def list_fine_tuning_jobs(
    tenant: CurrentTenant,
    db: DB,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> FineTuningJobList:
    """Newest first; page with ``after`` = the last id."""
    with db.transaction() as session:
        page = store.list_jobs(session, tenant.id, kind="finetune", limit=limit, after=after)
        jobs = [_view(_job(session, tenant.id, j.id)) for j in page.jobs]
    return FineTuningJobList(data=jobs, has_more=page.has_more)


@router.get("/{fine_tuning_job_id}", response_model=FineTuningJob)
def read_fine_tuning_job(fine_tuning_job_id: str, tenant: CurrentTenant, db: DB) -> FineTuningJob:
    return _read(db, tenant.id, fine_tuning_job_id)


@router.post("/{fine_tuning_job_id}/cancel", response_model=FineTuningJob)
def cancel_fine_tuning_job(fine_tuning_job_id: str, tenant: CurrentTenant, db: DB) -> FineTuningJob:
    """Stop it: the running task's process is ended and the job is ``cancelled``."""
    with db.transaction() as session:
        _job(session, tenant.id, fine_tuning_job_id)
        store.cancel_job(session, tenant.id, fine_tuning_job_id, reason="cancelled by user")
    return _read(db, tenant.id, fine_tuning_job_id)


@router.post("/{fine_tuning_job_id}/pause", response_model=FineTuningJob)
def pause_fine_tuning_job(fine_tuning_job_id: str, tenant: CurrentTenant, db: DB) -> FineTuningJob:
    """Training stops after its current step, at a checkpoint, until resumed. The paused
    attempt keeps its worker (and the weights in memory), as a paused process would."""
    with db.transaction() as session:
        _job(session, tenant.id, fine_tuning_job_id)
        runs.set_paused(session, tenant.id, fine_tuning_job_id, True)
    return _read(db, tenant.id, fine_tuning_job_id)


@router.post("/{fine_tuning_job_id}/resume", response_model=FineTuningJob)
def resume_fine_tuning_job(fine_tuning_job_id: str, tenant: CurrentTenant, db: DB) -> FineTuningJob:
    with db.transaction() as session:
        _job(session, tenant.id, fine_tuning_job_id)
        runs.set_paused(session, tenant.id, fine_tuning_job_id, False)
    return _read(db, tenant.id, fine_tuning_job_id)


def _events(session: Session, job: Job) -> list[FineTuningEvent]:
    """Oldest first: the job's and its tasks' state changes, each step's loss, checkpoints."""
    out = []
    names = {t.id: f"task {t.name}" for t in job.tasks}
    for e in store.read_job_events(session, job.tenant_id, job.id, limit=100_000):
        what = "job" if e.entity_type == "job" else names.get(e.entity_id, e.entity_type)
        level: Literal["info", "warn", "error"] = "error" if e.to_state == "failed" else "info"
        message = f"{what} {e.to_state}" + (f": {e.reason}" if e.reason else "")
        out.append(
            (
                e.created_at,
                FineTuningEvent(
                    id=f"ftevent-{e.id}",
                    created_at=_unix(e.created_at) or 0,
                    level=level,
                    message=message,
                    type="message",
                ),
            )
        )
    for s in runs.training_steps(session, job.id):
        metrics = {
            "step": s.step,
            "epoch": s.epoch + 1,
            "train_loss": s.train_loss,
            "valid_loss": s.valid_loss,
            "learning_rate": s.learning_rate,
            "tokens": s.tokens,
        }
        out.append(
            (
                s.created_at,
                FineTuningEvent(
                    id=f"ftevent-step-{s.step}",
                    created_at=_unix(s.created_at) or 0,
                    level="info",
                    message=f"Step {s.step}: training loss={s.train_loss:.4f}",
                    type="metrics",
                    data=metrics,
                ),
            )
        )
    out.sort(key=lambda pair: pair[0])
    return [event for _, event in out]


@router.get("/{fine_tuning_job_id}/events", response_model=EventList)
def list_fine_tuning_events(
    fine_tuning_job_id: str,
    tenant: CurrentTenant,
    db: DB,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 20,
) -> EventList:
    """Newest first, as OpenAI's; page with ``after`` = the last event id seen."""
    with db.transaction() as session:
        job = _job(session, tenant.id, fine_tuning_job_id)
        events = list(reversed(_events(session, job)))
    if after is not None:
        ids = [e.id for e in events]
        events = events[ids.index(after) + 1 :] if after in ids else []
    return EventList(data=events[:limit], has_more=len(events) > limit)


@router.get("/{fine_tuning_job_id}/checkpoints", response_model=CheckpointList)
def list_fine_tuning_checkpoints(
    fine_tuning_job_id: str,
    tenant: CurrentTenant,
    db: DB,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> CheckpointList:
    """Newest first; each names the model its weights would register as, at that step."""
    with db.transaction() as session:
        job = _job(session, tenant.id, fine_tuning_job_id)
        name = fine_tuned_name(job.spec, job.id)
        rows = list(reversed(runs.checkpoints(session, job.id)))
    if after is not None:
        ids = [c.id for c in rows]
        rows = rows[ids.index(after) + 1 :] if after in ids else []
    data = [
        FineTuningCheckpoint(
            id=c.id,
            created_at=_unix(c.created_at) or 0,
            fine_tuned_model_checkpoint=f"{name}:ckpt-step-{c.step}",
            fine_tuning_job_id=job.id,
            metrics=CheckpointMetrics(
                step=c.step, train_loss=c.train_loss, valid_loss=c.valid_loss
            ),
            step_number=c.step,
        )
        for c in rows[:limit]
    ]
    return CheckpointList(
        data=data,
        has_more=len(rows) > limit,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )
