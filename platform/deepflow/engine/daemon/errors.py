"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the
status the official client maps to its own exception classes (400 BadRequestError, 404
NotFoundError, 429 RateLimitError, 5xx InternalServerError).

The shape itself is ``deepflow.openai_errors`` (Starlette only), shared with the platform's
API; here are the daemon's exception and its validation messages.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepflow.openai_errors import OpenAIError, error_body, error_response, format_loc

log = logging.getLogger(__name__)

__all__ = [
    "OpenAIError",
    "bad_request",
    "error_body",
    "error_response",
    "install_error_handlers",
    "validation_error",
]


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def _is_union_member(part: int | str) -> bool:
    """pydantic names the union member that failed: ``prompt.str``, ``prompt.list[int]``."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_NAMES)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "literal"}


def validation_error(exc: RequestValidationError | ValidationError) -> OpenAIError:
    """A body that does not parse, as the 400 naming its first bad field (batches map their
    lines' bodies with it too)."""
    errors = [(e, [p for p in e.get("loc", ()) if p != "body"]) for e in exc.errors()]
    err, loc = errors[0]
    if err.get("type") == "json_invalid":
        return bad_request(
            f"the request body is not valid JSON: {err.get('msg')}", None, "invalid_json"
        )
    if not loc:
        return bad_request(
            "the request body must be a JSON object (Content-Type: application/json)",
            None,
            "invalid_json",
        )
    member = next((i for i, part in enumerate(loc) if _is_union_member(part)), None)
    if member is not None:  # no member of a union matched: name them all
        prefix = loc[:member]
        tried = [at[member] for _, at in errors if len(at) > member and at[:member] == prefix]
        param = format_loc(prefix)
        return bad_request(
            f"{param}: expected {' or '.join(map(str, dict.fromkeys(tried)))}", param
        )
    param = format_loc(loc)
    if err.get("type") == "missing":
        return bad_request(f"{param}: required field is missing", param, "missing_field")
    return bad_request(f"{param}: {err.get('msg')}", param)


def _openai_paths(app: FastAPI) -> list[str]:
    """The app's /v1 paths as clients write them, read from its OpenAPI schema (FastAPI builds
    it once; included routers are not plain routes in ``app.routes``)."""
    return [path for path in app.openapi()["paths"] if path.startswith("/v1/")]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(exc)
        return error_response(error.status, error.message, error.param, error.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":  # no route took the path
            message = (
                f"{request.method} {request.url.path} is not served here; "
                f"this server serves {', '.join(_openai_paths(app))}"
            )
        return error_response(exc.status_code, message, None, code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "the server hit an internal error", None, "internal_error")
