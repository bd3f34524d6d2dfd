"""``POST /v1/completions``: text or token-id prompts (several at once), OpenAI's legacy
logprobs, streaming as ``text_completion`` chunks."""

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
from deepflow.engine.daemon.protocol import CompletionRequest
from deepflow.engine.llm_engine import CompletionOutput, RequestOutput
from deepflow.streaming import STREAMED

router = APIRouter()


@router.post("/v1/completions", responses=STREAMED)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    server: EngineServer = request.app.state.flowserve
    # In a thread: the event loop keeps streaming others while long prompts are tokenised.
    prepared = await asyncio.to_thread(server.preparer.completion, body)
    admitted = server.generate(prepared.prompts, prepared.params)
    reply = CompletionReply(server.model_name, server.tokenizer, body, f"cmpl-{uuid.uuid4().hex}")
    if body.stream:
        return EngineStreamResponse(reply.stream(admitted), admitted)
    try:
        last = await collect_or_abort(request, admitted)
    except ClientGone:
        return Response(status_code=499)
    except EngineDeadError as exc:
        raise engine_dead(exc) from exc
    return JSONResponse(reply.full(last))


class CompletionReply:
    """The response body (``full``) or stream of one request; batches build theirs with it."""

    def __init__(
        self, model_name: str, tokenizer: Any, body: CompletionRequest, reply_id: str
    ) -> None:
        self.tokenizer = tokenizer
        self.body = body
        self.head = {
            "id": reply_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
        }

    def full(self, last: dict[int, RequestOutput]) -> dict[str, Any]:
        choices = []
        for index in sorted(last):
            for choice in last[index].outputs:
                choices.append(self._choice(index, choice, choice.text, ChoiceState()))
        return {**self.head, "choices": choices, "usage": usage(last)}

    async def stream(self, admitted: Admitted) -> AsyncIterator[str]:
        states: dict[tuple[int, int], ChoiceState] = {}
        last: dict[int, RequestOutput] = {}
        try:
            async for index, out in admitted:
                last[index] = out
                for choice in out.outputs:
                    state = states.setdefault((index, choice.index), ChoiceState())
                    if state.finished:
                        continue
                    wants_logprobs = choice.logprobs is not None and (
                        len(choice.token_ids) > state.logprobs_sent
                    )
                    if choice.delta_text or choice.finished or wants_logprobs:
                        data = self._choice(index, choice, choice.delta_text, state)
                        yield sse({**self.head, "choices": [data]})
                    state.finished = choice.finished
        except EngineDeadError as exc:
            yield sse_error(500, f"the engine failed: {exc}", "engine_dead")
        else:
            if self.body.include_usage:
                yield sse({**self.head, "choices": [], "usage": usage(last)})
        yield DONE

    def _choice(
        self, index: int, choice: CompletionOutput, text: str, state: ChoiceState
    ) -> dict[str, Any]:
        logprobs = None
        if choice.logprobs is not None and self.body.logprobs is not None:
            logprobs = self._logprobs(choice, state)
        return {
            "index": index * self.body.n + choice.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": choice.finish_reason,
            "stop_reason": choice.stop_reason,
        }

    def _logprobs(self, choice: CompletionOutput, state: ChoiceState) -> dict[str, Any]:
        """OpenAI's legacy shape: parallel lists over the tokens new since the last chunk."""
        top = self.body.logprobs or 0
        tokens: list[str] = []
        token_logprobs: list[float] = []
        top_logprobs: list[dict[str, float]] = []
        offsets: list[int] = []
        for token_id, entry in new_logprobs(choice, state.logprobs_sent):
            chosen, best = chosen_and_top(entry, token_id, top)
            text = token_text(self.tokenizer, token_id, chosen)
            tokens.append(text)
            token_logprobs.append(clamp(chosen.logprob))
            top_logprobs.append(
                {token_text(self.tokenizer, t, lp): clamp(lp.logprob) for t, lp in best}
            )
            offsets.append(state.text_offset)
            state.text_offset += len(text)
        state.logprobs_sent = len(choice.token_ids)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }
