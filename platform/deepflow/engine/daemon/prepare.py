"""An OpenAI request body made into the engine's prompts and SamplingParams, checked against the
model and its context.

One way to do it for two callers: the daemon's routes, and batches (``deepflow.batches``), which
run the same ``/v1/chat/completions`` and ``/v1/completions`` bodies through an offline engine
and must accept, refuse and answer them exactly as the daemon would. Every refusal is an
OpenAIError: a 400 naming the parameter, or a 404 for a model the engine does not serve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jinja2

from deepflow.engine.daemon.errors import OpenAIError, bad_request
from deepflow.engine.daemon.protocol import ChatCompletionRequest, CompletionRequest
from deepflow.engine.llm_engine import LLMEngine
from deepflow.engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class Prepared:
    """What the engine runs for one request body: its prompts as token ids, one set of
    parameters for all of them."""

    prompts: list[list[int]]
    params: SamplingParams


class Preparer:
    """Checks and tokenises request bodies for one engine serving ``model_names``. Its methods
    block (tokenising a long prompt takes a while): the daemon calls them off its event loop."""

    def __init__(self, engine: LLMEngine, model_names: Sequence[str]) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_names = tuple(dict.fromkeys(model_names))
        """Every id a request may ask for: the model name, then its aliases."""
        self.max_model_len = engine.max_model_len
        self.max_prompt_bytes = self.max_model_len * self.tokenizer.longest_token_bytes()
        """Text longer than this (UTF-8) cannot fit the context whatever its tokens: refused
        before it is tokenised, which for megabytes takes seconds."""

    def chat(self, body: ChatCompletionRequest) -> Prepared:
        self.check_model(body.model)
        params = body.engine_params()
        messages = body.template_messages()
        self.check_prompt_size("".join(str(m.get("content") or "") for m in messages), "messages")
        try:
            text = self.tokenizer.apply_chat_template(messages)
        except (jinja2.TemplateError, ValueError) as exc:
            message = f"the chat template refused the messages: {exc}"
            raise bad_request(message, "messages") from None
        prompt = self.encode(text, "messages", add_special_tokens=False)
        self.validate([prompt], params, "messages")
        return Prepared([prompt], params)

    def completion(self, body: CompletionRequest) -> Prepared:
        self.check_model(body.model)
        params = body.engine_params()
        prompts = [self.encode(p, "prompt") if isinstance(p, str) else p for p in body.prompts()]
        self.validate(prompts, params, "prompt")
        return Prepared(prompts, params)

    def check_model(self, model: str) -> None:
        if model not in self.model_names:
            served = " or ".join(map(repr, self.model_names))
            raise OpenAIError(
                404,
                f"the model {model!r} does not exist; this server has {served}",
                param="model",
                code="model_not_found",
            )

    def check_prompt_size(self, text: str, param: str) -> None:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.max_prompt_bytes:
            raise bad_request(
                f"the prompt is {size} bytes: more than this model's context of "
                f"{self.max_model_len} tokens can hold",
                param,
                "context_length_exceeded",
            )

    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, after the size check."""
        self.check_prompt_size(text, param)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)  # type: ignore[no-any-return]

    def validate(self, prompts: list[list[int]], params: SamplingParams, prompt_param: str) -> None:
        """The engine's own checks (tokens in the vocabulary, the prompt fits, n fits), then
        OpenAI's: prompt plus max_tokens must fit the context."""
        for ids in prompts:
            try:
                self.engine.make_request("validate", ids, params)
            except ValueError as exc:
                message = str(exc)
                param = (
                    "n"
                    if message.startswith("n=")
                    else ("stop_token_ids" if "stop_token_ids" in message else prompt_param)
                )
                raise bad_request(message, param) from None
            if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
                raise bad_request(
                    f"this model's context holds {self.max_model_len} tokens; the request "
                    f"asks for {len(ids) + params.max_tokens} ({len(ids)} in the prompt, "
                    f"{params.max_tokens} to generate)",
                    "max_tokens",
                )
