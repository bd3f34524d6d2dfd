"""Registered models and their versions (sets of weights by URI)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from deepflow.store.errors import NotFound
from deepflow.store.orm import Model, ModelVersion, ModelVersionState
from deepflow.store.transitions import set_model_version_state
from deepflow.store.types import new_id


def register_model_version(
    session: Session, tenant_id: str, name: str, uri: str, details: dict[str, Any] | None = None
) -> ModelVersion:
    """Add the next version of model ``name`` (created on first use), state registering."""
    named = select(Model).where(Model.tenant_id == tenant_id, Model.name == name)
    model = session.execute(named.with_for_update(key_share=True)).scalar_one_or_none()
    if model is None:
        model = Model(id=new_id("model"), tenant_id=tenant_id, name=name)
        session.add(model)
        session.flush()
    last = session.execute(
        select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model.id)
    ).scalar()
    version = ModelVersion(
        id=new_id("mv"),
        model_id=model.id,
        tenant_id=tenant_id,
        version=(last or 0) + 1,
        uri=uri,
        details=details or {},
    )
    data = {"model": name, "version": version.version, "uri": uri}
    set_model_version_state(session, version, ModelVersionState.REGISTERING, data=data)
    session.flush()
    return version


def read_model(session: Session, tenant_id: str, name: str) -> Model:
    model = session.execute(
        select(Model)
        .where(Model.tenant_id == tenant_id, Model.name == name)
        .options(selectinload(Model.versions))
    ).scalar_one_or_none()
    if model is None:
        raise NotFound("model", name)
    return model


def newest_ready_version(session: Session, tenant_id: str, name: str) -> ModelVersion | None:
    """The version of ``name`` that serving, batches and fine-tuning use: its newest ready one
    (None when it has none); NotFound when the tenant has no model of that name."""
    versions = read_model(session, tenant_id, name).versions
    ready = [v for v in versions if v.state is ModelVersionState.READY]
    return max(ready, key=lambda v: v.version) if ready else None


def list_models(session: Session, tenant_id: str) -> list[Model]:
    stmt = (
        select(Model)
        .where(Model.tenant_id == tenant_id)
        .options(selectinload(Model.versions))
        .order_by(Model.name)
    )
    return list(session.execute(stmt).scalars())
