"""Runs a shard's requests through an offline engine (``deepflow.engine.llm.LLM``).

Every request is checked and tokenised exactly as the engine daemon would (``Preparer``): a
bad one becomes its error line at once, the daemon's error body as its response. The good
ones are all admitted to the engine before the first step, so the scheduler keeps its batch
full until the shard's last requests (``LLM.generate``'s loop, with each request handed to
the caller as it finishes instead of all at the end).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from deepflow.batches.results import Result, output_line
from deepflow.engine.daemon.chat import ChatReply
from deepflow.engine.daemon.completions import CompletionReply
from deepflow.engine.daemon.errors import OpenAIError, bad_request, error_body, validation_error
from deepflow.engine.daemon.prepare import Prepared, Preparer
from deepflow.engine.daemon.protocol import ChatCompletionRequest, CompletionRequest
from deepflow.engine.llm import LLM
from deepflow.engine.llm_engine import RequestOutput

CHAT = "/v1/chat/completions"


@dataclass(slots=True)
class _Running:
    """A request whose prompts the engine is running (a completion may have several)."""

    custom_id: str
    body: ChatCompletionRequest | CompletionRequest
    prompts: int
    outputs: dict[int, RequestOutput] = field(default_factory=dict)


class ShardRunner:
    """One engine, one model, one endpoint: ``run`` a shard's records through it."""

    def __init__(self, llm: LLM, model_name: str, endpoint: str) -> None:
        self.engine = llm.engine
        self.model_name = model_name
        self.chat = endpoint == CHAT
        self.preparer = Preparer(self.engine, [model_name])

    def run(
        self, records: Iterable[tuple[int, dict[str, Any]]], emit: Callable[[Result], None]
    ) -> None:
        """Run every record; ``emit`` each one's Result as it finishes (an exception from it
        stops the run and propagates)."""
        running: dict[int, _Running] = {}
        for index, record in records:
            try:
                body, prepared = self._prepare(record["body"])
            except OpenAIError as exc:
                emit(self._refused(index, record["custom_id"], exc))
                continue
            for j, prompt in enumerate(prepared.prompts):
                self.engine.add_request(f"{index}.{j}", prompt, prepared.params, stream=False)
            running[index] = _Running(record["custom_id"], body, len(prepared.prompts))
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if not out.finished:
                    continue
                index, j = map(int, out.request_id.split("."))
                request = running[index]
                request.outputs[j] = out
                if len(request.outputs) == request.prompts:
                    emit(self._answer(index, running.pop(index)))

    def _prepare(
        self, raw: dict[str, Any]
    ) -> tuple[ChatCompletionRequest | CompletionRequest, Prepared]:
        model = ChatCompletionRequest if self.chat else CompletionRequest
        try:
            body = model.model_validate(raw)
        except ValidationError as exc:
            raise validation_error(exc) from None
        if body.stream:
            raise bad_request("a batch's requests cannot stream", "stream", "unsupported")
        if isinstance(body, ChatCompletionRequest):
            return body, self.preparer.chat(body)
        return body, self.preparer.completion(body)

    def _refused(self, index: int, custom_id: str, exc: OpenAIError) -> Result:
        body = error_body(exc.status, exc.message, exc.param, exc.code)
        return Result(index, False, output_line(custom_id, exc.status, body))

    def _answer(self, index: int, request: _Running) -> Result:
        tokenizer, hexid = self.engine.tokenizer, uuid.uuid4().hex
        if isinstance(request.body, ChatCompletionRequest):
            reply = ChatReply(self.model_name, tokenizer, request.body, f"chatcmpl-{hexid}")
            body = reply.full(request.outputs[0])
        else:
            completion = CompletionReply(self.model_name, tokenizer, request.body, f"cmpl-{hexid}")
            body = completion.full(request.outputs)
        usage = body["usage"]
        line = output_line(request.custom_id, 200, body)
        return Result(index, True, line, usage["prompt_tokens"], usage["completion_tokens"])
