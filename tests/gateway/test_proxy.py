"""The proxy's retries and out-of-rotation marks, against real sockets: an instance that
breaks a connection, one that refuses it, one that answers."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import pytest

from deepflow.engine.daemon.main import KEEP_ALIVE_S
from deepflow.gateway.policies import Endpoint
from deepflow.gateway.proxy import KEEPALIVE_S, Proxy
from deepflow.gateway.table import Route
from deepflow.openai_errors import OpenAIError

BODY = json.dumps({"model": "m", "prompt": "hi"}).encode()


class InOrder:
    """Picks the first candidate, so a test decides which instance is tried first."""

    name = "in_order"

    def choose(self, candidates: Sequence[Endpoint], hashes: list[bytes], cost: int) -> Endpoint:
        return candidates[0]


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    await reader.readexactly(length)


async def _answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    body = b'{"ok": true}'
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    writer.close()


async def _breaks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads the request and hangs up without a byte, as a pooled connection that the
    instance closed as idle looks to the client."""
    await _read_request(reader)
    writer.close()


@asynccontextmanager
async def server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], object],
) -> AsyncIterator[str]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.close()
        await srv.wait_closed()


def refused_address() -> str:
    """An address nothing listens on (a port just freed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


async def forward(route: Route) -> int:
    proxy = Proxy()
    try:
        response = await proxy.forward(route, "/v1/completions", BODY, [], 10, stream=False)
        return response.status_code
    finally:
        await proxy.client.aclose()


def test_a_broken_connection_is_retried_elsewhere_without_marking_the_instance() -> None:
    async def run() -> None:
        async with server(_breaks) as broken, server(_answers) as good:
            route = Route("dep", InOrder(), [Endpoint("a", broken), Endpoint("b", good)])  # type: ignore[arg-type]
            assert await forward(route) == 200
            a, b = route.endpoints
            assert a.down_until == 0.0, "one broken connection took the instance out"
            assert (a.outstanding_requests, b.outstanding_requests) == (0, 0)

    asyncio.run(run())


def test_a_refused_connection_takes_the_instance_out_of_rotation() -> None:
    async def run() -> None:
        async with server(_answers) as good:
            route = Route(
                "dep", InOrder(), [Endpoint("a", refused_address()), Endpoint("b", good)]  # type: ignore[arg-type]
            )
            assert await forward(route) == 200
            assert route.endpoints[0].down_until > 0.0
            # while it is out, requests go straight to the other instance
            assert [e.instance_id for e in route.live(time.monotonic())] == ["b"]

    asyncio.run(run())


def test_instances_all_out_of_rotation_are_tried_rather_than_refusing() -> None:
    async def run() -> None:
        async with server(_answers) as good:
            route = Route("dep", InOrder(), [Endpoint("a", good)])  # type: ignore[arg-type]
            route.endpoints[0].down_until = float("inf")  # a stale mark
            assert await forward(route) == 200

    asyncio.run(run())


def test_every_instance_failing_is_a_503_in_the_openai_shape() -> None:
    async def run() -> None:
        route = Route("dep", InOrder(), [Endpoint("a", refused_address())])  # type: ignore[arg-type]
        with pytest.raises(OpenAIError) as caught:
            await forward(route)
        assert (caught.value.status, caught.value.code) == (503, "no_ready_instance")

    asyncio.run(run())


def test_the_gateway_drops_idle_connections_before_the_daemon_closes_them() -> None:
    assert KEEPALIVE_S < KEEP_ALIVE_S
