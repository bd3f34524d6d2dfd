"""Batches on a whole platform of real processes (Prefect server and worker, Celery workers,
the API), through the ``openai`` client, unchanged, on a tiny random model: 1,000 lines
finish in ``custom_id`` order with ``request_counts`` moving while they run; bad lines go to
the error file while the good ones run; cancelling stops the shards' engines."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.types import Batch as OpenAIBatch
from sqlalchemy import select

from deepflow.batches.constants import LINES_PER_SHARD_ENV
from deepflow.store import Batch, Task
from deepflow.store.orm import TaskLog
from tests.batches.conftest import chat_line, completion_line, jsonl
from tests.integration.conftest import Platform, platform_up
from tests.replicas.conftest import MODEL, register_model

CHAT = "/v1/chat/completions"
ENDED = {"completed", "failed", "expired", "cancelled"}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    from deepflow.engine.testmodel import make_test_model

    folder = make_test_model(tmp_path_factory.mktemp("model") / MODEL, "llama", "tiny")
    with platform_up("embedded", tmp_path_factory.mktemp("batches"), workers=2) as platform:
        register_model(platform.db, folder)
        yield platform


@pytest.fixture(scope="module")
def client(platform: Platform) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{platform.url}/v1", api_key=platform.key, max_retries=0)


def _create(
    client: openai.OpenAI, lines: list[dict[str, Any]], endpoint: str = CHAT
) -> OpenAIBatch:
    file = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=file.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
    )


def _watch(client: openai.OpenAI, batch_id: str, timeout_s: float = 120) -> list[OpenAIBatch]:
    """Every state seen, polling until the batch has ended."""
    seen = [client.batches.retrieve(batch_id)]
    deadline = time.monotonic() + timeout_s
    while seen[-1].status not in ENDED:
        assert time.monotonic() < deadline, seen[-1]
        time.sleep(0.1)
        seen.append(client.batches.retrieve(batch_id))
    return seen


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_a_thousand_lines_finish_in_custom_id_order(client: openai.OpenAI) -> None:
    lines = [
        chat_line(f"q-{i:04d}", f"question {i}: {i} + {i} = ?", max_tokens=4, ignore_eos=True)
        for i in range(1000)
    ]
    batch = _create(client, lines)
    seen = _watch(client, batch.id)
    done = seen[-1]
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (1000, 1000)
    assert done.request_counts.failed == 0 and done.error_file_id is None
    # request_counts moved while the shard ran: counts strictly between none and all
    moving = {b.request_counts.completed for b in seen if b.request_counts is not None}
    assert any(0 < c < 1000 for c in moving), sorted(moving)
    statuses = list(dict.fromkeys(b.status for b in seen))
    assert statuses[-1] == "completed" and "in_progress" in statuses, statuses
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    out = _lines(client, done.output_file_id)
    assert [o["custom_id"] for o in out] == [f"q-{i:04d}" for i in range(1000)]
    assert all(o["error"] is None and o["response"]["status_code"] == 200 for o in out)
    body = out[0]["response"]["body"]
    assert (body["object"], body["model"]) == ("chat.completion", MODEL)
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 4
    assert done.usage is not None and done.usage.output_tokens == 4000
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"  # type: ignore[arg-type]


def test_bad_lines_go_to_the_error_file_while_the_good_ones_run(
    client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LINES_PER_SHARD_ENV, "8")  # the API runs in this process: 3 shards
    bad = {
        3: ("unknown model", {"model": "gpt-9"}, 404, "model_not_found"),
        9: ("too long", {"messages": [{"role": "user", "content": "word " * 5000}]}, 400, None),
        14: ("no messages", {"messages": []}, 400, "invalid_value"),
        20: ("streams", {"stream": True}, 400, "unsupported"),
    }
    lines = []
    for i in range(24):
        line = chat_line(f"line-{i}", f"say {i}", max_tokens=3, n=2 if i == 1 else 1)
        if i in bad:
            line["body"].update(bad[i][1])
        lines.append(line)
    done = _watch(client, _create(client, lines).id)[-1]
    assert done.status == "completed", done
    assert done.request_counts is not None
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (24, 20, 4)
    out = _lines(client, done.output_file_id)
    assert [o["custom_id"] for o in out] == [f"line-{i}" for i in range(24) if i not in bad]
    assert len(out[1]["response"]["body"]["choices"]) == 2  # n=2
    errors = _lines(client, done.error_file_id)
    assert [e["custom_id"] for e in errors] == [f"line-{i}" for i in sorted(bad)]
    for error, i in zip(errors, sorted(bad), strict=True):
        status, code = bad[i][2], bad[i][3]
        assert error["response"]["status_code"] == status, error
        detail = error["response"]["body"]["error"]
        assert detail["type"] == "invalid_request_error" and detail["message"], error
        if code is not None:
            assert detail["code"] == code, error
    assert "gpt-9" in errors[0]["response"]["body"]["error"]["message"]


def test_completions_run_every_prompt_of_a_line(client: openai.OpenAI) -> None:
    lines = [
        completion_line("one", "Once upon a time", max_tokens=3),
        completion_line("two", ["First,", "Second,"], max_tokens=2, ignore_eos=True),
    ]
    done = _watch(client, _create(client, lines, "/v1/completions").id)[-1]
    assert done.status == "completed", done
    out = _lines(client, done.output_file_id)
    assert [o["custom_id"] for o in out] == ["one", "two"]
    body = out[1]["response"]["body"]
    assert body["object"] == "text_completion" and len(body["choices"]) == 2
    assert body["usage"]["completion_tokens"] == 4


def test_cancelling_stops_it(client: openai.OpenAI, platform: Platform) -> None:
    quick = [chat_line(f"a{i}", "hi", max_tokens=1) for i in range(64)]
    slow = [chat_line(f"b{i}", "hi", max_tokens=400, ignore_eos=True) for i in range(1500)]
    batch = _create(client, quick + slow)
    deadline = time.monotonic() + 60
    while (b := client.batches.retrieve(batch.id)).request_counts.completed == 0:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, b
        time.sleep(0.1)
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at
    seen = _watch(client, batch.id, timeout_s=30)
    done = seen[-1]
    assert done.status == "cancelled" and done.cancelled_at, done
    assert done.output_file_id is None
    counts = done.request_counts
    assert counts is not None and 0 < counts.completed < counts.total
    time.sleep(2)
    assert client.batches.retrieve(batch.id).request_counts == counts  # nothing runs on
    with platform.db.transaction() as s:
        job_id = s.execute(select(Batch.job_id).where(Batch.id == batch.id)).scalar_one()
        shard = s.execute(
            select(Task).where(Task.job_id == job_id, Task.name == "run_shard_0")
        ).scalar_one()
        log = s.execute(select(TaskLog).where(TaskLog.task_id == shard.id)).scalars().all()
    assert platform.job(job_id)["state"] == "cancelled"
    assert [entry.outcome for entry in log] == ["stopped"]
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)
