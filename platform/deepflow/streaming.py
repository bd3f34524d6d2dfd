"""A streaming response that notices a client going away, for our SSE streams (the FlowServe
daemon's and the gateway's relay of them), and how their routes' schema says they stream."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
"""One server-sent event: ``data`` is a JSON chunk, or ``[DONE]`` last."""

STREAMED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": 'The completion, or with "stream": true its chunks as server-sent events',
        "content": {"text/event-stream": {"itemSchema": SSE_EVENT}},
    }
}
"""A completion route's ``responses=``: its 200 is JSON, or an event stream when asked. Each
event is described by ``itemSchema``, OpenAPI 3.2's field for event streams (schemathesis
checks every event against it)."""


class ClosingStreamingResponse(StreamingResponse):
    """Streams until the body ends or the client disconnects, then awaits ``on_close``.

    It listens for the disconnect itself: Starlette stops doing so for ASGI servers of spec
    2.4 and later (uvicorn's), where a stream to a gone client would run to its end. The
    close is shielded, because a disconnect arrives as a cancellation and in a cancelled scope
    every await would be cancelled again at once."""

    def __init__(self, content: Any, on_close: Callable[[], Awaitable[None]], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.on_close()
