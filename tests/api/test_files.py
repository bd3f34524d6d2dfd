"""The Files API through the ``openai`` client, unchanged: upload, list, retrieve, content,
delete; a bad JSONL file is refused naming its line, and nothing of it is stored."""

from __future__ import annotations

import json

import openai
import pytest

from tests.api.conftest import Api

CHAT = {
    "messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
}


def _jsonl(*records: object) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _client(api: Api, live_api: str, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_api}/v1", api_key=key or api.key, max_retries=0)


def _stored(api: Api) -> list[str]:
    root = api.client.app.state.settings.home / "files"
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_upload_list_retrieve_content_delete(api: Api, live_api: str) -> None:
    client = _client(api, live_api)
    data = _jsonl(CHAT, CHAT)
    made = client.files.create(file=("train.jsonl", data), purpose="fine-tune")
    assert (made.object, made.filename, made.purpose, made.bytes) == (
        "file",
        "train.jsonl",
        "fine-tune",
        len(data),
    )
    assert made.status == "processed"
    batch = client.files.create(
        file=(
            "in.jsonl",
            _jsonl(
                {
                    "custom_id": "a",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": "m"},
                }
            ),
        ),
        purpose="batch",
    )
    assert [f.id for f in client.files.list()] == [batch.id, made.id]
    assert [f.id for f in client.files.list(purpose="fine-tune")] == [made.id]
    assert client.files.retrieve(made.id).bytes == len(data)
    assert client.files.content(made.id).read() == data
    # another tenant sees none of it
    other = _client(api, live_api, api.other_key)
    assert list(other.files.list()) == []
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        other.files.delete(made.id)
    deleted = client.files.delete(made.id)
    assert (deleted.id, deleted.deleted) == (made.id, True)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(made.id)
    assert _stored(api) == [batch.id]


@pytest.mark.parametrize(
    ("purpose", "lines", "expected"),
    [
        ("fine-tune", [CHAT, "not json"], "line 2: not JSON"),
        (
            "fine-tune",
            [CHAT, {"messages": [{"role": "bot", "content": "x"}]}],
            "line 2: messages[0].role 'bot' is not one of system, user, assistant, tool",
        ),
        (
            "fine-tune",
            [{"messages": [{"role": "user", "content": "hi"}]}],
            "line 1: no assistant message",
        ),
        ("fine-tune", [], "the file is empty"),
        (
            "batch",
            [{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "m"}}]
            * 2,
            "line 2: custom_id 'a' repeats line 1",
        ),
        (
            "batch",
            [{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m"}}],
            "line 1: 'url' '/v1/embeddings' is not one of",
        ),
    ],
)
def test_a_bad_file_is_refused_naming_its_line(
    api: Api, live_api: str, purpose: str, lines: list[object], expected: str
) -> None:
    data = b"".join(
        (line if isinstance(line, str) else json.dumps(line)).encode() + b"\n" for line in lines
    )
    with pytest.raises(openai.BadRequestError) as err:
        _client(api, live_api).files.create(file=("bad.jsonl", data), purpose=purpose)  # type: ignore[arg-type]
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "invalid_file" and body["param"] == "file"
    assert body["message"].startswith(f"bad.jsonl: {expected}"), body
    assert _stored(api) == []
    assert list(_client(api, live_api).files.list()) == []


def test_an_unknown_purpose_is_refused(api: Api, live_api: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        _client(api, live_api).files.create(
            file=("x.jsonl", _jsonl(CHAT)),
            purpose="batch_output",  # type: ignore[arg-type]
        )
    assert err.value.body["param"] == "purpose"  # type: ignore[index]
