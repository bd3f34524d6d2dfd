"""LLMEngine behind asyncio: one background thread owns the engine and steps it; each request
streams its outputs to the event loop it came from.

The thread is the only one touching the engine's state: generate() validates and tokenises on
the caller's side (so a bad request raises there), then hands the request over through a
command list. A stream that is cancelled or closed early (client disconnect) aborts its request,
which frees its blocks at the start of the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from deepflow.engine.llm_engine import EngineStats, LLMEngine, RequestOutput
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.sequence import SequenceGroup

_Stream = tuple[asyncio.AbstractEventLoop, "_Collector"]


class EngineDeadError(RuntimeError):
    """The engine loop stopped (an exception in a step, or shutdown)."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._commands: list[Callable[[], object]] = []
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.error: BaseException | None = None

    @classmethod
    def from_model(cls, model_dir: str, **kwargs: Any) -> AsyncLLMEngine:
        return cls(LLMEngine.from_model(model_dir, **kwargs))

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs, ending with the one where ``finished`` is True."""
        request_id = uuid.uuid4().hex if request_id is None else request_id
        self._check_alive()
        group = self.engine.make_request(request_id, prompt, params, priority)
        queue = _Collector()
        with self._cond:
            if request_id in self._streams:
                raise ValueError(f"request {request_id!r} already exists")
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
        if not self._submit(lambda: self._admit(group)):
            with self._cond:
                self._streams.pop(request_id, None)
            self._check_alive()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            with self._cond:
                self._streams.pop(request_id, None)
            if not finished:
                self._submit(lambda: self.engine.abort(request_id))

    async def abort(self, request_id: str) -> None:
        """End a request from outside its stream; the stream gets a final 'abort' output."""
        self._submit(lambda: self._deliver_all([self.engine.abort(request_id)]))

    def get_stats(self) -> EngineStats:
        """A snapshot taken without stopping the loop (counters may be a step apart)."""
        return self.engine.get_stats()

    def shutdown(self) -> None:
        """Stop the loop thread; open streams fail with EngineDeadError."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._fail_all("the engine was shut down")

    async def __aenter__(self) -> AsyncLLMEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.shutdown)

    # ---- the loop thread ----------------------------------------------------------------
    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineDeadError("the engine loop died") from self.error
        if self._stopped:
            raise EngineDeadError("the engine was shut down")

    def _submit(self, command: Callable[[], object]) -> bool:
        """Queue a command for the loop thread (started on first use); False once it is dead."""
        with self._cond:
            if self._stopped or self.error is not None:
                return False
            self._commands.append(command)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="flowserve-engine", daemon=True
                )
                self._thread.start()
            self._cond.notify()
            return True

    def _admit(self, group: SequenceGroup) -> None:
        try:
            self.engine.admit(group)
        except ValueError as exc:
            self._deliver(group.request_id, exc)

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (
                        self._stopped or self._commands or self.engine.has_unfinished_requests()
                    ):
                        self._cond.wait()
                    if self._stopped:
                        return
                    commands, self._commands = self._commands, []
                for command in commands:
                    command()
                if self.engine.has_unfinished_requests():
                    self._deliver_all(self.engine.step())
        except BaseException as exc:  # every stream must hear of it
            self.error = exc
            self._fail_all(f"the engine loop died: {exc!r}")
            with contextlib.suppress(Exception):  # best effort: give the blocks back
                for request_id in list(self.engine.requests):
                    self.engine.abort(request_id)

    def _deliver_all(self, outputs: Iterable[RequestOutput | None]) -> None:
        for output in outputs:
            if output is not None:
                self._deliver(output.request_id, output)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._cond:
            stream = self._streams.get(request_id)
        if stream is None:
            return
        loop, queue = stream
        try:
            loop.call_soon_threadsafe(queue.put, item)
        except RuntimeError:  # the caller's loop is closed: nobody listens any more
            self.engine.abort(request_id)

    def _fail_all(self, message: str) -> None:
        with self._cond:
            request_ids = list(self._streams)
        for request_id in request_ids:
            error = EngineDeadError(message)
            error.__cause__ = self.error
            self._deliver(request_id, error)


class _Collector:
    """One request's undelivered output: a new step's output merges into the one its reader
    has not taken yet (the text and tokens each adds are joined), so a reader that falls
    behind the engine (a busy event loop, a slow client) takes one output covering every
    step since its last read, instead of a backlog of one per step that it must work
    through before it can notice its client has gone. Errors are not merged: they end the
    stream, so one replaces whatever was pending."""

    __slots__ = ("_pending", "_ready")

    def __init__(self) -> None:
        self._pending: RequestOutput | BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        pending = self._pending
        if isinstance(pending, RequestOutput) and isinstance(item, RequestOutput):
            item = _merged(pending, item)
        self._pending = item
        self._ready.set()

    async def get(self) -> RequestOutput | BaseException:
        await self._ready.wait()
        self._ready.clear()
        item, self._pending = self._pending, None
        assert item is not None
        return item


def _merged(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """``later`` (whose text, tokens and logprobs are cumulative) with the deltas of both."""
    before = {o.index: o for o in earlier.outputs}
    for out in later.outputs:
        prev = before.get(out.index)
        if prev is not None:
            out.delta_text = prev.delta_text + out.delta_text
            out.delta_token_ids = [*prev.delta_token_ids, *out.delta_token_ids]
    return later
