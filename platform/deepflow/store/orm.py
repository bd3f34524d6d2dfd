"""SQLAlchemy models of the request-job-task model (see ARCHITECTURE.md).

Every row that a user can see carries ``tenant_id``; the store's read functions always filter
by it. States are stored as short strings; the transitions between them live in
``policy.py`` and are written only through ``transitions.set_*_state``, creation included:
``state`` has no default here, so a row that did not get its first state from the writer
fails its insert.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from deepflow.dag.spec import ResourceClass
from deepflow.dag.states import JobState, TaskState
from deepflow.dag.trigger_rules import TriggerRule
from deepflow.store.types import UTCDateTime, utcnow

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class InstanceState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class DeploymentState(StrEnum):
    CREATING = "creating"
    READY = "ready"
    DEGRADED = "degraded"
    FAILED = "failed"
    DELETING = "deleting"
    DELETED = "deleted"


class ModelVersionState(StrEnum):
    REGISTERING = "registering"
    READY = "ready"
    FAILED = "failed"
    ARCHIVED = "archived"


def _enum(cls: type[StrEnum], name: str) -> Enum:
    return Enum(
        cls,
        name=name,
        native_enum=False,
        length=40,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class Tenant(Base):
    """A customer: owns keys, jobs, models and deployments. Each limit, when set, overrides
    the platform's default for this tenant (``deepflow.quotas``; 0: no limit)."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    requests_per_minute: Mapped[int | None]
    tokens_per_minute: Mapped[int | None]
    max_active_jobs: Mapped[int | None]
    max_instances: Mapped[int | None]


class ApiKey(Base):
    """A tenant's key, stored as its SHA-256 (the key itself is shown once, at creation)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(16), default="all", server_default="all")
    """``all``, or ``read``: GET requests only (``store.tenants.KeyScope``)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Request(Base):
    """One persisted user ask, as received (after validation)."""

    __tablename__ = "requests"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    kind: Mapped[str] = mapped_column(String(40))
    body: Mapped[dict[str, Any]]
    body_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        Index("ix_jobs_tenant_state", "tenant_id", "state"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"), unique=True)
    kind: Mapped[str] = mapped_column(String(40))
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"))
    spec: Mapped[dict[str, Any]] = mapped_column(deferred=True)
    """Loaded on access: a large DAG's spec is big, and workers and drivers never need it."""
    result: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    driver: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """How many flow runs have started driving the job: the newest (this number) holds it,
    and an older one that wakes up stops (``store.drivers``)."""
    driver_seen_at: Mapped[datetime | None]
    """The holding driver's last pass: a job whose driver stopped passing is driven again."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    paused_at: Mapped[datetime | None]
    """Set while its user has paused it (fine-tuning: training stops at a checkpoint)."""

    tasks: Mapped[list[Task]] = relationship(
        back_populates="job", order_by="Task.position", cascade="all, delete-orphan"
    )
    edges: Mapped[list[TaskEdge]] = relationship(cascade="all, delete-orphan")


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("job_id", "name"),
        Index("ix_tasks_state_lease", "state", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    position: Mapped[int] = mapped_column(Integer)
    """Declaration order within the job."""
    name: Mapped[str] = mapped_column(String(100))
    operator: Mapped[str] = mapped_column(String(100))
    args: Mapped[dict[str, Any]]
    trigger_rule: Mapped[TriggerRule] = mapped_column(_enum(TriggerRule, "trigger_rule"))
    retries: Mapped[int] = mapped_column(Integer)
    retry_delay_s: Mapped[float] = mapped_column(Float)
    retry_backoff: Mapped[float] = mapped_column(Float)
    max_retry_delay_s: Mapped[float] = mapped_column(Float)
    timeout_s: Mapped[float] = mapped_column(Float)
    priority: Mapped[int] = mapped_column(Integer)
    resource_class: Mapped[ResourceClass] = mapped_column(_enum(ResourceClass, "resource_class"))
    state: Mapped[TaskState] = mapped_column(_enum(TaskState, "task_state"))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    """The current (or last) attempt, 1-based; a worker's claim must name it (fencing)."""
    next_attempt_at: Mapped[datetime | None]
    """When an up_for_retry task may be queued again."""
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    deadline_at: Mapped[datetime | None]
    """Start of the running attempt plus timeout_s."""
    output: Mapped[Any | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    job: Mapped[Job] = relationship(back_populates="tasks")


class TaskEdge(Base):
    """``downstream`` depends on ``upstream`` (both tasks of ``job_id``)."""

    __tablename__ = "task_edges"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    upstream_id: Mapped[str] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    )
    downstream_id: Mapped[str] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    )


class Model(Base):
    """A registered model name; its weights live in versions."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model", order_by="ModelVersion.version"
    )


class ModelVersion(Base):
    """One set of weights of a model, by URI (a folder or object-store prefix)."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    version: Mapped[int] = mapped_column(Integer)
    uri: Mapped[str] = mapped_column(Text)
    state: Mapped[ModelVersionState] = mapped_column(
        _enum(ModelVersionState, "model_version_state")
    )
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    model: Mapped[Model] = relationship(back_populates="versions")


class File(Base):
    """An uploaded file (``/v1/files``): its content lives in the files directory under its
    id (``deepflow.files``); the row is written only once the content is complete."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    lines: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TrainingStep(Base):
    """One optimizer step of a fine-tuning job: the loss curve. A step redone after a killed
    worker replaces the row of the attempt that died (``store.fine_tuning``)."""

    __tablename__ = "training_steps"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    epoch: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float] = mapped_column(Float)
    tokens: Mapped[int] = mapped_column(Integer)
    """Tokens the loss was taken over (assistant tokens) in this step."""
    learning_rate: Mapped[float] = mapped_column(Float)
    valid_loss: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Checkpoint(Base):
    """Trainable weights and optimizer state saved at a step, complete on disk before the row
    is written: what a resumed training attempt starts from."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    train_loss: Mapped[float] = mapped_column(Float)
    valid_loss: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Deployment(Base):
    """A served model: what users asked for (replicas, routing policy). Its instances are
    launched, replaced and stopped by ``serve`` jobs that converge them on ``replicas``."""

    __tablename__ = "deployments"
    __table_args__ = (Index("ix_deployments_tenant_name", "tenant_id", "name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(200))
    """The model name clients send (OpenAI's ``model``)."""
    model_path: Mapped[str] = mapped_column(String(1000))
    """The weights: a Hugging Face folder the workers can read."""
    replicas: Mapped[int] = mapped_column(Integer)
    """Desired instances."""
    resource_class: Mapped[ResourceClass] = mapped_column(_enum(ResourceClass, "resource_class"))
    policy: Mapped[str] = mapped_column(String(40))
    """Gateway routing: round_robin | least_outstanding_tokens | prefix_cache_aware."""
    engine_args: Mapped[dict[str, Any]]
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    """The deploy job converging its instances now (or last)."""
    state: Mapped[DeploymentState] = mapped_column(_enum(DeploymentState, "deployment_state"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Instance(Base):
    """A running engine daemon."""

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    deployment_id: Mapped[str | None] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE"), index=True
    )
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    model_version_id: Mapped[str | None] = mapped_column(ForeignKey("model_versions.id"))
    model_name: Mapped[str] = mapped_column(String(200))
    address: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str] = mapped_column(String(40))
    role: Mapped[str] = mapped_column(String(20), default="both")
    """prefill | decode | both."""
    state: Mapped[InstanceState] = mapped_column(_enum(InstanceState, "instance_state"))
    running: Mapped[int] = mapped_column(Integer, default=0)
    waiting: Mapped[int] = mapped_column(Integer, default=0)
    kv_cache_usage: Mapped[float] = mapped_column(Float, default=0.0)
    pid: Mapped[int | None] = mapped_column(Integer)
    host: Mapped[str | None] = mapped_column(String(200))
    """Where the daemon runs (the launching worker's host), with ``pid``."""
    start_path: Mapped[str | None] = mapped_column(String(40))
    """How it started: ``cold`` (weights read from the model folder)."""
    model_path: Mapped[str | None] = mapped_column(String(1000))
    """The weights it serves: its deployment's ``model_path`` when it was launched. One that
    differs from the deployment's now is outdated and is replaced (``replicas.converge``)."""
    heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Event(Base):
    """An append-only audit row, written in the same transaction as the change it records."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_job", "job_id", "id"),
        Index("ix_events_entity", "entity_type", "entity_id"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    entity_type: Mapped[str] = mapped_column(String(20))
    entity_id: Mapped[str] = mapped_column(String(40))
    job_id: Mapped[str | None] = mapped_column(String(40))
    from_state: Mapped[str | None] = mapped_column(String(20))
    to_state: Mapped[str] = mapped_column(String(20))
    rule: Mapped[str] = mapped_column(String(60))
    """The policy rule that allowed the change (a creation rule for the entity's first event)."""
    reason: Mapped[str | None] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


@event.listens_for(Event, "before_update")
@event.listens_for(Event, "before_delete")
def _events_are_append_only(mapper: Any, connection: Any, target: Event) -> None:
    raise RuntimeError("events are append-only")


class TaskLog(Base):
    """What one attempt wrote: its operator's log records and stdout/stderr, and the
    traceback when it failed. The worker bounds the text (``workers.attempt_log``); one row
    per attempt, written when the attempt ends, so the dashboard can show why it failed."""

    __tablename__ = "task_logs"
    __table_args__ = (UniqueConstraint("task_id", "attempt"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    attempt: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(20))
    """succeeded | failed | timed_out | stopped (lease lost or cancelled)."""
    text: Mapped[str] = mapped_column(Text)
    dropped_chars: Mapped[int] = mapped_column(Integer, default=0)
    """How much of the middle of a long log was left out."""
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Batch(Base):
    """A batch of OpenAI requests (``/v1/batches``), run by its ``batch`` job. What OpenAI's
    Batch object shows and the job does not hold: the input and result files, the model
    version it pinned at creation, and the moments it entered each phase. Its request
    counts are its shards' (``BatchShard``)."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    input_file_id: Mapped[str] = mapped_column(String(40))
    endpoint: Mapped[str] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(8))
    model: Mapped[str] = mapped_column(String(200))
    model_uri: Mapped[str] = mapped_column(Text)
    """The weights of the model's newest ready version when the batch was created."""
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    """OpenAI's ``metadata`` (the attribute name ``metadata`` is SQLAlchemy's)."""
    total: Mapped[int] = mapped_column(Integer)
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    in_progress_at: Mapped[datetime | None]
    finalizing_at: Mapped[datetime | None]
    cancelling_at: Mapped[datetime | None]
    expired_at: Mapped[datetime | None]


class BatchShard(Base):
    """One shard's progress, written by its running attempt as requests finish. Counts are
    absolute (a retried attempt resumes from the shard's results and rewrites them), so
    summing the shards gives the batch's ``request_counts`` without double counting."""

    __tablename__ = "batch_shards"

    batch_id: Mapped[str] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
