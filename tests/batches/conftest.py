"""Batch fixtures: the API over a real database (``tests.api``), and request lines."""

from __future__ import annotations

import json
from typing import Any

from tests.api.conftest import api, live_api

__all__ = ["api", "chat_line", "completion_line", "jsonl", "live_api"]


def chat_line(custom_id: str, content: str, model: str = "tiny", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}], **body},
    }


def completion_line(
    custom_id: str, prompt: Any, model: str = "tiny", **body: Any
) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": model, "prompt": prompt, **body},
    }


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()
