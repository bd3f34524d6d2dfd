"""The engine as the routes see it: admission (429 over capacity, 503 draining), request
bodies made prompts (``prepare``: 400s and 404s), the streams of running requests with their
metrics, and the drain.

A request counts as *queued* from its admission until its first token. A new request is
refused with 429 when the queued ones would exceed ``max_waiting``: the count is kept here,
synchronously, so a burst cannot slip past it before the engine thread sees the requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

from starlette.requests import Request

from deepflow.engine.async_engine import AsyncLLMEngine, EngineDeadError
from deepflow.engine.daemon.errors import OpenAIError
from deepflow.engine.daemon.metrics import DaemonMetrics
from deepflow.engine.daemon.prepare import Preparer
from deepflow.engine.llm_engine import EngineStats, RequestOutput
from deepflow.engine.sampling_params import SamplingParams

T = TypeVar("T")
_DONE = object()


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


class EngineServer:
    def __init__(
        self,
        engine: AsyncLLMEngine,
        model_name: str,
        max_waiting: int,
        aliases: Sequence[str] = (),
    ) -> None:
        if max_waiting < 1:
            raise ValueError("max_waiting must be at least 1")
        self.engine = engine
        self.model_name = model_name
        """The id responses carry."""
        self.preparer = Preparer(engine.engine, (model_name, *aliases))
        """Request bodies made prompts and SamplingParams (the routes call it in a thread)."""
        self.model_names = self.preparer.model_names
        self.max_waiting = max_waiting
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len: int = engine.engine.max_model_len
        self.metrics = DaemonMetrics(model_name, self.stats)
        self.created = int(time.time())
        self.draining = False
        self.num_queued = 0
        self.active: set[str] = set()
        """Engine request ids whose streams are open."""
        self._drain_requested = asyncio.Event()

    def stats(self) -> EngineStats:
        return self.engine.get_stats()

    @property
    def engine_error(self) -> BaseException | None:
        return self.engine.error

    # ---- admission -------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        self.preparer.check_model(model)

    def check_admission(self, count: int) -> None:
        if self.draining:
            raise OpenAIError(
                503, "the server is draining and takes no new requests", code="draining"
            )
        if self.engine.error is not None:
            raise OpenAIError(503, "the engine stopped", code="engine_dead")
        if self.num_queued + count > self.max_waiting:
            raise OpenAIError(
                429,
                f"over capacity: {self.num_queued} requests are waiting "
                f"(at most {self.max_waiting}); retry later",
                code="over_capacity",
            )

    # ---- running requests -------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Admitted:
        """Admit the prompts (raises 429/503 right here) and stream them; see Admitted."""
        self.check_admission(len(prompts))
        return Admitted(self, prompts, params)

    async def _track(
        self,
        admitted: Admitted,
        index: int,
        request_id: str,
        ids: list[int],
        params: SamplingParams,
    ) -> AsyncIterator[RequestOutput]:
        started, finished, last = False, False, 0.0
        self.active.add(request_id)
        try:
            async with contextlib.aclosing(  # type: ignore[type-var]
                self.engine.generate(ids, params, request_id=request_id)
            ) as outputs:
                async for out in outputs:
                    now = time.monotonic()
                    if not started:
                        started = True
                        admitted.release(index)
                        self.metrics.first_token(out)
                    else:
                        self.metrics.inter_token(now - last)
                    last = now
                    if out.finished:
                        finished = True
                        self.metrics.finished(out)
                    yield out
        finally:
            admitted.release(index)
            if not finished:
                self.metrics.aborted()
            self.active.discard(request_id)

    # ---- draining ---------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Refuse new requests from now on; the serving process exits once drained."""
        self.draining = True
        self._drain_requested.set()

    async def wait_drain_requested(self) -> None:
        await self._drain_requested.wait()

    async def drain(self, grace_s: float) -> None:
        """Let open requests finish for up to ``grace_s``, then abort the rest."""
        self.begin_drain()
        deadline = time.monotonic() + grace_s
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self.active):
            await self.engine.abort(request_id)
        deadline = time.monotonic() + 5.0
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


class Admitted:
    """One HTTP request's prompts, admitted: iterate for (prompt index, output) pairs.

    Each prompt counts as queued until its first token. ``aclose()`` is safe in any state and
    must be called when the response ends however it ends: it aborts what still runs and
    gives back queue slots even if iteration never began (a client gone before the body).
    """

    def __init__(self, server: EngineServer, prompts: list[list[int]], params: SamplingParams):
        self._server = server
        self._queued = set(range(len(prompts)))
        server.num_queued += len(prompts)
        base = uuid.uuid4().hex
        self._stream = _merge(
            [server._track(self, i, f"{base}-{i}", ids, params) for i, ids in enumerate(prompts)]
        )

    def release(self, index: int) -> None:
        if index in self._queued:
            self._queued.discard(index)
            self._server.num_queued -= 1

    def __aiter__(self) -> Admitted:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        return await self._stream.__anext__()

    async def aclose(self) -> None:
        await self._stream.aclose()  # type: ignore[attr-defined]
        for index in list(self._queued):
            self.release(index)


async def _merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for item in stream:
                    queue.put_nowait((index, item))
        except Exception as exc:
            queue.put_nowait((index, exc))
        queue.put_nowait((index, _DONE))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            index, item = await queue.get()
            if item is _DONE:
                open_streams -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnected(request: Request) -> None:
    """Returns once the client has gone (call after the body was read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect_or_abort(request: Request, stream: Admitted) -> dict[int, RequestOutput]:
    """The last output of each prompt; raises ClientGone (after aborting) if the client left."""

    async def collect() -> dict[int, RequestOutput]:
        last: dict[int, RequestOutput] = {}
        async with contextlib.aclosing(stream):
            async for index, out in stream:
                last[index] = out
        return last

    work = asyncio.create_task(collect())
    watch = asyncio.create_task(until_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watch):
            task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
    if work.cancelled():
        raise ClientGone
    return work.result()


def engine_dead(exc: EngineDeadError) -> OpenAIError:
    return OpenAIError(500, f"the engine failed: {exc}", code="engine_dead")
