"""Request validation in OpenAI's error shape, on the app in this process (ASGI)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from deepflow.engine import AsyncLLMEngine
from deepflow.engine.daemon import build_app

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "body", "param", "code", "says"),
    [
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0]",
            "unsupported",
            "only text content parts",
        ),
        (CHAT, {"messages": []}, "messages", "invalid_value", "at least 1"),
        (CHAT, {}, "messages", "missing_field", "required"),
        (CHAT, {"messages": USER, "stop": [""]}, "stop", "invalid_value", "empty"),
        (CHAT, {"messages": USER, "stop": 5}, "stop", "invalid_value", "expected str or"),
        (CHAT, {"messages": USER, "top_logprobs": 2}, "top_logprobs", "invalid_value", "logprobs"),
        (CHAT, {"messages": USER, "n": 1000}, "n", "invalid_value", "max_num_seqs"),
        (
            CHAT,
            {"messages": USER, "min_tokens": 5, "max_tokens": 2},
            "min_tokens",
            "invalid_value",
            "must not exceed",
        ),
        (CHAT, {"messages": USER, "tools": [{"type": "function"}]}, "tools", "unsupported", ""),
        ("/v1/completions", {"prompt": [[1, 2], "a"]}, "prompt", "invalid_value", "list[int]"),
        ("/v1/completions", {"prompt": []}, "prompt", "invalid_value", "empty"),
        (
            "/v1/completions",
            {"prompt": "a", "logit_bias": {"1": 2}},
            "logit_bias",
            "unsupported",
            "",
        ),
        (
            "/v1/completions",
            {"prompt": "a", "stop_token_ids": [10**6]},
            "stop_token_ids",
            "invalid_value",
            "vocabulary",
        ),
    ],
)
async def test_bad_requests_name_their_parameter(
    engine: AsyncLLMEngine, path: str, body: dict[str, Any], param: str, code: str, says: str
) -> None:
    app = build_app(engine, "tiny")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://d") as c:
        got = await c.post(path, json={"model": "tiny", **body})
    assert got.status_code == 400
    error = got.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert says in error["message"]


async def test_unknown_fields_are_ignored_and_bad_json_is_400(engine: AsyncLLMEngine) -> None:
    app = build_app(engine, "tiny")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://d") as c:
        ok = await c.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "a", "max_tokens": 2, "new_openai_field": {"x": 1}},
        )
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2
        broken = await c.post(
            "/v1/completions", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
        missing = await c.get("/v1/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
