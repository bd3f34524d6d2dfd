"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the API returns goes through here, so clients (the official ``openai``
package included) see the shape and status they expect: 400 for a bad request, 401 for a
missing or wrong key, 404 for what does not exist (or belongs to another tenant), 409 for a
conflict with the current state, 503 (with Retry-After) while the database is unreachable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepflow.dag import DagError
from deepflow.openai_errors import OpenAIError as APIError
from deepflow.openai_errors import error_response, format_loc
from deepflow.store import Conflict, NotFound

log = logging.getLogger(__name__)

STORE_RETRY_AFTER_S = 1
"""Retry-After of a 503 answered while the database is unreachable (a restart)."""

__all__ = ["APIError", "error_response", "install"]


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    err = exc.errors()[0]
    loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
    if err.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {err.get('msg')}", None, "invalid_json"
    if not loc and err.get("loc", ())[:1] == ("body",):
        return (
            "the request body must be a JSON object (Content-Type: application/json)",
            None,
            ("invalid_json"),
        )
    param = format_loc(loc) if loc else None
    where = f"{param}: " if param else ""
    if err.get("type") == "extra_forbidden":
        return f"{where}unknown field", param, "unknown_field"
    if err.get("type") == "missing":
        return f"{where}required field is missing", param, "missing_field"
    return f"{where}{err.get('msg')}", param, "invalid_value"


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return error_response(400, message, param, code)

    @app.exception_handler(DagError)
    async def _dag(_: Request, exc: DagError) -> JSONResponse:
        return error_response(400, exc.message, exc.param, exc.code)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return error_response(404, str(exc), None, f"{exc.what}_not_found")

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, exc: Conflict) -> JSONResponse:
        return error_response(409, str(exc), None, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code == 404 and request.url.path.startswith("/v1/"):
            # A route we do not serve (an OpenAI client asking for /v1/embeddings, say): say
            # what is served instead of a bare "Not Found".
            served = ", ".join(served_prefixes(app.openapi()["paths"]))
            message = (
                f"{request.method} {request.url.path} is not served here; this API serves "
                f"{served} (see /docs)"
            )
        return error_response(exc.status_code, message, None, code)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _store_unreachable(_: Request, exc: Exception) -> JSONResponse:
        # A database restart or failover: nothing was done, and a retry will do it.
        log.warning("the database is unreachable: %s", str(exc).splitlines()[0])
        response = error_response(
            503, "the store is unavailable for a moment; retry", None, "store_unavailable"
        )
        response.headers["Retry-After"] = str(STORE_RETRY_AFTER_S)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "the server hit an internal error", None, "internal_error")


def served_prefixes(paths: Iterable[str]) -> list[str]:
    """The /v1 resources among OpenAPI ``paths``: each path up to its first parameter, with
    those under another left out (``/v1/jobs/{id}/tasks`` is under ``/v1/jobs``)."""
    cut = {p.split("/{", 1)[0] for p in paths if p.startswith("/v1/")}
    return sorted(p for p in cut if not any(p.startswith(f"{q}/") for q in cut))
