"""Request dependencies: the database, the caller's tenant (from its Bearer key, admitted by
``deepflow.quotas``: its scope and request rate), and the check of every route's path and
query values."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from deepflow.api.errors import APIError
from deepflow.api.schemas import NUL_MESSAGE
from deepflow.store import Database, Tenant, authenticate


def no_nul_parameters(request: Request) -> None:
    """A 400 for a path or query value with a NUL, as ``schemas.NO_NUL`` gives for a body
    field (PostgreSQL's text cannot hold one)."""
    for name, value in [*request.path_params.items(), *request.query_params.multi_items()]:
        if "\x00" in str(value):
            raise APIError(400, f"{name}: {NUL_MESSAGE}", param=name, code="invalid_value")


def database(request: Request) -> Database:
    return request.app.state.db  # type: ignore[no-any-return]


def current_tenant(request: Request, db: Annotated[Database, Depends(database)]) -> Tenant:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if not header:
        raise APIError(
            401,
            "You didn't provide an API key: send it as 'Authorization: Bearer <key>'. "
            "'deepflow keys create --tenant NAME' makes one.",
            code="missing_api_key",
        )
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(
            401, "The Authorization header must be 'Bearer <key>'.", code="invalid_api_key"
        )
    with db.transaction() as session:
        grant = authenticate(session, key.strip())
    if grant is None:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return request.app.state.quotas.admit(grant, request.method)  # type: ignore[no-any-return]


DB = Annotated[Database, Depends(database)]
CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
