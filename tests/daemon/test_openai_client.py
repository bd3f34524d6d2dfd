"""The official `openai` client, unchanged, against `deepflow serve` on the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from deepflow.engine import EngineConfig, LLMEngine, SamplingParams

from .conftest import Daemon

pytestmark = pytest.mark.timeout(120)
PROMPT = "Once upon a time"
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me a story."},
]


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def oracle(tiny_model: Path) -> LLMEngine:
    """The engine in this process: what the daemon must answer, greedy."""
    return LLMEngine(EngineConfig(model=str(tiny_model), num_kv_blocks=64))


def greedy(engine: LLMEngine, prompt: str | list[int], max_tokens: int) -> tuple[str, list[int]]:
    engine.add_request("oracle", prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out.outputs[0]
    return final.text, final.token_ids


def chat_prompt(engine: LLMEngine, messages: list[ChatCompletionMessageParam]) -> list[int]:
    text = engine.tokenizer.apply_chat_template(messages)
    return engine.tokenizer.encode(text, add_special_tokens=False)


def test_models_list_and_retrieve(client: openai.OpenAI, daemon: Daemon) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "deepflow"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    health = daemon.health().json()
    assert health["status"] == "ok" and health["model"] == "tiny"


def test_completion_matches_the_engine(client: openai.OpenAI, oracle: LLMEngine) -> None:
    text, ids = greedy(oracle, PROMPT, 12)
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.object == "text_completion"
    assert got.choices[0].text == text
    assert got.choices[0].finish_reason == ("length" if len(ids) == 12 else "stop")
    assert got.usage is not None
    assert got.usage.prompt_tokens == len(oracle.tokenizer.encode(PROMPT))
    assert got.usage.completion_tokens == len(ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + len(ids)


def test_completion_token_ids_several_prompts_and_n(client: openai.OpenAI) -> None:
    ids = [5, 17, 42, 99]
    got = client.completions.create(
        model="tiny", prompt=[ids, ids], n=2, max_tokens=4, seed=3, extra_body={"ignore_eos": True}
    )
    assert sorted(c.index for c in got.choices) == [0, 1, 2, 3]
    assert got.usage is not None
    assert got.usage.prompt_tokens == 2 * len(ids) and got.usage.completion_tokens == 16
    by_index = {c.index: c.text for c in got.choices}
    # The same seed gives prompt 0 and prompt 1 the same samples.
    assert (by_index[0], by_index[1]) == (by_index[2], by_index[3])


def test_completion_logprobs(client: openai.OpenAI) -> None:
    got = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=5,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    lp = got.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        # Keyed by text, two tokens decoding alike (partial UTF-8) share a key.
        assert 1 <= len(top) <= 3 and all(v <= 0 for v in top.values())
        assert chosen == pytest.approx(max(top.values()))  # greedy took the likeliest
    if "\ufffd" not in got.choices[0].text:
        assert "".join(lp.tokens) == got.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]


def test_chat_completion_uses_the_chat_template(client: openai.OpenAI, oracle: LLMEngine) -> None:
    prompt = chat_prompt(oracle, MESSAGES)
    text, ids = greedy(oracle, prompt, 10)
    got = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
    )
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == text
    assert got.usage is not None
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(prompt), len(ids))


def test_chat_stream_with_usage(client: openai.OpenAI, oracle: LLMEngine) -> None:
    text, ids = greedy(oracle, chat_prompt(oracle, MESSAGES), 10)
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_completion_stream_without_usage(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    chunks = list(
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)


def test_n2_samples_with_logprobs_count_in_usage(client: openai.OpenAI) -> None:
    got = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        n=2,
        max_tokens=6,
        temperature=1.0,
        seed=11,
        logprobs=True,
        top_logprobs=2,
    )
    assert sorted(c.index for c in got.choices) == [0, 1]
    assert got.choices[0].message.content != got.choices[1].message.content
    counts = [len(c.logprobs.content) for c in got.choices if c.logprobs and c.logprobs.content]
    assert len(counts) == 2 and got.usage is not None
    assert got.usage.completion_tokens == sum(counts)
    assert all(len(t.top_logprobs) == 2 for c in got.choices for t in c.logprobs.content)  # type: ignore[union-attr]
    again = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        n=2,
        max_tokens=6,
        temperature=1.0,
        seed=11,
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in got.choices]


def test_n2_stream(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            n=2,
            max_tokens=5,
            seed=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role]
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(roles) == [0, 1] and sorted(finished) == [0, 1]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 10


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(client: openai.OpenAI, stream: bool) -> None:
    args = {"model": "tiny", "prompt": PROMPT, "temperature": 0, "extra_body": {"ignore_eos": True}}
    text = client.completions.create(max_tokens=24, **args).choices[0].text  # type: ignore[call-overload]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"pick another prompt: no stop string in {text!r}"
    expected = text[: text.index(stop)]
    if stream:
        chunks = list(client.completions.create(max_tokens=24, stop=[stop], stream=True, **args))  # type: ignore[call-overload]
        got, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0]
    else:
        finish = client.completions.create(max_tokens=24, stop=[stop, "never"], **args).choices[0]  # type: ignore[call-overload]
        got = finish.text
    assert got == expected
    assert finish.finish_reason == "stop"


def test_errors_are_the_clients_exceptions(client: openai.OpenAI, daemon: Daemon) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="gpt-4", prompt="x")
    assert not_found.value.code == "model_not_found"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"temperature": -1}, "temperature"),
        ({"n": 0}, "n"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"prompt": [1] * 5000}, "prompt"),
        ({"prompt": [10**6]}, "prompt"),
        ({"echo": True}, "echo"),
        ({"logprobs": 50}, "logprobs"),
    ]
    for change, param in bad:
        args = {"model": "tiny", "prompt": "x", "max_tokens": 4, **change}
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(**args)
        assert error.value.status_code == 400
        assert error.value.param == param, (change, error.value.body)
        assert error.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as role:
        wizard: Any = [{"role": "wizard", "content": "hi"}]
        client.chat.completions.create(model="tiny", messages=wizard)
    assert role.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as streamed:  # a stream fails before it starts
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            temperature=-2,
            stream=True,
        )
    assert streamed.value.param == "temperature"
    daemon.wait_idle()
