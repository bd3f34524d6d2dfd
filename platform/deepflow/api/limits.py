"""Size limits on what the API accepts: the request body, and a job's spec and task count.

A body over ``max_body_bytes`` is refused (413 in OpenAI's shape) before the route reads it:
by its Content-Length when it declares one, else (chunked) as soon as the bytes received pass
the limit, so an oversized upload is never held in memory whole, stored or echoed back.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepflow.config import Settings
from deepflow.dag import Plan
from deepflow.openai_errors import OpenAIError, error_response


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


class BodyLimit:
    """ASGI middleware: a 413 for a request body larger than ``limit`` bytes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _refusal(self) -> Any:
        return error_response(
            413,
            f"the request body is larger than this server takes ({_mib(self.limit)}; "
            "DEEPFLOW_MAX_BODY_BYTES sets it)",
            None,
            "request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:  # the server holds the client to it
            if declared.isdigit() and int(declared) > self.limit:
                await self._refusal()(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        # Chunked: read it here, up to the limit, then hand the route what was read.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refusal()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


def check_spec_size(settings: Settings, spec: Any) -> None:
    """Before planning: a spec over ``max_spec_bytes`` (as compact JSON) is a 413."""
    size = len(json.dumps(spec, separators=(",", ":")))
    if size > settings.max_spec_bytes:
        raise OpenAIError(
            413,
            f"the job spec is {_mib(size)} as JSON; this server takes at most "
            f"{_mib(settings.max_spec_bytes)} (DEEPFLOW_MAX_SPEC_BYTES sets it)",
            param="spec",
            code="spec_too_large",
        )


def check_task_count(settings: Settings, plan: Plan) -> None:
    """After planning: more tasks than ``max_job_tasks`` is a 400."""
    if len(plan.tasks) > settings.max_job_tasks:
        raise OpenAIError(
            400,
            f"the job has {len(plan.tasks)} tasks; this server takes at most "
            f"{settings.max_job_tasks} in one job (DEEPFLOW_MAX_JOB_TASKS sets it)",
            param="spec.tasks",
            code="too_many_tasks",
        )
