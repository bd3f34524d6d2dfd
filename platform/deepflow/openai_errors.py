"""OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, for every HTTP
server of ours: the platform API and gateway, and the FlowServe daemon. It imports nothing of
ours (pydantic, for the shape's OpenAPI schema, and Starlette only when it builds a response),
so the DAG layer, the store-free daemon and the API can all use it.

``type`` follows the status the way OpenAI's client maps statuses to exception classes (400
BadRequestError, 401 AuthenticationError, 404 NotFoundError, 429 RateLimitError, 5xx
InternalServerError); ``param`` names the offending field as OpenAI does (``messages[0].role``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from starlette.responses import JSONResponse

TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error body, as ``error_body`` builds it."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "The request was refused (OpenAI's shape)"},
    "5XX": {"model": ErrorResponse, "description": "The server failed (OpenAI's shape)"},
}
"""An app's ``responses=``: the schema documents the statuses and body clients get instead of
FastAPI's default 422, which no route of ours returns (a validation error is a 400)."""


class OpenAIError(Exception):
    """Raised anywhere below a route; rendered as the error body with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s
        """Sent as ``Retry-After`` (a 429, a 503): when trying again may succeed."""


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    retry_after_s: int | None = None,
) -> JSONResponse:
    from starlette.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s)
    return JSONResponse(error_body(status, message, param, code), status, headers=headers)


def format_loc(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """A validation location as a parameter path: ``("spec", "tasks", 0, "name")`` ->
    ``spec.tasks[0].name``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
