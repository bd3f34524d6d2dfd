"""Pieces of OpenAI's response bodies shared by completions and chat completions."""

from __future__ import annotations

import json
from typing import Any

from deepflow.engine.daemon.engine_server import Admitted
from deepflow.engine.daemon.errors import error_body
from deepflow.engine.llm_engine import CompletionOutput, RequestOutput
from deepflow.engine.outputs import Logprob
from deepflow.streaming import ClosingStreamingResponse

# JSON has no -inf; a token the model rules out gets vLLM's floor instead.
_MIN_LOGPROB = -9999.0
DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(status: int, message: str, code: str) -> str:
    return sse(error_body(status, message, None, code))


def usage(outputs: dict[int, RequestOutput]) -> dict[str, int]:
    """Prompt tokens once per prompt, completion tokens over every sample."""
    prompt = sum(len(out.prompt_token_ids) for out in outputs.values())
    completion = sum(len(c.token_ids) for out in outputs.values() for c in out.outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def clamp(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


def chosen_and_top(
    entry: dict[int, Logprob], token_id: int, top: int
) -> tuple[Logprob, list[tuple[int, Logprob]]]:
    """The sampled token's logprob and the ``top`` most likely tokens, by rank."""
    ranked = sorted(entry.items(), key=lambda item: item[1].rank)
    return entry[token_id], [(t, lp) for t, lp in ranked if lp.rank <= top][:top]


def token_text(tokenizer: Any, token_id: int, lp: Logprob) -> str:
    if lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([token_id], skip_special_tokens=False)


def new_logprobs(choice: CompletionOutput, sent: int) -> list[tuple[int, dict[int, Logprob]]]:
    """(token id, logprob entry) of the tokens after the first ``sent`` ones."""
    if choice.logprobs is None:
        return []
    return list(zip(choice.token_ids[sent:], choice.logprobs[sent:], strict=False))


class ChoiceState:
    """What a stream has already sent of one choice."""

    __slots__ = ("finished", "logprobs_sent", "started", "text_offset")

    def __init__(self) -> None:
        self.started = False
        self.finished = False
        self.logprobs_sent = 0
        self.text_offset = 0


class EngineStreamResponse(ClosingStreamingResponse):
    """An SSE response that closes its Admitted streams however it ends: finished, client
    gone mid-stream, or client gone before the body began."""

    def __init__(self, content: Any, admitted: Admitted) -> None:
        super().__init__(
            content,
            admitted.aclose,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
        self.admitted = admitted
