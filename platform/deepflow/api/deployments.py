"""Serving deployments: create, list, read, scale, move to a new model version, delete. Every
change is carried out by a ``serve`` job (``deepflow.replicas.converge``), so it shows up as a
job with its DAG. A move to new weights is a rolling update: replicas of the new version start,
and the old ones are drained only once those are healthy."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from deepflow import store
from deepflow.api.deps import DB, CurrentTenant
from deepflow.api.errors import APIError
from deepflow.api.schemas import NO_NUL
from deepflow.dag.spec import ResourceClass
from deepflow.replicas.converge import converge
from deepflow.store import Deployment, DeploymentState, Instance, ModelVersionState

router = APIRouter(prefix="/v1/deployments", tags=["deployments"])

Policy = Literal["round_robin", "least_outstanding_tokens", "prefix_cache_aware"]


class EngineArgs(BaseModel):
    """The `deepflow serve` options a deployment may set for its daemons."""

    model_config = ConfigDict(extra="forbid")

    max_num_seqs: int | None = Field(default=None, ge=1, le=4096)
    max_waiting: int | None = Field(default=None, ge=1, le=100_000)
    num_kv_blocks: int | None = Field(default=None, ge=1)
    max_model_len: int | None = Field(default=None, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None


class DeploymentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=200), NO_NUL]
    """A model registered for this tenant; its newest ready version is served."""
    replicas: int = Field(default=1, ge=1, le=64)
    resource_class: ResourceClass = ResourceClass.CPU
    policy: Policy = "prefix_cache_aware"
    engine_args: EngineArgs = Field(default_factory=EngineArgs)


class DeploymentUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: int | None = Field(default=None, ge=0, le=64)
    """0 keeps the deployment with nothing running."""
    model_version: int | Literal["latest"] | None = None
    """Serve this ready version of the deployment's model (``latest``: its newest ready one)."""


class InstanceResponse(BaseModel):
    id: str
    object: Literal["instance"] = "instance"
    address: str | None
    role: str
    device: str
    state: str
    start_path: str | None
    host: str | None
    pid: int | None
    running: int
    waiting: int
    kv_cache_usage: float
    heartbeat_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, i: Instance) -> InstanceResponse:
        return cls(
            id=i.id,
            address=i.address,
            role=i.role,
            device=i.device,
            state=str(i.state),
            start_path=i.start_path,
            host=i.host,
            pid=i.pid,
            running=i.running,
            waiting=i.waiting,
            kv_cache_usage=i.kv_cache_usage,
            heartbeat_at=i.heartbeat_at,
            created_at=i.created_at,
        )


class DeploymentResponse(BaseModel):
    id: str
    object: Literal["deployment"] = "deployment"
    model: str
    replicas: int
    resource_class: ResourceClass
    policy: str
    engine_args: dict[str, Any]
    state: DeploymentState
    job_id: str | None
    created_at: datetime
    instances: list[InstanceResponse]

    @classmethod
    def of(cls, d: Deployment, instances: list[Instance]) -> DeploymentResponse:
        return cls(
            id=d.id,
            model=d.name,
            replicas=d.replicas,
            resource_class=d.resource_class,
            policy=d.policy,
            engine_args=d.engine_args,
            state=d.state,
            job_id=d.job_id,
            created_at=d.created_at,
            instances=[InstanceResponse.of(i) for i in instances],
        )


class DeploymentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeploymentResponse]


def _read(db: Any, tenant_id: str, deployment_id: str) -> DeploymentResponse:
    with db.transaction() as session:
        d = store.read_deployment(session, tenant_id, deployment_id)
        return DeploymentResponse.of(d, store.deployment_instances(session, d.id))


def _model_path(session: Any, tenant_id: str, name: str) -> str:
    version = store.newest_ready_version(session, tenant_id, name)
    if version is None:
        raise APIError(
            400,
            f"model {name!r} has no ready version to serve",
            param="model",
            code="model_not_ready",
        )
    return version.uri


@router.post("", status_code=201, response_model=DeploymentResponse)
def create_deployment(
    body: DeploymentCreate, request: Request, tenant: CurrentTenant, db: DB
) -> DeploymentResponse:
    """Deploy a registered model; a deploy job launches its replicas."""
    with db.transaction() as session:
        deployment = store.create_deployment(
            session,
            tenant.id,
            name=body.model,
            model_path=_model_path(session, tenant.id, body.model),
            replicas=body.replicas,
            resource_class=body.resource_class,
            policy=body.policy,
            engine_args=body.engine_args.model_dump(exclude_none=True),
        )
        deployment_id = deployment.id
        request.app.state.quotas.check_instances(session, tenant)
    converge(db, request.app.state.dispatcher, deployment_id, "created")
    return _read(db, tenant.id, deployment_id)


@router.get("", response_model=DeploymentList)
def list_deployments(tenant: CurrentTenant, db: DB) -> DeploymentList:
    with db.transaction() as session:
        return DeploymentList(
            data=[
                DeploymentResponse.of(d, store.deployment_instances(session, d.id))
                for d in store.list_deployments(session, tenant.id)
            ]
        )


@router.get("/{deployment_id}", response_model=DeploymentResponse)
def read_deployment(deployment_id: str, tenant: CurrentTenant, db: DB) -> DeploymentResponse:
    return _read(db, tenant.id, deployment_id)


@router.patch("/{deployment_id}", response_model=DeploymentResponse)
def update_deployment(
    deployment_id: str, body: DeploymentUpdate, request: Request, tenant: CurrentTenant, db: DB
) -> DeploymentResponse:
    """Set the replica count and/or the model version served (a rolling update)."""
    changes = []
    with db.transaction() as session:
        d = store.read_deployment(session, tenant.id, deployment_id)
        if d.state in (DeploymentState.DELETING, DeploymentState.DELETED):
            raise APIError(409, f"deployment {d.id} is {d.state}", code="deployment_deleted")
        if body.model_version is not None:
            d.model_path = _version_path(session, tenant.id, d.name, body.model_version)
            changes.append(f"moved to version {body.model_version}")
        if body.replicas is not None:
            more = body.replicas > d.replicas  # scaling in is never refused
            d.replicas = body.replicas
            if more:
                request.app.state.quotas.check_instances(session, tenant)
            changes.append(f"scaled to {body.replicas}")
    if changes:
        converge(db, request.app.state.dispatcher, deployment_id, ", ".join(changes))
    return _read(db, tenant.id, deployment_id)


def _version_path(session: Any, tenant_id: str, name: str, version: int | str) -> str:
    if version == "latest":
        return _model_path(session, tenant_id, name)
    ready = {
        v.version: v.uri
        for v in store.read_model(session, tenant_id, name).versions
        if v.state is ModelVersionState.READY
    }
    if version not in ready:
        raise APIError(
            400,
            f"model {name!r} has no ready version {version}",
            param="model_version",
            code="model_not_ready",
        )
    return ready[version]  # type: ignore[index]


@router.delete("/{deployment_id}", response_model=DeploymentResponse)
def delete_deployment(
    deployment_id: str, request: Request, tenant: CurrentTenant, db: DB
) -> DeploymentResponse:
    """Stop every instance (a deploy job drains them), then the deployment is ``deleted``."""
    with db.transaction() as session:
        d = store.read_deployment(session, tenant.id, deployment_id)
        if d.state not in (DeploymentState.DELETING, DeploymentState.DELETED):
            store.set_deployment_state(session, d, DeploymentState.DELETING, reason="deleted")
    converge(db, request.app.state.dispatcher, deployment_id, "deleted")
    return _read(db, tenant.id, deployment_id)
