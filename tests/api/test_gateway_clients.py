"""Hostile and clumsy clients of the gateway, over real sockets against a streaming instance: a
slow reader, a client that walks away mid-stream, one that stalls mid-body, and malformed
requests. None of them holds up anyone else, none leaves the instance streaming to nobody,
and each gets an answer in OpenAI's shape where an answer is possible."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from deepflow.store import (
    ensure_tenant,
)
from tests.api.conftest import Api, ready_deployment, serve

CHUNKS = 400
PAD = "x" * 1000  # ~1 KB an event: the stream is larger than the sockets' buffers


class Instance:
    """A streaming instance that records how each of its streams ended."""

    def __init__(self) -> None:
        self.ended: dict[str, tuple[str, int, float]] = {}
        """Stream id -> (how it ended, chunks it sent, when)."""
        self.lock = threading.Lock()

    def app(self) -> Starlette:
        async def chat(request: Request) -> StreamingResponse:
            body = await request.json()
            sid = body["messages"][0]["content"]

            async def events() -> AsyncIterator[bytes]:
                sent, how = 0, "cut"
                try:
                    for i in range(CHUNKS):
                        chunk = {"choices": [{"index": 0, "delta": {"content": f"{i} {PAD}"}}]}
                        yield f"data: {json.dumps(chunk)}\n\n".encode()
                        sent += 1
                        # a walker's stream is paced (4 s in all), so that it is still being
                        # written when its client leaves: the sockets' buffers hold 400 KB
                        await asyncio.sleep(0.01 if sid.startswith("walker") else 0)
                    yield b"data: [DONE]\n\n"
                    how = "done"
                finally:
                    with self.lock:
                        self.ended[sid] = (how, sent, time.monotonic())

            return StreamingResponse(events(), media_type="text/event-stream")

        return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.fixture
def gateway(api: Api, live_api: str) -> Iterator[tuple[str, Instance]]:
    if not api.db.url.startswith("sqlite"):
        pytest.skip("the gateway's relay does not depend on the store: one flavour is enough")
    instance = Instance()
    with serve(instance.app()) as address:
        with api.db.transaction() as s:
            ready_deployment(s, ensure_tenant(s, "acme").id, "m", address)
        yield live_api, instance


def _body(sid: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": sid}], "stream": True}


def _full_stream(url: str, api: Api, sid: str) -> int:
    events = 0
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=_body(sid), headers=api.headers(), timeout=30
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events += 1
    return events


def test_a_slow_reader_holds_up_no_one_and_is_served_in_full(
    api: Api, gateway: tuple[str, Instance]
) -> None:
    url, instance = gateway
    got: list[int] = []

    def slow() -> None:
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=_body("slow"), headers=api.headers(),
            timeout=60,
        ) as r:  # fmt: skip
            events = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events += 1
                    if events < 40:
                        time.sleep(0.05)  # 2 s reading its first 40 events
            got.append(events)

    reader = threading.Thread(target=slow)
    reader.start()
    time.sleep(0.3)
    start = time.monotonic()
    fast = [_full_stream(url, api, f"fast{i}") for i in range(5)]
    took = time.monotonic() - start
    reader.join(60)
    assert fast == [CHUNKS + 1] * 5 and got == [CHUNKS + 1]
    assert took < 2.0, f"5 streams took {took:.1f} s behind a slow reader"
    assert instance.ended["slow"][0] == "done"


def test_a_client_walking_away_mid_stream_ends_the_instances_stream(
    api: Api, gateway: tuple[str, Instance]
) -> None:
    url, instance = gateway
    for k in range(5):
        sid = f"walker{k}"
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=_body(sid), headers=api.headers(),
            timeout=30,
        ) as r:  # fmt: skip
            lines = r.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            left = time.monotonic()
        # the response is closed unread: the gateway must hang up on the instance too
        deadline = time.monotonic() + 5
        while sid not in instance.ended:
            assert time.monotonic() < deadline, f"{sid}: the instance streams on to nobody"
            time.sleep(0.02)
        how, sent, when = instance.ended[sid]
        assert how == "cut" and sent < CHUNKS, (how, sent)
        assert when - left < 2.0


def test_a_stalled_or_malformed_request_harms_no_one(
    api: Api, gateway: tuple[str, Instance]
) -> None:
    url, instance = gateway
    host, port = url.removeprefix("http://").split(":")
    stalled = socket.create_connection((host, int(port)))
    stalled.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {api.key}\r\nContent-Length: 1000\r\n\r\n".encode()
        + b'{"model": "m", "mess'  # and then nothing: a body that never completes
    )
    garbage = socket.create_connection((host, int(port)))
    garbage.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
    try:
        start = time.monotonic()
        assert _full_stream(url, api, "after") == CHUNKS + 1
        assert time.monotonic() - start < 2.0
        answers = [
            httpx.post(f"{url}/v1/chat/completions", content=raw, headers=api.headers())
            for raw in (b'{"model": "m", "messages": [', b"[1, 2]", b"\xff\xfe", b"{}")
        ]
        for r in answers:
            assert r.status_code == 400, r.text
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    finally:
        stalled.close()
        garbage.close()
    assert set(instance.ended) == {"after"}  # nothing malformed reached the instance
