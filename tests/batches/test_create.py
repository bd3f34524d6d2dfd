"""Creating a batch through the ``openai`` client, unchanged: a good file makes a batch (in
``validating`` until workers take it: these tests run no workers); a bad one is refused with
a 400 naming the offending line, and nothing is queued (no request, job or batch row)."""

from __future__ import annotations

import openai
import pytest
from sqlalchemy import func, select

from deepflow.store import (
    Batch,
    Job,
    ModelVersionState,
    Request,
    ensure_tenant,
    register_model_version,
    set_model_version_state,
)
from tests.api.conftest import Api
from tests.batches.conftest import chat_line, completion_line, jsonl

CHAT = "/v1/chat/completions"


@pytest.fixture
def client(api: Api, live_api: str) -> openai.OpenAI:
    with api.db.transaction() as s:
        tenant = ensure_tenant(s, "acme")
        ready = register_model_version(s, tenant.id, "tiny", "/models/tiny")
        set_model_version_state(s, ready.id, ModelVersionState.READY)
        register_model_version(s, tenant.id, "unready", "/models/unready")
    return openai.OpenAI(base_url=f"{live_api}/v1", api_key=api.key, max_retries=0)


def _rows(api: Api) -> tuple[int, ...]:
    """How many requests, jobs and batches are stored."""
    with api.db.transaction() as s:
        count = select(func.count())
        return tuple(s.execute(count.select_from(t)).scalar_one() for t in (Request, Job, Batch))


def test_a_good_file_makes_a_batch(client: openai.OpenAI, api: Api) -> None:
    lines = [chat_line(f"r{i}", f"question {i}", max_tokens=2) for i in range(5)]
    file = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id,
        endpoint=CHAT,
        completion_window="24h",
        metadata={"project": "demo"},
    )
    assert batch.object == "batch" and batch.id.startswith("batch_")
    assert (batch.status, batch.endpoint, batch.input_file_id) == ("validating", CHAT, file.id)
    assert (batch.model, batch.metadata) == ("tiny", {"project": "demo"})
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (5, 0)
    assert batch.expires_at == batch.created_at + 24 * 3600
    assert batch.output_file_id is None and batch.in_progress_at is None
    assert client.batches.retrieve(batch.id) == batch
    assert [b.id for b in client.batches.list()] == [batch.id]
    assert _rows(api) == (1, 1, 1)
    with api.db.transaction() as s:
        job = s.execute(select(Job)).scalar_one()
        assert (job.kind, job.spec["num_shards"], job.spec["input_file"]) == ("batch", 1, file.id)


def test_batches_list_newest_first_in_pages(client: openai.OpenAI) -> None:
    file = client.files.create(file=("in.jsonl", jsonl([chat_line("a", "x")])), purpose="batch")
    made = [
        client.batches.create(input_file_id=file.id, endpoint=CHAT, completion_window="24h").id
        for _ in range(3)
    ]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[:0:-1] and first.has_more
    assert [b.id for b in client.batches.list(limit=2, after=made[1]).data] == [made[0]]
    assert [b.id for b in client.batches.list()] == made[::-1]


@pytest.mark.parametrize(
    ("lines", "says"),
    [
        ([b'{"custom_id": "a", "method": "POST"'], "line 1: not JSON"),
        ([b"\n"], "the file is empty"),
        (
            [jsonl([chat_line("a", "x"), chat_line("b", "y"), chat_line("a", "z")])],
            "line 3: custom_id 'a' repeats line 1",
        ),
        (
            [jsonl([chat_line("a", "x"), {**chat_line("b", "y"), "url": "/v1/embeddings"}])],
            "line 2: 'url' '/v1/embeddings' is not one of",
        ),
    ],
)
def test_a_file_no_batch_could_run_is_refused_at_upload(
    client: openai.OpenAI, api: Api, lines: list[bytes], says: str
) -> None:
    """The Files API checks a batch file's lines as it is uploaded: such a file never gets
    an id a batch could name."""
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("bad.jsonl", b"".join(lines)), purpose="batch")
    assert says in info.value.message
    assert list(client.files.list()) == [] and _rows(api) == (0, 0, 0)


FINE_TUNE = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}


@pytest.mark.parametrize(
    ("records", "purpose", "endpoint", "param", "code", "says"),
    [
        (
            [chat_line("a", "x"), chat_line("b", "y"), completion_line("c", "z")],
            "batch",
            CHAT,
            "input_file_id",
            "invalid_file",
            "in.jsonl: line 3: 'url' '/v1/completions' does not match the batch's endpoint",
        ),
        (
            [chat_line("a", "x")],
            "batch",
            "/v1/completions",
            "input_file_id",
            "invalid_file",
            "line 1: 'url' '/v1/chat/completions' does not match the batch's endpoint "
            "'/v1/completions'",
        ),
        (
            [chat_line("a", "x", model="gpt-9"), chat_line("b", "y")],
            "batch",
            CHAT,
            "input_file_id",
            "model_not_found",
            "line 1: the model 'gpt-9' does not exist",
        ),
        (
            [chat_line("a", "x", model="unready")],
            "batch",
            CHAT,
            "input_file_id",
            "model_not_ready",
            "line 1: the model 'unready' has no ready version",
        ),
        ([FINE_TUNE], "fine-tune", CHAT, "input_file_id", "invalid_file_purpose", "'fine-tune'"),
        ([chat_line("a", "x")], "batch", "/v1/embeddings", "endpoint", "invalid_value", "one of"),
    ],
)
def test_a_bad_batch_is_refused_at_create_and_nothing_is_queued(
    client: openai.OpenAI,
    api: Api,
    records: list[dict[str, object]],
    purpose: str,
    endpoint: str,
    param: str,
    code: str,
    says: str,
) -> None:
    file = client.files.create(file=("in.jsonl", jsonl(records)), purpose=purpose)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(
            input_file_id=file.id,
            endpoint=endpoint,  # type: ignore[arg-type]
            completion_window="24h",
        )
    error = info.value.body
    assert isinstance(error, dict)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert says in error["message"], error["message"]
    assert _rows(api) == (0, 0, 0)


def test_unknown_file_and_window_are_refused(client: openai.OpenAI, api: Api) -> None:
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
    file = client.files.create(file=("in.jsonl", jsonl([chat_line("a", "x")])), purpose="batch")
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(
            input_file_id=file.id,
            endpoint=CHAT,
            completion_window="1h",  # type: ignore[arg-type]
        )
    assert "completion_window" in info.value.message
    assert _rows(api) == (0, 0, 0)
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_nope")


def test_a_page_after_an_unknown_batch_is_a_404_naming_a_batch(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.batches.list(after="batch_nope")
    assert info.value.code == "batch_not_found"
