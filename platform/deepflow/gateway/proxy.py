"""Forward one OpenAI request to an instance and its answer back, streaming without buffering.

A request is tried on another instance when its first one refused the connection, was
draining (503) or over capacity (429), or broke before a single byte reached the client. Once
bytes have been streamed, a broken upstream ends the stream with an OpenAI error event
(the official client raises it) instead of a silent truncation.

Only a refused (or timed-out) connection takes an instance out of rotation for ``DOWN_FOR_S``:
a connection that breaks later may be a pooled one the instance closed as idle, which says
nothing about the instance. And when every instance of a route is out of rotation, they are
tried anyway: a stale mark must not turn a working instance into a 503.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import Response

from deepflow.gateway.policies import Endpoint
from deepflow.gateway.table import Route
from deepflow.openai_errors import OpenAIError, error_body
from deepflow.streaming import ClosingStreamingResponse

ATTEMPTS = 3
DOWN_FOR_S = 5.0
RETRY_STATUS = {429, 503}
TIMEOUT = httpx.Timeout(connect=2.0, read=600.0, write=30.0, pool=30.0)
KEEPALIVE_S = 20.0
"""How long an idle pooled connection is reused: well below the engine daemon's keep-alive
(``engine/daemon/main.py: KEEP_ALIVE_S``), so the gateway drops a connection before the daemon
closes it under a request that is being sent."""
KEEPALIVE_CONNECTIONS = 16
"""Idle connections to instances kept for reuse. httpcore's pool scans its idle connections
against all of them each time a request starts or a response closes (quadratic): with 512
allowed, 200 streams' worth of idle connections held the gateway's event loop for up to 2.7 s
under tests/replicas/test_load.py's burst (py-spy: the pool's scan was most of its time), and a
client's hang-up reached its instance ~1,100-1,400 tokens late; with 16, ~570."""
LIMITS = httpx.Limits(
    max_connections=4096,
    max_keepalive_connections=KEEPALIVE_CONNECTIONS,
    keepalive_expiry=KEEPALIVE_S,
)


class Proxy:
    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:  # made in the server's event loop, on first use
            self._client = httpx.AsyncClient(timeout=TIMEOUT, limits=LIMITS)
        return self._client

    async def forward(
        self,
        route: Route,
        path: str,
        body: bytes,
        hashes: list[bytes],
        cost: int,
        stream: bool,
    ) -> Response:
        tried: set[str] = set()
        last: Response | None = None
        for _ in range(ATTEMPTS):
            untried = [e for e in route.endpoints if e.instance_id not in tried]
            live = [e for e in route.live(time.monotonic()) if e.instance_id not in tried]
            candidates = live or untried
            if not candidates:
                break
            endpoint = route.policy.choose(candidates, hashes, cost)
            tried.add(endpoint.instance_id)
            endpoint.outstanding_tokens += cost
            endpoint.outstanding_requests += 1
            handed_over = False
            try:
                request = self.client.build_request(
                    "POST",
                    f"{endpoint.address}{path}",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                try:
                    upstream = await self.client.send(request, stream=True)
                except (httpx.ConnectError, httpx.ConnectTimeout):
                    endpoint.down_until = time.monotonic() + DOWN_FOR_S
                    continue
                except httpx.TransportError:  # broke before answering: nothing sent yet
                    continue
                if upstream.status_code in RETRY_STATUS:
                    last = await _buffered(upstream)
                    continue
                if not stream or upstream.status_code >= 400:
                    try:
                        response = await _buffered(upstream)
                    except httpx.TransportError:  # broke before answering: nothing sent yet
                        continue
                    endpoint.remember(hashes)
                    return response
                chunks = upstream.aiter_raw()
                try:
                    first = await anext(chunks)
                except (httpx.TransportError, StopAsyncIteration):
                    await upstream.aclose()
                    continue
                endpoint.remember(hashes)
                handed_over = True

                async def close(
                    upstream: httpx.Response = upstream, e: Endpoint = endpoint
                ) -> None:
                    await upstream.aclose()  # the instance sees its client go and aborts
                    _release(e, cost)

                return ClosingStreamingResponse(
                    _relay(first, chunks),
                    close,
                    status_code=upstream.status_code,
                    media_type=upstream.headers.get("content-type", "text/event-stream"),
                )
            finally:
                if not handed_over:
                    _release(endpoint, cost)
        if last is not None:
            return last
        raise OpenAIError(
            503,
            "no instance of this model could take the request; try again shortly",
            code="no_ready_instance",
        )


async def _buffered(upstream: httpx.Response) -> Response:
    try:
        content = await upstream.aread()
    finally:
        await upstream.aclose()
    return Response(
        content,
        status_code=upstream.status_code,
        media_type=upstream.headers.get("content-type", "application/json"),
    )


def _release(endpoint: Endpoint, cost: int) -> None:
    endpoint.outstanding_tokens -= cost
    endpoint.outstanding_requests -= 1


async def _relay(first: bytes, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Pass chunks through as they arrive (the response closes upstream when it ends)."""
    yield first
    try:
        async for chunk in chunks:
            yield chunk
    except httpx.TransportError as exc:
        yield _error_event(f"the model instance stopped mid-stream: {type(exc).__name__}")


def _error_event(message: str) -> bytes:
    body = error_body(502, message, None, "instance_failed")
    return f"data: {json.dumps(body)}\n\n".encode()


def request_cost(payload: dict[str, Any], prompt_text: str) -> int:
    """Tokens the request will occupy, estimated: ~4 characters a prompt token, plus the
    output it may produce for each of its ``n`` samples."""
    max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens") or 256
    n = payload.get("n") or 1
    try:
        return len(prompt_text) // 4 + int(max_tokens) * int(n)
    except (TypeError, ValueError):
        return len(prompt_text) // 4
