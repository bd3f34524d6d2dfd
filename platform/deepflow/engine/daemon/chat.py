"""``POST /v1/chat/completions``: the model's chat template, chat logprobs, streaming as
``chat.completion.chunk`` deltas (the first per choice carrying the role)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from deepflow.engine.async_engine import EngineDeadError
from deepflow.engine.daemon.engine_server import (
    Admitted,
    ClientGone,
    EngineServer,
    collect_or_abort,
    engine_dead,
)
from deepflow.engine.daemon.formatting import (
    DONE,
    ChoiceState,
    EngineStreamResponse,
    chosen_and_top,
    clamp,
    new_logprobs,
    sse,
    sse_error,
    token_text,
    usage,
)
from deepflow.engine.daemon.protocol import ChatCompletionRequest
from deepflow.engine.llm_engine import CompletionOutput, RequestOutput
from deepflow.streaming import STREAMED

router = APIRouter()


@router.post("/v1/chat/completions", responses=STREAMED)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    server: EngineServer = request.app.state.flowserve
    # In a thread: the event loop keeps streaming others while a long prompt is tokenised.
    prepared = await asyncio.to_thread(server.preparer.chat, body)
    admitted = server.generate(prepared.prompts, prepared.params)
    reply = ChatReply(server.model_name, server.tokenizer, body, f"chatcmpl-{uuid.uuid4().hex}")
    if body.stream:
        return EngineStreamResponse(reply.stream(admitted), admitted)
    try:
        last = await collect_or_abort(request, admitted)
    except ClientGone:
        return Response(status_code=499)
    except EngineDeadError as exc:
        raise engine_dead(exc) from exc
    return JSONResponse(reply.full(last[0]))


class ChatReply:
    """The response body (``full``) or stream of one request; batches build theirs with it."""

    def __init__(self, model_name: str, tokenizer: Any, body: ChatCompletionRequest, reply_id: str):
        self.tokenizer = tokenizer
        self.body = body
        self.head = {"id": reply_id, "created": int(time.time()), "model": model_name}

    def full(self, out: RequestOutput) -> dict[str, Any]:
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self._logprobs(c, ChoiceState()),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for c in out.outputs
        ]
        return {
            **self.head,
            "object": "chat.completion",
            "choices": choices,
            "usage": usage({0: out}),
        }

    def _chunk(self, choices: list[dict[str, Any]]) -> str:
        return sse({**self.head, "object": "chat.completion.chunk", "choices": choices})

    async def stream(self, admitted: Admitted) -> AsyncIterator[str]:
        for index in range(self.body.n):
            yield self._chunk([self._delta(index, {"role": "assistant", "content": ""})])
        states = [ChoiceState() for _ in range(self.body.n)]
        last: RequestOutput | None = None
        try:
            async for _, out in admitted:
                last = out
                for choice in out.outputs:
                    state = states[choice.index]
                    if state.finished:
                        continue
                    logprobs = self._logprobs(choice, state)
                    if choice.delta_text or choice.finished or (logprobs and logprobs["content"]):
                        delta = {"content": choice.delta_text} if choice.delta_text else {}
                        yield self._chunk([self._delta(choice.index, delta, choice, logprobs)])
                    state.finished = choice.finished
        except EngineDeadError as exc:
            yield sse_error(500, f"the engine failed: {exc}", "engine_dead")
        else:
            if self.body.include_usage and last is not None:
                yield sse(
                    {
                        **self.head,
                        "object": "chat.completion.chunk",
                        "choices": [],
                        "usage": usage({0: last}),
                    }
                )
        yield DONE

    @staticmethod
    def _delta(
        index: int,
        delta: dict[str, Any],
        choice: CompletionOutput | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        data = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}
        if choice is not None and choice.finish_reason is not None:
            data.update(finish_reason=choice.finish_reason, stop_reason=choice.stop_reason)
        return data

    def _logprobs(self, choice: CompletionOutput, state: ChoiceState) -> dict[str, Any] | None:
        """``{"content": [...]}`` over the tokens new since the last chunk."""
        if choice.logprobs is None or not self.body.logprobs:
            return None
        top = self.body.top_logprobs or 0
        content = []
        for token_id, entry in new_logprobs(choice, state.logprobs_sent):
            chosen, best = chosen_and_top(entry, token_id, top)
            content.append(
                {
                    **self._token(token_id, chosen.logprob, chosen),
                    "top_logprobs": [self._token(t, lp.logprob, lp) for t, lp in best],
                }
            )
        state.logprobs_sent = len(choice.token_ids)
        return {"content": content}

    def _token(self, token_id: int, logprob: float, lp: Any) -> dict[str, Any]:
        text = token_text(self.tokenizer, token_id, lp)
        return {"token": text, "logprob": clamp(logprob), "bytes": list(text.encode())}
